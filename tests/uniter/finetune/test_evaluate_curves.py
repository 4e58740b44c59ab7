"""The evaluate stage's fine-tuning curves: read from a finetune artifact's `finetune_metrics` table."""

from __future__ import annotations

import time

import pyarrow as pa

from contract.artifact import Artifact
from storage import open_storage
from uniter.finetune.evaluate import validation_curves


def _metrics(task: str, rows: list[tuple[int, str, float]]) -> pa.Table:
    return pa.table(
        {
            "task": pa.array([task] * len(rows), pa.string()),
            "step": pa.array([r[0] for r in rows], pa.int64()),
            "name": pa.array([r[1] for r in rows], pa.string()),
            "value": pa.array([r[2] for r in rows], pa.float64()),
        }
    )


def test_validation_curves_per_task_from_the_finetune_metrics(tmp_path):
    art = Artifact(open_storage(str(tmp_path)), "finetune", "k" * 16)
    shards = {
        "nlvr2-final": art.write_shard(
            "nlvr2-final",
            {"finetune_metrics": _metrics("nlvr2", [(0, "loss/nlvr2", 0.7), (10, "val/nlvr2_accuracy", 51.0)])},
            {},
            "run",
            time.time(),
        ),
        "vqa-final": art.write_shard(
            "vqa-final",
            {
                "finetune_metrics": _metrics(
                    "vqa",
                    [(s, "loss/vqa", 1.0 / (s + 1)) for s in range(30)]
                    + [(30, "val/vqa_overall", 55.5), (15, "val/vqa_overall", 40.0), (15, "lr", 1e-4)],
                )
            },
            {},
            "run",
            time.time(),
        ),
    }
    art.publish(stage_version=1, config_sha256="c", inputs={}, code_version="t", shards=shards, seconds=0.0)
    assert validation_curves(art) == {
        "nlvr2": {"nlvr2_accuracy": [(10, 51.0)]},
        "vqa": {"vqa_overall": [(15, 40.0), (30, 55.5)]},
    }
    assert validation_curves(Artifact(art.storage, "finetune", "missing")) == {}
