"""Item-level reuse across cache keys: a stage takes finished items from its earlier artifacts.

A stage's cache key is the content of everything upstream, so ten new captions give `crawl` and
`extract` new keys. The artifact under the new key is still written whole (a rebuild gives the
same bytes as a build from scratch), but each item already finished under an earlier key — an
image fetched with the same options, features of the same image bytes by the same extractor — is
copied from the earlier artifact's file instead of being made again.

Layout under the storage root, per stage and *item fingerprint* (the stage's settings that shape
one item: image options, extractor weights digest and box selection — not the shard size)::

    index/<stage>/<fingerprint>/<artifact key>/<shard>.parquet   one row per item, sorted by `item`
    index/<stage>/<fingerprint>/_sealed/<artifact key>.json       its shards' item ranges

Shards of crawl and extract are contiguous ranges of sorted image keys, so an artifact's sealed
file (one line per shard: first and last item) is all a lookup needs to go from an image key to
the one earlier shard that may hold it: a binary search, then one small index file read per
earlier shard touched — never a scan of earlier artifacts per image. The index file holds what
the stage needs to decide (the URL, outcome and HTTP validators for crawl; the image sha256 for
extract); the data row itself is read from the earlier artifact's own table file.

The seal is written after every shard, before the artifact's manifest, and a source counts only
once its manifest exists, so a half-built artifact is never a source. `uniter gc` removes a
removed artifact's seal first, then its index files.
"""

from __future__ import annotations

import bisect
import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.artifact import ARTIFACTS, MANIFEST, ShardRecord
from storage import Storage, StorageError

INDEX = "index"
SEALED = "_sealed"
FIRST, LAST = "item_first", "item_last"  # shard stats: the shard's item range


@dataclass(frozen=True)
class Source:
    """A complete earlier artifact that can lend items: its key and its shards' item ranges
    (sorted by first item; disjoint for crawl and extract, possibly overlapping elsewhere)."""

    key: str
    created: float
    firsts: list[str]
    lasts: list[str]
    shards: list[str]
    reach: list[str] = field(default_factory=list)  # reach[i]: the largest last item of shards 0..i

    def __post_init__(self) -> None:
        reach: list[str] = []
        for last in self.lasts:
            reach.append(max(reach[-1], last) if reach else last)
        object.__setattr__(self, "reach", reach)

    def shards_of(self, item: str) -> list[str]:
        """The shards whose range holds ``item``: a binary search, then a walk back that stops at
        once when ranges are disjoint."""
        found = []
        i = bisect.bisect_right(self.firsts, item) - 1
        while i >= 0 and self.reach[i] >= item:
            if self.lasts[i] >= item:
                found.append(self.shards[i])
            i -= 1
        return found


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

    @property
    def prefix(self) -> str:
        return f"{INDEX}/{self.stage}/{self.fingerprint}"

    def shard_file(self, key: str, shard: str) -> str:
        return f"{self.prefix}/{key}/{shard}.parquet"

    # --- writing ------------------------------------------------------------------------------

    def record(self, shard: str, rows: pa.Table) -> dict[str, str]:
        """Write the index rows of one shard of the current artifact (before its marker). Returns
        the shard stats that carry its item range into the marker (and so into `seal`)."""
        rows = rows.sort_by("item")
        buf = io.BytesIO()
        pq.write_table(rows, buf, compression="zstd")
        self.storage.put(self.shard_file(self.current, shard), buf.getvalue())
        if rows.num_rows == 0:
            return {}
        return {FIRST: rows.column("item")[0].as_py(), LAST: rows.column("item")[-1].as_py()}

    def seal(self, done: dict[str, ShardRecord]) -> None:
        """Make the current artifact a source (call after all shards, before the manifest)."""
        ranges = sorted((rec.stats[FIRST], rec.stats[LAST], name) for name, rec in done.items() if FIRST in rec.stats)
        body = {"key": self.current, "created": time.time(), "shards": [list(r) for r in ranges]}
        self.storage.put(f"{self.prefix}/{SEALED}/{self.current}.json", json.dumps(body).encode())

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
                    ranges = body["shards"]
                    source = Source(
                        body["key"], float(body["created"]), [r[0] for r in ranges], [r[1] for r in ranges],
                        [r[2] for r in ranges],
                    )  # fmt: skip
                except (ValueError, KeyError, TypeError, IndexError, StorageError):
                    continue  # an unreadable seal lends nothing; the items are made again
                if source.key == self.current:
                    continue
                if self.storage.exists(f"{ARTIFACTS}/{self.stage}/{source.key}/{MANIFEST}"):
                    found.append(source)
            self._sources = sorted(found, key=lambda s: (-s.created, s.key))
        return self._sources

    def lookup(self, items: Iterable[str]) -> dict[str, Hit]:
        """The newest earlier index row of each item that has one."""
        hits: dict[str, Hit] = {}
        todo = sorted(set(items))
        for source in self.sources():
            if not todo:
                break
            by_shard: dict[str, list[str]] = {}
            for item in todo:
                for shard in source.shards_of(item):
                    by_shard.setdefault(shard, []).append(item)
            for shard, wanted in by_shard.items():
                rows = self._index_rows(source.key, shard)
                if rows is None:
                    continue
                found = rows.filter(pc.is_in(rows.column("item"), value_set=pa.array(wanted, pa.string())))
                for row in found.to_pylist():
                    hits.setdefault(row["item"], Hit(source.key, shard, row))
            todo = [i for i in todo if i not in hits]
        return hits

    def _index_rows(self, key: str, shard: str) -> pa.Table | None:
        path = self.shard_file(key, shard)
        if path not in self._files:
            try:
                self._files[path] = pq.read_table(io.BytesIO(self.storage.read_bytes(path)))
            except (StorageError, pa.ArrowException):
                self._files[path] = None  # gone or unreadable: make the items again
            if len(self._files) > 8:  # a run walks the sources in item order: a few files suffice
                self._files.pop(next(iter(self._files)))
        return self._files[path]

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
