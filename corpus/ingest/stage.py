"""The ingest stage: every configured source → shards of the `pairs` and `rejects` tables."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Iterator

import multiprocessing

from corpus.ingest.formats import Chunk, open_format
from corpus.ingest.writer import ShardBuilder
from pipeline.stage import Stage, StageContext, now, shard_id

log = logging.getLogger(__name__)


def normalize_chunk(fmt, chunk: Chunk) -> tuple[dict, dict, float]:
    """Worker: one chunk → (tables, stats, start time). Module-level so a process pool can run it."""
    started = now()
    out = ShardBuilder(fmt.name)
    fmt.normalize(chunk, out)
    return out.tables(), out.stats(), started


def run_ingest(ctx: StageContext) -> None:
    cfg = ctx.config
    for source in cfg.sources:
        fmt = open_format(source)
        with ctx.progress.task(f"ingest {fmt.name}", total=fmt.total_bytes, unit="B") as bar:
            todo = _pending(ctx, fmt, cfg.shard_rows, bar)
            # Line formats ship raw lines to worker processes cheaply; JSON formats keep an image
            # index in memory that would have to be copied to every worker, so they stay in-process.
            parallel = cfg.workers > 1 and source.format in ("cc", "sbu")
            results = _parallel(fmt, todo, cfg.workers) if parallel else (normalize_chunk(fmt, c) + (c,) for c in todo)
            for tables, stats, started, chunk in results:
                ctx.write_shard(shard_id(fmt.name, chunk.index), tables, stats, started)
                bar.advance(chunk.nbytes)


def _pending(ctx: StageContext, fmt, shard_rows: int, bar) -> Iterator[Chunk]:
    """Chunks whose shard is not done yet (done ones only advance the progress bar)."""
    for chunk in fmt.chunks(shard_rows):
        if ctx.shard_done(shard_id(fmt.name, chunk.index)):
            bar.advance(chunk.nbytes)
        else:
            yield chunk


def _parallel(fmt, chunks: Iterator[Chunk], workers: int):
    """Normalize chunks in worker processes, at most 2 per worker in flight (bounded memory),
    yielding results in chunk order."""
    # NOTE: forkserver, not fork: the parent may hold threads (boto3, DuckDB) that fork would copy locked.
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: list[tuple[Future, Chunk]] = []
        for chunk in chunks:
            pending.append((pool.submit(normalize_chunk, fmt, chunk), chunk))
            if len(pending) >= 2 * workers:
                fut, done_chunk = pending.pop(0)
                yield fut.result() + (done_chunk,)
        for fut, done_chunk in pending:
            yield fut.result() + (done_chunk,)


INGEST = Stage(
    name="ingest",
    version=1,
    run=run_ingest,
    inputs=(),
    tables=("pairs", "rejects"),
    description="annotation files (COCO, VG, CC, SBU, Karpathy, tables) → pairs + rejects",
)
