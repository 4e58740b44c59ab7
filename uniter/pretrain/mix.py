"""What pretraining samples: each dataset's weight, and — before any training — how many times
an update schedule goes through each source (the epochs `uniter recipe` shows). Torch-free: the
recipe check and the trainer share it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from storage import Storage
from uniter.data import Corpus, build_texts, token_bucket_batches, write_ipc
from uniter.pretrain.config import PretrainConfig


def dataset_weights(cfg: PretrainConfig, sources: list[str], sizes: list[int]) -> list[float]:
    """Each dataset's sampling weight: its own (`dataset_weights`, default 1), or its family's split
    among the family's sources by training examples."""
    family = {s: f for f, members in cfg.dataset_families.items() for s in members}
    out = []
    for source, size in zip(sources, sizes, strict=True):
        if source not in family:
            out.append(cfg.dataset_weights.get(source, 1.0))
            continue
        f = family[source]
        total = sum(n for s, n in zip(sources, sizes, strict=True) if family.get(s) == f)
        out.append(cfg.dataset_weights.get(f, 1.0) * size / total if total else 0.0)
    return out


def source_epochs(
    cfg: PretrainConfig, storage: Storage, text_keys: list[str], text_sha: str, feature_keys: list[str], tokenizer
) -> list[dict]:
    """Per training source: examples, share of the updates, examples per update and epochs over
    `cfg.steps` updates — from the corpus the pretrain stage would train on (its texts, tokenized
    and cached as the stage caches them, and each image's regions from the features' `conf`
    column only), batched by the trainer's own token buckets. A source's examples per update is
    its mean micro-batch × accumulation × processes; its updates, steps × its share."""
    text_path = build_texts(storage, text_keys, text_sha, tokenizer, cfg.max_txt_len)
    with tempfile.TemporaryDirectory(prefix="uniter-recipe-") as tmp:
        paths = []
        for i, key in enumerate(feature_keys):
            with storage.open(key) as f:
                table = pq.read_table(f, columns=["image_key", "conf"])
            paths.append(Path(tmp) / f"regions-{i:05d}.arrow")
            write_ipc(table, paths[-1])
        corpus = Corpus(
            text_path, paths, cfg.conf_thresh, cfg.min_bb, cfg.max_bb, cfg.val_percent,
            tuple(cfg.train_splits), tuple(cfg.val_splits),
        )  # fmt: skip
        ids = [np.flatnonzero(corpus.is_train & (corpus.source == d)) for d in range(len(corpus.sources))]
        lengths = corpus.lengths
    weights = dataset_weights(cfg, corpus.sources, [len(x) for x in ids])
    total = sum(w for w, x in zip(weights, ids, strict=True) if len(x)) or 1.0
    rows = []
    for d, source in enumerate(corpus.sources):
        if not len(ids[d]):
            continue
        batches = token_bucket_batches(ids[d], lengths, cfg.batch_tokens, cfg.bucket_size, np.random.default_rng(0))
        per_update = len(ids[d]) / len(batches) * cfg.accumulation() * cfg.processes
        share = weights[d] / total
        rows.append(
            {
                "source": source,
                "examples": len(ids[d]),
                "mean_length": round(float(lengths[ids[d]].mean()), 1),
                "share": share,
                "examples_per_update": per_update,
                "epochs": cfg.steps * share * per_update / len(ids[d]),
            }
        )
    return rows
