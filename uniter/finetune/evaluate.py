"""The evaluate stage: every fine-tuned task's predictions re-scored against its evaluation files
with the official metrics, and the report (paper layout, Meta-Sum) as JSON, Markdown, HTML and
pictures (`report.PICTURES`: meta_sum.png, and finetune_curves.png from the finetune artifact's
`finetune_metrics` table).

reader (the finetune artifact's prediction files and metrics) → each task's `rescore` (`tasks/`) →
report files and an `evaluation` table (run, task, metric, value) that `uniter sql` can query.
"""

from __future__ import annotations

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from contract.artifact import Artifact
from contract.stage import StageContext, now
from uniter.finetune import report
from uniter.finetune.config import FinetuneConfig
from uniter.finetune.tasks import FINETUNE_TASKS
from uniter.plots import series

log = logging.getLogger(__name__)


def evaluate_run(storage, finetune_key: str, cfg: FinetuneConfig, name: str) -> report.Run:
    """Each configured task's prediction files in the finetune artifact, re-scored by the task."""
    art = Artifact(storage, "finetune", finetune_key)
    run = report.Run(name, {})
    for task_name, task_cfg in cfg.tasks().items():
        task = FINETUNE_TASKS[task_name]
        files = {path: storage.read_bytes(art.file_key(f"files/{path}")) for path in task.predictions}
        scores, details = task.rescore(files, task_cfg)
        run.scores.update(scores)
        run.details[task_name] = details
    run.curves = validation_curves(art)
    return run


def validation_curves(art: Artifact) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per task, each validation metric over steps, from the finetune artifact's `finetune_metrics`."""
    manifest = art.manifest()
    rows = []
    for f in manifest.tables.get("finetune_metrics", []) if manifest else []:
        rows += pq.read_table(io.BytesIO(art.storage.read_bytes(art.file_key(f.path)))).to_pylist()
    return {task: series([r for r in rows if r["task"] == task], "val/") for task in sorted({r["task"] for r in rows})}


def write_report(ctx: StageContext, runs: list[report.Run]) -> None:
    rows = [
        (r.name, task, metric, float(value))
        for r in runs
        for task, d in r.details.items()
        for metric, value in d.get("accuracy_by_type", {}).items()
    ]
    rows += [(r.name, "meta_sum", "meta_sum", float(r.meta_sum)) for r in runs]
    table = pa.table(
        {
            "run": [x[0] for x in rows],
            "task": [x[1] for x in rows],
            "metric": [x[2] for x in rows],
            "value": pa.array([x[3] for x in rows], pa.float64()),
        }
    )
    pictures = report.pictures(runs)
    extras = {
        "report.json": json.dumps(report.to_json(runs), indent=2).encode(),
        "report.md": report.to_markdown(runs).encode(),
        "report.html": report.to_html(runs, pictures).encode(),
        **pictures,
    }
    stats = {
        "runs": len(runs),
        "scores": {
            r.name: {k: round(v, 4) for k, v in r.scores.items()} | {"meta_sum": round(r.meta_sum, 4)} for r in runs
        },
    }
    ctx.write_shard("report", {"evaluation": table}, stats, now(), extras=extras)
    log.info("evaluate:\n%s", report.to_markdown(runs))


def run_evaluate(ctx: StageContext) -> None:
    cfg: FinetuneConfig = ctx.extra["finetune"]
    write_report(ctx, [evaluate_run(ctx.storage, ctx.inputs["finetune"].key, cfg, "this config")])
