"""Images → RegionFeatures, shared by the `extract` and `downstream` stages.

An `Item` points at one image (a row of a crawl shard, or a local file); `extract_chunks` runs
chunks of items through DataLoader workers (read, decode, resize to the test scale; the grid
backend computes its features right there) and, for the detectron2 backend, the `Detector`
(feature_extraction/detector.py), yielding each chunk's rows in order. `shard_stats` and
`summarize` are the counts both stages record per shard and per artifact.
"""

from __future__ import annotations

import io
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from contract.pools import main_module_hidden
from contract.reuse import ItemIndex, shard_digest, where
from contract.stage import StageContext
from feature_extraction.config import ExtractConfig
from feature_extraction.grid import box_features, grid_features
from feature_extraction.schema import RegionFeatures
from storage import Storage, open_storage

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Item:
    key: str
    crawl_file: str | None  # storage key of the crawl shard holding its JPEG (None: `path`)
    crawl_row: int
    width: int
    height: int
    path: str | None = None  # a local image file (the downstream sets' images)
    gt_boxes: tuple[Box, ...] | None = None  # features of these boxes (pixel xyxy)
    sha256: str | None = None  # of the crawled image (extract reuses features of the same bytes)


@dataclass(frozen=True)
class StorageSpec:
    """Where the artifacts live, picklable: DataLoader workers and spawned processes reopen it."""

    uri: str
    endpoint_url: str | None
    region: str | None

    def open(self) -> Storage:
        return open_storage(self.uri, endpoint_url=self.endpoint_url, region=self.region)


def storage_spec(ctx: StageContext) -> StorageSpec:
    s = ctx.storage
    return StorageSpec(s.uri, getattr(s, "endpoint_url", None), getattr(s, "region", None))


# --- reading images ---------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _crawl_bytes(spec: StorageSpec, key: str):
    """The `bytes` column of one crawl shard (one file read serves ~1000 images)."""
    with spec.open().open(key) as f:
        return pq.read_table(f, columns=["bytes"]).column("bytes")


def test_scale(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """Detectron2's ResizeShortestEdge at test time: shorter side min_size, longer ≤ max_size."""
    scale = min_size / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)), scale


class ImageDataset(Dataset):
    """Items by index; returns what the model side needs, decoded in a worker process."""

    def __init__(self, items: list[Item], spec: StorageSpec, cfg: ExtractConfig):
        self.items, self.spec, self.cfg = items, spec, cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        if item.path is not None:
            with Image.open(item.path) as raw:
                image = ImageOps.exif_transpose(raw).convert("RGB")  # crawled images were already upright
        else:
            data = _crawl_bytes(self.spec, item.crawl_file)[item.crawl_row].as_py()
            image = Image.open(io.BytesIO(data)).convert("RGB")
        if self.cfg.backend == "grid":
            if item.gt_boxes is not None:
                result = box_features(item.key, image, np.array(item.gt_boxes, np.float32))
            else:
                result = grid_features(item.key, image, self.cfg.grid_rows, self.cfg.grid_cols, self.cfg.grid_objects)
            return {"item": item, "result": result}
        w, h, scale = test_scale(image.width, image.height, self.cfg.min_size, self.cfg.max_size)
        resized = image.resize((w, h), Image.Resampling.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(resized)[:, :, ::-1].transpose(2, 0, 1))
        out = {"item": item, "size": (image.width, image.height), "scale": scale, "tensor": torch.from_numpy(bgr)}
        if item.gt_boxes is not None:
            out["boxes"] = torch.tensor(item.gt_boxes, dtype=torch.float32).reshape(-1, 4) * scale
        return out


def aspect_batches(items: list[Item], start: int, batch_size: int) -> list[list[int]]:
    """Indices (offset by ``start``) in batches of similar aspect ratio: little padding per batch."""
    order = sorted(
        range(len(items)),
        key=lambda i: (items[i].width >= items[i].height, items[i].width / items[i].height, items[i].key),
    )
    return [[start + i for i in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]


# --- chunks of items → rows -------------------------------------------------------------------


# Fewer images than this per loader worker: decode in this process. A worker costs ≈ 3.5 s to
# start (a forkserver process importing torch). The grid backend's whole per-image work is
# ≈ 2 ms, so a worker pays for itself only from ≈ 2,000 images (a rebuild's 1,000 new images
# spent 3 s starting one for 2 s of work, measured); the detector's decode and resize (≈ 10 ms)
# overlap the model from a few hundred.
ITEMS_PER_WORKER = {"grid": 2048, "detectron2": 512}


def extract_chunks(
    cfg: ExtractConfig, device: str, spec: StorageSpec, chunks: list[list[Item]], todo: list[int]
) -> Iterator[tuple[int, list[RegionFeatures]]]:
    """Yield ``(chunk index, rows)`` for each chunk in ``todo``, in order."""
    if not todo:
        return
    items = [it for i in todo for it in chunks[i]]
    batches, bounds, start = [], [], 0
    for i in todo:
        batches += aspect_batches(chunks[i], start, cfg.batch_size)
        start += len(chunks[i])
        bounds.append((i, start))
    # NOTE: a loader worker costs seconds to start (a forkserver process importing torch: a rebuild
    # extracting 100 new images waited 3.5 s on it for 0.3 s of work, measured). Small jobs — a
    # rebuild's few new images — decode in this process; the output is the same either way.
    dataset = ImageDataset(items, spec, cfg)
    if len(items) >= ITEMS_PER_WORKER[cfg.backend] * cfg.loader_workers > 0:
        loader: Iterable[list[dict[str, Any]]] = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=list,
            num_workers=cfg.loader_workers,
            multiprocessing_context="forkserver",
            prefetch_factor=4,
        )
    else:
        loader = threaded_batches(dataset, batches, min(4, os.cpu_count() or 1))
    detector = None
    if cfg.backend == "detectron2":
        # detectron2 loads only when a detector runs: this module is imported at CLI start-up
        from feature_extraction.detector import Detector  # noqa: PLC0415

        detector = Detector(cfg, device)
    rows: list[RegionFeatures] = []
    seen, bound = 0, iter(bounds)
    index, end = next(bound)
    with main_module_hidden():  # the loader's workers start here (contract/pools.py)
        loaded = iter(loader)
    for batch in loaded:
        rows += [b["result"] for b in batch] if detector is None else detector(batch)
        seen += len(batch)
        while index is not None and seen >= end:  # batches never straddle chunks
            yield index, rows
            rows = []
            index, end = next(bound, (None, None))


def threaded_batches(dataset: ImageDataset, batches: list[list[int]], threads: int) -> Iterator[list[dict[str, Any]]]:
    """The batches in order, their items made by a few threads of this process: decoding, resizing
    and the grid's products release the GIL (1,000 crawled images on the grid backend: 2.0-2.2 s one
    by one, 1.45-1.55 s with 4 threads, 4.4-6.5 s with a loader worker that must start; 2 cores).
    At most 2 × threads batches are in flight, which bounds memory."""
    with ThreadPoolExecutor(threads) as pool:
        ahead: deque[list[Future]] = deque()
        pending = iter(batches)
        for batch in itertools.islice(pending, 2 * threads):
            ahead.append([pool.submit(dataset.__getitem__, i) for i in batch])
        while ahead:
            futures = ahead.popleft()
            if (batch := next(pending, None)) is not None:
                ahead.append([pool.submit(dataset.__getitem__, i) for i in batch])
            yield [f.result() for f in futures]


def reusing_shards(
    cfg: ExtractConfig,
    device: str,
    spec: StorageSpec,
    chunks: list[list[Item]],
    todo: list[int],
    reuse: ItemIndex | None,
    names: list[str],
    table_name: str,
    schema: pa.Schema,
    build: Callable[[list[RegionFeatures]], pa.Table],
    link: Callable[[str, str, str, dict[str, Any], float], bool] | None = None,
) -> Iterator[tuple[int, dict[str, pa.Table] | None, dict[str, Any]]]:
    """Each pending shard's tables and stats, in order (extract and downstream). Images whose
    features an earlier artifact holds (same key, same ``Item.sha256``, same extractor
    fingerprint) are copied from it; only the others go through the model. The shard's reuse index
    rows are recorded before its marker. ``build`` makes the table of the new rows. With ``link``
    (`StageContext.link_shard`), a shard whose images an earlier shard holds exactly is published
    as a copy of it, first, and comes with tables None."""
    same: dict[int, dict[tuple[str, str], list[str]]] = {}  # per shard: where its reused items are
    linked: dict[int, dict[str, Any]] = {}
    indexed = {i: _index_rows(chunks[i]) for i in todo} if reuse is not None else {}
    rest = list(chunks)
    for i in todo:
        if reuse is None:
            continue
        index_rows, digest = indexed[i]
        earlier = reuse.same_shard(digest) if link is not None else None
        if earlier is not None:
            assert link is not None
            started = time.time()
            stats = {**reuse.record(names[i], index_rows, digest), "reuse": {"reused": len(chunks[i]), "extracted": 0}}
            if link(names[i], earlier[0], earlier[1], stats, started):
                linked[i], rest[i] = stats, []
                continue
        hits = reuse.lookup(it.key for it in chunks[i])
        found = [h for it in chunks[i] if (h := hits.get(it.key)) and h.row["sha256"] == it.sha256]
        same[i] = where(found)
        reusable = {h.row["item"] for h in found}
        rest[i] = [it for it in chunks[i] if it.key not in reusable]
    fresh = iter(extract_chunks(cfg, device, spec, rest, [i for i in todo if rest[i]]))
    for i in todo:
        if i in linked:
            yield i, None, {"images": len(chunks[i]), **linked[i]}
            continue
        rows: list = []
        if rest[i]:
            index, rows = next(fresh)
            assert index == i, (index, i)
        table = build(rows)
        reused = 0
        if same.get(i):
            assert reuse is not None
            copied = reuse.grouped_rows(same.pop(i), table_name, "image_key", schema)
            table = pa.concat_tables([table, copied]).sort_by("image_key")
            reused = copied.num_rows
        stats = {
            "images": table.num_rows,
            "boxes": int(pc.sum(table.column("num_boxes")).as_py() or 0),
            "reuse": {"reused": reused, "extracted": len(rows)},
        }
        if reuse is not None:
            stats.update(reuse.record(names[i], *indexed[i]))
        yield i, {table_name: table}, stats


def _index_rows(chunk: list[Item]) -> tuple[pa.Table, str]:
    """A shard's reuse index rows and its digest (its images and the bytes of each)."""
    keys = {it.key: it.sha256 for it in chunk}
    rows = pa.table({"item": list(keys), "sha256": list(keys.values())}, schema=INDEX_SCHEMA)
    return rows, shard_digest((k, h or "") for k, h in keys.items())


# The reuse index row of one image: the bytes its features were computed from.
INDEX_SCHEMA = pa.schema([pa.field("item", pa.string(), nullable=False), pa.field("sha256", pa.string())])


def shard_stats(rows: list[RegionFeatures]) -> dict[str, Any]:
    """A shard's counts: images and boxes."""
    return {"images": len(rows), "boxes": int(sum(r.num_boxes for r in rows))}


def summarize(counts: dict[str, Any]) -> dict[str, Any]:
    """The artifact's summary from its summed shard counts."""
    images = counts.get("images", 0)
    return {"mean_boxes": round(counts.get("boxes", 0) / images, 2) if images else 0.0}
