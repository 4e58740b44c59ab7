"""Near-duplicate search: speed/memory of the Hamming join at scale, and precision/recall on photos.

1. The join at the paper's scale (issue 15): 1M, 2M and 5M images, each with its whole-image hash
   and 5 window hashes (what crawl stores), on hashes of real pictures — 1,500 photo-like pictures
   and their six variants (q40, half size, 5 % crop centred and from one side, brightness ±10 %),
   mixed bitwise into n images (`realistic_hashes`), so bands are clustered as real pHashes are —
   with 1 % planted copies; all pairs within the default distance, in DuckDB on 2 threads in 2 GB,
   each size in its own process. Seconds, seconds per 1M, peak RSS (goal at 5M: ≤ 5 min and ≤ 4 GB),
   the candidates the keys bring together (and how many times the uniform-hash estimate that is),
   and recall of the planted copies within the distance (must be 1.0: the join is exact). The
   smallest size runs again with one band per key, the only plans before issue 15: before/after.
2. Quality: 1,000 photos + 1,000 copies (JPEG q40, 50 % resize, 5 % crop — centred or from one
   side — brightness ±10 %), our
   windowed pHash at the default distance next to imagededup's PHash at its default threshold
   (10) on the same files, and our pHash candidates before the colour check
   (corpus/images/colour.py). Goal: recall ≥ 0.95 at precision ≥ 0.99, more recall than
   imagededup, and the colour check loses none.
3. Flat shapes, which pHash confuses: every combination of the fixture grid and copies of every
   fifth one; precision and recall before and after the colour check (coarse, then fine). Goal:
   precision 1.000 on shapes that differ in colour, size or place (the issue's fixture); printed
   too over every attribute the grid varies, the shape's type and the background included.

    make bench-dedup     # or: .venv/bin/python benchmarks/dedup.py [--sizes 1000000,2000000,5000000]
                         [--bases 1500] [--distance 4] [--photos 1000] [--quality-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_VENV = ROOT / ".venv-bench"


def photo_variants() -> list[tuple[str, object]]:
    """The six transformations a planted photo copy gets: (name, image → image)."""
    from tests.fixtures import images as fx

    return [
        ("q40", lambda im: fx.recompressed(im, 40)),
        ("half", lambda im: fx.resized(im, 0.5)),
        ("crop5", lambda im: fx.cropped(im, 0.05)),
        ("crop5-side", lambda im: im.crop((int(im.width * 0.05), 0, im.width, im.height))),
        ("bright+10", lambda im: fx.brightened(im, 1.1)),
        ("bright-10", lambda im: fx.brightened(im, 0.9)),
    ]


def base_hashes(seed: int) -> list[list[int]]:
    """One photo-like picture and its six variants, each stored as crawl stores it (JPEG, decoded,
    whole-image pHash + 5 window pHashes): (7, 6) hashes, the original first."""
    import io

    from PIL import Image

    from corpus.images.imagehash import phash_windows
    from tests.fixtures import images as fx

    im = fx.synthetic_photo(300_000 + seed, (400, 300))
    out = []
    for picture in (im, *(transform(im) for _, transform in photo_variants())):
        stored = Image.open(io.BytesIO(fx.jpeg(picture))).convert("RGB")
        whole, windows = phash_windows(stored)
        out.append([h - (1 << 64) if h >= 1 << 63 else h for h in (whole, *windows)])  # as crawl stores them: BIGINT
    return out


def realistic_hashes(bases, n: int, d: int, seed: int = 0):
    """n images' 6 hashes each, mixed from the bases' real pHashes, and 1 % planted copies.

    Image j takes each bit from one of two base pictures (a random 64-bit mask m_j): hash =
    (H_a & m_j) | (H_b & ~m_j), for the whole-image hash and each window alike. Every bit keeps the
    bias real pHashes have, and images that share a parent share about half its bits, so the bands
    the join keys on are clustered as real pHashes are, not uniform. A copy of j mixes the same two
    parents' same variant (q40, half, crop …) with the same mask: its distance to j is what those
    transformations really do, spread over the bits j took from each parent."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = len(bases)
    n_copies = n // 100
    n_orig = n - n_copies
    a = rng.integers(0, k, n_orig)
    b = (a + rng.integers(1, k, n_orig)) % k  # two different parents
    mask = rng.integers(-(2**63), 2**63 - 1, size=n_orig, dtype=np.int64)[:, None]
    hashes = np.empty((n, 6), np.int64)
    hashes[:n_orig] = (bases[a, 0] & mask) | (bases[b, 0] & ~mask)
    src = rng.choice(n_orig, size=n_copies, replace=False)
    variant = rng.integers(1, bases.shape[1], n_copies)
    m = mask[src]
    hashes[n_orig:] = (bases[a[src], variant] & m) | (bases[b[src], variant] & ~m)
    copies = np.arange(n_orig, n)

    # The pairs the join must find: the copy's whole hash within d of one of the original's six
    # hashes, or the other way round (what the stage's two-sided windows match).
    d1 = np.bitwise_count(hashes[copies, :1] ^ hashes[src]).min(1)
    d2 = np.bitwise_count(hashes[src, :1] ^ hashes[copies]).min(1)
    within = np.minimum(d1, d2) <= d
    return hashes, np.stack([src, copies], 1)[within], float(within.mean())


def join_child(n: int, bases_file: str, one_band: bool, distance: int | None) -> None:
    import functools

    import duckdb
    import numpy as np
    import pyarrow as pa

    import corpus.dedup.join
    from corpus.dedup.config import DedupConfig
    from corpus.dedup.join import count_candidates, hamming_join

    if one_band:  # the plans before issue 15, on the same hashes
        corpus.dedup.join.plan_bands = functools.partial(corpus.dedup.join.plan_bands, combine=False)
    plan_bands = corpus.dedup.join.plan_bands

    d = distance if distance is not None else DedupConfig().phash_max_distance
    hashes, planted, planted_within = realistic_hashes(np.load(bases_file), n, d)
    ids = np.arange(n, dtype=np.int64)
    # the dedup stage's settings: DuckDB on 2 threads in 2 GB
    # (spills go next to the hashes, in the run's temporary folder, not into the working directory)
    spill = str(Path(bases_file).parent / "spill")
    con = duckdb.connect(config={"threads": 2, "memory_limit": "2GB", "temp_directory": spill})
    con.register("q", pa.table({"id": ids, "h": hashes[:, 0]}))
    con.register("ix", pa.table({"id": np.repeat(ids, 6), "h": hashes.ravel()}))
    del hashes
    t0 = time.perf_counter()
    pairs = hamming_join(con, "select id, h from q", "select id, h from ix", d, exclude_self=True)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plan = plan_bands(d, n, 6 * n)
    candidates = count_candidates(con, "select id, h from q", "select id, h from ix", d)
    uniform = plan.expected_candidates(n, 6 * n)
    qid, iid = pairs.column("qid").to_numpy(), pairs.column("iid").to_numpy()
    found = set(zip(np.minimum(qid, iid).tolist(), np.maximum(qid, iid).tolist(), strict=True))
    recall = sum((int(x), int(y)) in found for x, y in planted) / max(1, len(planted))
    print(
        json.dumps(
            {
                "n": n,
                "d": d,
                "plan": str(plan),
                "seconds": seconds,
                "pairs": len(found),
                "candidates": candidates,
                "uniform_candidates": uniform,
                "planted": len(planted),
                "planted_within": planted_within,
                "recall": recall,
                "peak_rss_mb": rss,
            }
        )
    )


def make_photos(folder: Path, n: int) -> set[tuple[str, str]]:
    from tests.fixtures import images as fx

    transforms = photo_variants()
    truth = set()
    for i in range(n):
        im = fx.synthetic_photo(200_000 + i, (400, 300))
        name, transform = transforms[i % len(transforms)]
        a, b = f"{i:05d}.jpg", f"{i:05d}_{name}.jpg"
        (folder / a).write_bytes(fx.jpeg(im))
        (folder / b).write_bytes(fx.jpeg(transform(im)))
        truth.add((a, b))
    return truth


def make_shapes(folder: Path, seed: int = 0) -> tuple[set[tuple[str, str]], dict[str, tuple]]:
    """Every flat shape of the fixture grid (3 shapes × 10 colours × 3 sizes × 9 places × 3
    backgrounds, where the shape's colour is not the background's), 64 px, and one copy of every
    fifth image: re-encoded, resized, cropped or brightened. Any two originals differ in colour,
    size, place, shape or background: a different picture with a different caption."""
    import itertools
    import random

    from tests.fixtures import images as fx

    transforms = [
        ("q40", lambda im: fx.recompressed(im, 40)),
        ("double", lambda im: fx.resized(im, 2.0)),
        ("crop5", lambda im: fx.cropped(im, 0.05)),
        ("bright+10", lambda im: fx.brightened(im, 1.1)),
        ("bright-10", lambda im: fx.brightened(im, 0.9)),
    ]
    combos = [
        c
        for c in itertools.product(
            ("rectangle", "ellipse", "triangle"),
            fx.SHAPE_COLOURS,
            fx.SHAPE_SIZES,
            itertools.product(range(3), range(3)),
            range(3),
        )
        if fx.SHAPE_COLOURS[c[1]] != fx.SHAPE_BACKGROUNDS[c[4]]
    ]
    random.Random(seed).shuffle(combos)
    truth, made = set(), {}
    for i, combo in enumerate(combos):
        im = fx.flat_shape(*combo)
        a = f"s{i:05d}.jpg"
        made[a] = combo
        (folder / a).write_bytes(fx.jpeg(im))
        if i % 5 == 0:
            name, transform = transforms[(i // 5) % len(transforms)]
            b = f"s{i:05d}_{name}.jpg"
            (folder / b).write_bytes(fx.jpeg(transform(im)))
            truth.add((a, b))
            made[b] = combo
    return truth, made


def ours(folder: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]], float, float]:
    """Our near-duplicate pairs: the pHash candidates alone, and those that pass the colour check,
    coarse then fine (what dedup merges and decontaminates by), with the seconds each took."""
    import duckdb
    import pyarrow as pa
    from PIL import Image

    from corpus.dedup.config import DedupConfig
    from corpus.dedup.join import hamming_join
    from corpus.images.colour import aspect_ratio_close, colour_distances, colour_thumbnail, fine_differences
    from corpus.images.imagehash import phash_windows

    cfg = DedupConfig()
    names = sorted(p.name for p in folder.glob("*.jpg"))
    t0 = time.perf_counter()
    images = [Image.open(folder / n).convert("RGB") for n in names]
    hashes = [phash_windows(im) for im in images]
    con = duckdb.connect()
    con.register("q", pa.table({"id": list(range(len(names))), "h": [h[0] for h in hashes]}))
    ix_ids = [i for i, (_, w) in enumerate(hashes) for _ in range(1 + len(w))]
    ix_h = [x for f, w in hashes for x in (f, *w)]
    con.register("ix", pa.table({"id": ix_ids, "h": ix_h}))
    pairs = hamming_join(con, "select id, h from q", "select id, h from ix", cfg.phash_max_distance, exclude_self=True)
    ids = sorted(
        {
            (min(a, b), max(a, b))
            for a, b in zip(pairs.column("qid").to_pylist(), pairs.column("iid").to_pylist(), strict=True)
        }
    )
    phash_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    thumbs = [colour_thumbnail(im) for im in images]
    colour = colour_distances([thumbs[a] for a, _ in ids], [thumbs[b] for _, b in ids])
    coarse = [
        (a, b)
        for (a, b), c in zip(ids, colour, strict=True)
        if c <= cfg.colour_max_distance and aspect_ratio_close(*images[a].size, *images[b].size)
    ]
    fine = fine_differences([thumbs[a] for a, _ in coarse], [thumbs[b] for _, b in coarse])
    verified = [pair for pair, blocks in zip(coarse, fine, strict=True) if blocks == 0]
    check_seconds = time.perf_counter() - t1
    return (
        {(names[a], names[b]) for a, b in ids},
        {(names[a], names[b]) for a, b in verified},
        phash_seconds,
        check_seconds,
    )


IMAGEDEDUP = """
import json, sys, time
from imagededup.methods import PHash
t0 = time.perf_counter()
ph = PHash(verbose=False)
enc = ph.encode_images(image_dir=sys.argv[1], num_enc_workers=2)
dups = ph.find_duplicates(encoding_map=enc, num_dist_workers=2)  # default max_distance_threshold=10
pairs = sorted({tuple(sorted((a, b))) for a, bs in dups.items() for b in bs})
print(json.dumps({"pairs": pairs, "seconds": time.perf_counter() - t0}))
"""


def imagededup(folder: Path) -> tuple[set[tuple[str, str]], float]:
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run `make bench-peers` first")
    out = subprocess.run([str(python), "-c", IMAGEDEDUP, str(folder)], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {tuple(p) for p in res["pairs"]}, res["seconds"]


def scores(found: set, truth: set) -> tuple[float, float]:
    tp = len(found & truth)
    return (tp / len(found) if found else 1.0), tp / len(truth)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,2000000,5000000", help="corpus sizes for the join, comma-separated")
    ap.add_argument("--bases", type=int, default=1500, help="real pictures (× 7 variants) the hashes are mixed from")
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--join-child", type=int)
    ap.add_argument("--bases-file")
    ap.add_argument("--one-band", action="store_true")
    ap.add_argument("--distance", type=int, help="the join's distance (default: dedup's phash_max_distance, 4)")
    ap.add_argument("--quality-only", action="store_true", help="skip the join at scale")
    args = ap.parse_args()
    if args.join_child:
        return join_child(args.join_child, args.bases_file, args.one_band, args.distance)

    if not args.quality_only:
        join([int(x) for x in args.sizes.split(",")], args.bases, args.distance)
    quality(args.photos)


def join(sizes: list[int], bases: int, distance: int | None = None) -> None:
    """The join at the paper's scale on hashes of real pictures (see `realistic_hashes`), each size
    in its own process (its peak RSS is the join's)."""
    import numpy as np

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="uniter-bench-hashes-") as tmp:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=2) as pool:
            made = np.array(list(pool.map(base_hashes, range(bases), chunksize=16)), dtype=np.int64)
        bases_file = Path(tmp) / "bases.npy"
        np.save(bases_file, made)
        print(
            f"join: {bases:,} photo-like pictures × (original + {len(photo_variants())} variants), "
            f"pHash + 5 windows each, mixed bitwise into n images with 1 % planted copies "
            f"({time.perf_counter() - t0:.0f} s to make)"
        )
        print(f"distance ≤ {distance if distance is not None else 'the default'}")
        print(f"{'images':>10} {'plan':>36} {'s':>7} {'s per 1M':>9} {'RSS MB':>7} {'candidates':>14} "
              f"{'× uniform':>9} {'pairs':>10} {'planted':>8} {'recall':>6}")  # fmt: skip
        # the last row: the smallest size again with one band per key, as the join was before
        for n, one_band in [*((n, False) for n in sizes), (min(sizes), True)]:
            r = json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--join-child", str(n), "--bases-file", str(bases_file)]
                    + ["--one-band"] * one_band
                    + (["--distance", str(distance)] if distance is not None else []),
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            print(
                f"{r['n']:>10,} {r['plan']:>36} {r['seconds']:>7.1f} {r['seconds'] / r['n'] * 1e6:>9.1f} "
                f"{r['peak_rss_mb']:>7.0f} {r['candidates']:>14,} {r['candidates'] / r['uniform_candidates']:>9.1f} "
                f"{r['pairs']:>10,} {r['planted']:>8,} {r['recall']:>6.3f}",
                flush=True,
            )
            if r["n"] == max(sizes) and not one_band:
                ok = r["seconds"] <= 300 and r["peak_rss_mb"] <= 4096
                print(f"goal at {r['n']:,} images: ≤ 300 s and ≤ 4096 MB: {'met' if ok else 'NOT met'}")


def quality(photos: int) -> None:
    with tempfile.TemporaryDirectory(prefix="uniter-bench-dedup-") as tmp:
        folder = Path(tmp)
        truth = make_photos(folder, photos)
        phash_pairs, our_pairs, our_s, check_s = ours(folder)
        their_pairs, their_s = imagededup(folder)
    print(
        f"\nquality on {2 * photos:,} photos ({photos:,} planted pairs: q40, 50% resize, "
        "5% crop centred / one side, brightness ±10%)"
    )
    print(f"{'method':44} {'precision':>9} {'recall':>7} {'seconds':>8}")
    for name, found, secs in (
        ("uniter pHash + windows, d<=4 (before)", phash_pairs, our_s),
        ("uniter pHash + colour check (now)", our_pairs, our_s + check_s),
        ("imagededup PHash (default, d<=10)", their_pairs, their_s),
    ):
        p, rc = scores(found, truth)
        print(f"{name:44} {p:>9.3f} {rc:>7.3f} {secs:>8.1f}")
    p, rc = scores(our_pairs, truth)
    _, rc_before = scores(phash_pairs, truth)
    _, rc_them = scores(their_pairs, truth)
    ok = rc >= 0.95 and p >= 0.99 and rc > rc_them and rc >= rc_before
    print(
        "goal: recall >= 0.95 at precision >= 0.99, more recall than imagededup, no less than pHash alone: "
        f"{'met' if ok else 'NOT met'}"
    )
    by_kind: dict[str, list[int]] = {}
    for a, b in truth:
        by_kind.setdefault(b.split("_", 1)[1][:-4], []).append((a, b) in our_pairs)
    print(
        "our recall by transformation: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(by_kind.items()))
    )

    with tempfile.TemporaryDirectory(prefix="uniter-bench-shapes-") as tmp:
        folder = Path(tmp)
        truth, made = make_shapes(folder)
        n_images = len(made)
        phash_pairs, our_pairs, our_s, check_s = ours(folder)
    print(
        f"\nquality on {n_images:,} flat shapes (every shape × colour × size × place × background; "
        f"{len(truth):,} planted copies: q40, 2× resize, 5% crop, brightness ±10%)"
    )
    print(f"{'method':44} {'precision':>9} {'recall':>7} {'false':>6} {'seconds':>8}")
    for name, found, secs in (
        ("uniter pHash + windows, d<=4 (before)", phash_pairs, our_s),
        ("uniter pHash + colour check (now)", our_pairs, our_s + check_s),
    ):
        p, rc = scores(found, truth)
        print(f"{name:44} {p:>9.3f} {rc:>7.3f} {len(found - truth):>6,} {secs:>8.1f}")
    p, _ = scores(our_pairs, truth)
    # the fixture: shapes that differ only in colour, size or place (ours also varies the
    # shape's type and the background, which the goal does not name)
    named = {(a, b) for a, b in our_pairs - truth if made[a][0] == made[b][0] and made[a][4] == made[b][4]}
    p_named = len(our_pairs & truth) / max(1, len(our_pairs & truth) + len(named))
    print(f"precision over pairs differing in colour, size or place only: {p_named:.3f} ({len(named)} false)")
    named_met = "met" if p_named == 1.0 else "NOT met"
    print(
        f"goal: precision 1.000 on flat shapes differing in colour, size or place: {named_met}"
        f"; on every attribute (shape type and background too): {'met' if p == 1.0 else 'NOT met'} ({p:.3f})"
    )
    kinds: dict[str, int] = {}
    for a, b in sorted(our_pairs - truth):
        what = [k for k, j in (("shape", 0), ("colour", 1), ("size", 2), ("place", 3), ("background", 4))
                if made[a][j] != made[b][j]]  # fmt: skip
        kinds[" + ".join(what)] = kinds.get(" + ".join(what), 0) + 1
    print(
        "false matches by what differs: "
        + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none")
    )


if __name__ == "__main__":
    main()
