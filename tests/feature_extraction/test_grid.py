"""The weight-free grid features: a fixed function of each cell's pixels that a model can read."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from feature_extraction.grid import box_features, cell_vector, cell_vectors, grid_features, project


def test_no_single_statistic_swamps_a_cell():
    """A cell's 832 statistics are on one scale: the DCT's DC term once held 98 % of a plain cell's
    squared norm, so an object changed its feature by about half its norm and, after img_linear and
    LayerNorm, every cell looked alike to the model (issue 13)."""
    plain = Image.new("RGB", (96, 96), (110, 110, 110))
    with_object = plain.copy()
    ImageDraw.Draw(with_object).rectangle((34, 34, 46, 46), fill=(215, 40, 40))
    v = cell_vectors(plain, 6, 6)
    assert (v[0, 768] ** 2) / (v[0] ** 2).sum() < 0.5
    assert np.abs(v).max() <= 0.5
    a = grid_features("a", plain).features.astype(np.float32)
    b = grid_features("b", with_object).features.astype(np.float32)
    change = np.linalg.norm(a - b, axis=1)
    assert int(change.argmax()) == 14  # the cell the object sits in (row 2, column 2)
    assert change[14] > np.linalg.norm(a[14])  # the object is most of what that cell's feature says
    assert np.allclose(np.delete(change, 14), 0, atol=1e-2)  # cells it does not touch


def test_cells_equal_boxes_and_the_projection_keeps_distances():
    """The grid's cells (one whole-image resize) equal the same boxes cut out one by one, where the
    grid divides the image; the Walsh–Hadamard projection scales every distance by √(2048/832)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 120, 3), dtype=np.uint8))
    grid = grid_features("k", image, rows=4, cols=5)
    cut = box_features("k", image, grid.boxes)
    assert np.allclose(grid.features.astype(np.float32), cut.features.astype(np.float32), atol=2e-3)
    v = np.stack([cell_vector(image.crop((0, 0, 24, 24))), cell_vector(image.crop((24, 24, 48, 48)))])
    y = project(v).astype(np.float32)
    ratio = np.linalg.norm(y[0] - y[1]) / np.linalg.norm(v[0] - v[1])
    assert abs(ratio - np.sqrt(2048 / 832)) < 0.01
