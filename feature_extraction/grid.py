"""The weight-free `grid` backend: the image cut into a fixed rows × cols grid, each cell a region.

Each cell's box is its exact pixel rectangle. Its 2048-d feature is a fixed function of its pixels:
  v = [16×16 RGB thumbnail of the cell (BOX-filtered, scaled to [-0.5, 0.5]), 768 values;
       8×8 lowest DCT coefficients of its 32×32 grayscale (scaled by 1/(32·255)), 64 values]
  feature = P · v, P a fixed 2048×832 Gaussian matrix (seed 20200, variance 1/832)
— a random projection, so the 832 pixel statistics spread evenly over the 2048 dimensions UNITER's
image embedding expects. No detector, no soft labels: pretraining turns the MRC tasks off.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from feature_extraction.schema import FEATURE_DIM, RegionFeatures

_THUMB, _DCT_N, _DCT_KEEP = 16, 32, 8
_IN_DIM = _THUMB * _THUMB * 3 + _DCT_KEEP * _DCT_KEEP
_PROJECTION = np.random.default_rng(20200).standard_normal((FEATURE_DIM, _IN_DIM)).astype(np.float32) / np.sqrt(_IN_DIM)
_DCT = np.cos(np.pi * np.outer(np.arange(_DCT_N), 2 * np.arange(_DCT_N) + 1) / (2 * _DCT_N)).astype(np.float32)


def cell_boxes(width: int, height: int, rows: int, cols: int) -> np.ndarray:
    xs = np.round(np.linspace(0, width, cols + 1)).astype(np.float32)
    ys = np.round(np.linspace(0, height, rows + 1)).astype(np.float32)
    return np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(rows) for c in range(cols)], dtype=np.float32)


def cell_vector(cell: Image.Image) -> np.ndarray:
    thumb = np.asarray(cell.resize((_THUMB, _THUMB), Image.Resampling.BOX), dtype=np.float32) / 255.0 - 0.5
    gray = np.asarray(cell.convert("L").resize((_DCT_N, _DCT_N), Image.Resampling.BOX), dtype=np.float32)
    dct = (_DCT @ gray @ _DCT.T)[:_DCT_KEEP, :_DCT_KEEP] / (_DCT_N * 255.0)
    return np.concatenate([thumb.ravel(), dct.ravel()])


def grid_features(key: str, image: Image.Image, rows: int = 6, cols: int = 6) -> RegionFeatures:
    image = image.convert("RGB")
    boxes = cell_boxes(image.width, image.height, rows, cols)
    # (an image smaller than the grid still gets one pixel per cell)
    crops = [(int(x0), int(y0), max(int(x1), int(x0) + 1), max(int(y1), int(y0) + 1)) for x0, y0, x1, y1 in boxes]
    vectors = np.stack([cell_vector(image.crop(c)) for c in crops])
    feats = (vectors @ _PROJECTION.T).astype(np.float16)
    return RegionFeatures(
        image_key=key,
        image_w=image.width,
        image_h=image.height,
        features=feats,
        boxes=boxes,
        conf=np.ones(len(boxes), dtype=np.float32),
        backend="grid",
    )


def box_features(key: str, image: Image.Image, boxes: np.ndarray) -> RegionFeatures:
    """The grid backend's feature of given boxes (pixel x1, y1, x2, y2): the same function of each
    box's pixels as of a grid cell (ground-truth boxes for referring expressions)."""
    image = image.convert("RGB")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    crops = [
        (int(x0), int(y0), max(int(np.ceil(x1)), int(x0) + 1), max(int(np.ceil(y1)), int(y0) + 1))
        for x0, y0, x1, y1 in boxes
    ]
    if crops:
        vectors = np.stack([cell_vector(image.crop(c)) for c in crops])
    else:
        vectors = np.zeros((0, _IN_DIM), np.float32)
    return RegionFeatures(
        image_key=key,
        image_w=image.width,
        image_h=image.height,
        features=(vectors @ _PROJECTION.T).astype(np.float16),
        boxes=boxes,
        conf=np.ones(len(boxes), dtype=np.float32),
        backend="grid",
    )
