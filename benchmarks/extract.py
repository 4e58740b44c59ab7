"""Region-feature extraction throughput: our batched path vs a per-image DefaultPredictor-style loop.

Both run the full BUTD R101-C4 (random weights) at the test scale 600/1000 with 300 proposals, on
the same 64 JPEGs of mixed aspect ratios, one after the other in this run, each in its own process
(peak RSS of its whole process tree, sampled):

- per-image loop: decode and resize on the main thread, one image per forward pass, the reference's
  per-class NMS loop over 1600 classes (bottom-up-attention's generate_tsv.py);
- ours: `feature_extraction.featurize.extract_chunks` — DataLoader workers decode ahead, batches of
  similar aspect ratio, FrozenBN folded into the convs, channels-last, inference mode, one
  `batched_nms` for the selection.

Goal (issue 4): ≥ 1.5× the per-image loop on CPU. On a GPU (`--device cuda`): images/s on one
device (goal ≥ 30 images/s on an H100).

Then the weight-free `grid` backend through the same `extract_chunks` (loader_workers 2; below
2,048 images per worker it decodes in threads), on `--grid-images` 384-px JPEGs read from a
crawl-like Parquet shard: images/s (goal ≥ 300 here).

    .venv/bin/python benchmarks/extract.py [--images 64] [--device cpu] [--batch 4] [--grid-images 2000] [--grid-only]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SIZES = [(640, 480), (480, 640), (800, 600), (500, 500), (1000, 600), (600, 900), (1024, 768), (768, 1024)]


def make_images(folder: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.fixtures.images import jpeg, synthetic_photo

    data = [jpeg(synthetic_photo(40_000 + i, SIZES[i % len(SIZES)]), 90) for i in range(n)]
    pq.write_table(pa.table({"bytes": pa.array(data, pa.binary())}), folder / "crawl.parquet")


def tree_rss_sampler():
    import psutil

    me, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    return peak, stop


def run_ours(folder: Path, n: int, device: str, batch: int) -> dict:
    import pyarrow.parquet as pq
    from PIL import Image

    from feature_extraction.config import ExtractConfig
    from feature_extraction.featurize import Item, StorageSpec, extract_chunks

    data = pq.read_table(folder / "crawl.parquet").column("bytes").to_pylist()
    items = []
    for i, d in enumerate(data):
        w, h = Image.open(io.BytesIO(d)).size
        items.append(Item(f"img{i:03d}", "crawl.parquet", i, w, h))
    cfg = ExtractConfig(backend="detectron2", weights="random", batch_size=batch, loader_workers=1, device=device)
    peak, stop = tree_rss_sampler()
    t0 = time.perf_counter()
    boxes = sum(
        r.num_boxes
        for _, rows in extract_chunks(cfg, device, StorageSpec(str(folder), None, None), [items], [0])
        for r in rows
    )
    seconds = time.perf_counter() - t0
    stop.set()
    return {"images": n, "seconds": seconds, "boxes": boxes, "peak_rss_mb": peak[0] / 2**20}


def run_grid(folder: Path, n: int) -> dict:
    """The grid backend over `n` 384-px JPEGs (a crawl shard's `bytes` column), as extract runs it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from feature_extraction.config import ExtractConfig
    from feature_extraction.featurize import Item, StorageSpec, extract_chunks
    from tests.fixtures.images import jpeg, synthetic_photo

    sizes = [(384, 288), (288, 384), (384, 384), (384, 216)]
    data = [jpeg(synthetic_photo(50_000 + i % 200, sizes[i % len(sizes)]), 90) for i in range(n)]
    pq.write_table(pa.table({"bytes": pa.array(data, pa.binary())}), folder / "grid.parquet")
    items = [Item(f"img{i:05d}", "grid.parquet", i, *sizes[i % len(sizes)]) for i in range(n)]
    cfg = ExtractConfig(backend="grid", loader_workers=2)
    t0 = time.perf_counter()
    first, boxes, done = None, 0, 0
    # one chunk per 100 images, so the time of the first results is seen
    chunks = [items[i : i + 100] for i in range(0, n, 100)]
    for _, rows in extract_chunks(cfg, "cpu", StorageSpec(str(folder), None, None), chunks, list(range(len(chunks)))):
        if first is None:
            first, done_first = time.perf_counter() - t0, len(rows)
        boxes += sum(r.num_boxes for r in rows)
        done += len(rows)
    seconds = time.perf_counter() - t0
    from feature_extraction.featurize import ITEMS_PER_WORKER

    path = "2 loader workers" if n >= ITEMS_PER_WORKER["grid"] * cfg.loader_workers else "4 threads in-process"
    after_first = done - done_first
    return {"images": n, "seconds": seconds, "boxes": boxes, "first": first, "after_first": after_first, "path": path}


def doit(model, image):
    """The BUTD feature recipe as the LXMERT port's demo runs it on a Detectron2 model, per image:
    backbone, RPN, `roi_heads._shared_roi_transform` (RoIPool + res5), mean-pool, box predictor."""
    import torch.nn.functional as F

    from feature_extraction.butd import Detections

    batch = model.preprocess_image([{"image": image.to(model.pixel_mean.device)}])
    features = model.backbone(batch.tensor)
    proposals, _ = model.proposal_generator(batch, features, None)
    heads = model.roi_heads
    box_features = heads._shared_roi_transform(
        [features[f] for f in heads.in_features], [p.proposal_boxes for p in proposals]
    )
    pooled = box_features.mean(dim=[2, 3])
    logits, deltas = heads.box_predictor(pooled)
    attrs = heads.box_predictor.attributes(pooled, logits)
    return Detections(
        proposals[0].proposal_boxes.tensor.cpu(), pooled.cpu(), F.softmax(logits, -1).cpu(), deltas.cpu(), attrs.cpu()
    )


def run_loop(folder: Path, n: int, device: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from feature_extraction.butd import build_butd, butd_config, init_random
    from feature_extraction.featurize import test_scale
    from feature_extraction.select import select_caffe_reference

    model = init_random(build_butd(butd_config(device=device)), seed=0)
    data = pq.read_table(folder / "crawl.parquet").column("bytes").to_pylist()
    peak, stop = tree_rss_sampler()
    t0 = time.perf_counter()
    boxes = 0
    for d in data:  # DefaultPredictor: one image at a time, preprocessing on the same thread
        image = Image.open(io.BytesIO(d)).convert("RGB")
        w, h, _ = test_scale(image.width, image.height, 600, 1000)
        bgr = np.ascontiguousarray(
            np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))[:, :, ::-1].transpose(2, 0, 1)
        )
        with torch.no_grad():
            det = doit(model, torch.from_numpy(bgr))
        boxes += len(select_caffe_reference(det).index)
    seconds = time.perf_counter() - t0
    stop.set()
    return {"images": n, "seconds": seconds, "boxes": boxes, "peak_rss_mb": peak[0] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grid-images", type=int, default=2000)
    ap.add_argument("--grid-only", action="store_true")
    ap.add_argument("--child", choices=["ours", "loop", "grid"])
    ap.add_argument("--folder")
    args = ap.parse_args()
    if args.child:
        folder = Path(args.folder)
        if args.child == "grid":
            res = run_grid(folder, args.grid_images)
        elif args.child == "ours":
            res = run_ours(folder, args.images, args.device, args.batch)
        else:
            res = run_loop(folder, args.images, args.device)
        print(json.dumps(res))
        return

    if not args.grid_only:
        detector(args)
    with tempfile.TemporaryDirectory(prefix="uniter-bench-grid-") as tmp:
        cmd = [sys.executable, __file__, "--child", "grid", "--folder", tmp, "--grid-images", str(args.grid_images)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    rate = r["images"] / r["seconds"]
    steady = r["after_first"] / (r["seconds"] - r["first"])
    print(
        f"\ngrid backend: {r['images']:,} JPEGs of 384 px, {r['boxes'] // r['images']} cells each, {r['path']}:\n"
        f"  whole call {rate:.0f} images/s ({r['seconds']:.1f} s, of which {r['first']:.1f} s until the first 100: "
        f"start-up)\n  steady state {steady:.0f} images/s   "
        f"goal ≥ 300 images/s: {'met' if steady >= 300 else 'NOT met'}"
    )


def detector(args) -> None:
    with tempfile.TemporaryDirectory(prefix="uniter-bench-extract-") as tmp:
        folder = Path(tmp)
        make_images(folder, args.images)
        print(
            f"{args.images} JPEGs, {len(SIZES)} aspect ratios, R101-C4 at 600/1000, 300 proposals, "
            f"device {args.device}",
            flush=True,
        )
        results = {}
        for name in ("loop", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--folder",
                str(folder),
                "--images",
                str(args.images),
                "--device",
                args.device,
                "--batch",
                str(args.batch),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[name]
            print(
                f"  {name:5} {r['images'] / r['seconds']:6.3f} images/s  ({r['seconds']:.0f} s, "
                f"{r['boxes'] / r['images']:.1f} boxes/image, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB)",
                flush=True,
            )
    rate = {k: v["images"] / v["seconds"] for k, v in results.items()}
    ratio = rate["ours"] / rate["loop"]
    goal = "≥ 1.5x the per-image loop" if args.device == "cpu" else "≥ 30 images/s"
    met = ratio >= 1.5 if args.device == "cpu" else rate["ours"] >= 30
    print(f"\nbatched / per-image loop: {ratio:.2f}x   goal {goal}: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
