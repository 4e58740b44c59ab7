"""NLVR2: the jsonl files, accuracy and consistency; the task's examples and batches (`Nlvr2Data`:
train on `train`, score `dev`); the re-scoring of its predictions file.

An identifier is `split-set_id-pair_id-sentence_id` (e.g. `dev-850-0-0`); the pair's images are
`split-set_id-pair_id-img0.png` and `-img1.png`. One sentence is written for several image pairs
of its set: those examples share split, set id and sentence id, and consistency is the share of
sentences whose every example is answered right.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.errors import InputDataError
from uniter.batch import Vocab, pack
from uniter.finetune.config import Nlvr2Task
from uniter.finetune.tasks.base import FinetuneTask, Rescored, Score, TaskData
from uniter.finetune.tasks.common import Endless, eval_batches, text_corpus, texts_with_regions, tokenize

log = logging.getLogger(__name__)
PREDICTIONS = "nlvr2/predictions.csv"  # identifier, True/False: re-scored by the evaluate stage


@dataclass(frozen=True)
class Statement:
    identifier: str
    sentence: str
    label: bool | None  # None in an unlabeled test file
    images: tuple[str, str]  # image keys without extension: `<split>-<set>-<pair>-img0`, `…-img1`

    @property
    def sentence_group(self) -> str:
        split, set_id, _pair, sentence_id = self.identifier.split("-")
        return f"{split}-{set_id}-{sentence_id}"


def read_nlvr2(path: str | Path) -> list[Statement]:
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputDataError(f"{path}: NLVR2 file not found") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ident = str(row["identifier"])
            parts = ident.split("-")
            if len(parts) != 4:
                raise ValueError(f"identifier {ident!r} is not split-set_id-pair_id-sentence_id")
            label = row.get("label")
            if label is not None:
                if str(label) not in ("True", "False"):
                    raise ValueError(f"label {label!r} is not True or False")
                label = str(label) == "True"
            prefix = "-".join(parts[:3])
            out.append(Statement(ident, str(row["sentence"]), label, (f"{prefix}-img0", f"{prefix}-img1")))
        except json.JSONDecodeError as exc:
            raise InputDataError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(
                f"{path}:{lineno}: expected identifier, sentence and label ({type(exc).__name__}: {exc})"
            ) from None
    return out


def official_scores(predictions: dict[str, bool], statements: list[Statement]) -> dict[str, float]:
    """Accuracy and consistency in %, over the labeled statements (a missing prediction is wrong)."""
    labeled = [s for s in statements if s.label is not None]
    if not labeled:
        return {}
    right = {s.identifier: predictions.get(s.identifier) == s.label for s in labeled}
    groups: dict[str, bool] = {}
    for s in labeled:
        groups[s.sentence_group] = groups.get(s.sentence_group, True) and right[s.identifier]
    return {"accuracy": 100 * sum(right.values()) / len(right), "consistency": 100 * sum(groups.values()) / len(groups)}


# --- fine-tuning ---------------------------------------------------------------------------------


class Nlvr2Data(TaskData):
    """Each statement is two rows (its text with the left image, type 1, and the right, type 2)."""

    def __init__(
        self, task: Nlvr2Task, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int
    ):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        load = (tokenizer, feature_paths, local, pretrain, max_len)
        self.train_st, self.train, self.train_rows = self._load(task.train, "train", *load)
        self.dev_st, self.dev, self.dev_rows = self._load(task.dev, "dev", *load)
        self.skipped = 0
        if not len(self.train_rows):
            raise InputDataError(
                f"NLVR2: no training statement has features of both images in the downstream set "
                f"{task.images!r} (configure downstream.images.{task.images})"
            )
        if any(s.label is None for s in self.train_st):
            raise InputDataError(f"{task.train}: training statements need labels")
        lengths = self.train.lengths[self.train_rows[:, 1]] + self.train.lengths[self.train_rows[:, 2]]
        self.stream = Endless(lengths, task.batch_tokens, seed)

    def _load(self, path, split, tokenizer, feature_paths, local, pretrain, max_len):
        """(statements, their Corpus, (statement, left example, right example) per statement with both images)."""
        statements = read_nlvr2(path)
        tokens = tokenize(tokenizer, [s.sentence for s in statements], max_len)
        rows = [
            (f"{self.task.images}/{img}", tok) for s, tok in zip(statements, tokens, strict=True) for img in s.images
        ]
        corpus = text_corpus(rows, local / f"nlvr2-{split}.arrow", feature_paths, pretrain)
        where = {int(r): e for e, r in enumerate(corpus.text_row)}
        pairs = [
            (k, where[2 * k], where[2 * k + 1]) for k in range(len(statements)) if 2 * k in where and 2 * k + 1 in where
        ]
        if len(pairs) < len(statements):
            log.warning(
                "NLVR2 %s: %d statements lack features of an image and are skipped", split, len(statements) - len(pairs)
            )
        return statements, corpus, np.array(pairs, dtype=np.int64).reshape(-1, 3)

    def model_class(self):
        # transformers loads only where a model is built: the evaluate stage and the report import this module
        from uniter.modeling_uniter import UniterForNlvr2  # noqa: PLC0415

        return UniterForNlvr2, {"nlvr2_head": self.task.head}

    def prepare(self, model, from_pretrained: bool) -> None:
        model.grow_type_embeddings()  # a third type for the right image, copied from the image type

    def _batch(self, corpus, rows: np.ndarray) -> dict:
        ids = rows[:, 1:].reshape(-1)  # left, right, left, right…
        batch = pack(*texts_with_regions(corpus, ids, self.vocab, self.task.image_features), self.vocab)
        types = torch.ones(batch["img_feat"].shape[:2], dtype=torch.long)
        types[1::2] = 2
        batch["img_type_ids"] = types
        return batch

    def train_batch(self, j: int, score: Score) -> dict:
        pick = self.stream(j)
        batch = self._batch(self.train, self.train_rows[pick])
        batch["targets"] = torch.tensor([int(self.train_st[int(k)].label) for k in self.train_rows[pick, 0]])
        return batch

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        predictions: dict[str, bool] = {}
        lengths = self.dev.lengths[self.dev_rows[:, 1]] + self.dev.lengths[self.dev_rows[:, 2]]
        for pick in eval_batches(np.arange(len(self.dev_rows)), lengths, self.task.batch_tokens, self.seed):
            logits = score(self._batch(self.dev, self.dev_rows[pick])).logits
            for k, p in zip(self.dev_rows[pick, 0], logits.float().argmax(-1).tolist(), strict=True):
                predictions[self.dev_st[int(k)].identifier] = bool(p)
        out = io.StringIO()
        writer = csv.writer(out)
        for ident, p in sorted(predictions.items()):
            writer.writerow([ident, "True" if p else "False"])
        scores = official_scores(predictions, self.dev_st)
        return {f"nlvr2_{k}": v for k, v in scores.items()}, {PREDICTIONS: out.getvalue().encode()}


# --- evaluation ----------------------------------------------------------------------------------


def rescore(files: dict[str, bytes], task: Nlvr2Task) -> Rescored:
    """Accuracy and consistency of the predictions file on the task's dev split."""
    rows = csv.reader(io.StringIO(files[PREDICTIONS].decode()))
    scores = official_scores({ident: value == "True" for ident, value in rows}, read_nlvr2(task.dev))
    return {"nlvr2": scores.get("accuracy", 0.0)}, {"accuracy_by_type": scores}


TASK = FinetuneTask(data=Nlvr2Data, predictions=(PREDICTIONS,), rescore=rescore, columns=(("nlvr2", "NLVR2"),))
