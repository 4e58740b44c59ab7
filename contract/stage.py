"""The stage contract: a plain function over artifacts, with a version, sharded and resumable."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from contract.artifact import Artifact, EncodedTable, Manifest, ShardRecord
from contract.progress import NullProgress, Progress
from contract.reuse import ItemIndex
from storage import Storage


@dataclass(frozen=True)
class Deferred:
    """A function named `module:function`, imported at its first call: a stage's declaration
    (which every command reads) need not import what its work needs (torch for the detector and
    the trainer). Plain data, so a declaration still pickles."""

    target: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


@dataclass(frozen=True)
class Stage:
    """A node of the DAG.

    ``run(ctx)`` writes shards through ``ctx``; the runner publishes the manifest. Bump
    ``version`` whenever a code change alters the output, so old caches are not reused.
    """

    name: str
    version: int
    run: Callable[[StageContext], None]
    inputs: tuple[str, ...] = ()  # upstream stage names
    tables: tuple[str, ...] = ()  # tables the artifact holds (catalog views)
    description: str = ""
    # Derived figures added to the summed shard stats at publication (e.g. a success rate).
    summarize: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Parquet codec per table where zstd is wasted work (already-compressed image bytes).
    compression: dict[str, str] = field(default_factory=dict)
    # Other config sections the stage reads (dedup fetches evaluation images the way crawl does);
    # they are part of its key and reach it as ``ctx.extra[name]``.
    extra_config: tuple[str, ...] = ()
    # The ids of the shards a run writes, from its context (sharded stages: crawl, extract), so an
    # orchestrator can fan them out as separate tasks (`run_shards`) and publish once at the end.
    shard_ids: Callable[[StageContext], list[str]] | None = None
    # Item-level reuse across keys (contract/reuse.py): the config fields that do not shape one item
    # (the shard size) and so are left out of the item fingerprint. None: the stage reuses nothing.
    reuse_ignores: tuple[str, ...] | None = None
    # Upstream stages whose items this stage's items are made from: their item fingerprints are
    # part of this one (extract's features are of the crawl's stored JPEG, which the crawl's image
    # options shape, while its index names an image by the sha256 of the bytes as downloaded).
    reuse_inputs: tuple[str, ...] = ()
    # The version of one item's content, when a `version` bump left earlier items valid (it changed
    # how items are cut into shards, or how new ones are stored with the same hashes): earlier
    # artifacts keep lending their items (None: `version`).
    item_version: int | None = None


@dataclass
class StageContext:
    """What a running stage sees: its config section, its inputs, and a shard writer."""

    stage: Stage
    config: Any  # the stage's validated config section
    storage: Storage
    output: Artifact
    inputs: dict[str, Manifest]
    run_id: str
    progress: Progress = field(default_factory=NullProgress)
    extra: dict[str, Any] = field(default_factory=dict)
    done: dict[str, ShardRecord] = field(default_factory=dict)
    selection: frozenset[str] | None = None  # the shards this run may write (None: all)
    reuse: ItemIndex | None = None  # earlier artifacts' items (None: build everything, e.g. --force)
    written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def shard_done(self, shard: str) -> bool:
        return shard in self.done

    def selected(self, shard: str) -> bool:
        """Whether this run writes `shard` (a fanned-out task writes only its share)."""
        return self.selection is None or shard in self.selection

    def write_shard(
        self,
        shard: str,
        tables: dict[str, pa.Table],
        stats: dict[str, Any],
        started: float,
        extras: dict[str, bytes] | None = None,
    ) -> None:
        """Encode and publish one shard (safe to call from several threads). ``extras`` are
        non-table files (reports) published with it."""
        record = self.output.write_shard(shard, tables, stats, self.run_id, started, self.stage.compression, extras)
        with self._lock:
            self.done[shard] = record
            self.written += 1

    def publish_shard(
        self, shard: str, encoded: dict[str, EncodedTable], stats: dict[str, Any], started: float
    ) -> None:
        """For shards whose files a worker process already encoded (`encode_tables`)."""
        record = self.output.publish_shard(shard, encoded, stats, self.run_id, started)
        with self._lock:
            self.done[shard] = record
            self.written += 1

    def link_shard(self, shard: str, source: str, source_shard: str, stats: dict[str, Any], started: float) -> bool:
        """Publish ``shard`` as a copy of an earlier artifact's shard (`Artifact.link_shard`);
        False, writing nothing, if that shard's marker is gone."""
        record = self.output.link_shard(shard, source, source_shard, stats, self.run_id, started)
        if record is None:
            return False
        with self._lock:
            self.done[shard] = record
            self.written += 1
        return True

    def shard_files(self, shard: str, table: str) -> list[str]:
        """Storage keys of this stage's own finished shard's table (a later step reads an earlier one)."""
        rec = self.done[shard]
        return [self.output.file_key(rec.files[table].path)] if table in rec.files else []

    def input_files(self, stage: str, table: str) -> list[str]:
        """Storage keys of an upstream table's Parquet files, in shard order."""
        manifest = self.inputs[stage]
        art = Artifact(self.storage, stage, manifest.key)
        return [art.file_key(f.path) for f in manifest.tables.get(table, [])]


def now() -> float:
    return time.time()


def shard_id(prefix: str, index: int) -> str:
    """Zero-padded shard ids sort in shard order."""
    return f"{prefix}-{index:05d}"


def batched(items: Iterable, n: int) -> Iterable[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
