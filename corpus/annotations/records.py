"""What the records of the public annotation formats mean: ids, and where their images are.

Shared by ingest (the pairs of COCO, VG, Karpathy and table sources) and dedup (the evaluation sets:
Karpathy splits, RefCOCO with COCO's instances.json), so that both read the same record as the same
COCO id, Flickr photo id and image location.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from corpus.annotations.reader import JsonArrayStream

COCO_IMAGES_URL = "http://images.cocodataset.org"
FLICKR_PATTERN = r"flickr\.com/(?:[^/]*/)*(?P<id>\d+)_[^/]*$"
_FLICKR = re.compile(FLICKR_PATTERN)

# One entry of a COCO file's `images`: (file_name, coco_url, Flickr photo id), None where missing.
CocoImage = tuple[str | None, str | None, int | None]


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def join_location(root: str, *parts: str) -> str | None:
    """``root`` (a folder or URL prefix) joined with a record's relative ``parts``; None when the
    parts climb out of ``root`` (``..``): a record names an image under its root, never elsewhere."""
    rel = posixpath.normpath("/".join(p.strip("/") for p in parts if p))
    if rel == ".." or rel.startswith("../"):
        return None
    return "/".join([root.rstrip("/"), rel]) if rel != "." else root.rstrip("/")


def flickr_id_from_url(url: str | None) -> int | None:
    """Photo id of a static Flickr URL (``…staticflickr.com/3153/2970773875_164f0c0b83_z.jpg``)."""
    if not url or "flickr.com/" not in url:
        return None
    m = _FLICKR.search(url)
    return int(m.group("id")) if m else None


def coco_images(path: str) -> dict[int, CocoImage]:
    """The ``images`` of a COCO file (captions or instances) by image id. An image without an integer
    id cannot be referenced: it is left out."""
    images = {}
    for img in JsonArrayStream(path, "images"):
        image_id = as_int(img.get("id")) if isinstance(img, dict) else None
        if image_id is not None:
            images[image_id] = (img.get("file_name"), img.get("coco_url"), flickr_id_from_url(img.get("flickr_url")))
    return images


def karpathy_image_uri(img: dict, dataset: str, image_root: str | None) -> str | None:
    """Where an image of a Karpathy split file is. COCO: ``filepath``/``filename`` under ``image_root``
    (default: images.cocodataset.org). Flickr30K: ``filename`` under ``image_root``; None without a
    root, as Flickr30K images have no public URL, and None for a name that climbs out of the root."""
    if dataset == "coco":
        return join_location(image_root or COCO_IMAGES_URL, str(img.get("filepath", "")), img["filename"])
    return join_location(image_root, img["filename"]) if image_root else None


def flickr30k_photo_id(filename: str) -> int | None:
    """Flickr30K file stems are Flickr photo ids (they decontaminate SBU, COCO and VG copies)."""
    return as_int(Path(filename).stem)
