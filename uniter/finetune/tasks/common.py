"""What the tasks share: their texts as a `Corpus` joined with the downstream features, the
features' image ids, and the endless stream of training batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from contract.errors import InputDataError
from uniter.batch import Vocab
from uniter.data import Corpus, Region, token_bucket_batches, write_ipc


def text_corpus(rows: list[tuple[str, list[int]]], path: Path, feature_paths: list[Path], pretrain) -> Corpus:
    """A Corpus of (image key, token ids) rows; rows whose image has no features are left out
    (`corpus.text_row` maps its examples back to `rows`)."""
    write_ipc(
        pa.table(
            {
                "pair_id": [str(i) for i in range(len(rows))],
                "source": ["task"] * len(rows),
                "image_key": [key for key, _ in rows],
                "input_ids": pa.array([ids for _, ids in rows], pa.list_(pa.int32())),
            }
        ),
        path,
    )
    return Corpus(path, feature_paths, pretrain.conf_thresh, pretrain.min_bb, pretrain.max_bb, val_percent=0.0)


def tokenize(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [t[:max_len] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def feature_ids(feature_paths: list[Path], image_set: str, gt: bool = False) -> dict[int, str]:
    """Image id → key of the set's feature rows: its detected rows, or with `gt` its ground-truth-box
    rows (`<key>#gt`). The id is the downstream stage's `image_id` column (the number the file stem
    ends in: COCO_val2014_000000000042 → 42; null when it ends in none)."""
    prefix = f"{image_set}/"
    out: dict[int, str] = {}
    for path in feature_paths:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        rows = zip(table.column("image_key").to_pylist(), table.column("image_id").to_pylist(), strict=True)
        for key, iid in rows:
            if iid is None or not key.startswith(prefix) or key.endswith("#gt") != gt:
                continue
            if iid in out and out[iid] != key:
                raise InputDataError(f"downstream set {image_set!r}: images {out[iid]} and {key} share id {iid}")
            out[iid] = key
    return out


class Endless:
    """An endless stream of shuffled token-bucket epochs: `stream(j)` is the j-th batch, a pure
    function of j (a resumed run repeats an uninterrupted one). Each epoch is cut once and kept while
    its batches are being served: re-cutting every epoch up to j's on each call made a step's cost
    grow with its number (VQA on the grounding world: 0.12 s of a 0.20 s step by step 2,000)."""

    def __init__(self, lengths: np.ndarray, budget: int, seed: int):
        self.ids, self.lengths, self.budget, self.seed = np.arange(len(lengths)), lengths, budget, seed
        self.sizes: list[int] = []  # batches in each epoch cut so far
        self.epoch, self.batches = -1, []

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if epoch != self.epoch:
            rng = np.random.default_rng([self.seed, 7, epoch])
            self.epoch, self.batches = epoch, token_bucket_batches(self.ids, self.lengths, self.budget, 8192, rng)
        return self.batches

    def __call__(self, j: int) -> np.ndarray:
        epoch = 0
        while True:
            if epoch == len(self.sizes):
                self.sizes.append(len(self._epoch(epoch)))
            if j < self.sizes[epoch]:
                return self._epoch(epoch)[j]
            j -= self.sizes[epoch]
            epoch += 1


def eval_batches(ids: np.ndarray, lengths: np.ndarray, budget: int, seed: int) -> list[np.ndarray]:
    """The evaluation split's token-bucket batches, in one fixed order."""
    return token_bucket_batches(ids, lengths, budget, 8192, np.random.default_rng([seed, 8]))


def regions(corpus: Corpus, ids, image_features: str = "real") -> list[Region]:
    """The model's regions of examples ``ids``; with ``image_features`` "zeroed" (the image-blind
    baseline) as many regions, with nothing of the picture in them: zero features, zero boxes."""
    found = [corpus.example_region(int(i)) for i in ids]
    if image_features == "zeroed":
        return [Region(np.zeros_like(r.feat), np.zeros_like(r.pos), None) for r in found]
    return found


def texts_with_regions(
    corpus: Corpus, ids, vocab: Vocab, image_features: str = "real"
) -> tuple[list[np.ndarray], list]:
    texts = [np.concatenate([[vocab.cls], corpus.text(int(i)), [vocab.sep]]) for i in ids]
    return texts, regions(corpus, ids, image_features)
