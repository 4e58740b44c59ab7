"""Artifacts: the sharded, manifest-published output of one stage for one cache key.

Layout under the storage root::

    artifacts/<stage>/<key>/<table>/<shard>.parquet   data, one file per table per shard
    artifacts/<stage>/<key>/_shards/<shard>.json       shard marker: written after its data
    artifacts/<stage>/<key>/_manifest.json             written last: the artifact is complete

A shard with a marker is done and never redone; a manifest makes the artifact visible to readers.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from contract.fingerprint import sha256_json
from storage import Storage, StorageError

ARTIFACTS = "artifacts"
MANIFEST = "_manifest.json"
SHARDS = "_shards"


@dataclass(frozen=True)
class TableFile:
    path: str  # relative to the artifact folder
    sha256: str
    rows: int
    bytes: int


@dataclass
class ShardRecord:
    shard: str
    files: dict[str, TableFile]  # table -> file
    stats: dict[str, Any]
    seconds: float
    run_id: str
    extras: dict[str, TableFile] = field(default_factory=dict)  # non-table files (reports), by name

    @classmethod
    def from_json(cls, data: dict) -> ShardRecord:
        files = {t: TableFile(**f) for t, f in data["files"].items()}
        extras = {t: TableFile(**f) for t, f in data.get("extras", {}).items()}
        return cls(data["shard"], files, data["stats"], data["seconds"], data["run_id"], extras)


@dataclass
class Manifest:
    stage: str
    stage_version: int
    key: str
    config_sha256: str
    inputs: dict[str, str]  # input name -> content sha256 (upstream artifacts and input files)
    code_version: str
    tables: dict[str, list[TableFile]]
    counts: dict[str, Any]
    content_sha256: str  # over every data file's name and digest: equal iff the data is equal
    created_at: str
    shards: int = 0
    seconds: float = 0.0
    uri: str = ""
    files: dict[str, TableFile] = field(default_factory=dict)  # extra files (reports), by name

    def rows(self, table: str) -> int:
        return sum(f.rows for f in self.tables.get(table, []))

    def table_sha256(self, table: str) -> str:
        return sha256_json([[f.path, f.sha256] for f in self.tables.get(table, [])])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["tables"] = {t: [TableFile(**f) for f in files] for t, files in data["tables"].items()}
        data["files"] = {n: TableFile(**f) for n, f in data.get("files", {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class EncodedTable:
    local_path: str
    sha256: str
    rows: int
    bytes: int


def encode_tables(
    tables: dict[str, pa.Table], folder: Path, compression: dict[str, str] | None = None
) -> dict[str, EncodedTable]:
    """Write each table as Parquet into ``folder`` (pure: safe to run in a worker process)."""
    encoded = {}
    for table, data in tables.items():
        local = folder / f"{table}.parquet"
        # NOTE: fixed writer options keep the bytes deterministic, so a resumed run
        # reproduces exactly the files of an uninterrupted one.
        codec = (compression or {}).get(table, "zstd")
        # NOTE: no dictionary and no min/max statistics for blob columns (image bytes): pyarrow
        # would hash and compare every 100 KB value for nothing — 8× the cost of the write itself.
        small = [f.name for f in data.schema if not (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))]
        with open(local, "wb") as f:
            out = _HashingFile(f)
            pq.write_table(
                data, out, compression=codec, row_group_size=64 * 1024, use_dictionary=small, write_statistics=small
            )
        encoded[table] = EncodedTable(str(local), out.sha256.hexdigest(), data.num_rows, out.size)
    return encoded


class _HashingFile:
    """A file the Parquet writer writes through, hashed on the way, so the file is not read back to
    hash it (a 17 MB crawl shard: 48 against 73 ms, interleaved runs; the same bytes)."""

    def __init__(self, f):
        self.f, self.sha256, self.size, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True  # the caller's `with` closes the real file


def content_sha256(tables: dict[str, list[TableFile]], files: dict[str, TableFile] | None = None) -> str:
    digest = {t: [[f.path, f.sha256] for f in fs] for t, fs in sorted(tables.items())}
    if files:  # (only when present, so artifacts without extra files keep their digests)
        digest["__files__"] = [[f.path, f.sha256] for _, f in sorted(files.items())]
    return sha256_json(digest)


def merge_counts(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Sum numeric leaves of nested dicts (shard stats → stage counts)."""
    for k, v in more.items():
        if isinstance(v, dict):
            merge_counts(into.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v
    return into


@dataclass
class Artifact:
    storage: Storage
    stage: str
    key: str
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        self.prefix = f"{ARTIFACTS}/{self.stage}/{self.key}"

    @property
    def uri(self) -> str:
        return self.storage.url(self.prefix)

    def file_key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}"

    def manifest(self) -> Manifest | None:
        key = f"{self.prefix}/{MANIFEST}"
        if not self.storage.exists(key):
            return None
        try:
            return Manifest.from_json(self.storage.read_bytes(key).decode("utf-8"))
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"{self.storage.url(key)}: unreadable manifest ({exc}); remove it to rebuild") from None

    def done_shards(self) -> dict[str, ShardRecord]:
        done = {}
        for key in self.storage.list(f"{self.prefix}/{SHARDS}"):
            if not key.endswith(".json"):
                continue
            try:
                rec = ShardRecord.from_json(json.loads(self.storage.read_bytes(key)))
            except (ValueError, KeyError, TypeError):
                continue  # an unreadable marker means the shard is not done: it will be redone
            done[rec.shard] = rec
        return done

    def shard_record(self, shard: str) -> ShardRecord | None:
        """A finished shard's marker (None if it has none, or it cannot be read)."""
        try:
            return ShardRecord.from_json(json.loads(self.storage.read_bytes(f"{self.prefix}/{SHARDS}/{shard}.json")))
        except (StorageError, ValueError, KeyError, TypeError):
            return None

    def write_shard(
        self,
        shard: str,
        tables: dict[str, pa.Table],
        stats: dict[str, Any],
        run_id: str,
        started: float,
        compression: dict[str, str] | None = None,
        extras: dict[str, bytes] | None = None,
    ) -> ShardRecord:
        """Write each table's file, then the marker. Re-writing a shard yields identical bytes."""
        with tempfile.TemporaryDirectory(prefix="uniter-shard-") as tmp:
            encoded = encode_tables(tables, Path(tmp), compression)
            return self.publish_shard(shard, encoded, stats, run_id, started, extras)

    def publish_shard(
        self,
        shard: str,
        encoded: dict[str, EncodedTable],
        stats: dict[str, Any],
        run_id: str,
        started: float,
        extras: dict[str, bytes] | None = None,
    ) -> ShardRecord:
        """Upload files encoded by `encode_tables` (possibly in a worker process), then the marker."""
        files: dict[str, TableFile] = {}
        for table, enc in encoded.items():
            relpath = f"{table}/{shard}.parquet"
            self.storage.put_file(self.file_key(relpath), Path(enc.local_path), move=True)
            files[table] = TableFile(relpath, enc.sha256, enc.rows, enc.bytes)
        extra_files: dict[str, TableFile] = {}
        for name, data in (extras or {}).items():
            relpath = f"files/{name}"
            self.storage.put(self.file_key(relpath), data)
            extra_files[name] = TableFile(relpath, sha256_bytes(data), 0, len(data))
        record = ShardRecord(shard, files, stats, round(time.time() - started, 3), run_id, extra_files)
        marker = json.dumps(asdict(record), sort_keys=True).encode()
        self.storage.put(f"{self.prefix}/{SHARDS}/{shard}.json", marker)
        return record

    def link_shard(
        self, shard: str, source: str, source_shard: str, stats: dict[str, Any], run_id: str, started: float
    ) -> ShardRecord | None:
        """Publish ``shard`` as a copy of shard ``source_shard`` of this stage's artifact ``source``
        (same rows, so the same bytes as writing it: a file is a pure function of its rows), then
        the marker; ``stats`` update the earlier shard's. For a rebuild's unchanged shards: nothing
        decoded or encoded, and on S3 no bytes through this machine. None, writing nothing, if
        the earlier shard's marker is gone."""
        earlier = Artifact(self.storage, self.stage, source)
        record = earlier.shard_record(source_shard)
        if record is None:
            return None
        files: dict[str, TableFile] = {}
        for table, f in record.files.items():
            relpath = f"{table}/{shard}.parquet"
            self.storage.copy(earlier.file_key(f.path), self.file_key(relpath))
            files[table] = TableFile(relpath, f.sha256, f.rows, f.bytes)
        for f in record.extras.values():  # non-table files (reports) keep their names, files/<name>
            self.storage.copy(earlier.file_key(f.path), self.file_key(f.path))
        merged = {**record.stats, **stats, "shards_linked": 1}
        linked = ShardRecord(shard, files, merged, round(time.time() - started, 3), run_id, dict(record.extras))
        self.storage.put(f"{self.prefix}/{SHARDS}/{shard}.json", json.dumps(asdict(linked), sort_keys=True).encode())
        return linked

    def publish(
        self,
        *,
        stage_version: int,
        config_sha256: str,
        inputs: dict[str, str],
        code_version: str,
        shards: dict[str, ShardRecord],
        seconds: float,
        summarize=None,
    ) -> Manifest:
        tables: dict[str, list[TableFile]] = {}
        extra_files: dict[str, TableFile] = {}
        counts: dict[str, Any] = {}
        for name in sorted(shards):
            rec = shards[name]
            for table, f in rec.files.items():
                tables.setdefault(table, []).append(f)
            extra_files.update(rec.extras)
            merge_counts(counts, rec.stats)
        if summarize is not None:
            counts.update(summarize(counts))
        manifest = Manifest(
            stage=self.stage,
            stage_version=stage_version,
            key=self.key,
            config_sha256=config_sha256,
            inputs=inputs,
            code_version=code_version,
            tables=tables,
            counts=counts,
            content_sha256=content_sha256(tables, extra_files),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            shards=len(shards),
            seconds=round(seconds, 3),
            uri=self.uri,
            files=extra_files,
        )
        self.storage.put(f"{self.prefix}/{MANIFEST}", manifest.to_json().encode())
        return manifest

    def clear(self) -> None:
        # Manifest first: from then on the artifact is invisible, even if the rest fails midway.
        self.storage.remove(f"{self.prefix}/{MANIFEST}")
        self.storage.remove(self.prefix)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
