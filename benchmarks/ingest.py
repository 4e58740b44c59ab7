"""Ingest throughput and memory: a 2M-line CC-style TSV and a COCO-style JSON of 500k captions.

Prints rows/s and peak RSS of each run (each in its own process, so peaks don't mix; "all
processes" adds the worker processes, sampled every 50 ms), side by side:
- the TSV at 1/4 and full length (peak memory must not grow with the length),
- 1 and 2 worker processes,
- a bare "read lines and split" loop as the floor any Python TSV reader pays.

Goal (issue 2): >= 300k rows/s on the TSV; peak RSS flat in the TSV's length.

    .venv/bin/python benchmarks/ingest.py [--lines 2000000] [--captions 500000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "a",
    "the",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "street",
    "beach",
    "sits",
    "stands",
    "holding",
    "near",
    "with",
    "on",
    "in",
    "of",
    "large",
    "small",
]


def make_tsv(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
            host = rng.choice(["i.pinimg.com", "media.example.org", "farm4.staticflickr.com", "cdn.shop.com"])
            f.write(f"{caption}\thttp://{host}/{rng.randrange(10**6)}/{i}_{rng.randrange(16**8):08x}.jpg\n")


def make_coco(path: Path, captions: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    n_images = max(1, captions // 5)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"info": {}, "images": [')
        for i in range(n_images):
            sep = "," if i else ""
            f.write(
                f'{sep}{{"id": {i}, "file_name": "COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640,'
                f' "coco_url": "http://images.cocodataset.org/train2014/COCO_train2014_{i:012d}.jpg",'
                f' "flickr_url": "http://farm4.staticflickr.com/1/{10**9 + i}_abcdef0123_z.jpg"}}'
            )
        f.write('], "annotations": [')
        for a in range(captions):
            sep = "," if a else ""
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
            f.write(f'{sep}{{"image_id": {rng.randrange(n_images)}, "id": {a}, "caption": "{caption}"}}')
        f.write("]}")


def child(config: str) -> None:
    """Run ingest once in this process; print its summary as JSON."""
    import resource
    import threading

    import psutil

    from pipeline.config import load_config
    from pipeline.runner import run_stage

    cfg = load_config(config)
    me, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():  # worker processes are the forkserver's children, not ours: sample the whole tree
        while not stop.is_set():
            try:
                procs = [me, *me.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = run_stage("ingest", cfg)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows": result.manifest.counts["records"],
                "seconds": seconds,
                "peak_rss_mb": rss_mb,
                "tree_rss_mb": peak[0] / 2**20,
            }
        )
    )


def floor(tsv: str) -> None:
    """The bare loop: read, decode, split. No validation, no keys, no Parquet."""
    import resource

    t0 = time.perf_counter()
    n = 0
    with open(tsv, "rb") as f:
        for raw in f:
            caption, _, url = raw.decode("utf-8").rstrip("\n").rpartition("\t")
            n += 1
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": n, "seconds": seconds, "peak_rss_mb": rss, "tree_rss_mb": rss}))


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_config(work: Path, name: str, source: str, workers: int = 1) -> Path:
    cfg = work / f"{name}.yaml"
    cfg.write_text(
        f"storage:\n  uri: {work / ('data-' + name)}\ningest:\n  workers: {workers}\n  sources:\n    - {source}\n"
    )
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--captions", type=int, default=500_000)
    ap.add_argument("--child")
    ap.add_argument("--floor")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.floor:
        return floor(args.floor)

    with tempfile.TemporaryDirectory(prefix="uniter-bench-") as tmp:
        work = Path(tmp)
        os.environ["UNITER_CACHE_DIR"] = str(work / "cache")
        quarter, full, coco = work / "cc-quarter.tsv", work / "cc-full.tsv", work / "coco.json"
        t0 = time.perf_counter()
        make_tsv(quarter, args.lines // 4)
        make_tsv(full, args.lines)
        make_coco(coco, args.captions)
        print(
            f"generated inputs in {time.perf_counter() - t0:.0f} s: TSV {full.stat().st_size / 1e6:.0f} MB, "
            f"COCO JSON {coco.stat().st_size / 1e6:.0f} MB",
            flush=True,
        )

        runs = [
            ("floor: read+split, TSV full", ("--floor", str(full))),
            (
                "ingest TSV 1/4, 1 worker",
                ("--child", str(write_config(work, "q1", f"{{format: cc, path: {quarter}}}"))),
            ),
            ("ingest TSV full, 1 worker", ("--child", str(write_config(work, "f1", f"{{format: cc, path: {full}}}")))),
            (
                "ingest TSV full, 2 workers",
                ("--child", str(write_config(work, "f2", f"{{format: cc, path: {full}}}", 2))),
            ),
            ("ingest COCO JSON", ("--child", str(write_config(work, "coco", f"{{format: coco, path: {coco}}}")))),
        ]
        results = {}
        print(f"{'run':32} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'peak RSS main / all processes':>30}")
        for name, child_args in runs:
            r = run_child(*child_args)
            results[name] = r
            print(
                f"{name:32} {r['rows']:>10,} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>10,.0f} "
                f"{r['peak_rss_mb']:>13.0f} MB / {r['tree_rss_mb']:>6.0f} MB",
                flush=True,
            )

        f1, q1 = results["ingest TSV full, 1 worker"], results["ingest TSV 1/4, 1 worker"]
        f2, fl = results["ingest TSV full, 2 workers"], results["floor: read+split, TSV full"]
        rate = lambda r: r["rows"] / r["seconds"]  # noqa: E731
        print()
        print(f"peak RSS full / quarter TSV:        {f1['peak_rss_mb'] / q1['peak_rss_mb']:.2f}x (flat = 1.0)")
        print(f"throughput 2 workers / 1 worker:    {rate(f2) / rate(f1):.2f}x")
        print(f"ingest (1 worker) / bare floor:     {rate(f1) / rate(fl):.2f}x of the read+split loop's speed")
        best = max(rate(f1), rate(f2))
        print(
            f"TSV goal >= 300k rows/s:            {'met' if best >= 300_000 else 'NOT met'} ({best:,.0f} rows/s best)"
        )


if __name__ == "__main__":
    main()
