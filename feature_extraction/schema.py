"""The `features` table: one row per image, versioned. Readers use `unpack` to get NumPy arrays.
`features_table` writes the extract stage's table; `task_features_table` the downstream stage's
`task_features`: the same columns plus `image_id`.

| column | type | shape / meaning |
|---|---|---|
| image_key | string | the image's key in `corpus_images` / `pairs` |
| image_w, image_h | int32 | size of the image the boxes refer to (the crawled JPEG) |
| num_boxes | int32 | N |
| features | binary | float16, little-endian, C order, (N, 2048) — mean-pooled res5 (or grid cell features) |
| boxes | list<float32> | (N, 4) x1, y1, x2, y2 in pixels |
| norm_bb | list<float32> | (N, 7) x1/W, y1/H, x2/W, y2/H, w/W, h/H, w·h/(W·H) |
| conf | list<float32> | (N,) detector confidence, descending (1.0 for grid cells) |
| soft_labels | binary, null for grid | float16 (N, 1601), **background in column 0** (Caffe/UNITER), VG 1..1600 |
| object_ids | list<int32>, null for grid | (N,) argmax VG object class, 0..1599 |
| attr_ids | list<int32>, null for grid | (N,) argmax VG attribute, 0..399 |
| backend | string | `detectron2` or `grid` |

`task_features` only:

| column | type | shape / meaning |
|---|---|---|
| image_id | int64, null if none | the number the file stem ends in (COCO_val2014_000000000042 → 42) |

(a `<set>/<stem>#gt` row carries the id of its image, like `<set>/<stem>`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
FEATURE_DIM = 2048
NUM_SOFT_LABELS = 1601

FEATURES_SCHEMA = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("image_w", pa.int32(), nullable=False),
        pa.field("image_h", pa.int32(), nullable=False),
        pa.field("num_boxes", pa.int32(), nullable=False),
        pa.field("features", pa.binary(), nullable=False),
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("norm_bb", pa.list_(pa.float32()), nullable=False),
        pa.field("conf", pa.list_(pa.float32()), nullable=False),
        pa.field("soft_labels", pa.binary()),
        pa.field("object_ids", pa.list_(pa.int32())),
        pa.field("attr_ids", pa.list_(pa.int32())),
        pa.field("backend", pa.string(), nullable=False),
    ],
    metadata={"uniter.features.version": str(SCHEMA_VERSION), "uniter.features.dim": str(FEATURE_DIM)},
)
TASK_FEATURES_SCHEMA = FEATURES_SCHEMA.append(pa.field("image_id", pa.int64()))


@dataclass
class RegionFeatures:
    image_key: str
    image_w: int
    image_h: int
    features: np.ndarray  # (N, 2048) float16
    boxes: np.ndarray  # (N, 4) float32
    conf: np.ndarray  # (N,) float32
    soft_labels: np.ndarray | None = None  # (N, 1601) float16, background column 0
    object_ids: np.ndarray | None = None  # (N,) int32
    attr_ids: np.ndarray | None = None  # (N,) int32
    backend: str = "detectron2"

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    @property
    def norm_bb(self) -> np.ndarray:
        return normalize_boxes(self.boxes, self.image_w, self.image_h)


def normalize_boxes(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """(N, 4) pixel xyxy → (N, 7) UNITER position features."""
    b = boxes.astype(np.float32)
    x1, y1, x2, y2 = b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h
    bw, bh = x2 - x1, y2 - y1
    return np.stack([x1, y1, x2, y2, bw, bh, bw * bh], axis=1).astype(np.float32)


def features_table(rows: list[RegionFeatures]) -> pa.Table:
    """Rows → a `features` table (sorted by image key, so a shard's bytes do not depend on order)."""
    rows = sorted(rows, key=lambda r: r.image_key)
    col = {f.name: [] for f in FEATURES_SCHEMA}
    for r in rows:
        col["image_key"].append(r.image_key)
        col["image_w"].append(r.image_w)
        col["image_h"].append(r.image_h)
        col["num_boxes"].append(r.num_boxes)
        col["features"].append(np.ascontiguousarray(r.features, dtype="<f2").tobytes())
        col["boxes"].append(r.boxes.astype(np.float32).ravel().tolist())
        col["norm_bb"].append(r.norm_bb.ravel().tolist())
        col["conf"].append(r.conf.astype(np.float32).tolist())
        soft = None if r.soft_labels is None else np.ascontiguousarray(r.soft_labels, dtype="<f2").tobytes()
        col["soft_labels"].append(soft)
        col["object_ids"].append(None if r.object_ids is None else r.object_ids.astype(np.int32).tolist())
        col["attr_ids"].append(None if r.attr_ids is None else r.attr_ids.astype(np.int32).tolist())
        col["backend"].append(r.backend)
    return pa.table({f.name: pa.array(col[f.name], f.type) for f in FEATURES_SCHEMA}, schema=FEATURES_SCHEMA)


def task_features_table(rows: list[RegionFeatures], image_ids: Mapping[str, int | None]) -> pa.Table:
    """Rows → a `task_features` table: `features_table` plus `image_id` (``image_ids[image_key]``)."""
    table = features_table(rows)
    ids = pa.array([image_ids[k] for k in table.column("image_key").to_pylist()], pa.int64())
    return pa.Table.from_arrays([*table.columns, ids], schema=TASK_FEATURES_SCHEMA)


def unpack(row: dict) -> RegionFeatures:
    """One row of the `features` table (as from `Table.to_pylist()`) → arrays."""
    n = row["num_boxes"]
    soft = row.get("soft_labels")
    return RegionFeatures(
        image_key=row["image_key"],
        image_w=row["image_w"],
        image_h=row["image_h"],
        features=np.frombuffer(row["features"], dtype="<f2").reshape(n, FEATURE_DIM),
        boxes=np.asarray(row["boxes"], dtype=np.float32).reshape(n, 4),
        conf=np.asarray(row["conf"], dtype=np.float32),
        soft_labels=None if soft is None else np.frombuffer(soft, dtype="<f2").reshape(n, NUM_SOFT_LABELS),
        object_ids=None if row.get("object_ids") is None else np.asarray(row["object_ids"], dtype=np.int32),
        attr_ids=None if row.get("attr_ids") is None else np.asarray(row["attr_ids"], dtype=np.int32),
        backend=row["backend"],
    )
