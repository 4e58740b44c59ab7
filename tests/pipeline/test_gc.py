"""`uniter gc` removes what no current key needs, and never a file a kept artifact points to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.gc import plan_gc
from pipeline.runner import Planner, run_stage, storage_for
from tests.conftest import read_table
from tests.fixtures import images as fx

UNITER = str(Path(sys.executable).parent / "uniter")
STAGES = ("ingest", "crawl", "dedup", "extract")


def _config(tmp_path: Path, name: str, storage: dict, photos: range) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for i in photos:
        path = images / f"{i}.jpg"
        if not path.exists():
            path.write_bytes(fx.jpeg(fx.synthetic_photo(300 + i, (96, 64))))
        rows.append({"image_path": str(path), "caption": f"photo {i}"})
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "storage": storage,
        "ingest": {"sources": [{"format": "table", "path": f"{name}.jsonl"}]},
        "crawl": {"file_roots": [str(images)], "workers": 1, "shard_images": 3},
        "extract": {"shard_images": 3, "loader_workers": 0, "grid_rows": 2, "grid_cols": 2},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / f"{name}.yaml"


def _build(path: Path) -> dict:
    cfg = load_config(path)
    return {s: run_stage(s, cfg).manifest for s in STAGES}


def _keys(built: dict) -> set[tuple[str, str]]:
    return {(s, m.key) for s, m in built.items()}


# S3 only: its listing and deletes are the harder case; tests/storage covers both backends
@pytest.mark.parametrize("storage_spec", ["s3"], indirect=True)
def test_gc_keeps_current_keys_and_what_they_point_to(tmp_path, storage_spec):
    a_path = _config(tmp_path, "a", storage_spec, range(6))
    b_path = _config(tmp_path, "b", storage_spec, range(8))  # a's photos and two more: shares a's items
    a, b = _build(a_path), _build(b_path)
    # (local files are re-checked with a stat, so a's six count as revalidated, not reused)
    assert b["crawl"].counts["reuse"]["revalidated"] == 6 and b["crawl"].counts["reuse"]["fetched"] == 2
    assert b["extract"].counts["reuse"] == {"reused": 6, "extracted": 2}
    storage = storage_for(load_config(a_path))

    # Both configs current: nothing goes, even with --keep 0.
    both = subprocess.run(
        [UNITER, "gc", "-c", str(a_path), "-c", str(b_path), "--keep", "0", "--json"], capture_output=True, text=True
    )
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["removed"] == []

    # Only b current: a's artifacts go (a dry run first says so and removes nothing).
    dry = subprocess.run(
        [UNITER, "gc", "-c", str(b_path), "--keep", "0", "--dry-run", "--json"], capture_output=True, text=True
    )
    assert {(r["stage"], r["key"]) for r in json.loads(dry.stdout)["removed"]} == _keys(a)
    assert all(Artifact(storage, s, m.key).manifest() is not None for s, m in a.items())
    gone = subprocess.run([UNITER, "gc", "-c", str(b_path), "--keep", "0", "--json"], capture_output=True, text=True)
    assert {(r["stage"], r["key"]) for r in json.loads(gone.stdout)["removed"]} == _keys(a)
    assert all(Artifact(storage, s, m.key).manifest() is None for s, m in a.items())
    assert not [p for p in storage.list("index") if any(f"/{m.key}" in p for m in a.values())]

    # b is whole: every file its manifests name, every crawl file its corpus points to.
    for stage, m in b.items():
        art = Artifact(storage, stage, m.key)
        for files in m.tables.values():
            assert all(storage.exists(art.file_key(f.path)) for f in files)
    crawl_files = set(read_table(storage, b["dedup"], "corpus_images").column("crawl_file").to_pylist())
    assert crawl_files and all(storage.exists(k) for k in crawl_files)

    # Building a again takes its items from b's artifacts: nothing fetched or extracted twice.
    again = _build(a_path)
    assert again["crawl"].content_sha256 == a["crawl"].content_sha256
    assert again["crawl"].counts["reuse"] == {**again["crawl"].counts["reuse"], "revalidated": 6, "fetched": 0}
    assert again["extract"].counts["reuse"] == {"reused": 6, "extracted": 0}
    assert again["extract"].content_sha256 == a["extract"].content_sha256


def test_gc_follows_what_a_kept_artifact_points_to(tmp_path):
    """Only dedup's key is current: the crawl and ingest artifacts it was built from stay (its
    corpus_images rows address the crawl's files), the unrelated extract goes."""
    path = _config(tmp_path, "a", {"uri": str(tmp_path / "data")}, range(4))
    built = _build(path)
    storage = storage_for(load_config(path))
    plan = plan_gc(storage, {"dedup": {built["dedup"].key}}, keep=0)
    assert {(f.stage, f.key) for f in plan.kept} == _keys(built) - {("extract", built["extract"].key)}
    assert [(f.stage, f.key) for f in plan.removed] == [("extract", built["extract"].key)]


def test_gc_keeps_an_unfinished_artifact_that_is_being_built(tmp_path):
    from contract.lease import Lease

    path = _config(tmp_path, "a", {"uri": str(tmp_path / "data")}, range(4))
    cfg = load_config(path)
    run_stage("ingest", cfg)
    storage = storage_for(cfg)
    key = Planner(cfg, storage).plan("crawl").key
    storage.put(f"artifacts/crawl/{key}/_shards/images-00000.json", b"{}")  # a shard of a run in progress
    lease = Lease(storage, "crawl", key, ttl=30)
    lease.acquire(wait=False)
    try:
        assert ("crawl", key) in {(f.stage, f.key) for f in plan_gc(storage, {}, keep=0).kept}
    finally:
        lease.release()
    assert ("crawl", key) in {(f.stage, f.key) for f in plan_gc(storage, {}, keep=0).removed}
