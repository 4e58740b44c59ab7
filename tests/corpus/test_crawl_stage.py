"""The crawl stage end to end: pairs → images + failures, on local disk and S3; resume after SIGKILL."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import yaml

from contract.artifact import Artifact
from corpus.crawl import stage as crawl_stage
from pipeline.config import load_config
from pipeline.runner import Planner, run_stage, storage_for
from tests.conftest import read_table
from tests.fixtures import images as fx
from tests.fixtures import server as srv
from tests.fixtures.kill import kill_stage_when

ROOT = Path(__file__).resolve().parents[2]
CRAWL = dict(
    allow_private_networks=True,
    retries=1,
    backoff=0.05,
    read_timeout=0.5,
    total_timeout=5,
    max_bytes=1_000_000,
    max_side=200,
    workers=2,
)


def _config(tmp_path: Path, storage: dict, urls: list[str], **crawl) -> Path:
    rows = [{"image_url": u, "caption": f"caption {i}"} for i, u in enumerate(urls)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "storage": storage,
        "ingest": {"sources": [{"format": "table", "name": "web", "path": "pairs.jsonl"}]},
        "crawl": {**CRAWL, **crawl},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_crawl_lands_every_good_image_once_and_explains_every_failure(tmp_path, storage_spec):
    photo = fx.synthetic_photo(11, (640, 480))
    good = {
        "/jpeg.jpg": fx.jpeg(photo),
        "/cmyk.jpg": fx.cmyk_jpeg(photo),
        "/palette.png": fx.palette_png(photo),
        "/alpha.png": fx.alpha_png(photo),
        "/png16.png": fx.png16(photo),
        "/exif.jpg": fx.exif_rotated_jpeg(photo),
    }
    routes = {p: srv.serve(b) for p, b in good.items()}
    small_tagged = fx.tagged_jpeg(fx.synthetic_photo(13, (160, 120)), 75)
    routes.update(
        {
            "/flaky.jpg": srv.fail_then_serve(500, 1, fx.jpeg(fx.synthetic_photo(12))),
            # within max_side at q75, with its owner in EXIF: stored as downloaded, less the EXIF
            "/busy.jpg": srv.fail_then_serve(429, 1, small_tagged, {"Retry-After": "1"}),
            "/slow.jpg": srv.slow_body(),
            "/reset.jpg": srv.reset_connection,
            "/truncated.jpg": srv.serve(fx.truncated_jpeg(photo)),
            "/html.jpg": srv.serve(b"<!DOCTYPE html><html>Not Found</html>", "image/jpeg"),
            "/big.jpg": srv.serve(b"\xff" * 1_200_000),
            "/loop.jpg": srv.redirect("/loop.jpg"),
            "/private.jpg": srv.redirect("http://10.0.0.1/x.jpg"),
            "/bomb.png": srv.serve(fx.decompression_bomb_png(), "image/png"),
            "/noai.jpg": srv.serve(fx.jpeg(photo), headers={"X-Robots-Tag": "noai"}),
        }
    )
    expected_failures = {
        "/slow.jpg": "timeout",
        "/reset.jpg": "connection_reset",
        "/truncated.jpg": "corrupt_image",
        "/html.jpg": "not_an_image",
        "/big.jpg": "too_large",
        "/loop.jpg": "too_many_redirects",
        "/private.jpg": "blocked_private_address",
        "/bomb.png": "decompression_bomb",
        "/noai.jpg": "x_robots_tag",
        "/missing.jpg": "http_404",
    }
    with srv.ImageServer(routes) as server:
        urls = [server.url(p) for p in [*good, "/flaky.jpg", "/busy.jpg", *expected_failures]]
        urls.append(server.url("/jpeg.jpg"))  # a second caption of the same image: fetched once
        cfg_path = _config(
            tmp_path,
            storage_spec,
            urls,
            allowed_networks=["127.0.0.1/32"],
            allow_private_networks=False,
            shard_images=5,
        )
        cfg = load_config(cfg_path)
        run_stage("ingest", cfg)
        result = run_stage("crawl", cfg)
        assert server.hits["/jpeg.jpg"] == 1

    storage = storage_for(cfg)
    images = read_table(storage, result.manifest, "images").to_pylist()
    failures = read_table(storage, result.manifest, "failures").to_pylist()
    by_url = {r["url"].removeprefix(server.base): r for r in images}
    assert sorted(by_url) == sorted([*good, "/flaky.jpg", "/busy.jpg"])
    assert len(images) == len({r["image_key"] for r in images}) == 8
    assert {r["url"].removeprefix(server.base): r["reason"] for r in failures} == expected_failures
    attempts = {r["url"].removeprefix(server.base): r["attempts"] for r in failures}
    assert attempts["/missing.jpg"] == 1 and attempts["/reset.jpg"] == 2 and attempts["/loop.jpg"] == 6
    for r in images:
        assert max(r["width"], r["height"]) == (160 if r is by_url["/busy.jpg"] else 200)
        assert r["bytes"][:2] == b"\xff\xd8" and len(r["sha256"]) == 64
    assert b"Jane Q. Owner" in small_tagged and b"Jane Q. Owner" not in by_url["/busy.jpg"]["bytes"]
    assert by_url["/exif.jpg"]["width"] == 200 and by_url["/exif.jpg"]["height"] == 150  # oriented
    assert by_url["/jpeg.jpg"]["orig_width"] == 640
    for path, body in good.items():  # the size as downloaded (the body itself is not kept)
        assert by_url[path]["orig_bytes"] == len(body), path

    counts = result.manifest.counts
    assert (counts["images"], counts["failures"], counts["attempted"]) == (8, 10, 18)
    assert counts["success_rate"] == round(8 / 18, 4)
    assert counts["failure_reasons"] == dict(Counter(expected_failures.values()))
    assert counts["bytes_downloaded"] == sum(r["orig_bytes"] for r in images)
    assert counts["kept_as_downloaded"] == 1  # /busy.jpg; the others are larger than max_side
    assert result.manifest.shards == 4  # 18 distinct images in shards of 5
    assert run_stage("crawl", cfg).status == "cached"


def test_threads_and_the_process_pool_give_the_same_shards(tmp_path, monkeypatch):
    """Few images to process go to threads, many to the process pool: the bytes are the same."""
    photos = {f"/img/{i}.jpg": fx.jpeg(fx.synthetic_photo(300 + i, (320, 240))) for i in range(12)}
    digests = {}
    with srv.ImageServer({p: srv.serve(b) for p, b in photos.items()}) as server:
        for threaded in (0, 1000):  # 12 images to process: more than 0 (the pool), fewer than 1000 (threads)
            monkeypatch.setattr(crawl_stage, "THREADED_IMAGES", threaded)
            work = tmp_path / str(threaded)
            work.mkdir()
            cfg = load_config(_config(work, {"uri": str(work / "store")}, [server.url(p) for p in photos]))
            run_stage("ingest", cfg)
            manifest = run_stage("crawl", cfg).manifest
            assert manifest.counts["images"] == 12
            digests[threaded] = manifest.content_sha256
    assert len(set(digests.values())) == 1, digests


def test_sigkill_mid_crawl_then_resume(tmp_path):
    photos = {f"/img/{i}.jpg": fx.jpeg(fx.synthetic_photo(100 + i, (160, 120)), 80) for i in range(240)}

    def slow(body):
        def route(h):
            time.sleep(0.02)
            srv.send(h, 200, body)

        return route

    with srv.ImageServer({p: slow(b) for p, b in photos.items()}) as server:
        urls = [server.url(p) for p in photos]
        (tmp_path / "k").mkdir()
        killed_cfg = _config(
            tmp_path / "k", {"uri": str(tmp_path / "killed")}, urls, shard_images=10, concurrency=4, workers=1
        )
        cfg = load_config(killed_cfg)
        run_stage("ingest", cfg)
        storage = storage_for(cfg)
        art = Artifact(storage, "crawl", Planner(cfg, storage).plan("crawl").key)
        kill_stage_when("crawl", killed_cfg, art, lambda done: len(done) >= 4, 120, poll=0.02)
        assert art.manifest() is None
        before = {n: r.run_id for n, r in art.done_shards().items()}
        fetched_before = sum(server.hits.values())

        resumed = run_stage("crawl", cfg)
        after = {n: r.run_id for n, r in art.done_shards().items()}
        assert {n: after[n] for n in before} == before and resumed.resumed_shards == len(before)
        refetched = sum(server.hits.values()) - fetched_before
        assert refetched <= 240 - 10 * len(before)  # finished shards were not fetched again

        (tmp_path / "c").mkdir()
        clean_cfg = load_config(_config(tmp_path / "c", {"uri": str(tmp_path / "clean")}, urls, shard_images=10))
        run_stage("ingest", clean_cfg)
        clean = run_stage("crawl", clean_cfg)

    got = read_table(storage, resumed.manifest, "images")
    want = read_table(storage_for(clean_cfg), clean.manifest, "images")
    assert got.num_rows == 240 and len(set(got.column("image_key").to_pylist())) == 240
    assert sorted(got.column("image_key").to_pylist()) == sorted(want.column("image_key").to_pylist())
    assert sorted(got.column("sha256").to_pylist()) == sorted(want.column("sha256").to_pylist())
    assert resumed.manifest.content_sha256 == clean.manifest.content_sha256  # same shards, same bytes
