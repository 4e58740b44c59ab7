"""Scale-out on a real distributed engine: a Dask scheduler and two Dask worker processes started
with the `dask` CLI on 127.0.0.1, storage on the moto S3 server. The sharded stages' shard groups
(orchestration.fan_out: 2) run as Prefect tasks on those worker processes, and the artifacts are
byte-identical to one process doing every shard (fan_out: 1)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from contract.artifact import Artifact
from flows.dag import full_pipeline
from pipeline.config import load_config
from pipeline.runner import storage_for
from tests.conftest import free_port, make_bucket, write_config
from tests.fixtures import images as fx

DASK = str(Path(sys.executable).parent / "dask")
WORKERS = ("w0", "w1")
SHARDED = ("crawl", "extract")


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"--- {log.name}\n" + "\n".join(text.splitlines()[-lines:])


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM the process groups the processes lead (each CLI and anything it started), wait, then
    SIGKILL whatever is left in those groups (also children of a leader that has exited)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))


@pytest.fixture
def dask_cluster(tmp_path, s3_endpoint):
    """``(address, client)`` of a scheduler and two single-threaded worker processes, each in its own
    process group; all of them are killed on the way out, whatever happened."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    # The workers run the project's code: the same environment as this process (the moto S3
    # credentials set by conftest, the fingerprint cache).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Safety nets should this process die without running `finally`: the scheduler closes after
    # 5 idle minutes, and a worker 30 s after losing its scheduler.
    commands = {
        "scheduler": [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
        + ["--idle-timeout", "300s"],
        **{
            name: [DASK, "worker", address, "--name", name, "--nthreads", "1", "--nworkers", "1", "--no-nanny"]
            + ["--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "0", "--death-timeout", "30"]
            + ["--local-directory", str(tmp_path / f"dask-{name}")]
            for name in WORKERS
        },
    }
    procs: dict[str, subprocess.Popen] = {}
    client = None
    try:
        for name, cmd in commands.items():
            with open(logs / f"{name}.log", "wb") as out:
                procs[name] = subprocess.Popen(
                    cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        try:
            client = distributed.Client(address, timeout=60, set_as_default=False)
            client.wait_for_workers(len(WORKERS), timeout=90)
        except Exception as exc:
            exited = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
            report = "\n".join(_tail(logs / f"{n}.log") for n in commands)
            raise AssertionError(f"the Dask cluster did not start ({exc!r}; exited: {exited})\n{report}") from exc
        yield address, client
    finally:
        if client is not None:
            client.close(timeout=10)
        # the workers first: one that loses its scheduler while closing can hang until SIGKILL
        _stop([p for n, p in procs.items() if n != "scheduler"])
        _stop([p for n, p in procs.items() if n == "scheduler"])
        left = {n: p.returncode for n, p in procs.items() if p.returncode is None}
        assert not left, f"Dask processes still running: {left}"


def _config(tmp_path: Path, images: Path, storage: dict, fan_out: int, address: str) -> Path:
    cfg_path = write_config(
        tmp_path / f"cfg{fan_out}.yaml", storage, [{"format": "table", "path": str(tmp_path / "pairs.jsonl")}]
    )
    doc = yaml.safe_load(cfg_path.read_text())
    doc["crawl"] = {"file_roots": [str(images)], "workers": 1, "shard_images": 2}
    doc["extract"] = {"backend": "grid", "loader_workers": 0, "shard_images": 2}
    doc["orchestration"] = {"fan_out": fan_out, "task_runner": "dask", "dask_address": address}
    cfg_path.write_text(yaml.safe_dump(doc))
    return cfg_path


def _built(cfg_path: Path, results: list[dict]) -> dict[str, dict]:
    """Per sharded stage: its key, content digest, Parquet files (path → sha256) and shard writers."""
    storage = storage_for(load_config(cfg_path))
    built = {}
    for r in results:
        if r["stage"] not in SHARDED:
            continue
        art = Artifact(storage, r["stage"], r["key"])
        manifest = art.manifest()
        assert manifest is not None, r
        files = {f.path: f.sha256 for fs in manifest.tables.values() for f in fs}
        assert files and all(p.endswith(".parquet") for p in files), files
        markers = art.done_shards()
        built[r["stage"]] = {
            "key": r["key"],
            "content_sha256": r["content_sha256"],
            "manifest_content_sha256": manifest.content_sha256,
            "files": files,
            "shards": sorted(markers),
            "writers": {rec.run_id for rec in markers.values()},
        }
    return built


@pytest.mark.slow
def test_shard_groups_run_on_two_dask_worker_processes(tmp_path, s3_endpoint, prefect_server, dask_cluster):
    address, client = dask_cluster
    images = fx.photo_pairs(tmp_path, 8, seed=700)
    bucket = make_bucket(s3_endpoint)

    built = {}
    for fan_out in (2, 1):
        storage = {"uri": f"s3://{bucket}/fan{fan_out}", "endpoint_url": s3_endpoint}
        cfg_path = _config(tmp_path, images, storage, fan_out, address)
        if fan_out == 2:
            # The scheduler's own record of every task: which worker ran it, and when.
            with distributed.get_task_stream(client) as stream:
                results = full_pipeline(config=str(cfg_path), until="extract")
            tasks = stream.data
        else:
            results = full_pipeline(config=str(cfg_path), until="extract")
        assert [(r["stage"], r["status"]) for r in results] == [
            ("ingest", "ran"),
            ("crawl", "ran"),
            ("dedup", "ran"),
            ("extract", "ran"),
        ]
        built[fan_out] = _built(cfg_path, results)

    # 8 images, 2 per shard: 4 shards per sharded stage, written by 2 groups (fan_out 2) or 1 run.
    for stage in SHARDED:
        assert len(built[2][stage]["shards"]) == 4, built[2][stage]["shards"]
        assert len(built[2][stage]["writers"]) == 2, (stage, built[2][stage]["writers"])
        assert len(built[1][stage]["writers"]) == 1, (stage, built[1][stage]["writers"])
    # Byte-identical artifacts: the same keys, content digests and Parquet files either way.
    for stage in SHARDED:
        two, one = built[2][stage], built[1][stage]
        assert two["key"] == one["key"], stage
        assert two["content_sha256"] == one["content_sha256"] == two["manifest_content_sha256"], stage
        assert two["files"] == one["files"], stage

    # Both worker processes ran shard groups: the Prefect tasks of one stage's two groups on
    # different workers, for crawl and for extract.
    names = {addr: w["name"] for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    assert sorted(names.values()) == sorted(WORKERS), names
    ran = sorted(
        (min(ss["start"] for ss in t["startstops"] if ss["action"] == "compute"), names.get(t["worker"], t["worker"]))
        for t in tasks
        if any(ss["action"] == "compute" for ss in t["startstops"])
    )
    assert len(ran) == 2 * len(SHARDED), tasks  # one task per shard group, nothing else on the cluster
    for i, stage in enumerate(SHARDED):
        assert {w for _, w in ran[2 * i : 2 * i + 2]} == set(WORKERS), (stage, ran)

    # ... and reported to the Prefect API: one completed `shards` task run per group, all in the
    # fan_out 2 flow run (fan_out 1 runs no shard-group tasks).
    with get_client(sync_client=True) as api:
        runs = [r for r in api.read_task_runs(limit=200) if r.task_key.startswith("shard_group_task")]
    assert sorted(r.name for r in runs) == sorted(f"{stage} × 2" for stage in SHARDED for _ in WORKERS), runs
    assert all(r.state is not None and r.state.is_completed() for r in runs), [r.state for r in runs]
    assert len({r.flow_run_id for r in runs}) == 1, runs
