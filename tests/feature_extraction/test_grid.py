"""The weight-free grid features: a fixed function of each cell's pixels that a model can read."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from feature_extraction.grid import box_features, cell_vector, cell_vectors, grid_features, object_boxes, project
from tests.fixtures import world


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
    grid = grid_features("k", image, rows=4, cols=5, objects=10)
    assert len(grid.boxes) >= 21 and np.array_equal(grid.boxes[-21], [0, 0, 120, 96])  # whole image, cells
    cut = box_features("k", image, grid.boxes)
    assert np.allclose(grid.features.astype(np.float32), cut.features.astype(np.float32), atol=2e-3)
    v = np.stack([cell_vector(image.crop((0, 0, 24, 24))), cell_vector(image.crop((24, 24, 48, 48)))])
    y = project(v).astype(np.float32)
    ratio = np.linalg.norm(y[0] - y[1]) / np.linalg.norm(v[0] - v[1])
    assert abs(ratio - np.sqrt(2048 / 832)) < 0.01


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def test_objects_of_one_colour_are_regions_of_their_own():
    """Flat shapes, JPEG-compressed as the crawl stores them: each shape is found as one region
    whose box is the shape's, and its feature tells its colour and shape apart from the others'."""
    rng = np.random.default_rng(5)
    found = total = spurious = 0
    for _ in range(100):
        things = world.scene(rng)
        image = jpeg(world.draw(things, 96))
        truth = np.array([world.box(t, 96) for t in things])
        boxes = object_boxes(image, 10)
        assert np.array_equal(boxes, object_boxes(image, 10))  # deterministic, largest first
        overlap = iou(truth, boxes)
        total += len(things)
        found += int((overlap.max(1) > 0.5).sum())
        spurious += int((overlap.max(0) <= 0.5).sum())
    assert found / total > 0.97 and spurious / 100 < 1.0, (found / total, spurious / 100)

    red = world.Thing("circle", "red", "large", 0, 0)
    blue_square = world.Thing("square", "blue", "large", 2, 2)
    image = jpeg(world.draw([red, blue_square], 96))
    regions = grid_features("k", image, objects=10)
    truth = np.array([world.box(t, 96) for t in (blue_square, red)])
    assert np.diag(iou(truth, regions.boxes[:2])).min() > 0.8  # the two objects come first, largest first
    assert np.array_equal(regions.boxes[-37], [0, 0, 96, 96]) and len(regions.boxes) <= 10 + 1 + 36
    moved = world.Thing("square", "blue", "large", 2, 0)
    same = grid_features("k", jpeg(world.draw([red, moved], 96)), objects=10)
    green = world.Thing("circle", "green", "large", 0, 0)
    recoloured = grid_features("k", jpeg(world.draw([green, blue_square], 96)), objects=10)
    a, b, c = (r.features[:2].astype(np.float32) for r in (regions, same, recoloured))
    assert np.linalg.norm(a - b) < 0.2 * np.linalg.norm(a - c)  # moving a shape keeps its features


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area = lambda z: np.prod(z[:, 2:] - z[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)
