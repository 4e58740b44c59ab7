"""What a fine-tuning task provides, as the finetune and evaluate stages use it.

A task is one module (`vqa.py`, …) and one line in the registry (`__init__.py`), under the name of
its config field (`FinetuneConfig.<name>`, a `TaskConfig`). The finetune stage builds the task's
`TaskData` from that config, trains the model class it names (the loss is the model's own
`output.loss`) and publishes the files its `evaluate` returns; the evaluate stage re-scores the
task's prediction files with its official metric (`rescore`) and the report shows its columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Score = Callable[[dict], Any]  # a batch → the model's output, in eval mode without gradient
Rescored = tuple[dict[str, float], dict]  # (report column key → score in %, the task's details in report.json)


class TaskData(Protocol):
    """A task's examples in one worker process: its files joined with the downstream features
    (`task_features`, memory-mapped through `Corpus`)."""

    skipped: int  # examples left out (no features of their image, …), in the final shard's stats

    def __init__(
        self, task, tokenizer, feature_paths: list[Path], local: Path, pretrain, max_len: int, seed: int
    ) -> None:
        """`task`: its config section; `local`: a scratch folder; `pretrain`: the region selection."""

    def model_class(self) -> tuple[type, dict[str, Any]]:
        """The head model (`uniter.modeling_uniter`) and its config keywords."""
        ...

    def prepare(self, model, from_pretrained: bool) -> None:
        """Changes to the built model before training; most tasks need none."""
        return None  # a body, so that this default is inherited rather than abstract

    def train_batch(self, j: int, score: Score) -> dict:
        """The j-th training micro-batch, a pure function of j (so a resumed run repeats an
        uninterrupted one); `score` is the current model, for tasks that mine negatives."""
        ...

    def evaluate(self, score: Score) -> tuple[dict[str, float], dict[str, bytes]]:
        """Metrics on the evaluation split, and the files to publish (path under `files/` → bytes),
        the task's `predictions` among them."""
        ...

    # optional: `final_files(score) -> dict[str, bytes]`, files only the final model makes (VQA's
    # test-dev upload), published with the last evaluation's


@dataclass(frozen=True)
class FinetuneTask:
    data: type[TaskData]
    predictions: tuple[str, ...]  # the files `data.evaluate` writes and `rescore` reads (under files/)
    rescore: Callable[[dict[str, bytes], Any], Rescored]  # (those files' bytes, the task's config) → official scores
    columns: tuple[tuple[str, str], ...]  # report columns it fills: (score key, label)
    notes: Callable[[str, dict], list[str]] | None = None  # Markdown lines under the table: (run name, details)
