"""Image-text retrieval: the full score matrix of a split, built in bounded blocks, and R@K both
ways; the task's examples and batches (`RetrievalData`, on a Karpathy split file); the re-scoring of
its score matrix.

IR (text → image): a text's hit at K is its image ranked in the top K of all images.
TR (image → text): an image's hit at K is any of its captions in the top K of all texts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from contract.errors import InputDataError
from uniter.batch import Vocab, pack
from uniter.data import Corpus
from uniter.finetune.config import RetrievalTask
from uniter.finetune.tasks.base import FinetuneTask, Rescored, Score, TaskData
from uniter.finetune.tasks.common import regions, text_corpus, tokenize

SCORES = "retrieval/scores.npy"  # the (texts, images) score matrix of the evaluation split
EVAL = "retrieval/eval.json"  # each text's image (txt2img) and the recall curve


def score_matrix(
    score_block: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_txt: int,
    n_img: int,
    block_txt: int = 256,
    block_img: int = 64,
) -> np.ndarray:
    """(n_txt, n_img) scores from `score_block(text_ids, image_ids) → (len(text_ids), len(image_ids))`,
    one block at a time, so memory is the matrix plus one block (5k × 25k float32 is 500 MB)."""
    out = np.empty((n_txt, n_img), dtype=np.float32)
    for t in range(0, n_txt, block_txt):
        txt = np.arange(t, min(t + block_txt, n_txt))
        for i in range(0, n_img, block_img):
            img = np.arange(i, min(i + block_img, n_img))
            out[t : t + len(txt), i : i + len(img)] = score_block(txt, img)
    return out


def recall_at_k(scores: np.ndarray, txt2img: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in % both ways and their mean, from scores (n_txt, n_img) and each text's image index.
    Ties count against the ground truth (a tie with a wrong item ranks it first)."""
    scores = np.asarray(scores, dtype=np.float64)
    txt2img = np.asarray(txt2img)
    n_txt, n_img = scores.shape
    if txt2img.shape != (n_txt,) or txt2img.min(initial=0) < 0 or txt2img.max(initial=-1) >= n_img:
        raise ValueError(f"txt2img must give an image index in [0, {n_img}) for each of the {n_txt} texts")
    # IR: rank of the true image among all images, per text
    true = scores[np.arange(n_txt), txt2img]
    ir_rank = (scores >= true[:, None]).sum(1) - 1  # other images scoring at least as high
    # TR: per image, the best rank of any of its captions among all texts
    tr_rank = np.full(n_img, np.iinfo(np.int64).max)
    for img in range(n_img):
        caps = np.flatnonzero(txt2img == img)
        if len(caps):
            col = scores[:, img]
            ranks = (col[None, :] >= col[caps][:, None]).sum(1) - 1
            tr_rank[img] = ranks.min()
    has_caption = tr_rank < np.iinfo(np.int64).max
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = 100 * float((ir_rank < k).mean())
        out[f"tr_r{k}"] = 100 * float((tr_rank[has_caption] < k).mean())
    out["r_mean"] = float(np.mean([out[f"{d}_r{k}"] for d in ("ir", "tr") for k in ks]))
    return out


def read_karpathy(task: RetrievalTask) -> dict[str, list[tuple[str, str]]]:
    """The (image key, caption) rows of the split file: "train" (train + restval) and "eval" (`eval_split`)."""
    path = Path(task.karpathy)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        split_rows: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
        for im in doc["images"]:
            split = str(im["split"])
            side = "train" if split in ("train", "restval") else "eval" if split == task.eval_split else None
            if side is None:
                continue
            key = f"{task.images}/{Path(str(im['filename'])).stem}"
            split_rows[side] += [(key, str(s["raw"])) for s in im["sentences"]]
    except FileNotFoundError:
        raise InputDataError(f"{path}: Karpathy split file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputDataError(
            f"{path}: expected a Karpathy split file ({{'images': [{{filename, split, sentences: "
            f"[{{raw}}]}}]}}) ({type(exc).__name__}: {exc})"
        ) from None
    return split_rows


# --- fine-tuning ---------------------------------------------------------------------------------


class RetrievalData(TaskData):
    """Karpathy split: train on train + restval captions; rank every caption against every image of
    the evaluation split. A training micro-batch is a text query and an image query (`queries` of
    each), each with its positive and its hardest negatives from a sampled pool, as the reference
    trains both directions in every step."""

    def __init__(
        self, task: RetrievalTask, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int
    ):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        split_rows = read_karpathy(task)
        load = (tokenizer, feature_paths, local, pretrain, max_len)
        self.train = self._corpus(split_rows["train"], "train", *load)
        self.eval = self._corpus(split_rows["eval"], task.eval_split, *load)
        self.skipped = len(split_rows["train"]) - len(self.train) + len(split_rows["eval"]) - len(self.eval)
        if len(self.train) < 2:
            raise InputDataError(
                f"retrieval: fewer than 2 training captions have features of their image in the "
                f"downstream set {task.images!r} (configure downstream.images.{task.images})"
            )
        self.train_img = self._images(self.train)
        self.eval_img = self._images(self.eval)

    @staticmethod
    def _corpus(rows, split, tokenizer, feature_paths, local, pretrain, max_len) -> Corpus:
        tokens = tokenize(tokenizer, [t for _, t in rows], max_len)
        return text_corpus(
            [(k, ids) for (k, _), ids in zip(rows, tokens, strict=True)],
            local / f"itr-{split}.arrow",
            feature_paths,
            pretrain,
        )

    @staticmethod
    def _images(corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
        """(an example index per distinct image, each example's image number)."""
        img_ident = corpus.img_file.astype(np.int64) * (1 << 40) + corpus.img_row
        _, first, inverse = np.unique(img_ident, return_index=True, return_inverse=True)
        return first, inverse

    def model_class(self):
        # transformers loads only where a model is built: the evaluate stage and the report import this module
        from uniter.modeling_uniter import UniterForImageTextRetrieval  # noqa: PLC0415

        return UniterForImageTextRetrieval, {}

    def prepare(self, model, from_pretrained: bool) -> None:
        if from_pretrained:
            model.init_rank_from_itm()  # the reference's init: the ITM head's "match" score

    def _pairs(self, corpus: Corpus, text_ids, image_examples) -> dict:
        """Batch of (text of example t, regions of example i's image) pairs."""
        texts = [np.concatenate([[self.vocab.cls], corpus.text(int(t)), [self.vocab.sep]]) for t in text_ids]
        return pack(texts, regions(corpus, image_examples, self.task.image_features), self.vocab)

    def _scores(self, score: Score, corpus, text_ids, image_examples) -> np.ndarray:
        out, step = [], self.task.score_batch
        for s in range(0, len(text_ids), step):
            batch = self._pairs(corpus, text_ids[s : s + step], image_examples[s : s + step])
            out.append(score(batch).logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def train_batch(self, j: int, score: Score) -> dict:
        """`queries` text queries, each with its positive image and the hardest of a sampled pool of
        other images, then as many image queries with the hardest captions of other images: one
        group of 1 + K rows per query, the positive first (the model's hinge loss reads groups)."""
        task, corpus = self.task, self.train
        first, image_of = self.train_img
        k = min(task.hard_negatives, task.negative_pool)
        rng = np.random.default_rng([self.seed, 11, j])
        queries = rng.choice(len(corpus), size=min(2 * task.queries, len(corpus)), replace=True)
        text_ids: list[int] = []
        image_ids: list[int] = []
        for n, q in enumerate(queries):
            own = image_of[q]
            if n < task.queries:  # the text asks; negatives are other images
                candidates = np.flatnonzero(np.arange(len(first)) != own)
                pool = rng.choice(candidates, size=min(task.negative_pool, len(candidates)), replace=False)
                ranked = np.argsort(-self._scores(score, corpus, np.full(len(pool), q), first[pool]), kind="stable")
                hard = pool[ranked[:k]]
                text_ids += [q] * (1 + len(hard))
                image_ids += [q, *first[hard]]
            else:  # the image asks; negatives are captions of other images
                candidates = np.flatnonzero(image_of != own)
                pool = rng.choice(candidates, size=min(task.negative_pool, len(candidates)), replace=False)
                ranked = np.argsort(-self._scores(score, corpus, pool, np.full(len(pool), q)), kind="stable")
                hard = pool[ranked[:k]]
                text_ids += [q, *hard]
                image_ids += [q] * (1 + len(hard))
        group = len(text_ids) // len(queries)
        if group * len(queries) != len(text_ids):  # a tiny corpus: groups must be equal
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

        matrix = score_matrix(block, n_txt, n_img, block_txt, block_img)
        scores = recall_at_k(matrix, image_of)
        curve = recall_at_k(matrix, image_of, ks=tuple(range(1, 11)))
        buf = io.BytesIO()
        np.save(buf, matrix, allow_pickle=False)
        files = {
            SCORES: buf.getvalue(),
            EVAL: json.dumps({"txt2img": image_of.tolist(), "recall_curve": curve}).encode(),
        }
        return {f"retrieval_{k}": v for k, v in scores.items()}, files


# --- evaluation ----------------------------------------------------------------------------------


def rescore(files: dict[str, bytes], task: RetrievalTask) -> Rescored:
    """R@K both ways of the score matrix (the texts' images are in the eval file)."""
    matrix = np.load(io.BytesIO(files[SCORES]), allow_pickle=False)
    meta = json.loads(files[EVAL])
    scores = recall_at_k(matrix, np.array(meta["txt2img"]))
    details = {
        "accuracy_by_type": scores,
        "recall_curve": meta["recall_curve"],
        "texts": int(matrix.shape[0]),
        "images": int(matrix.shape[1]),
    }
    return {"ir_r1": scores["ir_r1"], "tr_r1": scores["tr_r1"]}, details


TASK = FinetuneTask(
    data=RetrievalData, predictions=(SCORES, EVAL), rescore=rescore, columns=(("ir_r1", "IR R@1"), ("tr_r1", "TR R@1"))
)
