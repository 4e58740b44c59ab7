"""The crawl stage: every distinct image of `pairs` → `images` (validated JPEG + hashes) and `failures`.

reader (distinct image keys in input order, cut into shards) → fetch (async HTTP / local roots)
→ worker (decode, orient, RGB, resize, JPEG, sha256, pHash in a process pool) → writer (shard).
A rebuild that expects only a few images to process (its new rows) does so in threads, without
starting the pool (see `THREADED_IMAGES`).

Several shards are in flight at once, so one slow host at the end of a shard never idles the
crawl; a shard is published when all its images are settled (fetched or failed). A rebuild's
shard whose images an earlier crawl's shard holds exactly, none due for a check, is linked from it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contract.artifact import Artifact
from contract.pools import process_pool
from contract.reuse import Hit, ItemIndex, shard_digest, where
from contract.stage import Stage, StageContext, now, shard_id
from corpus.images.fetch import Fetched, Fetcher, decide
from corpus.images.imaging import ImageOptions, Processed, process_or_reject
from storage.catalog import Catalog

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),  # the image_uri from pairs
        pa.field("final_url", pa.string(), nullable=False),  # after redirects
        pa.field("status", pa.string(), nullable=False),  # "ok"
        # JPEG, longer side <= max_side: re-encoded, or as downloaded less its metadata
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
        pa.field("orig_format", pa.string(), nullable=False),
        pa.field("orig_bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),  # of the original bytes
        pa.field("phash", pa.int64(), nullable=False),  # 64-bit pHash of the decoded image
        pa.field("phash_windows", pa.list_(pa.int64()), nullable=False),  # centre + 4 trimmed windows
        # CIELAB 32×32: the colour check of pHash candidates (corpus/images/colour.py)
        pa.field("thumb", pa.binary(), nullable=False),
    ]
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # http_404, timeout, too_large, not_an_image, …
        pa.field("detail", pa.string(), nullable=False),
        pa.field("http_status", pa.int32()),
        pa.field("attempts", pa.int32(), nullable=False),
    ]
)


# The reuse index row of one image (contract/reuse.py): what a later rebuild needs to decide
# whether to take the image from this crawl, check it again, or fetch it.
INDEX_SCHEMA = pa.schema(
    [
        pa.field("item", pa.string(), nullable=False),  # image_key
        pa.field("url", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),  # "ok" or the failure reason
        pa.field("etag", pa.string()),
        pa.field("last_modified", pa.string()),
        pa.field("fetched_at", pa.float64(), nullable=False),  # when these bytes (or this failure) came
        pa.field("checked_at", pa.float64(), nullable=False),  # last time the server confirmed them
    ]
)


@dataclass
class Outcome:
    key: str
    fetched: Fetched
    image: Processed | None = None
    reason: str | None = None
    detail: str = ""
    action: str = "fetched"  # fetched | retried | reused | revalidated | refetched | gone | recheck_failed
    prior: Hit | None = None  # the earlier crawl's row this shard takes (reused, revalidated, recheck_failed)
    fetched_at: float = 0.0
    checked_at: float = 0.0

    def index_row(self) -> dict[str, Any]:
        if self.prior is not None:
            row = dict(self.prior.row)
            if self.action == "revalidated":
                row.update(checked_at=self.checked_at, etag=self.fetched.etag, last_modified=self.fetched.last_modified)
            return row
        return {
            "item": self.key,
            "url": self.fetched.url,
            "outcome": "ok" if self.image is not None else self.reason or "unknown",
            "etag": self.fetched.etag,
            "last_modified": self.fetched.last_modified,
            "fetched_at": self.fetched_at,
            "checked_at": self.checked_at,
        }


def plan_shards(ctx: StageContext, shard_images: int) -> tuple[int, int, Iterator[tuple[int, list[str], list[str]]]]:
    """(distinct images, shards, iterator of (shard index, keys, uris)) in input order: each image
    where its first pair stands (ingest's files in shard order, rows in file order), shards of
    `shard_images` that never span two sources. The same pairs always give the same shards; rows
    appended to a source, or a new source, land in new shards, so a rebuild finds every earlier
    shard unchanged and links it (contract/reuse.py). DuckDB sorts out of core; we stream it."""
    keys = ctx.input_files("ingest", "pairs")
    catalog = Catalog(ctx.storage, {}, settings={"memory_limit": "2GB", "preserve_insertion_order": True})
    catalog.add_view("pairs", keys, positions=True)
    images = (
        "with images as (select image_key, min(image_uri) as image_uri, "
        "min({'f': filename, 'r': file_row_number, 's': source}) as first from pairs group by image_key) "
    )
    total, count = catalog.sql(
        images + f"select coalesce(sum(n), 0)::BIGINT, coalesce(sum(ceil(n / {int(shard_images)})), 0)::BIGINT "
        "from (select first.s, count(*) as n from images group by 1)"
    ).rows[0]
    query = images + "select image_key, image_uri, first.s from images order by first"

    def shards():
        index, buf_k, buf_u, source = 0, [], [], None
        try:
            for batch in catalog.stream(query):
                for key, uri, src in zip(*(batch.column(i).to_pylist() for i in range(3)), strict=True):
                    if buf_k and (len(buf_k) == shard_images or src != source):
                        yield index, buf_k, buf_u
                        buf_k, buf_u, index = [], [], index + 1
                    buf_k.append(key)
                    buf_u.append(uri)
                    source = src
            if buf_k:
                yield index, buf_k, buf_u
        finally:
            catalog.close()

    return total, count, shards()


def run_crawl(ctx: StageContext) -> None:
    cfg = ctx.config
    total, _, shards = plan_shards(ctx, cfg.shard_images)
    done_images = sum(rec.stats.get("images", 0) + rec.stats.get("failures", 0) for rec in ctx.done.values())
    with ctx.progress.task("crawl", total=total) as bar:
        bar.advance(done_images)
        threaded = expected_to_process(ctx, total - done_images) <= THREADED_IMAGES
        asyncio.run(_crawl(ctx, shards, bar, threaded))


# A rebuild that expects at most this many images to process (the corpus's images less those the
# newest earlier crawl holds) processes them in threads and never starts the pool. The pool costs
# ≈ 0.4 s of wall and two interpreters' imports of CPU before its first result; a small image
# costs ≈ 3.5 ms, mostly with the GIL released (decode, resize, JPEG encode): a rebuild's 250 new
# images crawled in 2.1 s in threads against 2.6 s with the pool (median of 3, 5,000 reused). A
# first build, or a big change, uses the pool from the start: 2,000 photos of 800-1600 px took
# 36.6 s with their first 512 in threads against 33.6 s with the pool alone (median of 3). The
# output is the same either way: the work per image is one pure function.
THREADED_IMAGES = 512


def expected_to_process(ctx: StageContext, total: int) -> int:
    """How many of the corpus's ``total`` images the newest earlier crawl does not hold (an
    estimate: it ignores recrawls and the images it holds that left the corpus)."""
    sources = ctx.reuse.sources() if ctx.reuse is not None else []
    manifest = Artifact(ctx.storage, "crawl", sources[0].key).manifest() if sources else None
    if manifest is None:
        return total
    return max(0, total - manifest.counts.get("images", 0) - manifest.counts.get("failures", 0))


def image_executor(workers: int, threaded: bool) -> Executor:
    """Where images are processed: the pool, or threads of this process when few are expected."""
    if threaded:
        return ThreadPoolExecutor(workers, thread_name_prefix="crawl-image")
    return process_pool(workers, preload=("corpus.images.imaging",))


async def _crawl(ctx: StageContext, shards, bar, threaded: bool) -> None:
    cfg = ctx.config
    workers = cfg.workers or os.cpu_count() or 1
    opts = ImageOptions.from_settings(cfg)
    pool = image_executor(workers, threaded)
    decode_slots = asyncio.Semaphore(4 * workers)  # bounded queue between download and decode
    # Bodies in memory, downloading or waiting to be decoded: without this bound, a crawl that
    # downloads faster than it decodes held every open shard's bodies at once.
    bodies = asyncio.Semaphore(cfg.concurrency + 4 * workers)
    shard_slots = asyncio.Semaphore(cfg.open_shards)
    loop = asyncio.get_running_loop()

    async def process(key: str, fetched: Fetched, action: str) -> Outcome:
        clock = time.time()
        if fetched.body is None:
            return Outcome(key, fetched, reason=fetched.reason, detail=fetched.detail, action=action,
                           fetched_at=clock, checked_at=clock)  # fmt: skip
        async with decode_slots:
            result = await loop.run_in_executor(pool, process_or_reject, fetched.body, opts)
        # The original is not stored, and an open shard held every one of them (2-3× its JPEGs).
        fetched.body = None
        if isinstance(result, Processed):
            return Outcome(key, fetched, image=result, action=action, fetched_at=clock, checked_at=clock)
        return Outcome(key, fetched, reason=result[0], detail=result[1], action=action, fetched_at=clock,
                       checked_at=clock)  # fmt: skip

    async def settle(fetcher: Fetcher, key: str, uri: str, hit: Hit | None, action: str) -> Outcome:
        async with bodies:
            out = await _settle(fetcher, key, uri, hit, action)
        bar.advance(1)
        return out

    async def _settle(fetcher: Fetcher, key: str, uri: str, hit: Hit | None, action: str) -> Outcome:
        if action == "check":
            row = hit.row
            fetched = await fetcher.fetch(uri, row["etag"], row["last_modified"])
            if fetched.not_modified:
                out = Outcome(key, fetched, action="revalidated", prior=hit, checked_at=time.time())
            elif fetched.body is not None:
                out = await process(key, fetched, "refetched")
            elif fetched.http_status in (404, 410) or not uri.startswith(("http://", "https://")):
                out = await process(key, fetched, "gone")
            else:  # a timeout or a 503 while re-checking: keep the copy we have, re-check next time
                out = Outcome(key, fetched, action="recheck_failed", prior=hit)
        else:
            out = await process(key, await fetcher.fetch(uri), "retried" if hit is not None else "fetched")
        return out

    async def crawl_shard(fetcher: Fetcher, index: int, keys: list[str], uris: list[str]) -> None:
        try:
            started = now()
            name = shard_id("images", index)
            pairs = list(zip(keys, uris, strict=True))
            digest = shard_digest(pairs)
            same = await asyncio.to_thread(ctx.reuse.same_shard, digest) if ctx.reuse is not None else None
            if same is not None:
                hits = same[2]
            else:
                hits = await asyncio.to_thread(ctx.reuse.lookup, keys) if ctx.reuse is not None else {}
            clock = time.time()
            actions = [decide(hits[k].row if k in hits else None, u, cfg, clock) for k, u in pairs]
            # NOTE: reused images take no task: in a rebuild they are 95 % of the items, and a task
            # each cost the event loop more than fetching the new ones (measured).
            outcomes = [
                Outcome(k, Fetched(u), action="reused", prior=hits[k])
                for (k, u), a in zip(pairs, actions, strict=True)
                if a == "reuse"
            ]
            bar.advance(len(outcomes))
            outcomes += await asyncio.gather(
                *(
                    settle(fetcher, k, u, hits.get(k), a)
                    for (k, u), a in zip(pairs, actions, strict=True)
                    if a != "reuse"
                )
            )
            rows = None  # the shard's reuse index rows: only a run that records them builds them
            if ctx.reuse is not None:
                rows = pa.Table.from_pylist([o.index_row() for o in outcomes], schema=INDEX_SCHEMA)
            # An earlier shard of exactly these images, each kept as it holds it (reused, or
            # confirmed by a 304): its files are this shard's, copied by the storage unread.
            if same is not None and all(o.prior is not None for o in outcomes):
                stats = {"bytes_downloaded": 0, "reuse": action_counts(outcomes)}
                if await asyncio.to_thread(link_shard, ctx, name, same[:2], rows, digest, stats, started):
                    return
            # Building and writing ~100 MB of Parquet: off the event loop, which keeps downloading.
            tables, stats = await asyncio.to_thread(shard_tables, outcomes, ctx.reuse)
            if ctx.reuse is not None:
                stats.update(await asyncio.to_thread(ctx.reuse.record, name, rows, digest))
            await asyncio.to_thread(ctx.write_shard, name, tables, stats, started)
        finally:
            shard_slots.release()

    try:
        async with Fetcher(cfg) as fetcher:
            running: set[asyncio.Task] = set()
            for index, keys, uris in shards:
                if ctx.shard_done(shard_id("images", index)) or not ctx.selected(shard_id("images", index)):
                    continue
                await shard_slots.acquire()
                task = asyncio.create_task(crawl_shard(fetcher, index, keys, uris))
                running.add(task)
                task.add_done_callback(running.discard)
                failed = [t for t in list(running) if t.done() and t.exception()]
                if failed:
                    raise failed[0].exception()
            if running:
                await asyncio.gather(*running)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def link_shard(
    ctx: StageContext,
    name: str,
    source: tuple[str, str],
    rows: pa.Table,
    digest: str,
    stats: dict[str, Any],
    started: float,
) -> bool:
    """Publish shard ``name`` as a copy of the earlier (artifact, shard) ``source``: index rows,
    then files and marker."""
    assert ctx.reuse is not None
    stats = {**ctx.reuse.record(name, rows, digest), **stats}
    return ctx.link_shard(name, *source, stats, started)


def shard_tables(outcomes: list[Outcome], reuse: ItemIndex | None = None) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Rows sorted by image key: a shard's content does not depend on completion order, nor on
    which rows came from an earlier crawl (their bytes are copied from its file as they are)."""
    outcomes = sorted(outcomes, key=lambda o: o.key)
    kept = [o for o in outcomes if o.prior is not None]
    ok = [o for o in outcomes if o.prior is None and o.image is not None]
    bad = [o for o in outcomes if o.prior is None and o.image is None]
    images = pa.table(
        {
            "image_key": [o.key for o in ok],
            "url": [o.fetched.url for o in ok],
            "final_url": [o.fetched.final_url or o.fetched.url for o in ok],
            "status": ["ok"] * len(ok),
            "bytes": binary_column([o.image.jpeg for o in ok]),
            "width": [o.image.width for o in ok],
            "height": [o.image.height for o in ok],
            "orig_width": [o.image.orig_width for o in ok],
            "orig_height": [o.image.orig_height for o in ok],
            "orig_format": [o.image.orig_format for o in ok],
            "orig_bytes": [o.image.orig_bytes for o in ok],
            "sha256": [o.image.sha256 for o in ok],
            "phash": [o.image.phash for o in ok],
            "phash_windows": [o.image.phash_windows for o in ok],
            "thumb": [o.image.thumb for o in ok],
        },
        schema=IMAGES_SCHEMA,
    )
    failures = pa.table(
        {
            "image_key": [o.key for o in bad],
            "url": [o.fetched.url for o in bad],
            "reason": [o.reason or "unknown" for o in bad],
            "detail": [o.detail[:300] for o in bad],
            "http_status": [o.fetched.http_status for o in bad],
            "attempts": [o.fetched.attempts for o in bad],
        },
        schema=FAILURES_SCHEMA,
    )
    if kept:
        assert reuse is not None
        good = [o.prior for o in kept if o.prior.row["outcome"] == "ok"]
        failed = [o.prior for o in kept if o.prior.row["outcome"] != "ok"]
        images = pa.concat_tables([images, reuse.grouped_rows(where(good), "images", "image_key", IMAGES_SCHEMA)])
        failures = pa.concat_tables(
            [failures, reuse.grouped_rows(where(failed), "failures", "image_key", FAILURES_SCHEMA)]
        )
        images, failures = images.sort_by("image_key"), failures.sort_by("image_key")
    stats = {
        "images": images.num_rows,
        "failures": failures.num_rows,
        "failure_reasons": dict(sorted(Counter(failures.column("reason").to_pylist()).items())),
        "bytes_downloaded": sum(o.image.orig_bytes for o in ok),
        "bytes_stored": pc.sum(pc.binary_length(images.column("bytes"))).as_py() or 0,
        "kept_as_downloaded": sum(o.image.as_downloaded for o in ok),  # of those processed in this run
        "reuse": action_counts(outcomes),
    }
    return {"images": images, "failures": failures}, stats


# How each image of a crawl came to be (the `reuse` counts of every run and rebuild).
ACTIONS = ("fetched", "retried", "reused", "revalidated", "refetched", "gone", "recheck_failed")


def action_counts(outcomes: list[Outcome]) -> dict[str, int]:
    actions = Counter(o.action for o in outcomes)
    return {a: actions.get(a, 0) for a in ACTIONS}


def binary_column(values: list[bytes]) -> pa.Array:
    """A binary array built with one join: pa.array() grows its buffer by doubling, which for a
    shard's ~100 MB of JPEGs cost more than everything else the main process does (measured)."""
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.binary(), len(values), buffers)


def summarize(counts: dict[str, Any]) -> dict[str, Any]:
    attempted = counts.get("images", 0) + counts.get("failures", 0)
    return {"attempted": attempted, "success_rate": round(counts.get("images", 0) / attempted, 4) if attempted else 0.0}


def crawl_shard_ids(ctx: StageContext) -> list[str]:
    _, count, shards = plan_shards(ctx, ctx.config.shard_images)
    next(shards, None)  # only the count is needed; start the stream so that closing it closes its catalog
    shards.close()
    return [shard_id("images", i) for i in range(count)]


CRAWL = Stage(
    name="crawl",
    # 2: the colour thumbnail beside the hashes; 3: JPEGs decoded at the scale of the real target
    # size (libjpeg's reduction applies to more photos; the resized pixels change slightly);
    # 4: the thumbnail is 64×64 (the dedup's fine check compares pixels); 5: hashes and thumbnail
    # from one box-reduced copy of at most 256 px (bits and pixels change slightly); 6: shards in
    # input order, not image-key order (a rebuild links the shards an append leaves unchanged);
    # 7: a JPEG within max_side and jpeg_quality is stored as downloaded, less its metadata
    version=7,
    # 6 cut shards differently; 7 stores some JPEGs without re-encoding them, but their hashes and
    # thumbnail are bit for bit 5's (the same decode), and 5's re-encoded bytes are a valid row:
    # refetching a corpus (and losing its dead links) for that would cost users more than it gives.
    item_version=5,
    run=run_crawl,
    inputs=("ingest",),
    tables=("images", "failures"),
    description=(
        "every distinct image of pairs → validated, resized JPEG + sha256 + pHash + colour thumbnail; "
        "failures with reasons"
    ),
    summarize=summarize,
    compression={"images": "none"},  # JPEG bytes do not compress; the other columns are small
    shard_ids=crawl_shard_ids,
    reuse_ignores=("shard_images",),
)
