"""The ingest stage: every configured source → shards of the `pairs` and `rejects` tables.

reader (formats.*.chunks) → worker (normalize + Parquet encode, in-process or a process pool)
→ writer (publish the shard's files, then its marker).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from contract.artifact import encode_tables
from contract.pools import process_pool
from contract.stage import Stage, StageContext, now, shard_id
from corpus.ingest.formats import Chunk, open_format
from corpus.ingest.writer import ShardBuilder

# Formats whose chunks are cheap to ship to another process (raw lines). The JSON formats hold an
# image index that every worker would need a copy of, and ijson parsing dominates them anyway.
PARALLEL_FORMATS = ("cc", "sbu")
PARALLEL_MIN_BYTES = 32 << 20


def process_chunk(fmt, chunk: Chunk, folder: str) -> tuple[dict, dict, float]:
    """Worker: normalize one chunk and encode its tables into ``folder``. Module-level: picklable."""
    started = now()
    out = ShardBuilder(fmt.name)
    fmt.normalize(chunk, out)
    return encode_tables(out.tables(), Path(folder)), out.stats(), started


def run_ingest(ctx: StageContext) -> None:
    cfg = ctx.config
    with tempfile.TemporaryDirectory(prefix="uniter-ingest-") as scratch:
        for source in cfg.sources:
            fmt = open_format(source, cfg.max_caption_chars)
            workers = _workers(cfg.workers, source.format, fmt.total_bytes)
            with ctx.progress.task(f"ingest {fmt.name}", total=fmt.total_bytes, unit="B") as bar:
                todo = _pending(ctx, fmt, cfg.shard_rows, bar)
                for chunk, (encoded, stats, started), folder in _process(fmt, todo, workers, Path(scratch)):
                    ctx.publish_shard(shard_id(fmt.name, chunk.index), encoded, stats, started)
                    shutil.rmtree(folder, ignore_errors=True)
                    bar.advance(chunk.nbytes)


def _workers(configured: int | None, format_name: str, total_bytes: int) -> int:
    if format_name not in PARALLEL_FORMATS:
        return 1
    if configured is None:
        # Starting worker processes costs ~1 s (imports): not worth it for small files.
        return (os.cpu_count() or 1) if total_bytes >= PARALLEL_MIN_BYTES else 1
    return configured


def _pending(ctx: StageContext, fmt, shard_rows: int, bar) -> Iterator[Chunk]:
    """Chunks whose shard is not done yet (done ones only advance the progress bar)."""
    for chunk in fmt.chunks(shard_rows):
        if ctx.shard_done(shard_id(fmt.name, chunk.index)):
            bar.advance(chunk.nbytes)
        else:
            yield chunk


def _process(fmt, chunks: Iterator[Chunk], workers: int, scratch: Path):
    """Yield ``(chunk, result, folder)`` in chunk order. With several workers at most two chunks
    per worker are in flight, so memory stays bounded whatever the input size."""

    def folder_for(chunk: Chunk) -> Path:
        folder = scratch / f"{fmt.name}-{chunk.index:05d}"
        folder.mkdir()
        return folder

    if workers == 1:
        for chunk in chunks:
            folder = folder_for(chunk)
            yield chunk, process_chunk(fmt, chunk, str(folder)), folder
        return
    with process_pool(workers) as pool:
        pending: list[tuple[Chunk, Future, Path]] = []
        for chunk in chunks:
            folder = folder_for(chunk)
            pending.append((chunk, pool.submit(process_chunk, fmt, chunk, str(folder)), folder))
            if len(pending) >= 2 * workers:
                done_chunk, fut, done_folder = pending.pop(0)
                yield done_chunk, fut.result(), done_folder
        for done_chunk, fut, done_folder in pending:
            yield done_chunk, fut.result(), done_folder


INGEST = Stage(
    name="ingest",
    version=2,  # 2: byte order marks, control characters, caption length, credentials, paths out of roots
    run=run_ingest,
    inputs=(),
    tables=("pairs", "rejects"),
    description="annotation files (COCO, VG, CC, SBU, Karpathy, tables) → pairs + rejects",
)
