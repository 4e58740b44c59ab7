"""The second look at a pHash candidate: is it really the same picture?

pHash sees the luminance structure of a 32×32 grayscale image. Pictures that differ in colour
(a yellow and a teal rectangle), or in the size or place of a flat shape, can share it exactly.
So every pHash candidate, for dedup and for decontamination alike, is checked against a colour
thumbnail before it counts. The thumbnail is stored at crawl time beside the hashes.

- The thumbnail is 32×32 CIELAB, area-averaged and stretched to a square. CIELAB because its
  Euclidean distance (ΔE) follows perceived colour difference: 2 is just noticeable; about 10 is
  a ±10 % brightness edit; 40 and more separates named colours. Aspect ratio is compared apart.
- Two thumbnails are compared on a 16×16 grid, after aligning one to the other. The alignments
  are the crops a pHash candidate can be: 0–6 % off both sides, or off one side. This is the same
  family the pHash crop windows cover.
- Brightness is not matched: a ±10 % edit leaves ΔE ≈ 10 everywhere, under the threshold, while
  matching it also hid a background changed from white to light grey (measured: it tripled the
  false matches on flat shapes).
- The distance is the largest ΔE after a 2×2 erosion. A cell-wide line of difference is what
  JPEG and a sub-cell misalignment leave along edges, and the erosion removes it. A region of two
  cells or more is a real difference, and it stays: a shape moved, resized or recoloured.
- The threshold is `dedup.colour_max_distance`, set from benchmarks/dedup.py. That benchmark uses
  re-encoded, resized, cropped and brightened copies of photos and of flat shapes, and flat
  shapes that differ in one attribute. Its figures are in docs/corpus.md.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from PIL import Image

THUMB_SIDE = 32  # stored: 32 × 32 × 3 bytes
GRID = 16  # compared
_TRIMS = tuple(t / 100 for t in range(7))
# Windows (x0, x1, y0, y1) as fractions of the image: trimmed evenly, or from one side.
WINDOWS = tuple(
    sorted(
        {(t / 2, 1 - t / 2, t / 2, 1 - t / 2) for t in _TRIMS}
        | {(t, 1.0, 0.0, 1.0) for t in _TRIMS}
        | {(0.0, 1 - t, 0.0, 1.0) for t in _TRIMS}
        | {(0.0, 1.0, t, 1.0) for t in _TRIMS}
        | {(0.0, 1.0, 0.0, 1 - t) for t in _TRIMS}
    )
)
_FULL = WINDOWS.index((0.0, 1.0, 0.0, 1.0))
MAX_ASPECT_RATIO = 1.15  # windows trim ≤ 6 % of a side; more than this is another picture's shape


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8) → CIELAB (D65)."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = c @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def colour_thumbnail(image: Image.Image) -> bytes:
    """The stored thumbnail of an RGB image: 32×32 CIELAB as bytes (L·2.55, a+128, b+128)."""
    small = np.asarray(image.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX))
    lab = _lab(small)
    packed = np.stack([lab[..., 0] * 2.55, lab[..., 1] + 128, lab[..., 2] + 128], -1)
    return np.clip(np.round(packed), 0, 255).astype(np.uint8).tobytes()


def _unpack(thumbs: list[bytes]) -> np.ndarray:
    raw = np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), THUMB_SIDE, THUMB_SIDE, 3)
    lab = raw.astype(np.float32)
    lab[..., 0] /= 2.55
    lab[..., 1:] -= 128
    return lab


@cache
def _resamplers() -> tuple[np.ndarray, np.ndarray]:
    """Per window, the bilinear maps (GRID × THUMB_SIDE) taking thumbnail rows and columns to the
    window's grid-cell centres: a window's grid is Ry · T · Rxᵀ."""

    def axis(lo: float, hi: float) -> np.ndarray:
        m = np.zeros((GRID, THUMB_SIDE), np.float32)
        centres = (lo + (np.arange(GRID) + 0.5) / GRID * (hi - lo)) * THUMB_SIDE - 0.5
        for g, c in enumerate(np.clip(centres, 0, THUMB_SIDE - 1)):
            i = min(int(math.floor(c)), THUMB_SIDE - 2)
            m[g, i], m[g, i + 1] = 1 - (c - i), c - i
        return m

    rx = np.stack([axis(x0, x1) for x0, x1, _, _ in WINDOWS])
    ry = np.stack([axis(y0, y1) for _, _, y0, y1 in WINDOWS])
    return rx, ry


def _windows(lab: np.ndarray) -> np.ndarray:
    """(n, windows, GRID, GRID, 3) grids of each thumbnail's windows (two batched products)."""
    rx, ry = _resamplers()
    rows = np.matmul(ry[None, :, None], lab[:, None].transpose(0, 1, 4, 2, 3))  # (n, K, 3, G, S)
    return np.matmul(rows, rx[None, :, None].transpose(0, 1, 2, 4, 3)).transpose(0, 1, 3, 4, 2)


def colour_distances(a: list[bytes], b: list[bytes], chunk: int = 2048) -> np.ndarray:
    """For each pair (a[i], b[i]) of stored thumbnails: the smallest, over the alignments of either
    one to the other, of the largest ΔE after a 2×2 erosion. Each
    distinct thumbnail of a chunk is resampled once, however many pairs it is in."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), chunk):
        left, right = a[start : start + chunk], b[start : start + chunk]
        distinct = list(dict.fromkeys([*left, *right]))
        where = {t: i for i, t in enumerate(distinct)}
        windows = _windows(_unpack(distinct))
        ia, ib = [where[t] for t in left], [where[t] for t in right]
        for s in range(0, len(ia), 256):  # (256 pairs × both directions at a time: bounded memory)
            wa, wb = windows[ia[s : s + 256]], windows[ib[s : s + 256]]
            out[start + s : start + s + len(wa)] = np.minimum(_aligned(wa[:, _FULL], wb), _aligned(wb[:, _FULL], wa))
    return out


def _aligned(full: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """full (n, G, G, 3) against every window (n, K, G, G, 3): the best alignment's distance."""
    diff = np.linalg.norm(full[:, None] - windows, axis=-1)  # (n, K, G, G)
    eroded = np.minimum(
        np.minimum(diff[..., :-1, :-1], diff[..., 1:, :-1]), np.minimum(diff[..., :-1, 1:], diff[..., 1:, 1:])
    )
    return eroded.max(axis=(2, 3)).min(axis=1)


def aspect_ratio_close(wa: int, ha: int, wb: int, hb: int) -> bool:
    ratio = (wa / max(ha, 1)) / (wb / max(hb, 1))
    return max(ratio, 1 / ratio) <= MAX_ASPECT_RATIO
