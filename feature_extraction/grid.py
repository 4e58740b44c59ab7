"""The weight-free `grid` backend: a rows × cols grid, and optionally objects found by colour.

Regions, in this order (the first two only with `objects` > 0; by default, the grid alone):
  - up to `objects` regions of one colour (`object_boxes`): on a copy at most 128 px, colours
    quantized to 8 levels a channel, 4-neighbours joined when in one bin (or within 6 levels
    across a bin's edge); the connected areas of 0.5–50 % of the picture, largest first;
  - the whole image;
  - the grid cells, each its exact pixel rectangle.
The grid alone hides objects: a shape spans several cells and each cell mixes it with background,
so a small model must learn to assemble objects before it can ask about one; with the objects as
regions of their own, a colour or a shape is one region's feature. Not yet the default: on the
synthetic world one fine-tuning seed learned colours faster with them, another did not (issue 13).

Each region's 2048-d feature is a fixed function of the pixels of its box:
  v = [16×16 RGB thumbnail of the cell (BOX-filtered, scaled to [-0.5, 0.5]), 768 values;
       8×8 lowest DCT coefficients of its centred 32×32 grayscale (gray/255 − 0.5), averaged
       over the pixels (1/32²), 64 values on the thumbnail's scale]
  feature = H · S · v / √832: v's entries with random signs placed at fixed random positions of a
  2048-vector (seed 20200), then the Walsh–Hadamard transform H
— a random projection, so the 832 pixel statistics spread evenly over the 2048 dimensions UNITER's
image embedding expects. It is norm-preserving up to the 1/√832 scale. H_2048 = H_32 ⊗ H_64
costs two small products, where a dense 2048×832 matrix cost 9 of a cell grid's 12 ms (measured). No
detector, no soft labels: pretraining turns the MRC tasks off.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from feature_extraction.schema import FEATURE_DIM, RegionFeatures

_THUMB, _DCT_N, _DCT_KEEP = 16, 32, 8
_IN_DIM = _THUMB * _THUMB * 3 + _DCT_KEEP * _DCT_KEEP
_rng = np.random.default_rng(20200)
_PLACES = _rng.permutation(FEATURE_DIM)[:_IN_DIM]  # (random places: no two output rows coincide on v)
_SIGNS = np.where(_rng.random(_IN_DIM) < 0.5, -1.0, 1.0).astype(np.float32) / np.float32(np.sqrt(_IN_DIM))
assert FEATURE_DIM & (FEATURE_DIM - 1) == 0, "the Walsh–Hadamard transform needs a power of two"


def _hadamard(size: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while len(h) < size:
        h = np.block([[h, h], [h, -h]])
    return h


_H_ROWS = _hadamard(1 << (FEATURE_DIM.bit_length() - 1) // 2)
_H_COLS = _hadamard(FEATURE_DIM // len(_H_ROWS))
_DCT = np.cos(np.pi * np.outer(np.arange(_DCT_N), 2 * np.arange(_DCT_N) + 1) / (2 * _DCT_N)).astype(np.float32)
_DCT_LOW = np.ascontiguousarray(_DCT[:_DCT_KEEP])  # only the kept frequencies are ever computed


def project(vectors: np.ndarray) -> np.ndarray:
    """(n, 832) pixel statistics → (n, 2048) float16 features (the module docstring's H · S · v)."""
    n = len(vectors)
    x = np.zeros((n, FEATURE_DIM), np.float32)
    x[:, _PLACES] = vectors * _SIGNS
    # H_2048 = H_rows ⊗ H_cols (Sylvester order): two small products instead of a 2048² one
    grid = x.reshape(n, len(_H_ROWS), len(_H_COLS))
    return (_H_ROWS @ grid @ _H_COLS).reshape(n, FEATURE_DIM).astype(np.float16)


def cell_boxes(width: int, height: int, rows: int, cols: int) -> np.ndarray:
    xs = np.round(np.linspace(0, width, cols + 1)).astype(np.float32)
    ys = np.round(np.linspace(0, height, rows + 1)).astype(np.float32)
    return np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r in range(rows) for c in range(cols)], dtype=np.float32)


def cell_vector(cell: Image.Image) -> np.ndarray:
    """The 832 statistics of one region (a ground-truth box): its own resizes."""
    return cell_vectors(cell, 1, 1)[0]


def box_vectors(image: Image.Image, boxes: np.ndarray) -> np.ndarray:
    """(n, 832) statistics of pixel boxes (x1, y1, x2, y2), each box's own crop."""
    crops = [
        (int(x0), int(y0), max(int(np.ceil(x1)), int(x0) + 1), max(int(np.ceil(y1)), int(y0) + 1))
        for x0, y0, x1, y1 in boxes
    ]
    if not crops:
        return np.zeros((0, _IN_DIM), np.float32)
    return np.stack([cell_vector(image.crop(c)) for c in crops])


def cell_vectors(image: Image.Image, rows: int, cols: int) -> np.ndarray:
    """The 832 statistics of every cell of a rows × cols grid at once: one BOX resize of the whole
    image to cols·16 × rows·16 (colour) and one to cols·32 × rows·32 (grayscale), cells by
    reshaping, the kept DCT terms as one batched product. BOX averages each output pixel over its
    exact share of the input, so a cell's block is the cell's own area average."""
    n = rows * cols
    thumb = np.asarray(image.resize((cols * _THUMB, rows * _THUMB), Image.Resampling.BOX), dtype=np.float32)
    thumb = thumb.reshape(rows, _THUMB, cols, _THUMB, 3).transpose(0, 2, 1, 3, 4).reshape(n, -1) / 255.0 - 0.5
    gray = image.convert("L").resize((cols * _DCT_N, rows * _DCT_N), Image.Resampling.BOX)
    blocks = np.asarray(gray, dtype=np.float32).reshape(rows, _DCT_N, cols, _DCT_N).transpose(0, 2, 1, 3)
    # centred like the thumbnail and averaged (not summed) over the 32×32 pixels: the DC term is the
    # cell's mean luminance in [-0.5, 0.5]. Summed, it was ~14 against a thumbnail norm of ~3, 95 %
    # of every token's norm: after img_linear and LayerNorm all cells looked alike (issue 13).
    centred = blocks.reshape(n, _DCT_N, _DCT_N) / 255.0 - 0.5
    dct = _DCT_LOW @ centred @ _DCT_LOW.T / (_DCT_N * _DCT_N)
    return np.concatenate([thumb, dct.reshape(n, -1)], axis=1)


# Object proposals work on a copy at most this large: objects under ~1 % of the picture are not
# what questions are asked about, and the search costs ~2 ms there whatever the crawl's max_side.
_SEARCH_SIDE = 128
_LEVELS = 8  # per channel: colours closer than 256 / 8 mostly share a bin
# Neighbours this close in every channel join across a bin's edge: JPEG noise scatters a flat colour
# near an edge over two bins. Larger steps chain objects to the background through soft edges.
_STEP = 6.0
_MIN_AREA, _MAX_AREA = 0.005, 0.5


def object_boxes(image: Image.Image, limit: int) -> np.ndarray:
    """(≤ limit, 4) pixel boxes of the largest regions of one colour, largest first (see the module
    docstring). Regions over half the picture are background; the whole-image region covers them."""
    w, h = image.size
    scale = min(1.0, _SEARCH_SIDE / max(w, h))
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)
    q = (pixels * (_LEVELS / 256)).astype(np.int32).clip(0, _LEVELS - 1)
    codes = (q[..., 0] * _LEVELS + q[..., 1]) * _LEVELS + q[..., 2]
    # Regions: 4-neighbours of the same colour bin joined, all bins in one connected-components
    # pass (labelling each bin alone cost ~90 ms on a photo with a hundred bins).
    rows, cols = codes.shape
    index = np.arange(codes.size).reshape(rows, cols)
    right = (codes[:, 1:] == codes[:, :-1]) | (np.abs(pixels[:, 1:] - pixels[:, :-1]).max(-1) < _STEP)
    down = (codes[1:] == codes[:-1]) | (np.abs(pixels[1:] - pixels[:-1]).max(-1) < _STEP)
    src = np.concatenate([index[:, :-1][right], index[:-1][down]])
    dst = np.concatenate([index[:, 1:][right], index[1:][down]])
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(codes.size, codes.size))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    ok = np.flatnonzero((sizes >= _MIN_AREA * codes.size) & (sizes <= _MAX_AREA * codes.size))
    # largest first; ties by label (the order of first pixels): one picture, one order
    ok = ok[np.lexsort((ok, -sizes[ok]))][:limit]
    labels = labels.reshape(rows, cols)
    boxes = np.zeros((len(ok), 4), np.float32)
    for i, label in enumerate(ok):
        ys, xs = np.nonzero(labels == label)
        boxes[i] = (xs.min() / scale, ys.min() / scale, (xs.max() + 1) / scale, (ys.max() + 1) / scale)
    return np.minimum(boxes, np.array([w, h, w, h], np.float32))


def grid_features(key: str, image: Image.Image, rows: int = 6, cols: int = 6, objects: int = 0) -> RegionFeatures:
    image = image.convert("RGB")
    boxes, vectors = cell_boxes(image.width, image.height, rows, cols), cell_vectors(image, rows, cols)
    if objects:
        found = object_boxes(image, objects)
        whole = np.array([[0, 0, image.width, image.height]], np.float32)
        boxes = np.concatenate([found, whole, boxes])
        vectors = np.concatenate([box_vectors(image, found), cell_vectors(image, 1, 1), vectors])
    feats = project(vectors)
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
    return RegionFeatures(
        image_key=key,
        image_w=image.width,
        image_h=image.height,
        features=project(box_vectors(image, boxes)),
        boxes=boxes,
        conf=np.ones(len(boxes), dtype=np.float32),
        backend="grid",
    )
