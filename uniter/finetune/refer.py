"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): the refs pickle read safely, COCO
instances, and the hit rule (IoU > 0.5, strictly, with the reference's +1-pixel convention).

The refs files (`refs(unc).p`, `refs(umd).p`, `refs(google).p`) are Python 2 pickles of lists of
dicts. Unpickling can run arbitrary code, so they are read by an unpickler that resolves no global
at all: builtin containers and scalars need none, and anything else is refused with an error.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputDataError


# Protocol-2 pickles write bytes as _codecs.encode(text, "latin1"); sets need their type. Nothing else.
_ALLOWED = {("_codecs", "encode"), ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
            ("__builtin__", "frozenset")}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Admits dict, list, tuple, str, bytes, int, float, bool, None (encoded by opcodes) and sets."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: only builtin containers and scalars are allowed")


def load_pickle_data(path: str | Path):
    """A pickle holding only builtin containers and scalars (Python 2 strings decoded as latin-1)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputDataError(f"{path}: refs file not found") from None
    try:
        return _DataOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise InputDataError(f"{path}: not a plain-data pickle ({exc})") from None
    except (EOFError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise InputDataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Expression:
    sent_id: int
    ref_id: int
    image_id: int
    ann_id: int
    split: str
    sentence: str
    box: tuple[float, float, float, float]  # the referred object's ground-truth box, COCO [x, y, w, h]


@dataclass(frozen=True)
class Instances:
    path: Path
    boxes: dict[int, tuple]  # annotation id → COCO [x, y, w, h]
    per_image: dict[int, list[tuple[int, tuple]]]  # image id → [(annotation id, xywh)], file order
    sizes: dict[int, tuple[float, float]]  # image id → (width, height), where the file gives them


def read_instances(instances_path: str | Path) -> Instances:
    """A COCO instances.json, read once (RefCOCO's is hundreds of MB)."""
    instances_path = Path(instances_path)
    try:
        with open(instances_path, encoding="utf-8") as f:
            instances = json.load(f)
    except FileNotFoundError:
        raise InputDataError(f"{instances_path}: instances file not found") from None
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{instances_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    boxes: dict[int, tuple] = {}
    per_image: dict[int, list[tuple[int, tuple]]] = {}
    for i, ann in enumerate(instances.get("annotations", []) if isinstance(instances, dict) else []):
        try:
            box = tuple(float(v) for v in ann["bbox"])
            if len(box) != 4:
                raise ValueError(f"bbox has {len(box)} values")
            boxes[int(ann["id"])] = box
            per_image.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), box))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(f"{instances_path}: annotations[{i}]: expected id, image_id and bbox [x, y, w, h] "
                                 f"({type(exc).__name__}: {exc})") from None
    if not boxes:
        raise InputDataError(f'{instances_path}: expected a COCO instances file with an "annotations" list')
    sizes = {int(im["id"]): (float(im["width"]), float(im["height"])) for im in instances.get("images", [])
             if isinstance(im, dict) and {"id", "width", "height"} <= set(im)}
    return Instances(instances_path, boxes, per_image, sizes)


def read_expressions(refs_path: str | Path, instances: Instances) -> list[Expression]:
    """The expressions (one per sentence) of a refs pickle, with their objects' boxes."""
    refs_path = Path(refs_path)
    refs = load_pickle_data(refs_path)
    if not isinstance(refs, list):
        raise InputDataError(f"{refs_path}: expected a list of refs, found {type(refs).__name__}")
    out = []
    for i, ref in enumerate(refs):
        try:
            ann_id = int(ref["ann_id"])
            if ann_id not in instances.boxes:
                raise ValueError(f"ann_id {ann_id} is not in {instances.path.name}")
            for sent in ref["sentences"]:
                out.append(Expression(int(sent["sent_id"]), int(ref["ref_id"]), int(ref["image_id"]), ann_id,
                                      str(ref["split"]), str(sent.get("sent") or sent["raw"]), instances.boxes[ann_id]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(f"{refs_path}: refs[{i}]: expected ref_id, image_id, ann_id, split and sentences "
                                 f"[{{sent_id, sent}}] ({type(exc).__name__}: {exc})") from None
    return out


def read_refer(refs_path: str | Path, instances_path: str | Path) -> tuple[list[Expression], dict[int, list[tuple[int, tuple]]]]:
    """The expressions (one per sentence) and, per image, its ground-truth boxes [(ann_id, xywh)]."""
    instances = read_instances(instances_path)
    return read_expressions(refs_path, instances), instances.per_image


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes [x, y, w, h] (broadcast over leading axes), with the reference's convention that
    a box covers pixels x .. x + w − 1."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x1, y1 = np.maximum(a[..., 0], b[..., 0]), np.maximum(a[..., 1], b[..., 1])
    x2 = np.minimum(a[..., 0] + a[..., 2] - 1, b[..., 0] + b[..., 2] - 1)
    y2 = np.minimum(a[..., 1] + a[..., 3] - 1, b[..., 1] + b[..., 3] - 1)
    inter = np.where((x1 < x2) & (y1 < y2), (x2 - x1 + 1) * (y2 - y1 + 1), 0.0)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return inter / union


def is_hit(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """A grounding is right when IoU > 0.5, strictly."""
    return iou(predicted, truth) > 0.5
