"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): the refs pickle read safely, COCO
instances, the hit rule (IoU > 0.5, strictly, with the reference's +1-pixel convention); the task's
examples and batches (`RefcocoData`); the re-scoring of its predicted boxes.

The refs files (`refs(unc).p`, `refs(umd).p`, `refs(google).p`) are Python 2 pickles of lists of
dicts. Unpickling can run arbitrary code, so they are read by an unpickler that resolves no global
at all: builtin containers and scalars need none, and anything else is refused with an error.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.errors import InputDataError
from uniter.batch import Vocab, pack
from uniter.data import Corpus
from uniter.finetune.config import RefcocoTask
from uniter.finetune.tasks.base import FinetuneTask, Rescored, Score, TaskData
from uniter.finetune.tasks.common import Endless, eval_batches, feature_ids, text_corpus, texts_with_regions, tokenize

log = logging.getLogger(__name__)
PREDICTIONS = "refcoco/predictions.json"  # per setting and expression, the predicted box: re-scored by evaluate

# Protocol-2 pickles write bytes as _codecs.encode(text, "latin1"); sets need their type. Nothing else.
_ALLOWED = {
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Admits dict, list, tuple, str, bytes, int, float, bool, None (encoded by opcodes) and sets."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only builtin containers and scalars are allowed"
        )


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
            raise InputDataError(
                f"{instances_path}: annotations[{i}]: expected id, image_id and bbox [x, y, w, h] "
                f"({type(exc).__name__}: {exc})"
            ) from None
    if not boxes:
        raise InputDataError(f'{instances_path}: expected a COCO instances file with an "annotations" list')
    sizes = {
        int(im["id"]): (float(im["width"]), float(im["height"]))
        for im in instances.get("images", [])
        if isinstance(im, dict) and {"id", "width", "height"} <= set(im)
    }
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
                out.append(
                    Expression(
                        int(sent["sent_id"]),
                        int(ref["ref_id"]),
                        int(ref["image_id"]),
                        ann_id,
                        str(ref["split"]),
                        str(sent.get("sent") or sent["raw"]),
                        instances.boxes[ann_id],
                    )
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(
                f"{refs_path}: refs[{i}]: expected ref_id, image_id, ann_id, split and sentences "
                f"[{{sent_id, sent}}] ({type(exc).__name__}: {exc})"
            ) from None
    return out


def read_refer(
    refs_path: str | Path, instances_path: str | Path
) -> tuple[list[Expression], dict[int, list[tuple[int, tuple]]]]:
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


# --- fine-tuning ---------------------------------------------------------------------------------


def region_boxes(pos: np.ndarray, width: float, height: float) -> np.ndarray:
    """(n, 7) normalized [x1, y1, x2, y2, w, h, area] → (n, 4) pixel [x, y, w, h]."""
    return np.stack([pos[:, 0] * width, pos[:, 1] * height, pos[:, 4] * width, pos[:, 5] * height], axis=1)


def gt_target(e: Expression, anns: list[tuple[int, tuple]]) -> tuple[np.ndarray, int] | None:
    """A ground-truth row's region boxes (its annotations, pixel x1 y1 x2 y2, as [x, y, w, h]) and the
    index of the referred one, if the row has it."""
    rb = np.array([[x1, y1, x2 - x1, y2 - y1] for _, (x1, y1, x2, y2) in anns])
    order = [a for a, _ in anns]
    return (rb, order.index(e.ann_id)) if e.ann_id in order else None


def det_target(e: Expression, pos: np.ndarray, size: tuple[float, float], train: bool) -> tuple[np.ndarray, int] | None:
    """A detected row's region boxes and the one overlapping the object most (for training, only
    with an IoU above 0.5)."""
    rb = region_boxes(pos, *size)
    overlap = iou(rb, np.array(e.box))
    if train and overlap.max() <= 0.5:
        return None
    return rb, int(overlap.argmax())


def targets(corpus: Corpus, chosen: list[Expression], gt_anns: dict | None, sizes: dict, train: bool) -> tuple:
    """(the examples with a region to point at, that region's index, (their region boxes, expression)):
    among the ground-truth rows' regions with `gt_anns`, among the detected regions without."""
    examples, indices, boxes = [], [], []
    for k, row in enumerate(corpus.text_row):
        e = chosen[int(row)]
        if gt_anns is not None:
            found = gt_target(e, gt_anns[e.image_id][: corpus.nbb[k]])
        else:
            found = det_target(e, corpus.example_region(k).pos, sizes[e.image_id], train)
        if found is not None:
            examples.append(k)
            indices.append(found[1])
            boxes.append((found[0], e))
    return np.array(examples, dtype=np.int64), np.array(indices, dtype=np.int64), boxes


class RefcocoData(TaskData):
    """Each expression scores the regions of its image. With ground-truth-box features
    (`downstream.gt_boxes`) it trains on them, the target being the referred annotation, and is
    evaluated on both ground-truth and detected regions; without, it trains on the detected region
    that overlaps the object most (expressions with no overlap above 0.5 are not trained on). A
    prediction is right when its box has IoU > 0.5 with the object's box."""

    def __init__(
        self, task: RefcocoTask, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int
    ):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        instances = read_instances(task.instances)  # once: boxes, sizes and the expressions' objects
        exprs = read_expressions(task.refs, instances)
        det_ids = feature_ids(feature_paths, task.images)
        gt_ids = feature_ids(feature_paths, task.images, gt=True)
        settings = (("gt", gt_ids), ("det", det_ids)) if gt_ids else (("det", det_ids),)
        # the ground-truth rows' regions: the image's annotations in ascending id (downstream.gt_boxes)
        gt_anns = {
            i: [(a, (x, y, x + w, y + h)) for a, (x, y, w, h) in sorted(anns)]
            for i, anns in instances.per_image.items()
        }
        self.sets: dict[tuple[str, str], tuple] = {}
        for side, split in (("train", task.train_split), ("eval", task.eval_split)):
            chosen = [e for e in exprs if e.split == split]
            missing = [e.image_id for e in chosen if e.image_id not in instances.sizes]
            if missing:
                raise InputDataError(f"{task.instances}: no width/height for image ids {sorted(set(missing))[:5]}")
            tokens = tokenize(tokenizer, [e.sentence for e in chosen], max_len)
            for setting, ids in settings:
                rows = zip([ids.get(e.image_id, "") for e in chosen], tokens, strict=True)
                corpus = text_corpus(list(rows), local / f"ref-{side}-{setting}.arrow", feature_paths, pretrain)
                found = targets(corpus, chosen, gt_anns if setting == "gt" else None, instances.sizes, side == "train")
                self.sets[(side, setting)] = (corpus, *found)
        self.train_setting = "gt" if ("train", "gt") in self.sets and len(self.sets[("train", "gt")][1]) else "det"
        if gt_ids and self.train_setting == "det":
            log.warning(
                "RefCOCO: no ground-truth-box features for the %s expressions: training on detected regions",
                task.train_split,
            )
        n_train = sum(e.split == task.train_split for e in exprs)
        self.skipped = n_train - len(self.sets[("train", self.train_setting)][1])
        if not len(self.sets[("train", self.train_setting)][1]):
            raise InputDataError(
                f"RefCOCO: no {task.train_split} expression has a region to point at in the "
                f"downstream set {task.images!r} (ground-truth-box features, or a detected region "
                "with IoU > 0.5)"
            )
        corpus, examples, _, _ = self.sets[("train", self.train_setting)]
        self.stream = Endless(corpus.lengths[examples], task.batch_tokens, seed)

    def model_class(self):
        # transformers loads only where a model is built: the evaluate stage and the report import this module
        from uniter.modeling_uniter import UniterForReferringExpression  # noqa: PLC0415

        return UniterForReferringExpression, {}

    def _batch(self, corpus: Corpus, ids) -> dict:
        batch = pack(*texts_with_regions(corpus, ids, self.vocab, self.task.image_features), self.vocab, with_ot=True)
        batch["region_index"], batch["region_pad"] = batch.pop("ot_img_index"), batch.pop("ot_img_pad")
        for k in ("ot_txt_index", "ot_txt_pad"):
            batch.pop(k)
        return batch

    def train_batch(self, j: int, score: Score) -> dict:
        corpus, examples, targets, _ = self.sets[("train", self.train_setting)]
        pick = self.stream(j)
        batch = self._batch(corpus, examples[pick])
        batch["targets"] = torch.from_numpy(targets[pick])
        return batch

    def _predict(self, score: Score, setting: str) -> tuple[list[bool], list[dict]]:
        """One setting's evaluation: each expression's hit, and its predicted box."""
        corpus, examples, _, boxes = self.sets[("eval", setting)]
        hits, predictions = [], []
        for pick in eval_batches(np.arange(len(examples)), corpus.lengths[examples], self.task.batch_tokens, self.seed):
            logits = score(self._batch(corpus, examples[pick])).logits.float()
            for p, region in zip(pick, logits.argmax(-1).tolist(), strict=True):
                rb, e = boxes[int(p)]
                box = rb[region]
                hits.append(bool(is_hit(box, np.array(e.box))))
                predictions.append(
                    {
                        "setting": setting,
                        "sent_id": e.sent_id,
                        "ref_id": e.ref_id,
                        "box": [round(float(v), 2) for v in box],
                    }
                )
        return hits, predictions

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        metrics, predictions = {}, []
        for setting in ("det", "gt"):
            if ("eval", setting) not in self.sets:
                continue
            hits, setting_predictions = self._predict(score, setting)
            predictions += setting_predictions
            metric = "refcoco_accuracy" if setting == "det" else "refcoco_accuracy_gt"
            metrics[metric] = 100 * float(np.mean(hits)) if hits else 0.0
        predictions.sort(key=lambda x: (x["setting"], x["sent_id"]))
        return metrics, {PREDICTIONS: json.dumps(predictions).encode()}


# --- evaluation ----------------------------------------------------------------------------------


def rescore(files: dict[str, bytes], task: RefcocoTask) -> Rescored:
    """Accuracy of the predicted boxes on the eval split's expressions, per setting (detected, ground-truth)."""
    predictions = json.loads(files[PREDICTIONS])
    truth = {e.sent_id: e.box for e in read_refer(task.refs, task.instances)[0] if e.split == task.eval_split}
    accuracy = {}
    for setting in ("det", "gt"):
        hits = [
            bool(is_hit(np.array(p["box"]), np.array(truth[p["sent_id"]])))
            for p in predictions
            if p["sent_id"] in truth and p.get("setting", "det") == setting
        ]
        if hits:
            accuracy[setting] = 100 * float(np.mean(hits))
    # the paper's ablation column is RefCOCO+ val on detected boxes (val^d)
    scores = {"refcoco+": accuracy["det"]} if "det" in accuracy else {}
    return scores, {"accuracy_by_type": {f"accuracy_{k}": v for k, v in accuracy.items()}, "expressions": len(truth)}


TASK = FinetuneTask(data=RefcocoData, predictions=(PREDICTIONS,), rescore=rescore, columns=(("refcoco+", "RefCOCO+"),))
