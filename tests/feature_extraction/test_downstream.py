"""The downstream stage: the tasks' image folders → task_features, keyed `<set>/<stem>`, cached by
the folders' content, with the extract section's detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

import tests.fixtures.images as fx
from contract.errors import ConfigError, InputDataError
from feature_extraction.downstream import image_id
from feature_extraction.schema import FEATURES_SCHEMA, unpack
from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.conftest import read_table
from tests.feature_extraction.test_extract_stage import TINY_D2


def _folder(root: Path, names: list[str], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(fx.jpeg(fx.synthetic_photo(seed + i, (100 + 20 * i, 80))))
    return root


def _config(tmp_path: Path, storage: dict, images: dict, extract: dict | None = None) -> Path:
    (tmp_path / "pairs.jsonl").write_text("")
    doc = {
        "storage": storage,
        "ingest": {"sources": [{"format": "table", "path": "pairs.jsonl"}]},
        "extract": extract or {"backend": "grid"},
        "downstream": {"images": images, "shard_images": 2},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_grid_features_of_every_set(tmp_path, storage_spec):
    _folder(
        tmp_path / "coco",
        [
            "val2014/COCO_val2014_000000000042.jpg",
            "val2014/COCO_val2014_000000000073.jpg",
            "train2014/COCO_train2014_000000000009.jpg",
        ],
    )
    _folder(tmp_path / "nlvr2", ["dev-850-0-img0.png", "dev-850-0-img1.png"], seed=10)
    cfg = load_config(_config(tmp_path, storage_spec, {"coco": "coco", "nlvr2": "nlvr2"}))
    result = run_stage("downstream", cfg)
    table = read_table(storage_for(cfg), result.manifest, "task_features")
    rows = [unpack(r) for r in table.to_pylist()]
    assert sorted(r.image_key for r in rows) == [
        "coco/COCO_train2014_000000000009",
        "coco/COCO_val2014_000000000042",
        "coco/COCO_val2014_000000000073",
        "nlvr2/dev-850-0-img0",
        "nlvr2/dev-850-0-img1",
    ]
    assert result.manifest.shards == 3  # coco-00000, coco-00001 (2 per shard), nlvr2-00000
    assert all(r.num_boxes == 36 for r in rows)
    # the features columns, plus each file's numeric id (null when its stem ends in none)
    assert table.schema.names == [*FEATURES_SCHEMA.names, "image_id"]
    assert table.schema.field("image_id").type == pa.int64()
    assert dict(zip(table.column("image_key").to_pylist(), table.column("image_id").to_pylist(), strict=True)) == {
        "coco/COCO_train2014_000000000009": 9,
        "coco/COCO_val2014_000000000042": 42,
        "coco/COCO_val2014_000000000073": 73,
        "nlvr2/dev-850-0-img0": None,
        "nlvr2/dev-850-0-img1": None,
    }
    assert run_stage("downstream", cfg).status == "cached"
    # an edited image is new content: a new key
    _folder(tmp_path / "nlvr2", ["dev-850-0-img1.png"], seed=99)
    assert (
        run_stage("downstream", load_config(_config(tmp_path, storage_spec, {"coco": "coco", "nlvr2": "nlvr2"}))).status
        == "ran"
    )


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_detectron2_backend_and_ground_truth_boxes(tmp_path, storage_spec):
    _folder(tmp_path / "coco", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"])
    instances = tmp_path / "instances.json"
    instances.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [
                    {"id": 7, "image_id": 42, "bbox": [10, 5, 30, 40]},
                    {"id": 3, "image_id": 42, "bbox": [50, 20, 20, 20]},
                ],
            }
        )
    )
    path = _config(tmp_path, storage_spec, {"coco": "coco"}, TINY_D2)
    doc = yaml.safe_load(path.read_text())
    doc["downstream"]["gt_boxes"] = {"coco": str(instances)}
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    result = run_stage("downstream", cfg)
    table = read_table(storage_for(cfg), result.manifest, "task_features")
    rows = {r["image_key"]: unpack(r) for r in table.to_pylist()}
    assert sorted(rows) == [
        "coco/COCO_val2014_000000000042",
        "coco/COCO_val2014_000000000042#gt",
        "coco/COCO_val2014_000000000073",
    ]
    det, gt = rows["coco/COCO_val2014_000000000042"], rows["coco/COCO_val2014_000000000042#gt"]
    assert det.backend == "detectron2" and det.soft_labels.shape[1] == 1601 and 10 <= det.num_boxes <= 40
    # the RoI head ran on exactly the annotated boxes, in ascending annotation id (3, then 7)
    assert np.allclose(gt.boxes, [[50, 20, 70, 40], [10, 5, 40, 45]], atol=0.05) and gt.num_boxes == 2
    assert gt.soft_labels.shape == (2, 1601) and (gt.conf == 1).all()
    # a ground-truth row carries the id of its image
    assert dict(zip(table.column("image_key").to_pylist(), table.column("image_id").to_pylist(), strict=True)) == {
        "coco/COCO_val2014_000000000042": 42,
        "coco/COCO_val2014_000000000042#gt": 42,
        "coco/COCO_val2014_000000000073": 73,
    }
    with pytest.raises(ConfigError, match=r"gt_boxes for \['flickr'\]: not image sets"):
        doc["downstream"]["gt_boxes"] = {"flickr": str(instances)}
        path.write_text(yaml.safe_dump(doc))
        load_config(path)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [("COCO_val2014_000000000042", 42), ("1000092795", 1000092795), ("dev-850-0-img0", None), ("img_7b", None)],
)
def test_image_id_is_the_number_a_stem_ends_in(stem, expected):
    assert image_id(stem) == expected


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_bad_folders_are_clear_errors(tmp_path, storage_spec):
    with pytest.raises(ConfigError, match=r"downstream.images.coco: .*folder not found"):
        load_config(_config(tmp_path, storage_spec, {"coco": "nowhere"}))
    _folder(tmp_path / "dup", ["a/x.jpg", "b/x.jpg"])
    with pytest.raises(InputDataError, match="two images would share the key 'dup/x'"):
        run_stage("downstream", load_config(_config(tmp_path, storage_spec, {"dup": "dup"})))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "y.jpg").write_bytes(b"not an image")
    with pytest.raises(InputDataError, match=r"y.jpg: not a readable image"):
        run_stage("downstream", load_config(_config(tmp_path, storage_spec, {"broken": "broken"})))


def test_a_new_set_reuses_the_features_of_unchanged_files(tmp_path):
    """Adding a set (the key changes) extracts only its images; a file whose content changed, or a
    ground-truth row whose boxes changed, is extracted again; the result equals a build from scratch."""
    _folder(tmp_path / "coco", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg", "c.jpg"])
    instances = tmp_path / "instances.json"
    boxes = [{"id": 7, "image_id": 42, "bbox": [10, 5, 30, 40]}, {"id": 8, "image_id": 73, "bbox": [1, 1, 9, 9]}]
    instances.write_text(json.dumps({"images": [], "annotations": boxes}))
    path = _config(tmp_path, {"uri": str(tmp_path / "data")}, {"coco": "coco"}, {"backend": "grid"})
    doc = yaml.safe_load(path.read_text())
    doc["downstream"]["gt_boxes"] = {"coco": str(instances)}
    path.write_text(yaml.safe_dump(doc))
    first = run_stage("downstream", load_config(path))
    assert first.manifest.counts["reuse"] == {"reused": 0, "extracted": 5}

    _folder(tmp_path / "nlvr2", ["dev-1-img0.png", "dev-1-img1.png"], seed=20)
    _folder(tmp_path / "coco", ["c.jpg"], seed=99)  # new content under an old name
    boxes[1]["bbox"] = [2, 2, 9, 9]  # image 73's annotation moved
    instances.write_text(json.dumps({"images": [], "annotations": boxes}))
    doc["downstream"]["images"]["nlvr2"] = "nlvr2"
    path.write_text(yaml.safe_dump(doc))
    second = run_stage("downstream", load_config(path))
    # reused: 42, 73 and 42#gt; extracted: c (changed), 73#gt (moved box), the two nlvr2 images
    assert second.manifest.counts["reuse"] == {"reused": 3, "extracted": 4}

    doc["storage"] = {"uri": str(tmp_path / "scratch")}
    path.write_text(yaml.safe_dump(doc))
    scratch = run_stage("downstream", load_config(path))
    assert (scratch.manifest.key, scratch.manifest.content_sha256) == (
        second.manifest.key,
        second.manifest.content_sha256,
    )
