"""64-bit perceptual hashes (pHash): the DCT of a 32×32 grayscale image, 8×8 lowest frequencies
against their median — the construction of the `imagehash` / imagededup PHash — for the whole
image and for five crop windows.

Why windows: a copy cropped by a few percent moves the whole 32×32 grid, and its pHash drifts by
up to ~14 bits (measured), far beyond what separates re-encodes. Hashing the original's crop
windows too (centre, and each side trimmed by `WINDOW_TRIM`) lets a cropped copy land within a few
bits of one of them, so near duplicates are found at a small distance, where an exact, indexed
join stays cheap (see corpus/dedup/join.py).

Hashes are signed int64 (Arrow/DuckDB BIGINT); Hamming distance = popcount(a XOR b).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_N = 32
# Unnormalized DCT-II basis (scale does not matter: bits compare coefficients with their median).
_DCT = 2 * np.cos(np.pi * np.outer(np.arange(_N), 2 * np.arange(_N) + 1) / (2 * _N))
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)
HASH_SIDE = 256  # hashes are computed from a grayscale copy at most this size: plenty for 32×32
WINDOW_TRIM = 0.05


def _hashes(grays: list[Image.Image]) -> list[int]:
    """pHashes of several grayscale images in one batched DCT."""
    # BOX (area average) to 32×32: as good as Lanczos for hashing, 5× cheaper (measured)
    pixels = np.stack([np.asarray(g.resize((_N, _N), Image.Resampling.BOX), dtype=np.float64) for g in grays])
    low = (_DCT @ pixels @ _DCT.T)[:, :8, :8].reshape(len(grays), 64)
    bits = (low > np.median(low, axis=1, keepdims=True)).astype(np.uint64)
    return [int(v) for v in np.sum(bits * _WEIGHTS, axis=1, dtype=np.uint64).astype(np.int64)]


def _hash_gray(gray: Image.Image) -> int:
    return _hashes([gray])[0]


def reduced(image: Image.Image) -> Image.Image:
    """The image box-reduced by the smallest integer factor that brings it to `HASH_SIDE` or less."""
    factor = -(-max(image.size) // HASH_SIDE)  # ceil
    return image.reduce(factor) if factor > 1 else image


def _work_copy(image: Image.Image) -> Image.Image:
    """Grayscale, at most `HASH_SIDE` on its longer side: gray first (one channel to shrink),
    then an integer box reduction, then a small resize."""
    return reduced(image.convert("L"))


def phash(image: Image.Image) -> int:
    """pHash of the whole image, as a signed 64-bit integer."""
    return _hash_gray(_work_copy(image))


def phash_windows(image: Image.Image) -> tuple[int, list[int]]:
    """(pHash of the whole image, pHashes of the centre window and of each side trimmed)."""
    gray = _work_copy(image)
    w, h = gray.size
    dx, dy = int(w * WINDOW_TRIM), int(h * WINDOW_TRIM)
    boxes = [
        (dx // 2, dy // 2, w - dx // 2, h - dy // 2),  # centre
        (dx, 0, w, h),
        (0, 0, w - dx, h),
        (0, dy, w, h),
        (0, 0, w, h - dy),  # one side trimmed
    ]
    full, *windows = _hashes([gray, *(gray.crop(b) for b in boxes)])
    return full, windows


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()
