"""A rebuild of the crawl costs the change: images fetched under an earlier key are taken from its
artifact, and the result is the artifact a build from scratch of the new inputs would write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.runner import run_stage, storage_for
from tests.conftest import read_table
from tests.fixtures import images as fx
from tests.fixtures import server as srv

CRAWL = dict(allow_private_networks=True, retries=0, backoff=0.01, max_side=64, workers=1, shard_images=4)


def _config(folder: Path, storage: dict, urls: list[str], **crawl) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"image_url": u, "caption": f"a caption of {u.rsplit('/', 1)[-1]}"} for u in urls]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {
        "storage": storage,
        "ingest": {"sources": [{"format": "table", "name": "web", "path": "pairs.jsonl"}]},
        "crawl": {**CRAWL, **crawl},
    }
    (folder / "cfg.yaml").write_text(yaml.safe_dump(doc))
    return load_config(folder / "cfg.yaml")


def _build(cfg):
    run_stage("ingest", cfg)
    return run_stage("crawl", cfg)


def _bodies(n: int, seed: int = 0) -> dict[str, bytes]:
    return {f"/img{i:02d}.jpg": fx.jpeg(fx.synthetic_photo(seed + i, (80, 60))) for i in range(n)}


def test_rebuild_fetches_only_new_images_and_equals_a_build_from_scratch(tmp_path, storage_spec):
    old, new = _bodies(10), _bodies(3, seed=100)
    new = {p.replace("img", "new"): b for p, b in new.items()}
    routes = {p: srv.validated(b) for p, b in {**old, **new}.items()}
    with srv.ImageServer(routes) as server:
        first = [server.url(p) for p in old] + [server.url("/missing.jpg")]
        a = _build(_config(tmp_path / "a", storage_spec, first))
        assert (a.manifest.counts["images"], a.manifest.counts["failures"]) == (10, 1)
        server.hits.clear()

        second = first + [server.url(p) for p in new]
        b = _build(_config(tmp_path / "b", storage_spec, second))
        # The old images and the recent failure: not asked for again; the new ones: once each.
        assert dict(server.hits) == {p: 1 for p in new}
        assert b.manifest.key != a.manifest.key
        assert b.manifest.counts["reuse"] == {
            "fetched": 3, "retried": 0, "reused": 11, "revalidated": 0, "refetched": 0, "gone": 0, "recheck_failed": 0
        }  # fmt: skip

        # Shards are cut in input order: the two full shards of old images are the earlier
        # crawl's, linked (copied by the storage, not rewritten); the third gained new images.
        assert b.manifest.counts["shards_linked"] == 2

        # The same inputs built from scratch on an empty storage: the very same artifact.
        scratch_storage = {"uri": str(tmp_path / "scratch")}
        c = _build(_config(tmp_path / "c", scratch_storage, second))
    assert c.manifest.key == b.manifest.key
    assert c.manifest.content_sha256 == b.manifest.content_sha256
    assert c.manifest.tables == b.manifest.tables  # file by file: same names, digests, rows


def test_a_new_source_leaves_the_other_sources_shards_unchanged(tmp_path):
    bodies = _bodies(8)
    extra = {p.replace("img", "new"): b for p, b in _bodies(2, seed=100).items()}
    with srv.ImageServer({p: srv.validated(b) for p, b in {**bodies, **extra}.items()}) as server:
        _build(_config(tmp_path / "a", {"uri": str(tmp_path / "data")}, [server.url(p) for p in bodies]))
        server.hits.clear()
        # Another source whose name sorts first: its images come first in input order.
        _config(tmp_path / "b", {"uri": str(tmp_path / "data")}, [server.url(p) for p in bodies])
        rows = [{"image_url": server.url(p), "caption": "a new source's caption"} for p in extra]
        (tmp_path / "b/aaa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        doc = yaml.safe_load((tmp_path / "b/cfg.yaml").read_text())
        doc["ingest"]["sources"].append({"format": "table", "name": "aaa", "path": "aaa.jsonl"})
        (tmp_path / "b/cfg.yaml").write_text(yaml.safe_dump(doc))
        b = _build(load_config(tmp_path / "b/cfg.yaml"))
        assert dict(server.hits) == {p: 1 for p in extra}
    # Shards never span two sources: [aaa: 2 new], then web's two shards of 4 as they were.
    assert (b.manifest.shards, b.manifest.counts["shards_linked"]) == (3, 2)


def test_recrawl_after_revalidates_with_conditional_gets(tmp_path):
    storage = {"uri": str(tmp_path / "data")}
    bodies = _bodies(4)
    routes = {p: srv.validated(b) for p, b in bodies.items()}
    with srv.ImageServer(routes) as server:
        urls = [server.url(p) for p in bodies]
        a = _build(_config(tmp_path / "a", storage, urls))
        before = {
            r["url"]: r
            for r in read_table(storage_for(load_config(tmp_path / "a/cfg.yaml")), a.manifest, "images").to_pylist()
        }
        server.hits.clear()
        # The world moves on: one picture replaced, one link gone, two unchanged.
        server.routes["/img01.jpg"] = srv.validated(fx.jpeg(fx.synthetic_photo(77, (80, 60))))
        server.routes["/img02.jpg"] = srv.status(404)
        extra = server.url("/img99.jpg")
        server.routes["/img99.jpg"] = srv.validated(fx.jpeg(fx.synthetic_photo(99, (80, 60))))
        cfg = _config(tmp_path / "b", storage, [*urls, extra], recrawl_after="0s")
        b = _build(cfg)
        assert server.conditional == {"/img00.jpg": 1, "/img01.jpg": 1, "/img02.jpg": 1, "/img03.jpg": 1}
        assert server.hits["/img99.jpg"] == 1 and "/img99.jpg" not in server.conditional

    reuse = b.manifest.counts["reuse"]
    assert (reuse["revalidated"], reuse["refetched"], reuse["gone"], reuse["fetched"]) == (2, 1, 1, 1)
    images = {r["url"]: r for r in read_table(storage_for(cfg), b.manifest, "images").to_pylist()}
    failures = {r["url"]: r["reason"] for r in read_table(storage_for(cfg), b.manifest, "failures").to_pylist()}
    assert failures == {server.url("/img02.jpg"): "http_404"}  # the gone link leaves the corpus
    assert images[urls[0]]["bytes"] == before[urls[0]]["bytes"]  # 304: the copy we had
    assert images[urls[1]]["sha256"] != before[urls[1]]["sha256"]  # 200: the new picture


def test_a_shard_whose_images_all_answer_304_is_linked_and_equals_a_build_from_scratch(tmp_path):
    bodies = _bodies(8)
    routes = {p: srv.validated(b) for p, b in bodies.items()}
    with srv.ImageServer(routes) as server:
        urls = [server.url(p) for p in bodies]
        _build(_config(tmp_path / "a", {"uri": str(tmp_path / "data")}, urls))
        server.routes["/img05.jpg"] = srv.validated(fx.jpeg(fx.synthetic_photo(55, (80, 60))))  # 2nd shard
        server.routes["/img99.jpg"] = srv.validated(fx.jpeg(fx.synthetic_photo(99, (80, 60))))
        urls.append(server.url("/img99.jpg"))  # a new row: a new key, and a third shard
        b = _build(_config(tmp_path / "b", {"uri": str(tmp_path / "data")}, urls, recrawl_after="0s"))
        assert server.conditional == {p: 1 for p in bodies}
        scratch = _build(_config(tmp_path / "c", {"uri": str(tmp_path / "scratch")}, urls, recrawl_after="0s"))
    # Shard 1: four 304s, the earlier shard's files as they are; shard 2: one new picture, rewritten.
    assert b.manifest.counts["shards_linked"] == 1
    assert b.manifest.counts["reuse"]["revalidated"] == 7 and b.manifest.counts["reuse"]["refetched"] == 1
    assert (b.manifest.content_sha256, b.manifest.tables) == (scratch.manifest.content_sha256, scratch.manifest.tables)


def test_failures_are_retried_only_after_retry_failures_after(tmp_path):
    storage = {"uri": str(tmp_path / "data")}
    with srv.ImageServer({}) as server:
        urls = [server.url("/later.jpg")]
        _build(_config(tmp_path / "a", storage, urls))
        server.routes["/later.jpg"] = srv.serve(fx.jpeg(fx.synthetic_photo(5, (80, 60))))
        server.hits.clear()
        kept = _build(_config(tmp_path / "b", storage, [*urls, server.url("/other.jpg")]))
        assert server.hits["/later.jpg"] == 0 and kept.manifest.counts["failures"] == 2
        retried = _build(_config(tmp_path / "c", storage, [*urls, server.url("/third.jpg")], retry_failures_after=0))
        assert server.hits["/later.jpg"] == 1
    assert retried.manifest.counts["reuse"]["retried"] == 1
    assert retried.manifest.counts["images"] == 1


@pytest.mark.parametrize(
    "value, seconds", [(90, 90.0), ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0), ("7d", 604800.0)]
)
def test_durations(tmp_path, value, seconds):
    cfg = _config(tmp_path, {"uri": str(tmp_path / "d")}, ["http://example.com/x.jpg"], recrawl_after=value)
    assert cfg.crawl.recrawl_after == seconds


def test_a_bad_duration_names_the_setting(tmp_path):
    from contract.errors import ConfigError

    with pytest.raises(ConfigError, match=r"recrawl_after.*invalid duration '3 weeks'"):
        _config(tmp_path, {"uri": str(tmp_path / "d")}, ["http://example.com/x.jpg"], recrawl_after="3 weeks")
