"""Crawl throughput: our crawl vs img2dataset on the same URLs, timed the same two ways (issue 15).

A local server (its own process) serves N JPEGs (q90, the longer side 640–1600 px, several aspect
ratios; each URL a distinct byte stream). Both tools get the same URL list, the same resize rule
(longer side ≤ MAX_SIDE, no upscaling, JPEG q90; a JPEG already within MAX_SIDE is stored as
downloaded — ours strips its metadata, img2dataset's `--skip_reencode` keeps it whole), Parquet
output, the same concurrency (64 requests in flight) and the same number of processes (2). Ours
also validates every image, applies EXIF orientation and computes sha256, pHash, 5 window hashes
and a colour thumbnail in the same pass; img2dataset computes sha256.

Both run as whole commands in their own processes, as a user runs them:
- ours: `uniter run crawl` (the ingest of the URL list runs before it, untimed: img2dataset reads
  a prepared URL file too);
- img2dataset: from its own venv (`make bench-peers`: its normal install, without torch).

Each is timed two ways:
- whole command: wall clock of the process, start-up included;
- steady state: from the first shard's start to the last shard's end, from each tool's own shard
  records (ours: the shard markers' write time less their `seconds`; img2dataset: the shard
  stats' start_time / end_time), so start-up and tear-down are out of both.

Runs alternate (ours, img2dataset) per pair; the ratios are medians over the pairs, with spread.

Goals: ours ÷ img2dataset ≥ 1.2× in steady state and ≥ 1.5× whole command, at max_side 384 and
1000.

    make bench-crawl     # or: .venv/bin/python benchmarks/crawl.py [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
I2D_VENV = ROOT / ".venv-img2dataset"
QUALITY, CONCURRENCY, PROCESSES, SHARD = 90, 64, 2, 250


def photos(n_base: int) -> list[bytes]:
    """The n_base photos behind the URLs (q90, longer side 640–1600 px, several aspect ratios)."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.images import jpeg, synthetic_photo

    rng = random.Random(0)
    base = []
    for i in range(n_base):
        long_side = rng.randint(640, 1600)
        w, h = long_side, int(long_side / rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0]))
        base.append(jpeg(synthetic_photo(70_000 + i, (w, h) if i % 3 else (h, w)), QUALITY))
    return base


def serve(port_file: str, n_base: int) -> None:
    """The image server: n_base photos, each URL a distinct byte stream (a JPEG comment differs)."""
    import asyncio

    from aiohttp import web

    base = photos(n_base)

    async def image(request):
        data = base[int(request.match_info["b"])]
        comment = f"variant {request.match_info['v']}".encode()
        # After the JFIF segment, where a file's first bytes stay those of a JPEG to img2dataset's
        # --skip_reencode test (imghdr looks for "JFIF" at byte 6).
        at = 4 + int.from_bytes(data[4:6], "big")
        body = data[:at] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[at:]
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{b}/{v}.jpg", image)

    async def start():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        Path(port_file).write_text(str(site._server.sockets[0].getsockname()[1]))
        while True:
            await asyncio.sleep(3600)

    asyncio.run(start())


def timed(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float, float, float]:
    """Run a command: (result, wall seconds, CPU seconds and peak RSS in MB of its whole process
    tree). The tree is polled in /proc (a process pool's workers are not children the command waits
    for, so rusage would miss them); a process's last < 0.1 s can be missed, on both sides alike."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, **kw)
    cpu: dict[int, float] = {}
    peak = 0.0
    while proc.poll() is None:
        now = _tree(proc.pid)
        cpu.update({pid: c for pid, (c, _) in now.items()})
        peak = max(peak, sum(rss for _, rss in now.values()))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}): {(err or b'')[-2000:]!r}")
    return subprocess.CompletedProcess(cmd, 0, out, err), wall, sum(cpu.values()), peak


def _tree(root: int) -> dict[int, tuple[float, float]]:
    """(CPU seconds, user + system; resident MB) of root and its descendants, by pid."""
    tick, page_mb = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE") / 2**20
    parents, stats = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        stats[pid] = ((int(fields[11]) + int(fields[12])) / tick, int(fields[21]) * page_mb)
    tree, grew = {root}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return {p: stats[p] for p in tree if p in stats}


def run_ours(work: Path, max_side: int) -> dict:
    out = work / f"ours-{time.time_ns()}"
    cfg = work / f"ours-{max_side}.yaml"
    cfg.write_text(
        f"storage: {{uri: {out}}}\n"
        f"ingest:\n  sources: [{{format: table, path: {work / 'urls.jsonl'}}}]\n"
        f"crawl:\n  allow_private_networks: true\n  concurrency: {CONCURRENCY}\n  per_host: {CONCURRENCY}\n"
        f"  per_host_rate: 0\n  workers: {PROCESSES}\n  max_side: {max_side}\n"
        f"  jpeg_quality: {QUALITY}\n  shard_images: {SHARD}\n"
    )
    uniter = [str(ROOT / ".venv" / "bin" / "uniter"), "run", "-q", "--json", "-c", str(cfg)]
    subprocess.run([*uniter, "ingest"], check=True, capture_output=True)
    proc, wall, cpu, rss = timed([*uniter, "crawl"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    counts = json.loads(proc.stdout)["counts"]
    spans = []
    for marker in out.glob("artifacts/crawl/*/_shards/*.json"):
        end = marker.stat().st_mtime
        spans.append((end - json.loads(marker.read_text())["seconds"], end))
    return {
        "images": counts["images"],
        "failures": counts["failures"],
        "as_downloaded": counts.get("kept_as_downloaded", 0),
        "stored_mb": counts["bytes_stored"] / 1e6,
        "wall": wall,
        "cpu": cpu,
        "rss": rss,
        "steady": _span(spans),
    }


def run_img2dataset(work: Path, max_side: int) -> dict:
    exe = I2D_VENV / "bin" / "img2dataset"
    out = work / f"i2d-{time.time_ns()}"
    # fmt: off
    cmd = [
        str(exe), "--url_list", str(work / "urls.txt"), "--input_format", "txt",
        "--output_folder", str(out), "--output_format", "parquet",
        "--image_size", str(max_side), "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True",
        "--encode_quality", str(QUALITY), "--skip_reencode", "True", "--processes_count", str(PROCESSES),
        "--thread_count", str(CONCURRENCY // PROCESSES), "--number_sample_per_shard", str(SHARD),
        "--timeout", "20", "--retries", "0", "--compute_hash", "sha256",
        "--distributor", "multiprocessing", "--enable_wandb", "False",
    ]
    # fmt: on
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    _, wall, cpu, rss = timed(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import pyarrow.parquet as pq

    ok = failed = 0
    spans = []
    stored = sum(
        sum(len(v) for v in pq.read_table(f, columns=["jpg"]).column("jpg").to_pylist() if v)
        for f in out.glob("*.parquet")
    )
    for stats in out.glob("*_stats.json"):
        s = json.loads(stats.read_text())
        ok += s["successes"]
        failed += s["count"] - s["successes"]
        spans.append((s["start_time"], s["end_time"]))
    return {
        "images": ok, "failures": failed, "wall": wall, "cpu": cpu, "rss": rss, "steady": _span(spans),
        "stored_mb": stored / 1e6,
    }  # fmt: skip


def image_work(max_side: int, n_base: int, rounds: int = 3) -> tuple[float, dict[str, float]]:
    """CPU ms per image of our image work alone (`process_image`: what a crawl worker does with a
    body) over the benchmark's photos, in this process; and of its steps, as the code runs them.
    On `PROCESSES` cores no crawl of these photos can beat PROCESSES / that, whatever the rest costs."""
    import hashlib
    import io

    from PIL import Image

    from corpus.images.colour import colour_thumbnail
    from corpus.images.imagehash import phash_windows, reduced
    from corpus.images.imaging import ImageOptions, process_image, target_size

    base, opts = photos(n_base), ImageOptions(max_side=max_side, jpeg_quality=QUALITY)
    steps = dict.fromkeys(("decode", "resize", "encode", "hashes + thumbnail", "sha256"), 0.0)

    @contextmanager
    def step(name: str):
        t = time.process_time()
        yield
        steps[name] += time.process_time() - t

    start = time.process_time()
    for _ in range(rounds):
        for data in base:
            process_image(data, opts)
    total = (time.process_time() - start) / rounds / len(base) * 1000
    for _ in range(rounds):
        for data in base:
            with step("sha256"):
                hashlib.sha256(data).hexdigest()
            image = Image.open(io.BytesIO(data))
            big = max(image.size) > max_side
            if big:
                image.draft("RGB", target_size(image.size, max_side))
            with step("decode"):
                image.load()
            if big:  # (within max_side: stored as downloaded, neither resized nor encoded)
                with step("resize"):
                    image = image.resize(target_size(image.size, max_side), Image.Resampling.BOX)
                with step("encode"):
                    image.save(io.BytesIO(), format="JPEG", quality=QUALITY)
            with step("hashes + thumbnail"):
                small = reduced(image)
                phash_windows(small), colour_thumbnail(small)
    return total, {k: v / rounds / len(base) * 1000 for k, v in steps.items()}


def _span(spans: list[tuple[float, float]]) -> float:
    if not spans:
        raise SystemExit("a run wrote no shard records")
    return max(e for _, e in spans) - min(s for s, _ in spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--base", type=int, default=200, help="distinct photos behind the URLs")
    ap.add_argument("--repeats", type=int, default=3, help="alternating (ours, img2dataset) pairs per size")
    ap.add_argument("--max-side", type=int, nargs="+", default=[384, 1000])
    args = ap.parse_args()
    if not (I2D_VENV / "bin" / "img2dataset").exists():
        raise SystemExit(f"{I2D_VENV}/bin/img2dataset is missing: run `make bench-peers` first")

    with tempfile.TemporaryDirectory(prefix="uniter-bench-crawl-") as tmp:
        work = Path(tmp)
        port_file = work / "port"
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.crawl import serve; "
        server = subprocess.Popen([sys.executable, "-c", code + f"serve({str(port_file)!r}, {args.base})"])
        try:
            while not port_file.exists() or not port_file.read_text():
                if server.poll() is not None:
                    raise SystemExit("the image server failed to start")
                time.sleep(0.2)
            base = f"http://127.0.0.1:{port_file.read_text()}"
            urls = [f"{base}/img/{i % args.base}/{i}.jpg" for i in range(args.images)]
            (work / "urls.txt").write_text("\n".join(urls) + "\n")
            (work / "urls.jsonl").write_text("".join(json.dumps({"image_url": u, "caption": "x"}) + "\n" for u in urls))
            print(f"{args.images} images from {args.base} photos, longer side 640–1600 px (q90), at {base}; "
                  f"{PROCESSES} processes, {CONCURRENCY} in flight, shards of {SHARD}", flush=True)  # fmt: skip
            results = {}
            for max_side in args.max_side:
                pairs = []
                for r in range(args.repeats):
                    ours, i2d = run_ours(work, max_side), run_img2dataset(work, max_side)
                    pairs.append((ours, i2d))
                    print(
                        f"max_side {max_side} pair {r + 1}: ours {_rates(ours)} ({ours['as_downloaded']} stored as "
                        f"downloaded); img2dataset {_rates(i2d)}",
                        flush=True,
                    )
                results[max_side] = pairs
        finally:
            server.terminate()
            server.wait()

    head = f"{'max_side':>8} {'measure':14} {'ours img/s':>11} {'i2d img/s':>10} {'ratio (median)':>15}"
    print(f"\n{head} {'spread':>12}  goal")
    met = True
    for max_side, pairs in results.items():
        for way, goal in (("steady", 1.2), ("wall", 1.5)):
            ours_r = [o["images"] / o[way] for o, _ in pairs]
            i2d_r = [i["images"] / i[way] for _, i in pairs]
            ratios = [a / b for a, b in zip(ours_r, i2d_r, strict=True)]
            med = statistics.median(ratios)
            met &= med >= goal
            label = "steady state" if way == "steady" else "whole command"
            verdict = "met" if med >= goal else "NOT met"
            print(f"{max_side:>8} {label:14} {statistics.median(ours_r):>11.1f} {statistics.median(i2d_r):>10.1f} "
                  f"{med:>14.2f}× {min(ratios):>5.2f}–{max(ratios):.2f}  ≥ {goal}× {verdict}")  # fmt: skip
        cpu_o = statistics.median(1000 * o["cpu"] / o["images"] for o, _ in pairs)
        cpu_i = statistics.median(1000 * i["cpu"] / i["images"] for _, i in pairs)
        print(
            f"{'':>8} {'CPU ms/image':14} {cpu_o:>11.1f} {cpu_i:>10.1f} {cpu_o / cpu_i:>14.2f}×  (whole process tree)"
        )
        rss_o = statistics.median(o["rss"] for o, _ in pairs)
        rss_i = statistics.median(i["rss"] for _, i in pairs)
        print(f"{'':>8} {'peak RSS MB':14} {rss_o:>11.0f} {rss_i:>10.0f} {rss_o / rss_i:>14.2f}×  (process tree)")
        mb_o = statistics.median(o["stored_mb"] for o, _ in pairs)
        mb_i = statistics.median(i["stored_mb"] for _, i in pairs)
        print(f"{'':>8} {'JPEGs, MB':14} {mb_o:>11.1f} {mb_i:>10.1f} {mb_o / mb_i:>14.2f}×  (image bytes stored)")
        fails = sorted({(o["failures"], i["failures"]) for o, i in pairs})
        print(f"{'':>8} failures (ours, img2dataset) per pair: {fails}")
        work_ms, steps = image_work(max_side, args.base)
        ceiling = PROCESSES * 1000 / work_ms
        i2d_steady = statistics.median(i["images"] / i["steady"] for _, i in pairs)
        print(
            f"{'':>8} our image work alone: {work_ms:.1f} ms CPU/image ("
            + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
            + f"): on {PROCESSES} cores at most {ceiling:.0f} img/s, {ceiling / i2d_steady:.2f}× img2dataset's "
            "steady rate"
        )
    print(f"\nall goals {'met' if met else 'NOT met'}")


def _rates(r: dict) -> str:
    return (
        f"{r['images']} images, {r['images'] / r['steady']:.1f} img/s steady, {r['images'] / r['wall']:.1f} "
        f"whole, {1000 * r['cpu'] / r['images']:.1f} ms CPU/image"
    )


if __name__ == "__main__":
    main()
