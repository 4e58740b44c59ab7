"""VQA v2: the official question/annotation files, answer normalization, the answer vocabulary,
soft targets and the official accuracy (the 10-choose-9 average); the task's examples and batches
(`VqaData`: train on `train`, score `val`); the re-scoring of its results file with the answer-type
confusion for the report.

Normalization follows the VQA evaluation's rules: punctuation removed (or turned into a space
where it separates words), periods kept inside numbers, commas kept between digits, lower case,
number words → digits, articles dropped, apostrophe-less contractions restored.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.errors import InputDataError
from uniter.batch import Vocab, pack
from uniter.finetune.config import VqaTask
from uniter.finetune.tasks.base import FinetuneTask, Rescored, Score, TaskData
from uniter.finetune.tasks.common import Endless, eval_batches, feature_ids, text_corpus, texts_with_regions, tokenize

log = logging.getLogger(__name__)

ANSWERS = "vqa/answers.json"  # the answer vocabulary, label order
RESULTS = "vqa/results.json"  # the official results file, re-scored by the evaluate stage
UPLOAD = "vqa/test_upload.json"  # the final model's answers to `test_questions`, for the official server

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Written without their apostrophe → the canonical form (the answers humans typed use both).
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Im": "I'm",
    "im": "i'm",
    "ive": "i've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "lets": "let's",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "thered": "there'd",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCT:
        # next to a space (or in a text with a digit-comma-digit) a mark is dropped; between words it separates them
        if f"{p} " in text or f" {p}" in text or _DIGIT_COMMA.search(text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official accuracy of one prediction against the human answers (normally 10): the mean,
    over each answer left out in turn, of min(1, #matching among the others / 3)."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# The soft score of an answer given by n humans. "butd": the bottom-up-attention VQA code's
# (0.3, 0.6, 0.9, then 1), which the reference's preprocessed targets use; "thirds": min(1, n/3),
# the evaluation metric's own shape.
SCORES = {
    "butd": lambda n: (0.0, 0.3, 0.6, 0.9)[n] if n < 4 else 1.0,
    "thirds": lambda n: min(1.0, n / 3),
}


def soft_targets(answers: list[str], vocab: dict[str, int], score: str = "butd") -> dict[int, float]:
    """Training targets: each answer's soft score (`SCORES`), for answers in the vocabulary."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {vocab[a]: SCORES[score](c) for a, c in counts.items() if a in vocab}


@dataclass(frozen=True)
class Question:
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...]  # the human answers (empty for the test splits)
    answer_type: str  # "yes/no", "number", "other" ("" without annotations)
    question_type: str


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputDataError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def read_vqa(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[Question]:
    """Questions (`v2_OpenEnded_mscoco_<split>_questions.json`) joined with their annotations
    (`v2_mscoco_<split>_annotations.json`; None for test splits)."""
    questions_path = Path(questions_path)
    doc = _load_json(questions_path, "VQA questions")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise InputDataError(
            f'{questions_path}: expected a JSON object with a "questions" list (VQA v2 questions file)'
        )
    annotations: dict[int, dict] = {}
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        ann_doc = _load_json(annotations_path, "VQA annotations")
        if not isinstance(ann_doc, dict) or not isinstance(ann_doc.get("annotations"), list):
            raise InputDataError(
                f'{annotations_path}: expected a JSON object with an "annotations" list (VQA v2 annotations file)'
            )
        for i, ann in enumerate(ann_doc["annotations"]):
            try:
                answers = ann["answers"]
                annotations[int(ann["question_id"])] = {
                    "answers": tuple(str(a["answer"]) for a in answers),
                    "answer_type": str(ann.get("answer_type", "")),
                    "question_type": str(ann.get("question_type", "")),
                }
            except (KeyError, TypeError, ValueError) as exc:
                raise InputDataError(
                    f"{annotations_path}: annotations[{i}]: expected question_id and answers "
                    f"[{{answer: …}}, …] ({type(exc).__name__}: {exc})"
                ) from None
    out = []
    for i, q in enumerate(doc["questions"]):
        try:
            qid, image_id, text = int(q["question_id"]), int(q["image_id"]), str(q["question"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(
                f"{questions_path}: questions[{i}]: expected question_id, image_id and question "
                f"({type(exc).__name__}: {exc})"
            ) from None
        ann = annotations.get(qid)
        if annotations_path is not None and ann is None:
            raise InputDataError(
                f"{annotations_path}: no annotation for question_id {qid} (questions[{i}] of "
                f"{questions_path.name}): the two files are of different splits?"
            )
        ann = ann or {"answers": (), "answer_type": "", "question_type": ""}
        out.append(Question(qid, image_id, text, ann["answers"], ann["answer_type"], ann["question_type"]))
    return out


def answer_vocab(questions: list[Question], size: int = 3129) -> list[str]:
    """The `size` most frequent normalized answers (each human answer counts), ties broken by text."""
    counts = Counter(normalize_answer(a) for q in questions for a in q.answers)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def read_answer_vocab(path: str | Path) -> list[str]:
    """A given answer vocabulary, in label order: the reference's `ans2label.json` (answer → label)
    or a JSON list. Answers are normalized as training answers are; two that normalize alike, or
    labels that are not 0..n-1, are an error naming the file."""
    doc = _load_json(Path(path), "answer vocabulary")
    if isinstance(doc, dict):
        labels = sorted(doc.values()) if all(isinstance(v, int) for v in doc.values()) else None
        if labels != list(range(len(doc))):
            raise InputDataError(f"{path}: expected answer → label with the labels 0..{len(doc) - 1}, each once")
        answers = [a for a, _ in sorted(doc.items(), key=lambda kv: kv[1])]
    elif isinstance(doc, list) and all(isinstance(a, str) for a in doc):
        answers = doc
    else:
        raise InputDataError(f"{path}: expected an answer → label object (ans2label.json) or a list of answers")
    normalized = [normalize_answer(a) for a in answers]
    if len(set(normalized)) != len(normalized):
        same = next(a for a in normalized if normalized.count(a) > 1)
        raise InputDataError(f"{path}: several answers normalize to {same!r}")
    return normalized


def write_results(predictions: dict[int, str], path: str | Path) -> None:
    """The official results file: [{"question_id": …, "answer": …}, …] in question order."""
    rows = [{"question_id": qid, "answer": ans} for qid, ans in sorted(predictions.items())]
    Path(path).write_text(json.dumps(rows))


def official_scores(predictions: dict[int, str], questions: list[Question]) -> dict[str, float]:
    """Overall accuracy (in %) and per answer type, over the questions with answers."""
    per_type: dict[str, list[float]] = {}
    for q in questions:
        if not q.answers:
            continue
        acc = vqa_accuracy(predictions.get(q.question_id, ""), list(q.answers))
        per_type.setdefault("overall", []).append(acc)
        per_type.setdefault(q.answer_type or "unknown", []).append(acc)
    return {k: 100 * sum(v) / len(v) for k, v in per_type.items()}


def answer_type(answer: str) -> str:
    """The type an answer would have in VQA's annotation: yes/no, number, other."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.replace(".", "", 1).isdigit() else "other"


# --- fine-tuning ---------------------------------------------------------------------------------


class VqaData(TaskData):
    def __init__(
        self, task: VqaTask, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int
    ):
        self.task, self.seed, self.vocab = task, seed, Vocab.from_tokenizer(tokenizer)
        train_q = [q for files in task.train for q in read_vqa(files.questions, files.annotations)]
        self.val_q = read_vqa(task.val.questions, task.val.annotations)
        self.labels = read_answer_vocab(task.answers_file) if task.answers_file else answer_vocab(train_q, task.answers)
        keys = feature_ids(feature_paths, task.images)

        def corpus(questions: list[Question], split: str):
            tokens = tokenize(tokenizer, [q.question for q in questions], max_len)
            rows = zip([keys.get(q.image_id, "") for q in questions], tokens, strict=True)
            return text_corpus(list(rows), local / f"vqa-{split}.arrow", feature_paths, pretrain)

        self.train, self.val = corpus(train_q, "train"), corpus(self.val_q, "val")
        self.skipped = len(train_q) - len(self.train) + len(self.val_q) - len(self.val)
        self.test_q = read_vqa(task.test_questions) if task.test_questions else []
        self.test = corpus(self.test_q, "test") if self.test_q else None
        if not len(self.train):
            raise InputDataError(
                f"VQA: none of the {len(train_q)} training questions has features of its image in the "
                f"downstream set {task.images!r} (configure downstream.images.{task.images})"
            )
        self.stream = Endless(self.train.lengths, task.batch_tokens, seed)
        label_of = {a: i for i, a in enumerate(self.labels)}
        self.targets = [
            soft_targets(list(train_q[int(r)].answers), label_of, task.target_score) for r in self.train.text_row
        ]

    def model_class(self):
        # transformers loads only where a model is built: the evaluate stage and the report import this module
        from uniter.modeling_uniter import UniterForVqa  # noqa: PLC0415

        return UniterForVqa, {"num_answers": len(self.labels), "vqa_loss": self.task.loss}

    def train_batch(self, j: int, score: Score) -> dict:
        ids = self.stream(j)
        batch = pack(*texts_with_regions(self.train, ids, self.vocab, self.task.image_features), self.vocab)
        t = torch.zeros(len(ids), len(self.labels))
        for row, i in enumerate(ids):
            for label, value in self.targets[int(i)].items():
                t[row, label] = value
        batch["targets"] = t
        return batch

    def _predict(self, corpus, questions: list[Question], score: Score) -> dict[int, str]:
        predictions: dict[int, str] = {}
        for ids in eval_batches(np.arange(len(corpus)), corpus.lengths, self.task.batch_tokens, self.seed):
            inputs = texts_with_regions(corpus, ids, self.vocab, self.task.image_features)
            logits = score(pack(*inputs, self.vocab)).logits
            for i, label in zip(ids, logits.float().argmax(-1).tolist(), strict=True):
                predictions[questions[int(corpus.text_row[i])].question_id] = self.labels[label]
        return predictions

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        predictions = self._predict(self.val, self.val_q, score)
        results = [{"question_id": q, "answer": a} for q, a in sorted(predictions.items())]
        files = {ANSWERS: json.dumps(self.labels).encode(), RESULTS: json.dumps(results).encode()}
        return {f"vqa_{k}": v for k, v in official_scores(predictions, self.val_q).items()}, files

    def final_files(self, score: Score) -> dict[str, bytes]:
        """The upload file for the official server: an answer for every test question. A question
        whose image has no features gets the first label (the server scores all or nothing), and
        the log says how many did."""
        if self.test is None:
            return {}
        predictions = self._predict(self.test, self.test_q, score)
        blind = [q.question_id for q in self.test_q if q.question_id not in predictions]
        if blind:
            log.warning("VQA test: %d of %d questions have no image features: answered %r", len(blind),
                        len(self.test_q), self.labels[0])  # fmt: skip
        rows = [{"question_id": q.question_id, "answer": predictions.get(q.question_id, self.labels[0])}
                for q in self.test_q]  # fmt: skip
        return {UPLOAD: json.dumps(rows).encode()}


# --- evaluation ----------------------------------------------------------------------------------


def rescore(files: dict[str, bytes], task: VqaTask) -> Rescored:
    """Official VQA accuracy of the results file on the task's val split, and the answer-type confusion."""
    questions = read_vqa(task.val.questions, task.val.annotations)
    predictions = {int(r["question_id"]): str(r["answer"]) for r in json.loads(files[RESULTS])}
    scores = official_scores(predictions, questions)
    confusion: dict[str, dict[str, int]] = {}
    for q in questions:
        if q.answers:
            row = confusion.setdefault(q.answer_type or "unknown", {})
            kind = answer_type(normalize_answer(predictions.get(q.question_id, "")))
            row[kind] = row.get(kind, 0) + 1
    details = {
        "accuracy_by_type": {k: round(v, 4) for k, v in scores.items()},
        "answer_type_confusion": confusion,
        "questions": sum(1 for q in questions if q.answers),
        "predicted": len(predictions),
    }
    return {"vqa": scores.get("overall", 0.0)}, details


def confusion_notes(run: str, details: dict) -> list[str]:
    """The report's answer-type confusion table of a run."""
    confusion = details.get("answer_type_confusion")
    if not confusion:
        return []
    types = sorted({t for row in confusion.values() for t in row} | set(confusion))
    out = [
        "",
        f"VQA answer types, {run} (rows: the question's type; columns: the predicted answer's type):",
        "",
        "| | " + " | ".join(types) + " |",
        "|---|" + "---:|" * len(types),
    ]
    return out + [f"| {t} | " + " | ".join(str(confusion.get(t, {}).get(u, 0)) for u in types) + " |" for t in types]


TASK = FinetuneTask(
    data=VqaData, predictions=(RESULTS,), rescore=rescore, columns=(("vqa", "VQA"),), notes=confusion_notes
)
