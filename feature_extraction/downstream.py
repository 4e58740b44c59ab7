"""The downstream stage: the evaluation tasks' images → `task_features`, with the extract stage's
detector (the same backend, weights and box selection, so fine-tuning sees what pretraining saw).

reader (every image file of each configured folder, by set and path, cut into shards of
`shard_images` per set) → featurize.extract_chunks (the DataLoader/detector path the extract stage
uses too) → writer (shard per chunk; each row also carries its file's numeric `image_id`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from contract.errors import InputDataError
from contract.fingerprint import file_fingerprints, folder_files, sha256_json
from contract.stage import StageContext, now
from feature_extraction.config import DownstreamConfig, ExtractConfig
from feature_extraction.featurize import Item, reusing_shards, storage_spec
from feature_extraction.schema import TASK_FEATURES_SCHEMA, task_features_table

log = logging.getLogger(__name__)


def annotated_boxes(path: str) -> dict[int, list[tuple[int, tuple[float, float, float, float]]]]:
    """image id → [(annotation id, pixel x1, y1, x2, y2)], ascending annotation id, from instances.json."""
    where = '"annotations"'
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        out: dict[int, list] = {}
        for index, ann in enumerate(doc["annotations"]):
            where = f"annotations[{index}]"
            x, y, w, h = (float(v) for v in ann["bbox"])
            out.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), (x, y, x + w, y + h)))
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InputDataError(
            f"{path}: {where}: expected id, image_id and bbox [x, y, w, h] ({type(exc).__name__}: {exc})"
        ) from None
    return {k: sorted(v) for k, v in out.items()}


def image_id(stem: str) -> int | None:
    """The numeric id a file stem ends in (COCO_train2014_000000000042 → 42), if any."""
    digits = stem.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else None


def plan(cfg: DownstreamConfig) -> list[tuple[str, list[Item]]]:
    """(shard id, items) for every set, in name order; within a set, files in path order; then the
    ground-truth-box rows of the sets that have them (in shards of their own: a batch is one kind)."""
    shards = []
    for name in sorted(cfg.images):
        folder = cfg.images[name]
        found, seen = [], {}
        for path in folder_files(folder):
            key = f"{name}/{path.stem}"
            if key in seen:
                raise InputDataError(
                    f"{folder}: two images would share the key {key!r}: {seen[key]} and {path} "
                    "(a set's file stems must be unique)"
                )
            seen[key] = path
            try:
                with Image.open(path) as im:
                    width, height = im.size
            except OSError as exc:
                raise InputDataError(f"{path}: not a readable image ({exc})") from None
            found.append((key, path, width, height))
        # (each file's digest: a rebuild reuses the features of an unchanged file)
        digests = file_fingerprints([path for _, path, _, _ in found])
        items = [
            Item(key, None, 0, width, height, str(path), sha256=digest)
            for (key, path, width, height), digest in zip(found, digests, strict=True)
        ]
        if not items:
            log.warning("downstream: no images (.jpg, .jpeg, .png) under %s for set %r", folder, name)
        n = cfg.shard_images
        shards += [(f"{name}-{i // n:05d}", items[i : i + n]) for i in range(0, len(items), n)]
        if name in cfg.gt_boxes:
            boxes = annotated_boxes(cfg.gt_boxes[name])
            gt = [
                Item(
                    f"{it.key}#gt",
                    None,
                    0,
                    it.width,
                    it.height,
                    it.path,
                    gt := tuple(b for _, b in boxes[iid]),
                    sha256=sha256_json([it.sha256, gt]),
                )  # fmt: skip
                for it in items
                if (iid := image_id(Path(it.path).stem)) is not None and iid in boxes
            ]
            if not gt:
                log.warning("downstream: %s annotates none of the images of set %r", cfg.gt_boxes[name], name)
            shards += [(f"{name}-gt-{i // n:05d}", gt[i : i + n]) for i in range(0, len(gt), n)]
    return shards


def run_downstream(ctx: StageContext) -> None:
    cfg: DownstreamConfig = ctx.config
    extract: ExtractConfig = ctx.extra["extract"]
    shards = plan(cfg)
    chunks = [items for _, items in shards]
    ids = {it.key: image_id(Path(it.path).stem) for items in chunks for it in items}  # `#gt` rows: their image's
    todo = [i for i, (sid, _) in enumerate(shards) if not ctx.shard_done(sid)]
    names = [sid for sid, _ in shards]
    spec = storage_spec(ctx)
    with ctx.progress.task("downstream", total=sum(len(chunks[i]) for i in todo)) as bar:
        for index, tables, stats in reusing_shards(
            extract, extract.device, spec, chunks, todo, ctx.reuse, names, "task_features", TASK_FEATURES_SCHEMA,
            lambda rows: task_features_table(rows, ids), ctx.link_shard,
        ):  # fmt: skip
            if tables is not None:
                ctx.write_shard(names[index], tables, stats, now())
            bar.advance(stats["images"])
