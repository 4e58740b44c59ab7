"""Content-keyed caching of stages, on local disk and S3: cache hits do no work, changes re-run
exactly the affected stages, missing inputs fail clearly."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.artifact import Artifact
from contract.errors import MissingInputError
from contract.stage import Stage, now
from pipeline.config import load_config
from pipeline.runner import run_stage, stage_status, storage_for
from pipeline.stages import STAGES, ancestors, dependents
from tests.conftest import S3_SECRET, read_table, write_config


def _count_sources(ctx):
    """A small downstream stage: pairs per source, read through the storage interface."""
    counts: Counter[str] = Counter()
    for key in ctx.input_files("ingest", "pairs"):
        with ctx.storage.open(key) as f:
            counts.update(pq.read_table(f, columns=["source"]).column("source").to_pylist())
    table = pa.table({"source": sorted(counts), "pairs": [counts[s] for s in sorted(counts)]})
    ctx.write_shard("all-00000", {"source_counts": table}, {"sources": len(counts)}, now())


COUNT = Stage("count", 1, _count_sources, inputs=("ingest",), tables=("source_counts",))


@pytest.fixture
def cc_file(tmp_path):
    path = tmp_path / "in" / "cc.tsv"
    path.parent.mkdir()
    path.write_text("".join(f"caption {i}\thttp://example.org/{i}.jpg\n" for i in range(50)))
    return path


def _config(tmp_path, storage_spec, cc_path, **ingest):
    src = {"format": "cc", "path": str(cc_path)}
    src.update(ingest.pop("source", {}))
    return load_config(
        write_config(tmp_path / "cfg.yaml", storage_spec, [src], shard_rows=ingest.pop("shard_rows", 20), **ingest)
    )


def _markers(storage, manifest):
    art = Artifact(storage, manifest.stage, manifest.key)
    return {name: rec.run_id for name, rec in art.done_shards().items()}


def test_second_run_is_cached_and_does_no_work(tmp_path, storage_spec, cc_file):
    cfg = _config(tmp_path, storage_spec, cc_file)
    storage = storage_for(cfg)
    first = run_stage("ingest", cfg)
    assert first.status == "ran" and first.manifest.shards == 3 and first.manifest.rows("pairs") == 50
    before = _markers(storage, first.manifest)
    second = run_stage("ingest", cfg)
    assert second.status == "cached"
    assert second.manifest.key == first.manifest.key
    assert second.manifest.content_sha256 == first.manifest.content_sha256
    assert _markers(storage, second.manifest) == before  # no shard was rewritten
    # The manifest carries provenance, and no credentials.
    m = second.manifest
    assert m.stage == "ingest" and m.stage_version == 2 and m.config_sha256 and m.code_version
    assert m.inputs == {f"file:{cc_file}": m.inputs[f"file:{cc_file}"]} and len(m.inputs[f"file:{cc_file}"]) == 64
    assert all(f.bytes > 0 and len(f.sha256) == 64 for f in m.tables["pairs"])
    raw = storage.read_bytes(f"{Artifact(storage, 'ingest', m.key).prefix}/_manifest.json").decode()
    assert S3_SECRET not in raw and "AKIA" not in raw
    assert json.dumps(first.to_json(storage)).count(S3_SECRET) == 0


def test_config_change_invalidates_but_parallelism_does_not(tmp_path, storage_spec, cc_file):
    base = run_stage("ingest", _config(tmp_path, storage_spec, cc_file))
    renamed = run_stage("ingest", _config(tmp_path, storage_spec, cc_file, source={"split": "val"}))
    assert renamed.status == "ran" and renamed.manifest.key != base.manifest.key
    parallel = run_stage("ingest", _config(tmp_path, storage_spec, cc_file, workers=2))
    assert parallel.status == "cached" and parallel.manifest.key == base.manifest.key


def test_key_follows_file_content_not_path(tmp_path, storage_spec, cc_file):
    run_stage("ingest", _config(tmp_path, storage_spec, cc_file))
    moved = tmp_path / "elsewhere.tsv"
    shutil.copy(cc_file, moved)
    assert run_stage("ingest", _config(tmp_path, storage_spec, moved)).status == "cached"
    with open(moved, "a") as f:
        f.write("one more\thttp://example.org/x.jpg\n")
    changed = run_stage("ingest", _config(tmp_path, storage_spec, moved))
    assert changed.status == "ran" and changed.manifest.rows("pairs") == 51


def test_force_rebuilds_identical_bytes(tmp_path, storage_spec, cc_file):
    cfg = _config(tmp_path, storage_spec, cc_file)
    storage = storage_for(cfg)
    first = run_stage("ingest", cfg)
    first_runs = set(_markers(storage, first.manifest).values())
    forced = run_stage("ingest", cfg, force=True)
    assert forced.status == "ran" and forced.resumed_shards == 0
    forced_runs = set(_markers(storage, forced.manifest).values())
    assert len(forced_runs) == 1 and not forced_runs & first_runs  # every shard rewritten by the new run
    assert forced.manifest.content_sha256 == first.manifest.content_sha256
    assert read_table(storage, forced.manifest, "pairs").equals(read_table(storage, first.manifest, "pairs"))


def test_downstream_stage_needs_its_input_and_follows_it(tmp_path, storage_spec, cc_file, monkeypatch):
    monkeypatch.setitem(STAGES, "count", COUNT)
    assert dependents("ingest") == ["crawl", "dedup", "extract", "pretrain", "finetune", "evaluate", "count"]
    assert dependents("crawl") == ["dedup", "extract", "pretrain", "finetune", "evaluate"]
    assert ancestors("finetune") == ["ingest", "crawl", "dedup", "extract", "downstream", "pretrain"]
    assert ancestors("count") == ["ingest"] and ancestors("ingest") == []
    cfg = _config(tmp_path, storage_spec, cc_file)
    with pytest.raises(
        MissingInputError, match=r"needs the output of 'ingest'.*Run `uniter run ingest -c cfg.yaml` first"
    ):
        run_stage("count", cfg, config_path="cfg.yaml")
    blocked = {
        "ingest": "missing",
        "crawl": "blocked",
        "dedup": "blocked",
        "extract": "blocked",
        "downstream": "missing",
        "pretrain": "blocked",
        "finetune": "blocked",
        "evaluate": "blocked",
        "count": "blocked",
    }
    assert {r["stage"]: r["status"] for r in stage_status(cfg)} == blocked

    ingest = run_stage("ingest", cfg)
    count = run_stage("count", cfg)
    assert count.status == "ran" and count.manifest.inputs == {"ingest": ingest.manifest.content_sha256}
    assert read_table(storage_for(cfg), count.manifest, "source_counts").to_pylist() == [{"source": "cc", "pairs": 50}]
    assert run_stage("count", cfg).status == "cached"

    # A change upstream changes the downstream key too: both re-run, nothing else.
    cfg2 = _config(tmp_path, storage_spec, cc_file, source={"name": "cc3m"})
    assert {r["stage"]: r["status"] for r in stage_status(cfg2)} == blocked
    run_stage("ingest", cfg2)
    count2 = run_stage("count", cfg2)
    assert count2.status == "ran" and count2.manifest.key != count.manifest.key
    assert read_table(storage_for(cfg2), count2.manifest, "source_counts").to_pylist() == [
        {"source": "cc3m", "pairs": 50}
    ]


def test_status_reports_partial_artifacts(tmp_path, storage_spec, cc_file):
    cfg = _config(tmp_path, storage_spec, cc_file)
    assert stage_status(cfg)[0]["status"] == "missing"
    done = run_stage("ingest", cfg)
    row = stage_status(cfg)[0]
    assert (
        row["status"] == "complete" and row["rows"] == {"pairs": 50, "rejects": 0} and row["key"] == done.manifest.key
    )
    storage = storage_for(cfg)
    art = Artifact(storage, "ingest", done.manifest.key)
    storage.remove(f"{art.prefix}/_manifest.json")
    storage.remove(f"{art.prefix}/_shards/cc-00001.json")
    row = stage_status(cfg)[0]
    assert (row["status"], row["shards"]) == ("partial", 2)
    resumed = run_stage("ingest", cfg)
    assert resumed.resumed_shards == 2 and resumed.manifest.content_sha256 == done.manifest.content_sha256
