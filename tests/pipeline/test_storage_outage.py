"""An S3 endpoint that goes away in the middle of a stage: the run gives up after a bounded retry with
exit 2 and a message, nothing half-written is published, and once the endpoint is back the next run
resumes and publishes exactly what an uninterrupted run publishes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from contract.artifact import Artifact
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage
from storage import open_storage
from tests.conftest import S3_SECRET, make_bucket
from tests.fixtures import images as fx
from tests.fixtures import server as srv
from tests.fixtures.proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
IMAGES, SHARD_IMAGES = 8, 2
# One shard in flight at a time, each taking >= DELAY to fetch: the test cuts the endpoint after the
# first shard is published and before the next one writes.
DELAY = 0.4
CRAWL = dict(allow_private_networks=True, shard_images=SHARD_IMAGES, open_shards=1, workers=1, retries=0, max_side=64)


def _config(folder: Path, storage: dict, urls: list[str]) -> Path:
    folder.mkdir()
    rows = [{"image_url": u, "caption": f"caption {i}"} for i, u in enumerate(urls)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "storage": storage,
        "ingest": {"sources": [{"format": "table", "name": "web", "path": "pairs.jsonl"}]},
        "crawl": CRAWL,
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(doc))
    return folder / "cfg.yaml"


def _slow(body: bytes):
    def route(h):
        time.sleep(DELAY)
        srv.send(h, 200, body)

    return route


def test_endpoint_down_mid_crawl_then_resume(tmp_path, s3_endpoint):
    bucket = make_bucket(s3_endpoint)
    photos = {f"/img/{i}.jpg": fx.jpeg(fx.synthetic_photo(500 + i, (96, 64)), 80) for i in range(IMAGES)}
    proxy = TcpProxy(urlparse(s3_endpoint).port)
    with srv.ImageServer({p: _slow(b) for p, b in photos.items()}) as server, proxy:
        urls = [server.url(p) for p in photos]
        cut_path = _config(tmp_path / "cut", {"uri": f"s3://{bucket}/cut", "endpoint_url": proxy.url}, urls)
        cfg = load_config(cut_path)
        run_stage("ingest", cfg)
        # The test watches the bucket directly, not through the proxy it cuts.
        direct = open_storage(f"s3://{bucket}/cut", endpoint_url=s3_endpoint)
        key = Planner(cfg, direct).plan("crawl").key
        assert key is not None
        art = Artifact(direct, "crawl", key)

        # A short retry budget (the default, 10 attempts, may wait ~26 s): the variable boto3 reads.
        env = {**os.environ, "AWS_MAX_ATTEMPTS": "3"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", "crawl", "-c", str(cut_path), "-q"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not art.done_shards():
            assert proc.poll() is None, f"crawl ended before a shard was published: {proc.communicate()}"
            assert time.time() < deadline, "no shard published within 120 s"
            time.sleep(0.02)
        proxy.stop()
        _, err = proc.communicate(timeout=120)

        assert proc.returncode == 2, err[-3000:]
        message = err.strip().splitlines()[-1]
        assert message.startswith(f"uniter: error: crawl stopped: s3://{bucket}/cut/"), err[-3000:]
        assert "gave up after 3 attempts" in message and "the next run resumes" in message
        assert "Traceback" not in err and S3_SECRET not in err
        # Published means a marker; every marker's files are whole, and there is no manifest.
        done = art.done_shards()
        assert 1 <= len(done) < IMAGES // SHARD_IMAGES and art.manifest() is None
        for rec in done.values():
            for f in rec.files.values():
                assert hashlib.sha256(direct.read_bytes(art.file_key(f.path))).hexdigest() == f.sha256
        settled = sum(rec.stats["images"] + rec.stats["failures"] for rec in done.values())

        proxy.start()
        hits_before = sum(server.hits.values())
        resumed = run_stage("crawl", cfg)
        assert resumed.status == "ran" and resumed.resumed_shards == len(done)
        assert {n: r.run_id for n, r in art.done_shards().items() if n in done} == {
            n: r.run_id for n, r in done.items()
        }
        assert sum(server.hits.values()) - hits_before == IMAGES - settled  # published shards not fetched again

        clean_cfg = load_config(
            _config(tmp_path / "clean", {"uri": f"s3://{bucket}/clean", "endpoint_url": s3_endpoint}, urls)
        )
        run_stage("ingest", clean_cfg)
        clean = run_stage("crawl", clean_cfg)

    assert resumed.manifest.key == clean.manifest.key
    assert resumed.manifest.tables == clean.manifest.tables and resumed.manifest.counts == clean.manifest.counts
    assert resumed.manifest.content_sha256 == clean.manifest.content_sha256
    clean_art = Artifact(open_storage(f"s3://{bucket}/clean", endpoint_url=s3_endpoint), "crawl", clean.manifest.key)
    for files in resumed.manifest.tables.values():
        for f in files:
            assert direct.read_bytes(art.file_key(f.path)) == clean_art.storage.read_bytes(clean_art.file_key(f.path))
