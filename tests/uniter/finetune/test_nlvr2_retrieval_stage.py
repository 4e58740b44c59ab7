"""NLVR2 and image-text retrieval through the finetune stage, then re-scored by evaluate."""

from __future__ import annotations

import json

import pytest
import yaml

import tests.fixtures.images as fx
from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.uniter.finetune.test_finetune_stage import metrics, setup, upstream


def nlvr2_files(tmp_path):
    folder = tmp_path / "nlvr2_images"
    folder.mkdir(exist_ok=True)
    lines = {"train": [], "dev": []}
    for split, sets in (("train", range(3)), ("dev", range(3, 5))):
        for s in sets:
            for pair in range(2):
                for side in (0, 1):
                    f = folder / f"{split}-{s}-{pair}-img{side}.png"
                    f.write_bytes(fx.jpeg(fx.synthetic_photo(700 + 10 * s + 2 * pair + side, (100, 80))))
                for sent in range(2):
                    label = (s + pair + sent) % 2 == 0
                    lines[split].append(
                        json.dumps(
                            {
                                "identifier": f"{split}-{s}-{pair}-{sent}",
                                "label": str(label),
                                "sentence": ["the left image has more things", "both are red"][sent],
                                "left_url": "http://x",
                                "right_url": "http://y",
                                "writer": "1",
                            }
                        )
                    )
    paths = {}
    for split, rows in lines.items():
        paths[split] = tmp_path / f"{split}.json"
        paths[split].write_text("\n".join(rows) + "\n")
    return folder, paths


def karpathy_file(tmp_path):
    folder = tmp_path / "f30k"
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(10):
        name = f"{1000 + i}.jpg"
        (folder / name).write_bytes(fx.jpeg(fx.synthetic_photo(800 + i, (110, 90))))
        split = "train" if i < 6 else "test"
        images.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentids": [2 * i, 2 * i + 1],
                "sentences": [
                    {"raw": f"a photo of a thing number {i}", "tokens": [], "imgid": i, "sentid": 2 * i},
                    {"raw": f"the table near a window {i}", "tokens": [], "imgid": i, "sentid": 2 * i + 1},
                ],
            }
        )
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return folder, path


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_nlvr2_and_retrieval(tmp_path, storage_spec, vocab):
    path = setup(tmp_path, storage_spec, vocab)
    doc = yaml.safe_load(path.read_text())
    n_folder, n_files = nlvr2_files(tmp_path)
    k_folder, k_file = karpathy_file(tmp_path)
    doc["downstream"]["images"].update(nlvr2=str(n_folder), flickr30k=str(k_folder))
    del doc["finetune"]["vqa"]
    doc["finetune"]["nlvr2"] = {
        "train": str(n_files["train"]),
        "dev": str(n_files["dev"]),
        "steps": 12,
        "warmup": 2,
        "lr": 5e-4,
        "batch_tokens": 1024,
        "validate_every": 12,
    }
    doc["finetune"]["retrieval"] = {
        "karpathy": str(k_file),
        "steps": 6,
        "warmup": 1,
        "lr": 5e-4,
        "queries": 2,
        "accumulation": 1,
        "negative_pool": 4,
        "hard_negatives": 2,
        "validate_every": 6,
        "score_batch": 16,
    }
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    upstream(cfg)
    result = run_stage("finetune", cfg)
    counts = result.manifest.counts
    assert counts["nlvr2"]["steps"] == 12 and set(counts["nlvr2"]["val"]) == {"nlvr2_accuracy", "nlvr2_consistency"}
    r = counts["retrieval"]["val"]
    assert counts["retrieval"]["steps"] == 6 and {"retrieval_ir_r1", "retrieval_tr_r10", "retrieval_r_mean"} <= set(r)
    assert (
        r["retrieval_ir_r10"] == 100.0 and r["retrieval_tr_r10"] == 100.0
    )  # 4 test images: everything is in the top 10
    rows = metrics(cfg, result)
    assert [s for s, n, _ in rows if n == "loss/retrieval"] == list(range(6))
    storage = storage_for(cfg)
    art = Artifact(storage, "finetune", result.manifest.key)
    preds = storage.read_bytes(art.file_key("files/nlvr2/predictions.csv")).decode().splitlines()
    assert len(preds) == 8 and all(p.split(",")[1] in ("True", "False") for p in preds)

    ev = run_stage("evaluate", cfg).manifest.counts["scores"]["this config"]
    assert ev["nlvr2"] == pytest.approx(counts["nlvr2"]["val"]["nlvr2_accuracy"], abs=1e-3)
    assert ev["ir_r1"] == pytest.approx(r["retrieval_ir_r1"], abs=1e-3) and ev["tr_r1"] == pytest.approx(
        r["retrieval_tr_r1"], abs=1e-3
    )
    assert ev["meta_sum"] == pytest.approx(ev["nlvr2"] + ev["ir_r1"] + ev["tr_r1"], abs=1e-3)


def refcoco_files(tmp_path):
    import pickle

    refs, anns, images = [], [], []
    for image_id in range(1, 13):
        images.append({"id": image_id, "width": 120, "height": 90, "file_name": f"COCO_train2014_{image_id:012d}.jpg"})
        col, row = image_id % 6, (image_id * 5) % 6
        anns.append(
            {"id": 100 + image_id, "image_id": image_id, "bbox": [20 * col, 15 * row, 20, 15], "category_id": 1}
        )
        for d in (1, 2):  # distractors: other objects of the same image
            anns.append(
                {"id": 1000 * d + image_id, "image_id": image_id, "bbox": [5 * d, 40, 30, 20 + d], "category_id": 1}
            )
        refs.append(
            {
                "ref_id": image_id,
                "ann_id": 100 + image_id,
                "image_id": image_id,
                "category_id": 1,
                "split": "train" if image_id <= 8 else "val",
                "sent_ids": [image_id],
                "sentences": [{"sent_id": image_id, "sent": f"the thing at {col} {row}", "raw": "x", "tokens": []}],
            }
        )
    r, i = tmp_path / "refs(unc).p", tmp_path / "instances.json"
    r.write_bytes(pickle.dumps(refs, protocol=2))
    i.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return r, i


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
@pytest.mark.parametrize("gt", [True, False], ids=["gt-boxes", "detected-only"])
def test_refcoco(tmp_path, storage_spec, vocab, gt):
    path = setup(tmp_path, storage_spec, vocab)
    doc = yaml.safe_load(path.read_text())
    refs, instances = refcoco_files(tmp_path)
    if gt:
        doc["downstream"]["gt_boxes"] = {"coco": str(instances)}
    del doc["finetune"]["vqa"]
    doc["finetune"]["refcoco"] = {
        "refs": str(refs),
        "instances": str(instances),
        "steps": 10,
        "warmup": 1,
        "lr": 5e-4,
        "batch_tokens": 1024,
        "validate_every": 10,
    }
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    upstream(cfg)
    result = run_stage("finetune", cfg)
    counts = result.manifest.counts["refcoco"]
    assert counts["steps"] == 10 and counts["skipped"] == 0  # every box is a grid cell: a hit exists for each
    assert 0 <= counts["val"]["refcoco_accuracy"] <= 100
    assert ("refcoco_accuracy_gt" in counts["val"]) == gt
    art = Artifact(storage_for(cfg), "finetune", result.manifest.key)
    preds = json.loads(storage_for(cfg).read_bytes(art.file_key("files/refcoco/predictions.json")))
    det = [p for p in preds if p["setting"] == "det"]
    assert [p["sent_id"] for p in det] == [9, 10, 11, 12] and all(len(p["box"]) == 4 for p in preds)
    if gt:
        # one region per annotation (the referred object and its 2 distractors), ascending annotation id
        down = run_stage("downstream", cfg)
        from feature_extraction.schema import unpack
        from tests.conftest import read_table

        rows = {
            r["image_key"]: unpack(r) for r in read_table(storage_for(cfg), down.manifest, "task_features").to_pylist()
        }
        g = rows["coco/COCO_train2014_000000000003#gt"]
        assert g.num_boxes == 3 and g.boxes[0].tolist() == [60.0, 45.0, 80.0, 60.0]  # annotation 103: cell (3, 3)
        gt_preds = [p for p in preds if p["setting"] == "gt"]
        assert [p["sent_id"] for p in gt_preds] == [9, 10, 11, 12]
        # a ground-truth prediction is one of the image's annotated boxes
        assert all(
            p["box"]
            in (
                [20 * (p["sent_id"] % 6), 15 * ((p["sent_id"] * 5) % 6), 20.0, 15.0],
                [5.0, 40.0, 30.0, 21.0],
                [10.0, 40.0, 30.0, 22.0],
            )
            for p in gt_preds
        ), gt_preds
    ev = run_stage("evaluate", cfg).manifest.counts["scores"]["this config"]
    assert ev["refcoco+"] == pytest.approx(counts["val"]["refcoco_accuracy"], abs=1e-3)
