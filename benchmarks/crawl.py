"""Crawl throughput: our crawl stage vs img2dataset on the same URLs, one after the other.

A local server (its own process) serves ~5,000 JPEGs of 100–500 KB. Both tools get the same URL
list, the same resize rule (longer side ≤ 1000, no upscaling, JPEG q90), Parquet output and the
same concurrency budget (64 requests in flight, 2 processes). Ours also validates every image,
orients it, and computes sha256 + pHash (+5 window hashes); img2dataset computes sha256.

Goal (issue 3): ≥ 1.2× img2dataset's images/s.

    make bench-crawl     # or: .venv/bin/python benchmarks/crawl.py [--images 5000]

img2dataset runs from .venv-bench (made by `make bench-peers`), which layers the peer packages
over this project's venv without changing its pins.
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
BENCH_VENV = ROOT / ".venv-bench"
MAX_SIDE, QUALITY, CONCURRENCY, PROCESSES = 1000, 90, 64, 2


def serve(port_file: str, n_base: int) -> None:
    """The image server: n_base photos, each URL a distinct byte stream (a JPEG comment differs)."""
    from aiohttp import web

    sys.path.insert(0, str(ROOT))
    from tests.fixtures.images import jpeg, synthetic_photo

    rng = random.Random(0)
    sizes = [(800, 600), (1024, 768), (1280, 960), (1600, 1200)]
    base = [jpeg(synthetic_photo(70_000 + i, rng.choice(sizes)), 90) for i in range(n_base)]

    async def image(request):
        b, v = int(request.match_info["b"]), request.match_info["v"]
        data = base[b]
        comment = f"variant {v}".encode()
        body = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{b}/{v}.jpg", image)

    async def start():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        Path(port_file).write_text(str(port))
        while True:
            await asyncio.sleep(3600)

    import asyncio

    asyncio.run(start())


def run_ours(urls_file: Path, work: Path) -> dict:
    """Ingest (untimed) then crawl (timed), in this process."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from pipeline.runner import run_stage

    cfg_path = work / "ours.yaml"
    out = work / f"ours-{time.time_ns()}"
    cfg_path.write_text(
        f"storage: {{uri: {out}}}\n"
        f"ingest:\n  sources: [{{format: table, path: {urls_file}}}]\n"
        f"crawl:\n  allow_private_networks: true\n  concurrency: {CONCURRENCY}\n  per_host: {CONCURRENCY}\n"
        f"  per_host_rate: 0\n  workers: {PROCESSES}\n  max_side: {MAX_SIDE}\n"
        f"  jpeg_quality: {QUALITY}\n  shard_images: 1000\n"
    )
    cfg = load_config(cfg_path)
    run_stage("ingest", cfg)
    t0 = time.perf_counter()
    result = run_stage("crawl", cfg)
    seconds = time.perf_counter() - t0
    return {
        "images": result.manifest.counts["images"],
        "failures": result.manifest.counts["failures"],
        "seconds": seconds,
    }


def run_img2dataset(url_list: Path, work: Path) -> dict:
    exe = BENCH_VENV / "bin" / "img2dataset"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: run `make bench-peers` first")
    out = work / f"i2d-{time.time_ns()}"
    cmd = [
        str(exe),
        "--url_list",
        str(url_list),
        "--input_format",
        "txt",
        "--output_folder",
        str(out),
        "--output_format",
        "parquet",
        "--image_size",
        str(MAX_SIDE),
        "--resize_mode",
        "keep_ratio_largest",
        "--resize_only_if_bigger",
        "True",
        "--encode_quality",
        str(QUALITY),
        "--processes_count",
        str(PROCESSES),
        "--thread_count",
        str(CONCURRENCY // PROCESSES),
        "--number_sample_per_shard",
        "1000",
        "--timeout",
        "20",
        "--retries",
        "0",
        "--compute_hash",
        "sha256",
        "--distributor",
        "multiprocessing",
        "--enable_wandb",
        "False",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    ok = failed = 0
    for stats in out.glob("*_stats.json"):
        s = json.loads(stats.read_text())
        ok += s["successes"]
        failed += s["count"] - s["successes"]
    return {"images": ok, "failures": failed, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--base", type=int, default=100)
    ap.add_argument(
        "--repeat", type=int, default=2, help="runs per tool, alternating; the best counts (this machine is noisy)"
    )
    ap.add_argument("--serve")
    ap.add_argument("--ours")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.base)
    if args.ours:
        work = Path(args.ours)
        print(json.dumps(run_ours(work / "urls.jsonl", work)))
        return

    with tempfile.TemporaryDirectory(prefix="uniter-bench-crawl-") as tmp:
        work = Path(tmp)
        os.environ["UNITER_CACHE_DIR"] = str(work / "cache")
        port_file = work / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--base", str(args.base)])
        try:
            while not port_file.exists():
                if server.poll() is not None:
                    raise SystemExit("the image server failed to start")
                time.sleep(0.2)
            base = f"http://127.0.0.1:{port_file.read_text()}"
            urls = [f"{base}/img/{i % args.base}/{i}.jpg" for i in range(args.images)]
            (work / "urls.txt").write_text("\n".join(urls) + "\n")
            (work / "urls.jsonl").write_text("".join(json.dumps({"image_url": u, "caption": "x"}) + "\n" for u in urls))
            print(
                f"{args.images} images from {args.base} photos of 800×600–1600×1200 (100–500 KB), served at {base}",
                flush=True,
            )

            runs: dict[str, list[dict]] = {"uniter crawl": [], "img2dataset": []}
            for _ in range(args.repeat):
                runs["uniter crawl"].append(
                    json.loads(
                        subprocess.run(
                            [sys.executable, __file__, "--ours", str(work)],
                            check=True,
                            capture_output=True,
                            text=True,
                        )
                        .stdout.strip()
                        .splitlines()[-1]
                    )
                )
                runs["img2dataset"].append(run_img2dataset(work / "urls.txt", work))
        finally:
            server.terminate()
            server.wait()

    rate = lambda r: r["images"] / r["seconds"]  # noqa: E731
    print(f"{'tool':14} {'images':>7} {'failed':>7} {'seconds':>8} {'images/s':>9}   all runs (images/s)")
    best = {}
    for name, rs in runs.items():
        best[name] = max(rs, key=rate)
        r = best[name]
        print(
            f"{name:14} {r['images']:>7} {r['failures']:>7} {r['seconds']:>8.1f} {rate(r):>9.1f}   "
            + ", ".join(f"{rate(x):.1f}" for x in rs)
        )
    ours, i2d = best["uniter crawl"], best["img2dataset"]
    ratio = rate(ours) / rate(i2d)
    print(f"\nuniter / img2dataset: {ratio:.2f}x  (goal >= 1.2x: {'met' if ratio >= 1.2 else 'NOT met'})")
    print("uniter also decodes/validates every image, applies EXIF orientation and computes pHash + 5 window hashes.")


if __name__ == "__main__":
    main()
