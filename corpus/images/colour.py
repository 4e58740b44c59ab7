"""The second look at a pHash candidate: is it really the same picture?

pHash sees the luminance structure of a 32×32 grayscale image. Pictures that differ in colour
(a yellow and a teal rectangle), or in the size or place of a flat shape, can share it exactly.
So every pHash candidate, for dedup and for decontamination alike, is checked against a colour
thumbnail before it counts. The thumbnail is stored at crawl time beside the hashes.

- The thumbnail is 64×64 CIELAB, area-averaged and stretched to a square. CIELAB because its
  Euclidean distance (ΔE) follows perceived colour difference: 2 is just noticeable; about 10 is
  a ±10 % brightness edit; 40 and more separates named colours. Aspect ratio is compared apart.
- The coarse check: the thumbnails, averaged down to 32×32, are compared on a 16×16 grid after
  aligning one to the other. The alignments are the crops a pHash candidate can be: 0–6 % off both
  sides, or off one side. This is the same family the pHash crop windows cover.
- Brightness is not matched: a ±10 % edit leaves ΔE ≈ 10 everywhere, under the threshold, while
  matching it also hid a background changed from white to light grey (measured: it tripled the
  false matches on flat shapes).
- The distance is the largest ΔE after a 2×2 erosion. A cell-wide line of difference is what
  JPEG and a sub-cell misalignment leave along edges, and the erosion removes it. A region of two
  cells or more is a real difference, and it stays: a shape moved, resized or recoloured.
- The threshold is `dedup.colour_max_distance`, set from benchmarks/dedup.py. That benchmark uses
  re-encoded, resized, cropped and brightened copies of photos and of flat shapes, and flat
  shapes that differ in one attribute. Its figures are in docs/corpus.md.
- The fine check, for candidates that pass the coarse one: the full 64×64 thumbnails, every
  alignment, pixel by pixel. A pixel differs when its smallest ΔE to the other picture's pixels
  within one pixel (a resize or crop moves edges by that much) exceeds FINE_TOLERANCE plus
  FINE_TEXTURE × the local contrast (the largest ΔE to a neighbour, in either picture): flat areas
  must agree closely, edges and texture — where JPEG and resampling differ — less so. A 2×2 block
  of differing pixels is a real difference; none may remain. At the coarse grid a 2×2 erosion
  had to hide whatever a small shape's size changes (a 13-pixel triangle in a 64-pixel picture
  against an 8-pixel one); here it is four pixels wide. Both constants come from benchmarks/dedup.py.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from PIL import Image

THUMB_SIDE = 64  # stored: 64 × 64 × 3 bytes
COARSE_SIDE = 32  # the coarse check's thumbnail (2 × 2 means of the stored one) …
GRID = 16  # … compared on this grid
FINE_TOLERANCE = 12.0  # ΔE a flat pixel may differ by
FINE_TEXTURE = 0.5  # and this much of the local contrast more
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
    xyz = _LINEAR[rgb] @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _linear_table() -> np.ndarray:
    """Linear light of each 8-bit sRGB value: a lookup instead of a power per pixel."""
    c = np.arange(256, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LINEAR = _linear_table()
_RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def colour_thumbnail(image: Image.Image) -> bytes:
    """The stored thumbnail of an RGB image: 64×64 CIELAB as bytes (L·2.55, a+128, b+128)."""
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


def _coarse(lab: np.ndarray) -> np.ndarray:
    """(n, 64, 64, 3) → (n, 32, 32, 3): 2 × 2 means."""
    n, f = len(lab), THUMB_SIDE // COARSE_SIDE
    return lab.reshape(n, COARSE_SIDE, f, COARSE_SIDE, f, 3).mean(axis=(2, 4))


@cache
def _resamplers(grid: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per window, the bilinear maps (grid × side) taking thumbnail rows and columns to the
    window's grid-cell centres: a window's grid is Ry · T · Rxᵀ."""

    def axis(lo: float, hi: float) -> np.ndarray:
        m = np.zeros((grid, side), np.float32)
        centres = (lo + (np.arange(grid) + 0.5) / grid * (hi - lo)) * side - 0.5
        for g, c in enumerate(np.clip(centres, 0, side - 1)):
            i = min(int(math.floor(c)), side - 2)
            m[g, i], m[g, i + 1] = 1 - (c - i), c - i
        return m

    rx = np.stack([axis(x0, x1) for x0, x1, _, _ in WINDOWS])
    ry = np.stack([axis(y0, y1) for _, _, y0, y1 in WINDOWS])
    return rx, ry


def _windows(lab: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(n, windows, grid, grid, 3) grids of each thumbnail's windows (two batched products)."""
    rx, ry = _resamplers(grid, lab.shape[1])
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
        windows = _windows(_coarse(_unpack(distinct)))
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


def fine_differences(a: list[bytes], b: list[bytes], top: int = 3) -> np.ndarray:
    """For each pair (a[i], b[i]) of stored thumbnails: over the alignments of either one to the
    other, the fewest 2×2 blocks of pixels that differ (module docstring); 0 = the same picture.
    Only the `top` alignments the coarse grid ranks best are compared pixel by pixel: all 35 cost
    a third of a second a pair (measured), these a few milliseconds."""
    out = np.empty(len(a), np.int64)
    memo: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def prepared(thumb: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(64×64 thumbnail channels first, its contrast, its coarse windows), once per thumbnail."""
        if thumb not in memo:
            if len(memo) > 4096:
                memo.clear()
            lab = _unpack([thumb])
            planes = np.ascontiguousarray(lab[0].transpose(2, 0, 1))
            memo[thumb] = planes, _contrast(planes), _windows(_coarse(lab))[0]
        return memo[thumb]

    for i, (ta, tb) in enumerate(zip(a, b, strict=True)):
        pa, pb = prepared(ta), prepared(tb)
        out[i] = min(
            _fine(pa, pb, _ranked(pa[2][_FULL], pb[2])[:top]), _fine(pb, pa, _ranked(pb[2][_FULL], pa[2])[:top])
        )
    return out


def _ranked(full: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The coarse check's windows in order of its distance (best alignment first)."""
    diff = np.linalg.norm(full[None] - windows, axis=-1)  # (K, G, G)
    eroded = np.minimum(np.minimum(diff[:, :-1, :-1], diff[:, 1:, :-1]), np.minimum(diff[:, :-1, 1:], diff[:, 1:, 1:]))
    return np.argsort(eroded.max(axis=(1, 2)), kind="stable")


def _fine(mine: tuple, theirs: tuple, windows: np.ndarray) -> int:
    """My full thumbnail against the given windows of theirs: the fewest 2×2 blocks that differ."""
    rx, ry = _resamplers(THUMB_SIDE, THUMB_SIDE)
    full, full_contrast = mine[0], mine[1]
    # each window resampled to S×S, channels first: (k, 3, S, S)
    grids = np.matmul(np.matmul(ry[windows][:, None], theirs[0][None]), rx[windows].transpose(0, 2, 1)[:, None])
    best = None
    for grid in grids:
        blocks = _blocks(full, full_contrast, np.ascontiguousarray(grid, np.float32))
        best = blocks if best is None else min(best, blocks)
        if best == 0:
            break
    return int(best if best is not None else 0)


def _shifts(x: np.ndarray) -> list[np.ndarray]:
    """x (3, S, S) moved by each of the 9 offsets within one pixel (edges repeated)."""
    n = x.shape[-1]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    return [padded[:, dy : dy + n, dx : dx + n] for dy in range(3) for dx in range(3)]


def _sq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared ΔE of two (3, S, S) arrays (channel by channel: a sum over a last axis of 3 is slow)."""
    d = x - y
    return d[0] * d[0] + d[1] * d[1] + d[2] * d[2]


def _contrast(x: np.ndarray) -> np.ndarray:
    """Each pixel's largest ΔE to its 8 neighbours."""
    return np.sqrt(np.max([_sq(x, s) for s in _shifts(x)], axis=0))


def _blocks(full: np.ndarray, full_contrast: np.ndarray, grid: np.ndarray) -> int:
    """Two aligned (3, S, S) thumbnails: the 2×2 blocks of pixels that differ."""
    a_to_b = np.min([_sq(full, s) for s in _shifts(grid)], axis=0)
    b_to_a = np.min([_sq(grid, s) for s in _shifts(full)], axis=0)
    allowed = np.square(FINE_TOLERANCE + FINE_TEXTURE * np.maximum(full_contrast, _contrast(grid)))
    bad = (a_to_b > allowed) | (b_to_a > allowed)
    return int((bad[:-1, :-1] & bad[1:, :-1] & bad[:-1, 1:] & bad[1:, 1:]).sum())


def aspect_ratio_close(wa: int, ha: int, wb: int, hb: int) -> bool:
    ratio = (wa / max(ha, 1)) / (wb / max(hb, 1))
    return max(ratio, 1 / ratio) <= MAX_ASPECT_RATIO
