"""The downstream tasks as data + model + metric, for the one fine-tuning loop in `stage.py`.

Each task turns its files and the downstream features into examples (texts joined with regions
through `Corpus`), gives the j-th training micro-batch as a pure function of j (so a resumed run
repeats an uninterrupted one), builds its model, and scores the model on its evaluation split with
the official metric, returning the files the evaluate stage re-scores.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from pipeline.errors import InputDataError
from uniter.data import Corpus, _write_ipc, token_bucket_batches
from uniter.finetune import nlvr2, retrieval, vqa
from uniter.pretrain.tasks import Vocab, pack

log = logging.getLogger(__name__)
Score = Callable[[dict], Any]  # a batch → the model's output, in eval mode without gradient


def text_corpus(rows: list[tuple[str, list[int]]], path: Path, feature_paths: list[Path], pretrain) -> Corpus:
    """A Corpus of (image key, token ids) rows; rows whose image has no features are left out
    (`corpus.text_row` maps its examples back to `rows`)."""
    _write_ipc(pa.table({
        "pair_id": [str(i) for i in range(len(rows))],
        "source": ["task"] * len(rows),
        "image_key": [key for key, _ in rows],
        "input_ids": pa.array([ids for _, ids in rows], pa.list_(pa.int32())),
    }), path)
    return Corpus(path, feature_paths, pretrain.conf_thresh, pretrain.min_bb, pretrain.max_bb, val_percent=0.0)


def tokenize(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [t[:max_len] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def image_keys(feature_paths: list[Path], image_set: str) -> list[str]:
    import pyarrow.ipc as ipc

    prefix = f"{image_set}/"
    return [k for p in feature_paths for k in ipc.open_file(pa.memory_map(str(p), "r")).read_all().column("image_key").to_pylist()
            if k.startswith(prefix)]


def numeric_ids(keys: list[str], image_set: str) -> dict[int, str]:
    """Image id → key, for files whose stem ends in the id (COCO_val2014_000000000042 → 42)."""
    from feature_extraction.downstream import image_id

    out: dict[int, str] = {}
    for key in keys:
        iid = image_id(key.rsplit("/", 1)[-1])
        if iid is not None:
            if iid in out and out[iid] != key:
                raise InputDataError(f"downstream set {image_set!r}: images {out[iid]} and {key} share id {iid}")
            out[iid] = key
    return out


def endless(n_ids: np.ndarray, lengths: np.ndarray, budget: int, seed: int, j: int) -> np.ndarray:
    """The j-th token-bucket batch of an endless stream of shuffled epochs."""
    epoch = 0
    while True:
        batches = token_bucket_batches(n_ids, lengths, budget, 8192, np.random.default_rng([seed, 7, epoch]))
        if j < len(batches):
            return batches[j]
        j -= len(batches)
        epoch += 1


def texts_with_regions(corpus: Corpus, ids, vocab: Vocab) -> tuple[list[np.ndarray], list]:
    texts = [np.concatenate([[vocab.cls], corpus.text(int(i)), [vocab.sep]]) for i in ids]
    return texts, [corpus.example_region(int(i)) for i in ids]


# --- VQA ----------------------------------------------------------------------------------------


class VqaData:
    name = "vqa"

    def __init__(self, task, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        train_q = [q for files in task.train for q in vqa.read_vqa(files.questions, files.annotations)]
        self.val_q = vqa.read_vqa(task.val.questions, task.val.annotations)
        self.labels = vqa.answer_vocab(train_q, task.answers)
        label_of = {a: i for i, a in enumerate(self.labels)}
        ids = numeric_ids(image_keys(feature_paths, task.images), task.images)
        self.train = text_corpus(list(zip([ids.get(q.image_id, "") for q in train_q], tokenize(tokenizer, [q.question for q in train_q], max_len), strict=True)),
                                 local / "vqa-train.arrow", feature_paths, pretrain)
        self.val = text_corpus(list(zip([ids.get(q.image_id, "") for q in self.val_q], tokenize(tokenizer, [q.question for q in self.val_q], max_len), strict=True)),
                               local / "vqa-val.arrow", feature_paths, pretrain)
        self.skipped = len(train_q) - len(self.train) + len(self.val_q) - len(self.val)
        if not len(self.train):
            raise InputDataError(f"VQA: none of the {len(train_q)} training questions has features of its image in the "
                                 f"downstream set {task.images!r} (configure downstream.images.{task.images})")
        self.targets = [vqa.soft_targets(list(train_q[int(r)].answers), label_of) for r in self.train.text_row]

    def model_class(self):
        from uniter.modeling_uniter import UniterForVqa

        return UniterForVqa, {"num_answers": len(self.labels)}

    def train_batch(self, j: int, score: Score) -> dict:
        ids = endless(np.arange(len(self.train)), self.train.lengths, self.task.batch_tokens, self.seed, j)
        batch = pack(*texts_with_regions(self.train, ids, self.vocab), self.vocab)
        t = torch.zeros(len(ids), len(self.labels))
        for row, i in enumerate(ids):
            for label, value in self.targets[int(i)].items():
                t[row, label] = value
        batch["targets"] = t
        return batch

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        predictions: dict[int, str] = {}
        for ids in token_bucket_batches(np.arange(len(self.val)), self.val.lengths, self.task.batch_tokens, 8192,
                                        np.random.default_rng([self.seed, 8])):
            logits = score(pack(*texts_with_regions(self.val, ids, self.vocab), self.vocab)).logits
            for i, label in zip(ids, logits.float().argmax(-1).tolist(), strict=True):
                predictions[self.val_q[int(self.val.text_row[i])].question_id] = self.labels[label]
        scores = vqa.evaluate(predictions, self.val_q)
        files = {"vqa/answers.json": json.dumps(self.labels).encode(),
                 "vqa/results.json": json.dumps([{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]).encode()}
        return {f"vqa_{k}": v for k, v in scores.items()}, files


# --- NLVR2 --------------------------------------------------------------------------------------


class Nlvr2Data:
    """Each statement is two rows (its text with the left image, type 1, and the right, type 2)."""

    name = "nlvr2"

    def __init__(self, task, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        self.train_st, self.train, self.train_rows = self._load(task.train, "train", tokenizer, feature_paths, local, pretrain, max_len)
        self.dev_st, self.dev, self.dev_rows = self._load(task.dev, "dev", tokenizer, feature_paths, local, pretrain, max_len)
        self.skipped = 0
        if not len(self.train_rows):
            raise InputDataError(f"NLVR2: no training statement has features of both images in the downstream set "
                                 f"{task.images!r} (configure downstream.images.{task.images})")
        if any(s.label is None for s in self.train_st):
            raise InputDataError(f"{task.train}: training statements need labels")

    def _load(self, path, split, tokenizer, feature_paths, local, pretrain, max_len):
        statements = nlvr2.read_nlvr2(path)
        tokens = tokenize(tokenizer, [s.sentence for s in statements], max_len)
        rows = [(f"{self.task.images}/{img}", tok) for s, tok in zip(statements, tokens, strict=True) for img in s.images]
        corpus = text_corpus(rows, local / f"nlvr2-{split}.arrow", feature_paths, pretrain)
        where = {int(r): e for e, r in enumerate(corpus.text_row)}
        pairs = [(k, where[2 * k], where[2 * k + 1]) for k in range(len(statements)) if 2 * k in where and 2 * k + 1 in where]
        if len(pairs) < len(statements):
            log.warning("NLVR2 %s: %d statements lack features of an image and are skipped", split, len(statements) - len(pairs))
        return statements, corpus, np.array(pairs, dtype=np.int64).reshape(-1, 3)

    def model_class(self):
        from uniter.modeling_uniter import UniterForNlvr2

        return UniterForNlvr2, {"nlvr2_head": self.task.head}

    def prepare(self, model, from_pretrained: bool) -> None:
        model.grow_type_embeddings()  # a third type for the right image, copied from the image type

    def _batch(self, corpus, rows: np.ndarray) -> dict:
        ids = rows[:, 1:].reshape(-1)  # left, right, left, right…
        batch = pack(*texts_with_regions(corpus, ids, self.vocab), self.vocab)
        types = torch.ones(batch["img_feat"].shape[:2], dtype=torch.long)
        types[1::2] = 2
        batch["img_type_ids"] = types
        return batch

    def train_batch(self, j: int, score: Score) -> dict:
        lengths = self.train.lengths[self.train_rows[:, 1]] + self.train.lengths[self.train_rows[:, 2]]
        pick = endless(np.arange(len(self.train_rows)), lengths, self.task.batch_tokens, self.seed, j)
        batch = self._batch(self.train, self.train_rows[pick])
        batch["targets"] = torch.tensor([int(self.train_st[int(k)].label) for k in self.train_rows[pick, 0]])
        return batch

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        predictions: dict[str, bool] = {}
        lengths = self.dev.lengths[self.dev_rows[:, 1]] + self.dev.lengths[self.dev_rows[:, 2]]
        for pick in token_bucket_batches(np.arange(len(self.dev_rows)), lengths, self.task.batch_tokens, 8192,
                                         np.random.default_rng([self.seed, 8])):
            logits = score(self._batch(self.dev, self.dev_rows[pick])).logits
            for k, p in zip(self.dev_rows[pick, 0], logits.float().argmax(-1).tolist(), strict=True):
                predictions[self.dev_st[int(k)].identifier] = bool(p)
        scores = nlvr2.evaluate(predictions, self.dev_st)
        out = io.StringIO()
        writer = csv.writer(out)
        for ident, p in sorted(predictions.items()):
            writer.writerow([ident, "True" if p else "False"])
        return {f"nlvr2_{k}": v for k, v in scores.items()}, {"nlvr2/predictions.csv": out.getvalue().encode()}


# --- image-text retrieval -----------------------------------------------------------------------


class RetrievalData:
    """Karpathy split: train on train + restval captions; rank every caption against every image of
    the evaluation split. A training micro-batch is a few queries, each with its positive and its
    hardest negatives from a sampled pool (text queries with negative images on even micro-batches,
    image queries with negative texts on odd ones, as the reference alternates)."""

    name = "retrieval"

    def __init__(self, task, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        path = Path(task.karpathy)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            images = doc["images"]
            split_rows = {"train": [], "eval": []}
            for im in images:
                split = str(im["split"])
                side = "train" if split in ("train", "restval") else "eval" if split == task.eval_split else None
                if side is None:
                    continue
                key = f"{task.images}/{Path(str(im['filename'])).stem}"
                split_rows[side] += [(key, str(s["raw"])) for s in im["sentences"]]
        except FileNotFoundError:
            raise InputDataError(f"{path}: Karpathy split file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputDataError(f"{path}: expected a Karpathy split file ({{'images': [{{filename, split, sentences: "
                                 f"[{{raw}}]}}]}}) ({type(exc).__name__}: {exc})") from None
        self.train = self._corpus(split_rows["train"], "train", tokenizer, feature_paths, local, pretrain, max_len)
        self.eval = self._corpus(split_rows["eval"], task.eval_split, tokenizer, feature_paths, local, pretrain, max_len)
        self.skipped = len(split_rows["train"]) - len(self.train) + len(split_rows["eval"]) - len(self.eval)
        if len(self.train) < 2:
            raise InputDataError(f"retrieval: fewer than 2 training captions have features of their image in the "
                                 f"downstream set {task.images!r} (configure downstream.images.{task.images})")
        self.train_img = self._images(self.train)
        self.eval_img = self._images(self.eval)

    @staticmethod
    def _corpus(rows, split, tokenizer, feature_paths, local, pretrain, max_len) -> Corpus:
        tokens = tokenize(tokenizer, [t for _, t in rows], max_len)
        return text_corpus([(k, ids) for (k, _), ids in zip(rows, tokens, strict=True)], local / f"itr-{split}.arrow",
                           feature_paths, pretrain)

    @staticmethod
    def _images(corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
        """(an example index per distinct image, each example's image number)."""
        img_ident = corpus.img_file.astype(np.int64) * (1 << 40) + corpus.img_row
        uniq, first, inverse = np.unique(img_ident, return_index=True, return_inverse=True)
        return first, inverse

    def model_class(self):
        from uniter.modeling_uniter import UniterForImageTextRetrieval

        return UniterForImageTextRetrieval, {}

    def prepare(self, model, from_pretrained: bool) -> None:
        if from_pretrained:
            model.init_rank_from_itm()  # the reference's init: the ITM head's "match" score

    def _pairs(self, corpus: Corpus, text_ids, image_examples) -> dict:
        """Batch of (text of example t, regions of example i's image) pairs."""
        texts = [np.concatenate([[self.vocab.cls], corpus.text(int(t)), [self.vocab.sep]]) for t in text_ids]
        return pack(texts, [corpus.example_region(int(i)) for i in image_examples], self.vocab)

    def _scores(self, score: Score, corpus, text_ids, image_examples) -> np.ndarray:
        out = []
        for s in range(0, len(text_ids), self.task.score_batch):
            batch = self._pairs(corpus, text_ids[s : s + self.task.score_batch], image_examples[s : s + self.task.score_batch])
            out.append(score(batch).logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def train_batch(self, j: int, score: Score) -> dict:
        task, corpus = self.task, self.train
        first, image_of = self.train_img
        k = min(task.hard_negatives, task.negative_pool)
        per_query = int(np.mean(corpus.lengths)) * (1 + k)
        n_queries = max(1, task.batch_tokens // max(1, per_query))
        rng = np.random.default_rng([self.seed, 11, j])
        queries = rng.choice(len(corpus), size=min(n_queries, len(corpus)), replace=False)
        text_ids, image_ids = [], []
        for q in queries:
            own = image_of[q]
            if j % 2 == 0:  # the text asks; negatives are other images
                candidates = np.flatnonzero(np.arange(len(first)) != own)
                pool = rng.choice(candidates, size=min(task.negative_pool, len(candidates)), replace=False)
                hard = pool[np.argsort(-self._scores(score, corpus, np.full(len(pool), q), first[pool]), kind="stable")[:k]]
                text_ids += [q] * (1 + len(hard))
                image_ids += [q, *first[hard]]
            else:  # the image asks; negatives are captions of other images
                candidates = np.flatnonzero(image_of != own)
                pool = rng.choice(candidates, size=min(task.negative_pool, len(candidates)), replace=False)
                hard = pool[np.argsort(-self._scores(score, corpus, pool, np.full(len(pool), q)), kind="stable")[:k]]
                text_ids += [q, *hard]
                image_ids += [q] * (1 + len(hard))
        group = len(text_ids) // len(queries)
        if group * len(queries) != len(text_ids):  # a tiny corpus: groups must be equal, drop extras
            raise InputDataError("retrieval: too few images for the configured negatives (lower hard_negatives)")
        batch = self._pairs(corpus, np.array(text_ids), np.array(image_ids))
        batch["group_size"] = group
        return batch

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        corpus = self.eval
        first, image_of = self.eval_img
        n_txt, n_img = len(corpus), len(first)
        block_img = min(n_img, 16)
        block_txt = max(1, self.task.score_batch // block_img)

        def block(t_ids, i_ids):
            tt = np.repeat(t_ids, len(i_ids))
            ii = np.tile(first[i_ids], len(t_ids))
            return self._scores(score, corpus, tt, ii).reshape(len(t_ids), len(i_ids))

        matrix = retrieval.score_matrix(block, n_txt, n_img, block_txt, block_img)
        scores = retrieval.recall_at_k(matrix, image_of)
        curve = retrieval.recall_at_k(matrix, image_of, ks=tuple(range(1, 11)))
        buf = io.BytesIO()
        np.save(buf, matrix, allow_pickle=False)
        files = {"retrieval/scores.npy": buf.getvalue(),
                 "retrieval/eval.json": json.dumps({"txt2img": image_of.tolist(), "recall_curve": curve}).encode()}
        return {f"retrieval_{k}": v for k, v in scores.items()}, files


# --- referring expressions ----------------------------------------------------------------------


def region_boxes(pos: np.ndarray, width: float, height: float) -> np.ndarray:
    """(n, 7) normalized [x1, y1, x2, y2, w, h, area] → (n, 4) pixel [x, y, w, h]."""
    return np.stack([pos[:, 0] * width, pos[:, 1] * height, pos[:, 4] * width, pos[:, 5] * height], axis=1)


class RefcocoData:
    """Each expression scores the regions of its image. With ground-truth-box features
    (`downstream.gt_boxes`) it trains on them, the target being the referred annotation, and is
    evaluated on both ground-truth and detected regions; without, it trains on the detected region
    that overlaps the object most (expressions with no overlap above 0.5 are not trained on). A
    prediction is right when its box has IoU > 0.5 with the object's box."""

    name = "refcoco"

    def __init__(self, task, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int):
        from uniter.finetune.refer import iou, read_expressions, read_instances

        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        instances = read_instances(task.instances)  # once: boxes, sizes and the expressions' objects
        exprs, sizes = read_expressions(task.refs, instances), instances.sizes
        keys = image_keys(feature_paths, task.images)
        det_ids = numeric_ids([k for k in keys if not k.endswith("#gt")], task.images)
        gt_ids = {i: k + "#gt" for i, k in numeric_ids([k.removesuffix("#gt") for k in keys if k.endswith("#gt")], task.images).items()}
        # the ground-truth rows' regions: the image's annotations in ascending id (downstream.gt_boxes)
        gt_anns = {i: [(a, (x, y, x + w, y + h)) for a, (x, y, w, h) in sorted(anns)] for i, anns in instances.per_image.items()}
        self.sets: dict[tuple[str, str], tuple] = {}
        for side, split in (("train", task.train_split), ("eval", task.eval_split)):
            chosen = [e for e in exprs if e.split == split]
            missing = [e.image_id for e in chosen if e.image_id not in sizes]
            if missing:
                raise InputDataError(f"{task.instances}: no width/height for image ids {sorted(set(missing))[:5]}")
            tokens = tokenize(tokenizer, [e.sentence for e in chosen], max_len)
            for setting, ids in (("gt", gt_ids), ("det", det_ids)):
                if setting == "gt" and not gt_ids:
                    continue
                corpus = text_corpus(list(zip([ids.get(e.image_id, "") for e in chosen], tokens, strict=True)),
                                     local / f"ref-{side}-{setting}.arrow", feature_paths, pretrain)
                examples, targets, boxes = [], [], []
                for k, row in enumerate(corpus.text_row):
                    e = chosen[int(row)]
                    if setting == "gt":
                        anns = gt_anns[e.image_id][: corpus.nbb[k]]
                        rb = np.array([[x1, y1, x2 - x1, y2 - y1] for _, (x1, y1, x2, y2) in anns])
                        order = [a for a, _ in anns]
                        if e.ann_id not in order:
                            continue
                        target = order.index(e.ann_id)
                    else:
                        rb = region_boxes(corpus.example_region(k).pos, *sizes[e.image_id])
                        overlap = iou(rb, np.array(e.box))
                        if side == "train" and overlap.max() <= 0.5:
                            continue
                        target = int(overlap.argmax())
                    examples.append(k)
                    targets.append(target)
                    boxes.append((rb, e))
                self.sets[(side, setting)] = (corpus, np.array(examples, dtype=np.int64), np.array(targets, dtype=np.int64), boxes)
        self.train_setting = "gt" if ("train", "gt") in self.sets and len(self.sets[("train", "gt")][1]) else "det"
        if gt_ids and self.train_setting == "det":
            log.warning("RefCOCO: no ground-truth-box features for the %s expressions: training on detected regions", task.train_split)
        n_train = sum(e.split == task.train_split for e in exprs)
        self.skipped = n_train - len(self.sets[("train", self.train_setting)][1])
        if not len(self.sets[("train", self.train_setting)][1]):
            raise InputDataError(f"RefCOCO: no {task.train_split} expression has a region to point at in the downstream "
                                 f"set {task.images!r} (ground-truth-box features, or a detected region with IoU > 0.5)")

    def model_class(self):
        from uniter.modeling_uniter import UniterForReferringExpression

        return UniterForReferringExpression, {}

    def _batch(self, corpus: Corpus, ids) -> dict:
        batch = pack(*texts_with_regions(corpus, ids, self.vocab), self.vocab, with_ot=True)
        batch["region_index"], batch["region_pad"] = batch.pop("ot_img_index"), batch.pop("ot_img_pad")
        for k in ("ot_txt_index", "ot_txt_pad"):
            batch.pop(k)
        return batch

    def train_batch(self, j: int, score: Score) -> dict:
        corpus, examples, targets, _ = self.sets[("train", self.train_setting)]
        pick = endless(np.arange(len(examples)), corpus.lengths[examples], self.task.batch_tokens, self.seed, j)
        batch = self._batch(corpus, examples[pick])
        batch["targets"] = torch.from_numpy(targets[pick])
        return batch

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        from uniter.finetune.refer import is_hit

        metrics, predictions = {}, []
        for setting in ("det", "gt"):
            if ("eval", setting) not in self.sets:
                continue
            corpus, examples, _, boxes = self.sets[("eval", setting)]
            hits = []
            for pick in token_bucket_batches(np.arange(len(examples)), corpus.lengths[examples], self.task.batch_tokens,
                                             8192, np.random.default_rng([self.seed, 8])):
                logits = score(self._batch(corpus, examples[pick])).logits.float()
                for p, region in zip(pick, logits.argmax(-1).tolist(), strict=True):
                    rb, e = boxes[int(p)]
                    box = rb[region]
                    hits.append(bool(is_hit(box, np.array(e.box))))
                    predictions.append({"setting": setting, "sent_id": e.sent_id, "ref_id": e.ref_id,
                                        "box": [round(float(v), 2) for v in box]})
            metrics["refcoco_accuracy" if setting == "det" else "refcoco_accuracy_gt"] = 100 * float(np.mean(hits)) if hits else 0.0
        predictions.sort(key=lambda x: (x["setting"], x["sent_id"]))
        return metrics, {"refcoco/predictions.json": json.dumps(predictions).encode()}


TASKS = {"vqa": VqaData, "nlvr2": Nlvr2Data, "retrieval": RetrievalData, "refcoco": RefcocoData}
