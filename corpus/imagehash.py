"""64-bit perceptual hash (pHash): the DCT of a 32×32 grayscale image, 8×8 lowest frequencies
against their median. Same construction as the `imagehash` / imagededup PHash.

Hashes are stored as signed int64 (Arrow/DuckDB BIGINT); Hamming distance = popcount(a XOR b).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_N = 32
# Unnormalized DCT-II basis (scale does not matter: bits compare coefficients with their median).
_DCT = 2 * np.cos(np.pi * np.outer(np.arange(_N), 2 * np.arange(_N) + 1) / (2 * _N))
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash(image: Image.Image) -> int:
    """pHash of a decoded image, as a signed 64-bit integer."""
    small = image.convert("L").resize((_N, _N), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    bits = (low > np.median(low)).ravel().astype(np.uint64)
    return int(np.sum(bits * _WEIGHTS, dtype=np.uint64).astype(np.int64))


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()
