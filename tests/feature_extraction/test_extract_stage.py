"""The extract stage end to end (ingest → crawl → dedup → extract) on generated images: both
backends, local and S3, exporters, parallel processes, and SIGKILL + resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from contract.artifact import Artifact
from contract.errors import ConfigError
from feature_extraction.export import read_lxmert_tsv, to_lxmert_tsv, to_npz
from feature_extraction.grid import grid_features
from feature_extraction.schema import unpack
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage, storage_for
from tests.conftest import read_table
from tests.fixtures import images as fx
from tests.fixtures.kill import kill_stage_when

ROOT = Path(__file__).resolve().parents[2]
TINY_D2 = {
    "backend": "detectron2",
    "weights": "random",
    "min_size": 96,
    "max_size": 144,
    "rpn_post_nms_topk": 40,
    "loader_workers": 0,
    "batch_size": 3,
}


def corpus(tmp_path: Path, storage: dict, n: int, extract: dict, name: str = "cfg.yaml", crawl_shard: int = 50) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        path = images / f"{i:04d}.jpg"
        if not path.exists():
            size = (120 + 40 * (i % 3), 90 + 30 * ((i + 1) % 3))  # mixed aspect ratios
            path.write_bytes(fx.jpeg(fx.synthetic_photo(900 + i, size)))
        rows.append({"image_path": f"images/{i:04d}.jpg", "caption": f"photo {i}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "storage": storage,
        "ingest": {"sources": [{"format": "table", "path": "pairs.jsonl"}]},
        "crawl": {"file_roots": [str(images)], "workers": 1, "shard_images": crawl_shard},
        "extract": extract,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def build_upstream(cfg) -> None:
    for stage in ("ingest", "crawl", "dedup"):
        run_stage(stage, cfg)


def features(cfg, result):
    return [unpack(r) for r in read_table(storage_for(cfg), result.manifest, "features").to_pylist()]


def test_grid_backend(tmp_path, storage_spec):
    cfg = load_config(
        corpus(tmp_path, storage_spec, 12, {"grid_rows": 4, "grid_cols": 5, "shard_images": 5, "loader_workers": 0})
    )
    build_upstream(cfg)
    result = run_stage("extract", cfg)
    rows = features(cfg, result)
    assert len(rows) == 12 and result.manifest.shards == 3
    for r in rows:
        assert r.backend == "grid" and r.num_boxes == 20 and r.features.shape == (20, 2048)
        assert r.soft_labels is None and r.object_ids is None
        assert r.boxes[0].tolist() == [0, 0, round(r.image_w / 5), round(r.image_h / 4)]
        assert r.boxes[-1][2] == r.image_w and r.boxes[-1][3] == r.image_h  # the grid tiles the image
        assert r.norm_bb.min() >= 0 and r.norm_bb.max() <= 1
    assert result.manifest.counts["mean_boxes"] == 20
    assert run_stage("extract", cfg).status == "cached"
    forced = run_stage("extract", cfg, force=True)
    assert forced.manifest.content_sha256 == result.manifest.content_sha256  # deterministic

    # objects by colour and the whole image before the same cells (a new key, same upstream)
    extract = {"grid_rows": 4, "grid_cols": 5, "grid_objects": 3, "shard_images": 5, "loader_workers": 0}
    with_objects = load_config(corpus(tmp_path, storage_spec, 12, extract, name="objects.yaml"))
    more = {r.image_key: r for r in features(with_objects, run_stage("extract", with_objects))}
    for r in rows:
        m = more[r.image_key]
        assert 21 <= m.num_boxes <= 24 and m.boxes[-21].tolist() == [0, 0, r.image_w, r.image_h]
        assert np.array_equal(m.boxes[-20:], r.boxes) and np.array_equal(m.features[-20:], r.features)
    assert sum(m.num_boxes - 21 for m in more.values()) >= 12  # the synthetic photos' blobs were found


def test_grid_features_are_a_function_of_the_pixels():
    a = fx.synthetic_photo(1, (200, 150))
    r1, r2 = grid_features("a", a), grid_features("a", a.copy())
    assert r1.features.tobytes() == r2.features.tobytes()
    other = grid_features("b", fx.synthetic_photo(2, (200, 150)))
    assert not np.array_equal(other.features, r1.features)
    tiny = grid_features("t", Image.new("RGB", (3, 2), (10, 20, 30)))  # smaller than the grid: still 36 cells
    assert tiny.num_boxes == 36 and np.isfinite(tiny.features.astype(np.float32)).all()


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_detectron2_backend_and_weight_files(tmp_path, storage_spec):
    cfg = load_config(corpus(tmp_path, storage_spec, 5, TINY_D2))
    build_upstream(cfg)
    result = run_stage("extract", cfg)
    rows = features(cfg, result)
    assert len(rows) == 5
    for r in rows:
        assert 10 <= r.num_boxes <= 40 and r.backend == "detectron2"
        assert np.all(np.diff(r.conf) <= 0)
        assert r.soft_labels.shape == (r.num_boxes, 1601)
        assert np.allclose(r.soft_labels.astype(np.float32).sum(1), 1, atol=2e-2)
        assert r.boxes[:, 2].max() <= r.image_w and r.boxes[:, 3].max() <= r.image_h

    # the same random weights saved as a Detectron2 pickle and loaded from the file: same features
    from feature_extraction.butd import build_butd, butd_config, init_random
    from feature_extraction.weights import save_detectron2_pickle

    weights = tmp_path / "butd_random.pkl"
    save_detectron2_pickle(init_random(build_butd(butd_config()), seed=0), weights)
    cfg2 = load_config(corpus(tmp_path, storage_spec, 5, {**TINY_D2, "weights": str(weights)}, "cfg2.yaml"))
    from_file = run_stage("extract", cfg2)
    assert from_file.manifest.key != result.manifest.key
    assert from_file.manifest.content_sha256 == result.manifest.content_sha256

    # exporters: UNITER npz and LXMERT TSV
    n = to_npz(rows, tmp_path / "npz")
    z = np.load(tmp_path / "npz" / f"{rows[0].image_key.replace(':', '_')}.npz")
    assert n == 5 and z["features"].shape == rows[0].features.shape and z["norm_bb"].shape == (rows[0].num_boxes, 6)
    assert z["soft_labels"].dtype == np.float16
    to_lxmert_tsv(rows, tmp_path / "feats.tsv")
    back = read_lxmert_tsv(tmp_path / "feats.tsv")
    assert [b["img_id"] for b in back] == [r.image_key for r in rows]
    assert np.allclose(back[0]["features"], rows[0].features.astype(np.float32))
    assert np.array_equal(back[0]["objects_id"], rows[0].object_ids)


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_parallel_processes_match_one_process(tmp_path, storage_spec):
    one = load_config(
        corpus(tmp_path, {"uri": str(tmp_path / "d1")}, 10, {"shard_images": 3, "loader_workers": 0}, "one.yaml")
    )
    two = load_config(
        corpus(
            tmp_path,
            {"uri": str(tmp_path / "d2")},
            10,
            {"shard_images": 3, "loader_workers": 0, "processes": 2},
            "two.yaml",
        )
    )
    build_upstream(one)
    build_upstream(two)
    a, b = run_stage("extract", one), run_stage("extract", two)
    assert a.manifest.key == b.manifest.key and a.manifest.content_sha256 == b.manifest.content_sha256
    runs = {
        r.run_id.rsplit("-", 1)[-1]
        for r in Artifact(storage_for(two), "extract", b.manifest.key).done_shards().values()
    }
    assert runs == {"0", "1"}  # both processes wrote shards


@pytest.mark.parametrize("storage_spec", ["local"], indirect=True)
def test_sigkill_then_resume(tmp_path, storage_spec):
    extract = {"shard_images": 4, "loader_workers": 1, "grid_rows": 12, "grid_cols": 12}
    cfg_path = corpus(tmp_path, storage_spec, 120, extract)
    cfg = load_config(cfg_path)
    build_upstream(cfg)
    storage = storage_for(cfg)
    art = Artifact(storage, "extract", Planner(cfg, storage).plan("extract").key)
    kill_stage_when("extract", cfg_path, art, lambda done: len(done) >= 3, 180)
    assert art.manifest() is None
    before = {n: r.run_id for n, r in art.done_shards().items()}
    resumed = run_stage("extract", cfg)
    assert resumed.resumed_shards == len(before) < 30
    assert {n: r.run_id for n, r in art.done_shards().items() if n in before} == before

    clean = load_config(corpus(tmp_path, {"uri": str(tmp_path / "clean")}, 120, extract, "clean.yaml"))
    build_upstream(clean)
    assert run_stage("extract", clean).manifest.content_sha256 == resumed.manifest.content_sha256


def test_loader_worker_and_threads_give_the_same_features(tmp_path, monkeypatch):
    """Small jobs decode in threads of the stage's process, large ones in loader workers: the
    artifact must not depend on which (the threshold only moves the cost)."""
    from feature_extraction import featurize

    extract = {"shard_images": 5, "loader_workers": 1, "grid_rows": 3, "grid_cols": 3}
    threaded = load_config(corpus(tmp_path, {"uri": str(tmp_path / "threads")}, 12, extract, "threads.yaml"))
    build_upstream(threaded)
    by_threads = run_stage("extract", threaded).manifest
    monkeypatch.setattr(featurize, "ITEMS_PER_WORKER", {"grid": 1, "detectron2": 1})
    worker = load_config(corpus(tmp_path, {"uri": str(tmp_path / "worker")}, 12, extract, "worker.yaml"))
    build_upstream(worker)
    by_worker = run_stage("extract", worker).manifest
    assert by_worker.counts["images"] == by_threads.counts["images"] == 12
    assert by_worker.content_sha256 == by_threads.content_sha256


def test_detector_without_weights_is_a_config_error(tmp_path):
    path = corpus(tmp_path, {"uri": str(tmp_path / "d")}, 1, {"backend": "detectron2"})
    with pytest.raises(ConfigError, match="backend 'detectron2' needs weights"):
        load_config(path)


@pytest.mark.parametrize(
    "storage_spec, extract",
    [
        ("local", {"shard_images": 3, "loader_workers": 0}),
        ("s3", {"shard_images": 3, "loader_workers": 0}),
        ("local", {**TINY_D2, "shard_images": 3}),
        ("local", {"shard_images": 3, "loader_workers": 0, "processes": 2}),
    ],
    indirect=["storage_spec"],
    ids=["grid-local", "grid-s3", "detectron2", "grid-2-processes"],
)
def test_rebuild_extracts_only_new_images_and_equals_a_build_from_scratch(tmp_path, storage_spec, extract):
    build_upstream(load_config(corpus(tmp_path, storage_spec, 8, extract, "old.yaml", crawl_shard=3)))
    first = run_stage("extract", load_config(tmp_path / "old.yaml"))
    assert first.manifest.counts["reuse"] == {"reused": 0, "extracted": 8}

    new = load_config(corpus(tmp_path, storage_spec, 11, extract, "new.yaml", crawl_shard=3))  # 3 more photos
    build_upstream(new)
    rebuilt = run_stage("extract", new)
    assert rebuilt.manifest.key != first.manifest.key
    assert rebuilt.manifest.counts["reuse"] == {"reused": 8, "extracted": 3}
    # Crawl shards of 3 in input order, extract shards within them: the shards of photos 0-2 and
    # 3-5 hold the same images as before, and are linked (copied by the storage).
    assert rebuilt.manifest.counts["shards_linked"] == 2

    scratch = load_config(corpus(tmp_path, {"uri": str(tmp_path / "scratch")}, 11, extract, "scratch.yaml", 3))
    build_upstream(scratch)
    for stage in ("crawl", "dedup", "extract"):
        a, b = run_stage(stage, scratch).manifest, run_stage(stage, new).manifest
        assert (a.key, a.content_sha256) == (b.key, b.content_sha256), stage


def test_new_crawl_image_options_mean_new_features(tmp_path):
    """Features are of the crawl's stored JPEG: a smaller `crawl.max_side` keeps each image's sha256
    (of the bytes as downloaded) but changes the pixels, so nothing is reused."""
    path = corpus(tmp_path, {"uri": str(tmp_path / "data")}, 6, {"shard_images": 3, "loader_workers": 0})
    cfg = load_config(path)
    build_upstream(cfg)
    assert run_stage("extract", cfg).manifest.counts["reuse"] == {"reused": 0, "extracted": 6}
    doc = yaml.safe_load(path.read_text())
    doc["crawl"]["max_side"] = 64
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(doc))
    small = load_config(tmp_path / "small.yaml")
    build_upstream(small)
    assert run_stage("extract", small).manifest.counts["reuse"] == {"reused": 0, "extracted": 6}
