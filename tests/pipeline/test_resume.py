"""SIGKILL a running `uniter run ingest` mid-way: the next run resumes from the finished shards,
redoes none of them, and publishes exactly what an uninterrupted run publishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage, stage_status, storage_for
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]


def _big_tsv(path: Path, lines: int) -> Path:
    with open(path, "w") as f:
        for i in range(lines):
            f.write(f"a photo of thing number {i} on a table\thttp://img{i % 13}.example.org/{i}.jpg\n")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_then_resume_gives_identical_artifact(tmp_path, storage_spec, workers):
    if (workers == 2) == storage_spec["uri"].startswith("s3://"):
        pytest.skip("S3 with one worker, local with two: workers only change who encodes the shards")
    tsv = _big_tsv(tmp_path / "cc.tsv", 300_000)
    source = [{"format": "cc", "path": str(tsv)}]
    cfg_path = write_config(tmp_path / "killed.yaml", storage_spec, source, shard_rows=2000, workers=workers)
    cfg = load_config(cfg_path)
    storage = storage_for(cfg)
    key = Planner(cfg, storage).plan("ingest").key
    art = Artifact(storage, "ingest", key)

    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "ingest", "-c", str(cfg_path), "--json", "-q"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
        start_new_session=True,
    )
    deadline = time.time() + 120
    while len(art.done_shards()) < 8:
        assert proc.poll() is None, f"ingest ended before it could be killed: {proc.communicate()}"
        assert time.time() < deadline, "no shard finished within 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and any worker processes, mid-shard
    proc.wait()

    assert art.manifest() is None, "the run finished before the kill: make the input bigger"
    done_before = {name: rec.run_id for name, rec in art.done_shards().items()}
    assert 8 <= len(done_before) < 150
    status = stage_status(cfg)[0]
    assert status["status"] == "partial" and status["shards"] == len(done_before)

    resumed = run_stage("ingest", cfg)
    assert resumed.status == "ran" and resumed.resumed_shards == len(done_before)
    after = {name: rec.run_id for name, rec in art.done_shards().items()}
    assert {n: after[n] for n in done_before} == done_before  # finished shards were not redone
    assert len(after) == 150

    clean_cfg = load_config(
        write_config(tmp_path / "clean.yaml", {"uri": str(tmp_path / "clean")}, source, shard_rows=2000)
    )
    clean = run_stage("ingest", clean_cfg)
    assert clean.manifest.key == resumed.manifest.key
    assert clean.manifest.content_sha256 == resumed.manifest.content_sha256
    assert clean.manifest.tables == resumed.manifest.tables  # every file: same name, digest, rows, size
    assert resumed.manifest.rows("pairs") == 300_000

    # And the CLI agrees: the next run is a cache hit.
    out = subprocess.run(
        [sys.executable, "-m", "cli", "run", "ingest", "-c", str(cfg_path), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["status"] == "cached"
