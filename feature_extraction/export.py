"""Export `features` to the layouts existing tools read.

- `npz`: UNITER's per-image `<image_key>.npz` (as its convert_imgdir.py consumes): `features`
  (N×2048 fp16), `norm_bb` (N×6 fp16: x1, y1, x2, y2, w, h normalized — UNITER adds the area
  itself), `conf` (N fp16), `soft_labels` (N×1601 fp16, background column 0). ':' and '/' in keys
  become '_' in file names.
- `lxmert`: LXMERT's TSV (`load_obj_tsv`): img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features — arrays base64-encoded (int64 ids, float32
  confidences, boxes and features). attrs_conf is not kept by extract and is written as zeros,
  as the LXMERT port's own COCO script does.
"""

from __future__ import annotations

import base64
import csv
import io
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from feature_extraction.schema import RegionFeatures

LXMERT_FIELDS = [
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
]


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def to_npz(rows: Iterable[RegionFeatures], folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for r in rows:
        arrays = {
            "features": r.features.astype(np.float16),
            "norm_bb": r.norm_bb[:, :6].astype(np.float16),
            "conf": r.conf.astype(np.float16),
        }
        if r.soft_labels is not None:
            arrays["soft_labels"] = r.soft_labels.astype(np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        (folder / f"{safe_name(r.image_key)}.npz").write_bytes(buf.getvalue())
        n += 1
    return n


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def to_lxmert_tsv(rows: Iterable[RegionFeatures], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LXMERT_FIELDS, delimiter="\t")
        for r in rows:
            k = r.num_boxes
            writer.writerow(
                {
                    "img_id": r.image_key,
                    "img_h": r.image_h,
                    "img_w": r.image_w,
                    "objects_id": _b64((r.object_ids if r.object_ids is not None else np.full(k, -1)).astype(np.int64)),
                    "objects_conf": _b64(r.conf.astype(np.float32)),
                    "attrs_id": _b64((r.attr_ids if r.attr_ids is not None else np.full(k, -1)).astype(np.int64)),
                    "attrs_conf": _b64(np.zeros(k, dtype=np.float32)),
                    "num_boxes": k,
                    "boxes": _b64(r.boxes.astype(np.float32)),
                    "features": _b64(r.features.astype(np.float32)),
                }
            )
            n += 1
    return n


def read_lxmert_tsv(path: Path) -> list[dict]:
    """LXMERT's reader, for checking round trips (its `load_obj_tsv`)."""
    csv.field_size_limit(1 << 30)
    out = []
    with open(path, newline="") as f:
        for item in csv.DictReader(f, LXMERT_FIELDS, delimiter="\t"):
            k = int(item["num_boxes"])
            decoded = {
                "img_id": item["img_id"],
                "img_h": int(item["img_h"]),
                "img_w": int(item["img_w"]),
                "num_boxes": k,
            }
            for key, shape, dtype in (
                ("objects_id", (k,), np.int64),
                ("objects_conf", (k,), np.float32),
                ("attrs_id", (k,), np.int64),
                ("attrs_conf", (k,), np.float32),
                ("boxes", (k, 4), np.float32),
                ("features", (k, -1), np.float32),
            ):
                decoded[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            out.append(decoded)
    return out
