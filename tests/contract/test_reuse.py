"""The reuse index: items found through hash buckets, whole shards through their digest, the newest
source first — on a local folder and on a real S3-protocol server."""

from __future__ import annotations

import json

import pyarrow as pa

from contract import reuse
from contract.artifact import ARTIFACTS, MANIFEST, ShardRecord
from contract.reuse import ItemIndex, shard_digest

SCHEMA = pa.schema([pa.field("item", pa.string()), pa.field("url", pa.string())])


def _build(storage, key: str, shards: dict[str, list[str]]) -> None:
    """An artifact ``key`` of crawl with these shards' items, recorded, sealed and published."""
    index = ItemIndex(storage, "crawl", "fp", current=key)
    done = {}
    for name, items in shards.items():
        rows = pa.table({"item": items, "url": [f"http://h/{i}?{key}" for i in items]}, schema=SCHEMA)
        stats = index.record(name, rows, shard_digest((i,) for i in items))
        done[name] = ShardRecord(name, {}, stats, 0.0, "run")
    index.seal(done)
    storage.put(f"{ARTIFACTS}/crawl/{key}/{MANIFEST}", b"{}")  # a source counts once it is published


def test_items_are_found_through_their_bucket_and_shards_through_their_digest(storage, monkeypatch):
    monkeypatch.setattr(reuse, "BUCKET_ROWS", 4)  # 30 items: 16 buckets (depth 1), as at scale
    shards = {f"images-{s:05d}": [f"url:{s}-{i}" for i in range(10)] for s in range(3)}
    _build(storage, "k1", shards)
    seal = json.loads(storage.read_bytes("index/crawl/fp/_sealed/k1.json"))
    assert seal["depth"] == 1
    buckets = [p for p in storage.list("index/crawl/fp/k1") if "/_bucket-" in p]
    assert 8 <= len(buckets) <= 16

    index = ItemIndex(storage, "crawl", "fp", current="k2")
    wanted = [i for items in shards.values() for i in items]
    hits = index.lookup([*wanted, "url:missing"])
    assert sorted(hits) == sorted(wanted)
    assert {h.shard for i, h in hits.items() if i.startswith("url:1-")} == {"images-00001"}
    assert hits["url:2-7"].row == {"item": "url:2-7", "url": "http://h/url:2-7?k1"}

    found = index.same_shard(shard_digest((i,) for i in reversed(shards["images-00001"])))  # any order
    assert found is not None
    source, shard, by_item = found
    assert (source, shard, sorted(by_item)) == ("k1", "images-00001", sorted(shards["images-00001"]))
    assert index.same_shard(shard_digest((i,) for i in shards["images-00001"][:9])) is None  # one fewer


def test_a_newer_source_wins_over_an_older_shard_of_the_same_items(storage):
    _build(storage, "old", {"images-00000": ["url:a", "url:b"], "images-00001": ["url:c"]})
    _build(storage, "new", {"images-00000": ["url:b", "url:z"]})  # url:b again, in another shard

    index = ItemIndex(storage, "crawl", "fp", current="next")
    assert [s.key for s in index.sources()] == ["new", "old"]
    # The old shard [a, b] is no longer the newest copy of url:b: matched item by item instead.
    assert index.same_shard(shard_digest([("url:a",), ("url:b",)])) is None
    hits = index.lookup(["url:a", "url:b", "url:c"])
    assert {i: (h.source, h.row["url"]) for i, h in hits.items()} == {
        "url:a": ("old", "http://h/url:a?old"),
        "url:b": ("new", "http://h/url:b?new"),
        "url:c": ("old", "http://h/url:c?old"),
    }
    assert index.same_shard(shard_digest([("url:c",)]))[:2] == ("old", "images-00001")
    # Building "next" itself never lends to itself, and --force (lend=False) lends nothing.
    assert ItemIndex(storage, "crawl", "fp", current="new").same_shard(shard_digest([("url:b",), ("url:z",)])) is None
    assert ItemIndex(storage, "crawl", "fp", current="x", lend=False).lookup(["url:a"]) == {}


def test_an_artifact_without_index_rows_seals_and_lends_nothing(storage):
    _build(storage, "empty", {})  # e.g. a dedup without evaluation sets: no indexed shard
    index = ItemIndex(storage, "crawl", "fp", current="next")
    assert [s.key for s in index.sources()] == ["empty"]
    assert index.lookup(["url:a"]) == {}


def test_a_seal_from_before_hash_buckets_is_upgraded_and_lends(storage):
    """Seals written before the buckets held each shard's first and last item: a later run builds
    that artifact's buckets once and rewrites its seal, so an upgrade fetches nothing again."""
    old = ItemIndex(storage, "crawl", "fp", current="old")
    ranges = []
    for name, items in {"images-00000": ["url:a", "url:c"], "images-00001": ["url:d", "url:f"]}.items():
        old.record(name, pa.table({"item": items, "url": [f"http://h/{i}" for i in items]}, schema=SCHEMA))
        ranges.append([items[0], items[-1], name])
    seal = {"key": "old", "created": 1.0, "shards": ranges}
    storage.put("index/crawl/fp/_sealed/old.json", json.dumps(seal).encode())
    storage.put(f"{ARTIFACTS}/crawl/old/{MANIFEST}", b"{}")

    index = ItemIndex(storage, "crawl", "fp", current="new")
    hits = index.lookup(["url:a", "url:d", "url:f", "url:z"])
    assert {i: h.shard for i, h in hits.items()} == {
        "url:a": "images-00000", "url:d": "images-00001", "url:f": "images-00001"
    }  # fmt: skip
    assert json.loads(storage.read_bytes("index/crawl/fp/_sealed/old.json")) == {
        "key": "old", "created": 1.0, "depth": 0, "shards": {}
    }  # fmt: skip
    assert index.same_shard(shard_digest([("url:a",), ("url:c",)])) is None  # no digests: item by item
