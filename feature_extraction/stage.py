"""The extract stage: every kept image of the corpus → one row of region features.

reader (corpus_images in crawl order, cut into shards) → DataLoader workers (read the crawled JPEG,
decode, resize to the test scale; grid features are computed there outright) → model (batches of
images with similar aspect ratios, inference mode, optional bf16) → box selection → writer (shard).
With `processes: N` each process (one per GPU) takes every N-th shard.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from feature_extraction.config import ExtractConfig
from feature_extraction.grid import box_features, grid_features
from feature_extraction.schema import RegionFeatures, pack
from pipeline.artifact import Artifact
from pipeline.stage import Stage, StageContext, now, shard_id
from storage import Storage, open_storage
from storage.catalog import Catalog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    key: str
    crawl_file: str | None  # storage key of the crawl shard holding its JPEG (None: `path`)
    crawl_row: int
    width: int
    height: int
    path: str | None = None  # a local image file (the downstream sets' images)
    gt_boxes: tuple[tuple[float, float, float, float], ...] | None = None  # features of these boxes (pixel xyxy)


@dataclass(frozen=True)
class StorageSpec:
    uri: str
    endpoint_url: str | None
    region: str | None

    def open(self) -> Storage:
        return open_storage(self.uri, endpoint_url=self.endpoint_url, region=self.region)


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
                return {"item": item, "result": box_features(item.key, image, np.array(item.gt_boxes, np.float32))}
            return {"item": item, "result": grid_features(item.key, image, self.cfg.grid_rows, self.cfg.grid_cols)}
        w, h, scale = test_scale(image.width, image.height, self.cfg.min_size, self.cfg.max_size)
        resized = image.resize((w, h), Image.Resampling.BILINEAR)
        bgr = np.ascontiguousarray(np.asarray(resized)[:, :, ::-1].transpose(2, 0, 1))
        out = {"item": item, "size": (image.width, image.height), "scale": scale, "tensor": torch.from_numpy(bgr)}
        if item.gt_boxes is not None:
            out["boxes"] = torch.tensor(item.gt_boxes, dtype=torch.float32).reshape(-1, 4) * scale
        return out


def aspect_batches(items: list[Item], start: int, batch_size: int) -> list[list[int]]:
    """Indices (offset by ``start``) in batches of similar aspect ratio: little padding per batch."""
    order = sorted(range(len(items)), key=lambda i: (items[i].width >= items[i].height, items[i].width / items[i].height, items[i].key))
    return [[start + i for i in order[b : b + batch_size]] for b in range(0, len(order), batch_size)]


# --- the detector path ------------------------------------------------------------------------


class Detector:
    """The BUTD model plus box selection; `__call__` turns a decoded batch into RegionFeatures."""

    def __init__(self, cfg: ExtractConfig, device: str):
        from feature_extraction.butd import build_butd, butd_config, init_random, optimize_for_inference
        from feature_extraction.weights import load_weights

        d2cfg = butd_config(depth=cfg.depth, post_nms_topk=cfg.rpn_post_nms_topk, min_size=cfg.min_size,
                            max_size=cfg.max_size, device=device)
        model = build_butd(d2cfg)
        if cfg.weights == "random":
            init_random(model, seed=0)
        else:
            load_weights(model, cfg.weights)
        self.model = optimize_for_inference(model)
        self.cfg = cfg
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    def __call__(self, batch: list[dict[str, Any]]) -> list[RegionFeatures]:
        from feature_extraction.butd import detect
        from feature_extraction.select import select_caffe, select_lxmert36

        cfg = self.cfg
        given = "boxes" in batch[0]  # a batch of ground-truth-box items (they are sharded apart)
        detections = detect(self.model, [b["tensor"] for b in batch], self.dtype,
                            boxes=[b["boxes"] for b in batch] if given else None)
        out = []
        for b, det in zip(batch, detections, strict=True):
            det = _to_cpu(det)
            h, w = b["tensor"].shape[1:]
            if given:  # every given box, in the given order, confidence 1
                n = len(det.proposals)
                sel = _Given(det.proposals, torch.arange(n), torch.ones(n))
            elif cfg.selection == "caffe":
                sel = select_caffe(det, nms_iou=cfg.nms_iou, conf_thresh=cfg.conf_thresh, min_boxes=cfg.min_boxes,
                                   max_boxes=cfg.max_boxes, score_floor=cfg.score_floor)
            else:
                sel = select_lxmert36(det, self.model.roi_heads.box_predictor.box2box_transform, (h, w))
            out.append(region_features(b, det, sel))
        return out


@dataclass(frozen=True)
class _Given:
    boxes: torch.Tensor  # (R, 4) at test scale
    index: torch.Tensor
    conf: torch.Tensor


def _to_cpu(det):
    from feature_extraction.butd import Detections

    return Detections(*(t.detach().float().cpu() for t in (det.proposals, det.features, det.probs, det.deltas, det.attr_logits)))


def region_features(b: dict[str, Any], det, sel) -> RegionFeatures:
    item, (width, height), scale = b["item"], b["size"], b["scale"]
    boxes = (sel.boxes / scale).numpy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    probs = det.probs[sel.index]
    soft = torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)  # background first: Caffe/UNITER order
    return RegionFeatures(
        image_key=item.key, image_w=width, image_h=height,
        features=det.features[sel.index].numpy().astype(np.float16), boxes=boxes.astype(np.float32),
        conf=sel.conf.numpy().astype(np.float32), soft_labels=soft.numpy().astype(np.float16),
        object_ids=probs[:, :-1].argmax(dim=1).numpy().astype(np.int32),
        attr_ids=det.attr_logits[sel.index][:, :-1].argmax(dim=1).numpy().astype(np.int32),
        backend="detectron2",
    )


# --- the stage --------------------------------------------------------------------------------


def plan(ctx: StageContext) -> list[list[Item]]:
    """Kept images in crawl order, cut into shards of `shard_images` (same corpus, same shards)."""
    catalog = Catalog(ctx.storage, {"corpus_images": ctx.input_files("dedup", "corpus_images")})
    try:
        if "corpus_images" not in catalog.views:
            return []
        rows = catalog.sql("select image_key, crawl_file, crawl_row, width, height from corpus_images order by crawl_file, crawl_row").rows
    finally:
        catalog.close()
    items = [Item(*r) for r in rows]
    n = ctx.config.shard_images
    return [items[i : i + n] for i in range(0, len(items), n)]


def run_extract(ctx: StageContext) -> None:
    cfg: ExtractConfig = ctx.config
    chunks = plan(ctx)
    todo = [i for i in range(len(chunks)) if not ctx.shard_done(shard_id("feat", i)) and ctx.selected(shard_id("feat", i))]
    spec = storage_spec(ctx)
    if cfg.backend == "grid":
        log.info("extract: grid backend (no detector, no soft labels: pretraining turns MRC off)")
    if cfg.processes > 1 and len(todo) > 1:
        art = ctx.output
        ctx_args = (spec, art.stage, art.key, ctx.run_id, cfg, chunks, todo)
        torch.multiprocessing.start_processes(_rank_main, args=(cfg.processes, *ctx_args), nprocs=cfg.processes,
                                              start_method="spawn")
        ctx.done.update(art.done_shards())
        return
    total = sum(len(chunks[i]) for i in todo)
    with ctx.progress.task("extract", total=total) as bar:
        for index, rows in extract_chunks(cfg, cfg.device, spec, chunks, todo):
            ctx.write_shard(shard_id("feat", index), {"features": pack(rows)}, _stats(rows), now())
            bar.advance(len(rows))


def extract_chunks(cfg: ExtractConfig, device: str, spec: StorageSpec, chunks: list[list[Item]], todo: list[int]):
    """Yield ``(chunk index, rows)`` for each chunk in ``todo``, in order."""
    if not todo:
        return
    items = [it for i in todo for it in chunks[i]]
    batches, bounds, start = [], [], 0
    for i in todo:
        batches += aspect_batches(chunks[i], start, cfg.batch_size)
        start += len(chunks[i])
        bounds.append((i, start))
    loader = DataLoader(
        ImageDataset(items, spec, cfg), batch_sampler=batches, collate_fn=list, num_workers=cfg.loader_workers,
        multiprocessing_context="forkserver" if cfg.loader_workers else None, prefetch_factor=4 if cfg.loader_workers else None,
    )
    detector = Detector(cfg, device) if cfg.backend == "detectron2" else None
    rows: list[RegionFeatures] = []
    seen, bound = 0, iter(bounds)
    index, end = next(bound)
    for batch in loader:
        rows += [b["result"] for b in batch] if detector is None else detector(batch)
        seen += len(batch)
        while index is not None and seen >= end:  # batches never straddle chunks
            yield index, rows
            rows = []
            index, end = next(bound, (None, None))


def _rank_main(rank: int, world: int, spec: StorageSpec, stage: str, key: str, run_id: str, cfg, chunks, todo) -> None:
    """One of `processes` workers (one per GPU): every world-th pending chunk."""
    device = f"cuda:{rank}" if cfg.device.startswith("cuda") else cfg.device
    art = Artifact(spec.open(), stage, key)
    mine = todo[rank::world]
    for index, rows in extract_chunks(cfg, device, spec, chunks, mine):
        art.write_shard(shard_id("feat", index), {"features": pack(rows)}, _stats(rows), f"{run_id}-{rank}", now(),
                        EXTRACT.compression)


def _stats(rows: list[RegionFeatures]) -> dict[str, Any]:
    return {"images": len(rows), "boxes": int(sum(r.num_boxes for r in rows))}


def storage_spec(ctx: StageContext) -> StorageSpec:
    s = ctx.storage
    return StorageSpec(s.uri, getattr(s, "endpoint_url", None), getattr(s, "region", None))


def summarize(counts: dict[str, Any]) -> dict[str, Any]:
    images = counts.get("images", 0)
    return {"mean_boxes": round(counts.get("boxes", 0) / images, 2) if images else 0.0}


def extract_shard_ids(ctx: StageContext) -> list[str]:
    return [shard_id("feat", i) for i in range(len(plan(ctx)))]


EXTRACT = Stage(
    name="extract",
    version=1,
    run=run_extract,
    inputs=("crawl", "dedup"),
    tables=("features",),
    description="kept images → BUTD region features (Detectron2) or grid features, to Parquet",
    summarize=summarize,
    compression={"features": "none"},  # float16 features barely compress; don't pay zstd for it
    shard_ids=extract_shard_ids,
)
