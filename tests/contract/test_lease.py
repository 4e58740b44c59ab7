"""One runner per stage and key: two runs at once do the work once; a dead holder is not waited for
long; the lease lapses when its holder stops renewing it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from contract.lease import Lease, LeaseHeld
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage, storage_for
from tests.fixtures import images as fx
from tests.fixtures import server as srv

UNITER = str(Path(sys.executable).parent / "uniter")


def _gated_images(n: int, gate: threading.Event) -> dict:
    """Images that are served only once ``gate`` is set: the first run holds the lease until then."""

    def route(body: bytes):
        def handler(h):
            gate.wait(120)
            srv.send(h, 200, body)

        return handler

    return {f"/img{i}.jpg": route(fx.jpeg(fx.synthetic_photo(i, (64, 48)))) for i in range(n)}


def _config(tmp_path: Path, storage: dict, urls: list[str], lease_seconds: float = 30) -> Path:
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image_url": u, "caption": "c"}) + "\n" for u in urls))
    doc = {
        "storage": {**storage, "lease_seconds": lease_seconds},
        "ingest": {"sources": [{"format": "table", "path": "pairs.jsonl"}]},
        "crawl": {
            "allow_private_networks": True,
            "workers": 1,
            "shard_images": 2,
            "per_host": 1,
            "concurrency": 1,
            "retries": 0,
        },
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(doc))
    return tmp_path / "cfg.yaml"


def test_two_runs_at_once_do_the_work_once(tmp_path, storage_spec):
    gate = threading.Event()
    with srv.ImageServer(_gated_images(6, gate)) as server:
        cfg_path = _config(tmp_path, storage_spec, [server.url(f"/img{i}.jpg") for i in range(6)])
        run_stage("ingest", load_config(cfg_path))
        first = subprocess.Popen([UNITER, "run", "crawl", "-c", str(cfg_path), "--json", "-q"], stdout=subprocess.PIPE)
        storage = storage_for(load_config(cfg_path))
        key = Planner(load_config(cfg_path), storage).plan("crawl").key
        deadline = time.time() + 60
        while not storage.list(f"leases/crawl/{key}") and time.time() < deadline:
            time.sleep(0.05)
        # Without --wait: exit 2, naming the holder and what to do.
        busy = subprocess.run([UNITER, "run", "crawl", "-c", str(cfg_path)], capture_output=True, text=True)
        assert busy.returncode == 2, busy.stderr
        assert f":{first.pid})" in busy.stderr and "--wait" in busy.stderr
        # With --wait: it waits (it says so), then finds the artifact built.
        second = subprocess.Popen(
            [UNITER, "run", "crawl", "-c", str(cfg_path), "--json", "-q", "--wait"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        said = ""
        while "waiting" not in said and second.poll() is None:
            said += second.stderr.readline()
        gate.set()
        out, _ = first.communicate(timeout=120)
        second_out, second_err = second.communicate(timeout=120)
        assert first.returncode == 0 and second.returncode == 0, said + second_err
        assert json.loads(out)["status"] == "ran" and json.loads(second_out)["status"] == "cached"
        assert json.loads(out)["content_sha256"] == json.loads(second_out)["content_sha256"]
        assert dict(server.hits) == {f"/img{i}.jpg": 1 for i in range(6)}  # each image fetched once


def test_a_lease_lapses_when_its_holder_stops_renewing(tmp_path):
    """A holder on another host that stopped (killed, or its host lost) is waited for until its
    lease expires, then the next run takes over."""
    cfg = load_config(_config(tmp_path, {"uri": str(tmp_path / "data")}, ["http://127.0.0.1:9/x.jpg"]))
    run_stage("ingest", cfg)
    storage = storage_for(cfg)
    key = Planner(cfg, storage).plan("crawl").key
    stale = {"holder": "another-host:4242", "expires": time.time() + 2.0, "released": False}
    storage.put(f"leases/crawl/{key}/stage/00000000.json", json.dumps(stale).encode())
    with pytest.raises(LeaseHeld, match="another-host:4242"):
        run_stage("crawl", cfg, wait=False)
    started = time.time()
    result = run_stage("crawl", cfg, wait=True)
    assert result.status == "ran" and 1.0 < time.time() - started < 30
    assert storage.list(f"leases/crawl/{key}/stage") == [
        f"leases/crawl/{key}/stage/00000000.json",
        f"leases/crawl/{key}/stage/00000001.json",  # taken over as the next generation, then released
    ]
    assert json.loads(storage.read_bytes(f"leases/crawl/{key}/stage/00000001.json"))["released"] is True


def test_a_killed_holder_on_this_host_is_not_waited_for(tmp_path):
    storage_dir = tmp_path / "data"
    cfg = load_config(_config(tmp_path, {"uri": str(storage_dir)}, ["http://127.0.0.1:9/x.jpg"], lease_seconds=600))
    run_stage("ingest", cfg)
    storage = storage_for(cfg)
    key = Planner(cfg, storage).plan("crawl").key
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    body = {"holder": f"{socket.gethostname()}:{dead.pid}", "expires": time.time() + 600, "released": False}
    storage.put(f"leases/crawl/{key}/stage/00000000.json", json.dumps(body).encode())
    started = time.time()
    assert run_stage("crawl", cfg, wait=False).status == "ran"
    assert time.time() - started < 20


def test_the_holder_renews_and_a_usurper_is_noticed(tmp_path):
    from storage import open_storage

    storage = open_storage(str(tmp_path))
    lease = Lease(storage, "crawl", "k" * 64, ttl=1.5)
    lease.acquire(wait=False)
    first = json.loads(storage.read_bytes(lease._file(0)))["expires"]
    time.sleep(1.2)
    assert json.loads(storage.read_bytes(lease._file(0)))["expires"] > first  # renewed
    other = Lease(storage, "crawl", "k" * 64, ttl=1.5)
    with pytest.raises(LeaseHeld):
        other.acquire(wait=False)
    storage.put(lease._file(1), json.dumps({"holder": "x:1", "expires": time.time() + 60}).encode())
    time.sleep(1.0)
    assert lease.lost
    lease.release()
