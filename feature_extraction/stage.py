"""The extract stage: every kept image of the corpus → one row of region features.

reader (corpus_images in crawl order, cut into shards) → featurize.extract_chunks (DataLoader
workers read the crawled JPEG, decode, resize to the test scale; grid features are computed there
outright → detector: batches of images with similar aspect ratios, inference mode, optional bf16,
box selection) → writer (shard). With `processes: N` each process (one per GPU) takes every N-th
shard.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import torch

from contract.artifact import Artifact
from contract.reuse import ItemIndex
from contract.stage import StageContext, now, shard_id
from feature_extraction.config import ExtractConfig
from feature_extraction.featurize import Item, StorageSpec, reusing_shards, storage_spec
from feature_extraction.schema import FEATURES_SCHEMA, features_table
from feature_extraction.stages import EXTRACT
from storage.catalog import Catalog

log = logging.getLogger(__name__)


def plan(ctx: StageContext) -> list[list[Item]]:
    """Kept images in crawl order, cut into shards of `shard_images` that never span two crawl
    shards (same corpus, same shards): a crawl shard a rebuild left unchanged gives unchanged
    extract shards, which it links (contract/reuse.py), wherever the change fell."""
    catalog = Catalog(ctx.storage, {"corpus_images": ctx.input_files("dedup", "corpus_images")})
    try:
        if "corpus_images" not in catalog.views:
            return []
        rows = catalog.sql(
            "select image_key, crawl_file, crawl_row, width, height, sha256 from corpus_images "
            "order by crawl_file, crawl_row"
        ).rows
    finally:
        catalog.close()
    items = [Item(*r[:5], sha256=r[5]) for r in rows]
    n = ctx.config.shard_images
    chunks = []
    for _, group in itertools.groupby(items, key=lambda it: it.crawl_file):
        same_file = list(group)
        chunks += [same_file[i : i + n] for i in range(0, len(same_file), n)]
    return chunks


def run_extract(ctx: StageContext) -> None:
    cfg: ExtractConfig = ctx.config
    chunks = plan(ctx)
    todo = [
        i for i in range(len(chunks)) if not ctx.shard_done(shard_id("feat", i)) and ctx.selected(shard_id("feat", i))
    ]
    spec = storage_spec(ctx)
    if cfg.backend == "grid":
        log.info("extract: grid backend (no detector, no soft labels: pretraining turns MRC off)")
    if cfg.processes > 1 and len(todo) > 1:
        art = ctx.output
        fp = ctx.reuse.fingerprint if ctx.reuse is not None else None
        lend = ctx.reuse is not None and ctx.reuse.lend
        ctx_args = (spec, art.stage, art.key, ctx.run_id, cfg, chunks, todo, fp, lend)
        torch.multiprocessing.start_processes(
            _rank_main, args=(cfg.processes, *ctx_args), nprocs=cfg.processes, start_method="spawn"
        )
        ctx.done.update(art.done_shards())
        return
    total = sum(len(chunks[i]) for i in todo)
    # NOTE: each shard is encoded, hashed and written by a thread while the next one is made (the
    # Parquet writer, hashing and fsync release the GIL): in a rebuild, copying earlier features
    # is most of the work, and it no longer waits on the disk. One write in flight bounds memory.
    with ctx.progress.task("extract", total=total) as bar, ThreadPoolExecutor(1) as writer:
        pending: Future | None = None
        for index, tables, stats in extract_shards(cfg, cfg.device, spec, chunks, todo, ctx.reuse, ctx.link_shard):
            if tables is not None:
                if pending is not None:
                    pending.result()
                pending = writer.submit(ctx.write_shard, shard_id("feat", index), tables, stats, now())
            bar.advance(stats["images"])
        if pending is not None:
            pending.result()


def _rank_main(
    rank: int,
    world: int,
    spec: StorageSpec,
    stage: str,
    key: str,
    run_id: str,
    cfg: ExtractConfig,
    chunks: list[list[Item]],
    todo: list[int],
    fingerprint: str | None,
    lend: bool,
) -> None:
    """One of `processes` workers (one per GPU): every world-th pending chunk."""
    device = f"cuda:{rank}" if cfg.device.startswith("cuda") else cfg.device
    storage = spec.open()
    art = Artifact(storage, stage, key)
    reuse = ItemIndex(storage, stage, fingerprint, current=key, lend=lend) if fingerprint else None

    def link(shard: str, source: str, source_shard: str, stats: dict[str, Any], started: float) -> bool:
        return art.link_shard(shard, source, source_shard, stats, f"{run_id}-{rank}", started) is not None

    for index, tables, stats in extract_shards(cfg, device, spec, chunks, todo[rank::world], reuse, link):
        if tables is not None:
            art.write_shard(shard_id("feat", index), tables, stats, f"{run_id}-{rank}", now(), EXTRACT.compression)


def extract_shard_ids(ctx: StageContext) -> list[str]:
    return [shard_id("feat", i) for i in range(len(plan(ctx)))]


def extract_shards(
    cfg: ExtractConfig,
    device: str,
    spec: StorageSpec,
    chunks: list[list[Item]],
    todo: list[int],
    reuse: ItemIndex | None,
    link: Callable[[str, str, str, dict[str, Any], float], bool] | None = None,
) -> Iterator[tuple[int, dict[str, pa.Table] | None, dict[str, Any]]]:
    names = [shard_id("feat", i) for i in range(len(chunks))]
    return reusing_shards(
        cfg, device, spec, chunks, todo, reuse, names, "features", FEATURES_SCHEMA, features_table, link
    )
