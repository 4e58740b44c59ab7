"""Item-level reuse across cache keys: a stage takes finished items from its earlier artifacts.

A stage's cache key is the content of everything upstream, so ten new captions give `crawl` and
`extract` new keys. The artifact under the new key is still written whole (a rebuild gives the
same bytes as a build from scratch), but what an earlier key already finished is taken from it:
- a whole shard, when an earlier artifact holds a shard of exactly the same items (the stage's
  *shard digest*: crawl's image keys and URLs, extract's image keys and sha256): its files are
  copied by the storage (`Artifact.link_shard`: a hard link, a server-side copy) — nothing is
  decoded or encoded. Crawl cuts shards in input order, never across two sources (new rows of a
  TSV, or a new source, land in new shards), and extract within crawl shards, so a rebuild after
  an append links every earlier shard but the last;
- otherwise item by item: an image fetched with the same options, features of the same image
  bytes by the same extractor, copied row by row from the earlier artifact's file.

Layout under the storage root, per stage and *item fingerprint* (the stage's settings that shape
one item: image options, extractor weights digest and box selection — not the shard size — and
the fingerprints of the stages it makes its items from, `Stage.reuse_inputs`)::

    index/<stage>/<fingerprint>/<artifact key>/<shard>.parquet     one row per item of the shard
    index/<stage>/<fingerprint>/<artifact key>/_bucket-<b>.parquet  the same rows with their shard,
                                                                    by hash bucket of the item
    index/<stage>/<fingerprint>/_sealed/<artifact key>.json         bucket depth; shard → digest

An item's lookup reads the one bucket file its hash names in each earlier artifact (a bucket holds
≈ BUCKET_ROWS items: 4.2 M images make 4,096 buckets of ≈ 1,000) — never a scan of an earlier
artifact. A shard's lookup by digest reads the sealed file (loaded once per run) and that one
earlier shard's index file. The index rows hold what the stage needs to decide (the URL, outcome
and HTTP validators for crawl; the image sha256 for extract); the data rows come from the earlier
artifact's own table files.

The seal is written after every shard, before the artifact's manifest, and a source counts only
once its manifest exists, so a half-built artifact is never a source. `uniter gc` removes a
removed artifact's seal first, then its index files. A seal from before the buckets (shard key
ranges) is upgraded by the first run that reads it (`_upgrade`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.artifact import ARTIFACTS, MANIFEST, ShardRecord
from storage import Storage, StorageError

INDEX = "index"
SEALED = "_sealed"
BUCKET = "_bucket-"
DIGEST = "items_digest"  # shard stat: the digest of the shard's items (`shard_digest`)
BUCKET_ROWS = 4096  # a sealed artifact's index rows per bucket file, about
CACHED_FILES = 256  # index files a run keeps in memory (a bucket file is ≈ 100 KB)
IO_THREADS = 8  # reads and writes a seal keeps in flight


def _in_order(
    pool: ThreadPoolExecutor, fn: Callable[[str], bytes], keys: list[str], window: int = 32
) -> Iterator[bytes]:
    """``fn`` of each key, in order, with at most ``window`` calls in flight (bounded memory)."""
    pending: deque[Future] = deque()
    for key in keys:
        pending.append(pool.submit(fn, key))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _hash32(item: str) -> int:
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=4).digest(), "big")


def _bucket(h: int, depth: int) -> str:
    """The bucket of an item whose `_hash32` is ``h``, in an index of ``depth`` hex digits
    (16^depth buckets, depth ≤ 8): the hash's first ``depth`` hex digits."""
    return f"{h >> (32 - 4 * depth):0{depth}x}" if depth else ""


def shard_digest(rows: Iterable[tuple[str, ...]]) -> str:
    """The digest of a shard's items: equal digests, equal shard contents (a shard's files are a
    pure function of the set of its items, each with what shapes its row)."""
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update("\t".join(row).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Source:
    """A complete earlier artifact that can lend items: its key, bucket depth and shard digests."""

    key: str
    created: float
    depth: int
    digests: dict[str, str]  # digest -> shard (shards without a digest lend item by item only)


@dataclass(frozen=True)
class Hit:
    """Where an item was found: the source artifact, its shard, and the item's index row."""

    source: str
    shard: str
    row: dict[str, Any]


@dataclass
class ItemIndex:
    storage: Storage
    stage: str
    fingerprint: str
    current: str = ""  # the key being built: never its own source
    lend: bool = True  # False: record and seal the current artifact, reuse nothing (--force)
    _sources: list[Source] | None = field(default=None, repr=False)
    _files: dict[str, pa.Table | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def prefix(self) -> str:
        return f"{INDEX}/{self.stage}/{self.fingerprint}"

    def shard_file(self, key: str, shard: str) -> str:
        return f"{self.prefix}/{key}/{shard}.parquet"

    # --- writing ------------------------------------------------------------------------------

    def record(self, shard: str, rows: pa.Table, digest: str | None = None) -> dict[str, str]:
        """Write the index rows of one shard of the current artifact (before its marker). Returns
        the shard stats that carry its digest (if the stage gives one) into the marker and `seal`."""
        buf = io.BytesIO()
        pq.write_table(rows.sort_by("item"), buf, compression="zstd")
        self.storage.put(self.shard_file(self.current, shard), buf.getvalue())
        return {DIGEST: digest} if digest else {}

    def seal(self, done: dict[str, ShardRecord]) -> None:
        """Make the current artifact a source (call after all shards, before the manifest): its
        shards' index rows regrouped into hash buckets, then the sealed file."""
        present = set(self.storage.list(f"{self.prefix}/{self.current}"))
        depth = self._write_buckets(
            self.current, [n for n in sorted(done) if self.shard_file(self.current, n) in present]
        )
        digests = {name: rec.stats[DIGEST] for name, rec in sorted(done.items()) if rec.stats.get(DIGEST)}
        body = {"key": self.current, "created": time.time(), "depth": depth, "shards": digests}
        self.storage.put(f"{self.prefix}/{SEALED}/{self.current}.json", json.dumps(body).encode())

    def _write_buckets(self, key: str, shards: list[str]) -> int:
        """Artifact ``key``'s index rows (of these shards) regrouped into hash buckets; the depth."""
        # NOTE: out of core, in one read of the shard index files: each file's rows go to one of
        # 16 local spill files by the first hex digit of their hash (a bucket at any depth ≥ 1
        # lies in one of them), then each spill file is cut into its buckets. Memory holds a
        # sixteenth of the index, not all of it twice (1 M crawl items: +470 MB in memory).
        # The reads and writes overlap in threads: on S3 each is a round trip (the paper's corpus:
        # 8,400 shard files read, 4,096 bucket files written).
        with tempfile.TemporaryDirectory(prefix="uniter-seal-") as tmp, ThreadPoolExecutor(IO_THREADS) as io_pool:
            spills: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchStreamWriter]] = {}
            total = 0
            files = _in_order(io_pool, self.storage.read_bytes, [self.shard_file(key, n) for n in shards])
            try:
                for name, data in zip(shards, files, strict=True):
                    rows = pq.read_table(io.BytesIO(data))
                    hashes = np.fromiter(map(_hash32, rows.column("item").to_pylist()), np.uint32, rows.num_rows)
                    rows = rows.append_column("shard", pa.array([name] * rows.num_rows, pa.string()))
                    rows = rows.append_column("_hash", pa.array(hashes))
                    total += rows.num_rows
                    for group in np.unique(hashes >> 28):
                        part = rows.filter(pa.array(hashes >> 28 == group))
                        if int(group) not in spills:
                            sink = pa.OSFile(f"{tmp}/{group}.arrow", "wb")
                            spills[int(group)] = sink, pa.ipc.new_stream(sink, part.schema)
                        spills[int(group)][1].write_table(part)
            finally:
                for sink, writer in spills.values():
                    writer.close()
                    sink.close()
            depth = 0
            while total > BUCKET_ROWS * 16**depth:
                depth += 1
            groups = [[g] for g in sorted(spills)] if depth else [sorted(spills)] if spills else []
            writes: list[Future] = []
            for group in groups:
                rows = pa.concat_tables(pa.ipc.open_stream(f"{tmp}/{g}.arrow").read_all() for g in group)
                rows = rows.combine_chunks()
                hashes = rows.column("_hash").to_numpy()
                buckets = hashes >> np.uint32(32 - 4 * depth) if depth else np.zeros(rows.num_rows, np.uint32)
                order = np.argsort(buckets, kind="stable")
                rows = rows.drop_columns(["_hash"])
                for run in np.split(order, np.flatnonzero(np.diff(buckets[order])) + 1):
                    buf = io.BytesIO()
                    pq.write_table(rows.take(pa.array(run)), buf, compression="zstd")
                    path = f"{self.prefix}/{key}/{BUCKET}{_bucket(int(hashes[run[0]]), depth)}.parquet"
                    writes.append(io_pool.submit(self.storage.put, path, buf.getvalue()))
                for done_write in writes:  # a group's files are written before the next is read
                    done_write.result()
                writes.clear()
        return depth

    def put_table(self, name: str, table: pa.Table) -> None:
        """A whole-artifact table of the current artifact (e.g. dedup's near-duplicate edges)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.storage.put(f"{self.prefix}/{self.current}/{name}.parquet", buf.getvalue())

    def newest_table(self, name: str) -> pa.Table | None:
        """That table of the newest source that has one."""
        for source in self.sources():
            path = f"{self.prefix}/{source.key}/{name}.parquet"
            if self.storage.exists(path):
                try:
                    return pq.read_table(io.BytesIO(self.storage.read_bytes(path)))
                except (StorageError, pa.ArrowException):
                    continue
        return None

    # --- finding ------------------------------------------------------------------------------

    def sources(self) -> list[Source]:
        """Complete earlier artifacts with this fingerprint, newest first (read once per run)."""
        if self._sources is None and not self.lend:
            self._sources = []
        if self._sources is None:
            found = []
            for key in self.storage.list(f"{self.prefix}/{SEALED}"):
                try:
                    body = json.loads(self.storage.read_bytes(key))
                    if body["key"] == self.current:
                        continue
                    if not self.storage.exists(f"{ARTIFACTS}/{self.stage}/{body['key']}/{MANIFEST}"):
                        continue  # not complete (or removed): lends nothing
                    if "depth" not in body and isinstance(body.get("shards"), list):
                        body = self._upgrade(key, body)
                    digests = {d: shard for shard, d in body["shards"].items()}
                    found.append(Source(body["key"], float(body["created"]), int(body["depth"]), digests))
                except (ValueError, KeyError, TypeError, AttributeError, StorageError):
                    continue  # an unreadable seal lends nothing; the items are made again
            self._sources = sorted(found, key=lambda s: (-s.created, s.key))
        return self._sources

    def _upgrade(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A seal written before hash buckets (each shard's first and last item, `[first, last,
        shard]`): its buckets are built once from its shard index files, and the seal rewritten in
        today's form, without digests (its shards lend item by item). An upgrade then keeps the
        items a storage already holds (idempotent: racing runs write the same files)."""
        depth = self._write_buckets(body["key"], [r[2] for r in body["shards"]])
        new = {"key": body["key"], "created": body["created"], "depth": depth, "shards": {}}
        self.storage.put(path, json.dumps(new).encode())
        return new

    def same_shard(self, digest: str) -> tuple[str, str, dict[str, Hit]] | None:
        """The newest earlier shard with exactly these items (`shard_digest`), as (source, shard,
        its items' hits); None if no source has one, its index file is gone, or a newer source
        holds any of its items (a newer row wins, as in `lookup`)."""
        sources = self.sources()
        for n, source in enumerate(sources):
            shard = source.digests.get(digest)
            if shard is None:
                continue
            rows = self._index_file(self.shard_file(source.key, shard))
            if rows is None:
                return None
            hits = {r["item"]: Hit(source.key, shard, r) for r in rows.to_pylist()}
            if n and self.lookup(hits, sources[:n]):
                return None
            return source.key, shard, hits
        return None

    def lookup(self, items: Iterable[str], sources: list[Source] | None = None) -> dict[str, Hit]:
        """The newest earlier index row of each item that has one: per source, one bucket file per
        bucket the items fall in."""
        hits: dict[str, Hit] = {}
        todo = set(items)
        hashes = {item: _hash32(item) for item in todo}  # once, whatever the sources' depths
        for source in self.sources() if sources is None else sources:
            if not todo:
                break
            by_bucket: dict[str, list[str]] = {}
            for item in todo:
                by_bucket.setdefault(_bucket(hashes[item], source.depth), []).append(item)
            for bucket, wanted in sorted(by_bucket.items()):
                rows = self._index_file(f"{self.prefix}/{source.key}/{BUCKET}{bucket}.parquet")
                if rows is None:
                    continue
                found = rows.filter(pc.is_in(rows.column("item"), value_set=pa.array(wanted, pa.string())))
                for row in found.to_pylist():
                    shard = row.pop("shard")
                    hits.setdefault(row["item"], Hit(source.key, shard, row))
            todo.difference_update(hits)
        return hits

    def _index_file(self, path: str) -> pa.Table | None:
        with self._lock:
            if path in self._files:
                return self._files[path]
        try:
            rows: pa.Table | None = pq.read_table(io.BytesIO(self.storage.read_bytes(path)))
        except (StorageError, pa.ArrowException):
            rows = None  # gone or unreadable: make the items again
        with self._lock:
            self._files[path] = rows
            while len(self._files) > CACHED_FILES:
                self._files.pop(next(iter(self._files)))
        return rows

    def grouped_rows(
        self, groups: dict[tuple[str, str], list[str]], table: str, column: str, schema: pa.Schema
    ) -> pa.Table:
        """The rows of ``table`` whose ``column`` holds these items, read from each source
        artifact's own shard file; the items grouped by (source, shard), as `where` groups hits (a
        caller that looks items up long before it copies them keeps these lists, not the hits)."""
        parts = [schema.empty_table()]
        for (source, shard), wanted in sorted(groups.items()):
            key = f"{ARTIFACTS}/{self.stage}/{source}/{table}/{shard}.parquet"
            with self.storage.open(key) as f:
                # NOTE: read, then filter: `filters=` goes through the dataset machinery, which cost
                # 19 ms against 14 for a crawl shard of 500 images (17 MB), most of them wanted.
                data = pq.read_table(f)
            keep = pa.array(wanted, data.schema.field(column).type)
            data = data.filter(pc.is_in(data.column(column), value_set=keep))
            if data.num_rows != len(set(wanted)):
                raise StorageError(
                    f"{self.storage.url(key)}: holds {data.num_rows} of the {len(set(wanted))} rows its index "
                    f"names; remove {self.storage.url(self.prefix)}/{SEALED}/{source}.json to stop reusing it"
                )
            parts.append(data.select(schema.names).cast(schema))
        return pa.concat_tables(parts)


def where(hits: Iterable[Hit]) -> dict[tuple[str, str], list[str]]:
    """The hits' items grouped by the (source artifact, shard) that holds them."""
    groups: dict[tuple[str, str], list[str]] = {}
    for hit in hits:
        groups.setdefault((hit.source, hit.shard), []).append(hit.row["item"])
    return groups


def remove_sources(storage: Storage, stage: str, keys: Iterable[str]) -> int:
    """Forget these artifacts as sources: each seal first (no reader then finds half an index),
    then the index files. Returns how many index objects were removed. For `uniter gc`."""
    wanted = set(keys)
    seals, files = [], []
    for path in storage.list(f"{INDEX}/{stage}"):
        parts = path.split("/")  # index/<stage>/<fp>/<key or _sealed>/<file>
        if len(parts) != 5:
            continue
        if parts[3] == SEALED and parts[4].removesuffix(".json") in wanted:
            seals.append(path)
        elif parts[3] in wanted:
            files.append(path)
    for path in seals + files:
        storage.remove(path)
    return len(seals) + len(files)
