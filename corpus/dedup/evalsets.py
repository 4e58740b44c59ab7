"""Read the downstream evaluation sets from their distribution files: which images they hold, by
COCO id, Flickr photo id and image location.

RefCOCO's refs ship as Python pickles. `load_refs` reads them with an unpickler that resolves no
global at all, so only pickle's native containers and scalars load; anything that would import or
call code is refused with an error, never executed.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

from contract.errors import InputDataError
from corpus.annotations.reader import JsonArrayStream
from corpus.annotations.records import as_int, coco_images, flickr30k_photo_id, join_location, karpathy_image_uri
from corpus.dedup.config import FlickrIdsEval, KarpathyEval, RefcocoEval


@dataclass(frozen=True)
class EvalItem:
    eval_set: str
    split: str
    item: str  # human-readable: "coco:391895", "flickr30k:1000092795.jpg", "refcoco:12345"
    coco_id: int | None
    flickr_id: int | None
    image_uri: str | None  # where to fetch it for appearance matching, if known


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refuses global {module}.{name}")


def load_refs(path: str) -> list:
    """A refs pickle, admitting only builtin containers and scalars."""
    try:
        with open(path, "rb") as f:
            data = _NoGlobals(io.BufferedReader(f), encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InputDataError(
            f"{path}: not a refs pickle of builtin containers and scalars ({exc}); "
            "only lists, dicts, strings and numbers are loaded from downloaded pickles"
        ) from None
    if not isinstance(data, list):
        raise InputDataError(f"{path}: expected a list of refs at the top level, found {type(data).__name__}")
    return data


def read_karpathy(spec: KarpathyEval) -> list[EvalItem]:
    splits = set(spec.chosen_splits())
    items = []
    for img in JsonArrayStream(spec.path, "images"):
        if not isinstance(img, dict) or img.get("split") not in splits or not isinstance(img.get("filename"), str):
            continue
        filename, uri = img["filename"], karpathy_image_uri(img, spec.dataset, spec.image_root)
        if spec.dataset == "coco":
            coco_id = as_int(img.get("cocoid"))
            items.append(EvalItem(spec.name, img["split"], f"coco:{coco_id}", coco_id, None, uri))
        else:
            flickr_id = flickr30k_photo_id(filename)
            items.append(EvalItem(spec.name, img["split"], f"flickr30k:{filename}", None, flickr_id, uri))
    return items


def read_refcoco(spec: RefcocoEval) -> list[EvalItem]:
    splits = set(spec.splits)
    images = coco_images(spec.instances) if spec.instances else {}
    seen: dict[int, EvalItem] = {}
    for i, ref in enumerate(load_refs(spec.refs)):
        if not isinstance(ref, dict) or ref.get("split") not in splits:
            continue
        image_id = as_int(ref.get("image_id"))
        if image_id is None:
            raise InputDataError(f"{spec.refs}: ref #{i} has no integer image_id")
        if image_id in seen:
            continue
        file_name, _coco_url, flickr_id = images.get(image_id, (None, None, None))
        if file_name is None:
            file_name = f"COCO_train2014_{image_id:012d}.jpg"  # RefCOCO images are all COCO train2014
        uri = join_location(spec.image_root, file_name) if spec.image_root else None
        seen[image_id] = EvalItem(spec.name, str(ref["split"]), f"coco:{image_id}", image_id, flickr_id, uri)
    return list(seen.values())


def read_flickr_ids(spec: FlickrIdsEval) -> list[EvalItem]:
    items = []
    with open(spec.path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            flickr_id = as_int(text.split(".")[0])
            if flickr_id is None:
                raise InputDataError(f"{spec.path}: line {line_no}: expected a Flickr photo id, found {text[:60]!r}")
            items.append(EvalItem(spec.name, "all", f"flickr:{flickr_id}", None, flickr_id, None))
    return items


def read_eval_set(spec) -> list[EvalItem]:
    return {"karpathy": read_karpathy, "refcoco": read_refcoco, "flickr_ids": read_flickr_ids}[spec.format](spec)
