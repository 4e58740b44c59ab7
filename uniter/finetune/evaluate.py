"""The evaluate stage: every fine-tuned task's predictions re-scored against its evaluation files
with the official metrics, and the report (paper layout, Meta-Sum) as JSON, Markdown, HTML and PNG.

reader (the finetune artifact's results files) → metrics (`vqa.evaluate`, …) → report files and
an `evaluation` table (run, task, metric, value) that `uniter sql` can query.
"""

from __future__ import annotations

import csv
import io
import json
import logging

import numpy as np
import pyarrow as pa

from pipeline.artifact import Artifact
from pipeline.stage import Stage, StageContext, now
from uniter.finetune import nlvr2, report, retrieval, vqa
from uniter.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)


def score_vqa(results: list[dict], task) -> tuple[dict[str, float], dict]:
    """Official VQA accuracy of a results file on the task's val split, and the answer-type confusion."""
    questions = vqa.read_vqa(task.val.questions, task.val.annotations)
    predictions = {int(r["question_id"]): str(r["answer"]) for r in results}
    scores = vqa.evaluate(predictions, questions)
    confusion: dict[str, dict[str, int]] = {}
    for q in questions:
        if q.answers:
            row = confusion.setdefault(q.answer_type or "unknown", {})
            kind = report.vqa_answer_type(vqa.normalize_answer(predictions.get(q.question_id, "")))
            row[kind] = row.get(kind, 0) + 1
    return scores, {"accuracy_by_type": {k: round(v, 4) for k, v in scores.items()}, "answer_type_confusion": confusion,
                    "questions": sum(1 for q in questions if q.answers), "predicted": len(predictions)}


def evaluate_run(storage, finetune_key: str, cfg: FinetuneConfig, name: str) -> report.Run:
    art = Artifact(storage, "finetune", finetune_key)
    run = report.Run(name, {})
    if cfg.vqa is not None:
        results = json.loads(storage.read_bytes(art.file_key("files/vqa/results.json")))
        scores, details = score_vqa(results, cfg.vqa)
        run.scores["vqa"] = scores.get("overall", 0.0)
        run.details["vqa"] = details
    if cfg.nlvr2 is not None:
        rows = csv.reader(io.StringIO(storage.read_bytes(art.file_key("files/nlvr2/predictions.csv")).decode()))
        predictions = {ident: value == "True" for ident, value in rows}
        scores = nlvr2.evaluate(predictions, nlvr2.read_nlvr2(cfg.nlvr2.dev))
        run.scores["nlvr2"] = scores.get("accuracy", 0.0)
        run.details["nlvr2"] = {"accuracy_by_type": scores}
    if cfg.retrieval is not None:
        matrix = np.load(io.BytesIO(storage.read_bytes(art.file_key("files/retrieval/scores.npy"))), allow_pickle=False)
        meta = json.loads(storage.read_bytes(art.file_key("files/retrieval/eval.json")))
        scores = retrieval.recall_at_k(matrix, np.array(meta["txt2img"]))
        run.scores["ir_r1"], run.scores["tr_r1"] = scores["ir_r1"], scores["tr_r1"]
        run.details["retrieval"] = {"accuracy_by_type": scores, "recall_curve": meta["recall_curve"],
                                    "texts": int(matrix.shape[0]), "images": int(matrix.shape[1])}
    if cfg.refcoco is not None:
        from uniter.finetune.refer import is_hit, read_refer

        predictions = json.loads(storage.read_bytes(art.file_key("files/refcoco/predictions.json")))
        truth = {e.sent_id: e.box for e in read_refer(cfg.refcoco.refs, cfg.refcoco.instances)[0]
                 if e.split == cfg.refcoco.eval_split}
        accuracy = {}
        for setting in ("det", "gt"):
            hits = [bool(is_hit(np.array(p["box"]), np.array(truth[p["sent_id"]]))) for p in predictions
                    if p["sent_id"] in truth and p.get("setting", "det") == setting]
            if hits:
                accuracy[setting] = 100 * float(np.mean(hits))
        if "det" in accuracy:  # the paper's ablation column is RefCOCO+ val on detected boxes (val^d)
            run.scores["refcoco+"] = accuracy["det"]
        run.details["refcoco"] = {"accuracy_by_type": {f"accuracy_{k}": v for k, v in accuracy.items()},
                                  "expressions": len(truth)}
    return run


def write_report(ctx: StageContext, runs: list[report.Run]) -> None:
    rows = [(r.name, task, metric, float(value)) for r in runs for task, d in r.details.items()
            for metric, value in d.get("accuracy_by_type", {}).items()]
    rows += [(r.name, "meta_sum", "meta_sum", float(r.meta_sum)) for r in runs]
    table = pa.table({"run": [x[0] for x in rows], "task": [x[1] for x in rows], "metric": [x[2] for x in rows],
                      "value": pa.array([x[3] for x in rows], pa.float64())})
    extras = {"report.json": json.dumps(report.to_json(runs), indent=2).encode(),
              "report.md": report.to_markdown(runs).encode(),
              "report.html": report.to_html(runs).encode(),
              "meta_sum.png": report.bar_chart_png(runs)}
    stats = {"runs": len(runs), "scores": {r.name: {k: round(v, 4) for k, v in r.scores.items()} | {"meta_sum": round(r.meta_sum, 4)}
                                           for r in runs}}
    ctx.write_shard("report", {"evaluation": table}, stats, now(), extras=extras)
    log.info("evaluate:\n%s", report.to_markdown(runs))


def run_evaluate(ctx: StageContext) -> None:
    cfg: FinetuneConfig = ctx.extra["finetune"]
    write_report(ctx, [evaluate_run(ctx.storage, ctx.inputs["finetune"].key, cfg, "this config")])


EVALUATE = Stage(
    name="evaluate",
    version=1,
    run=run_evaluate,
    inputs=("finetune",),
    tables=("evaluation",),
    description="score the fine-tuned tasks with the official metrics; the Meta-Sum report",
    extra_config=("finetune",),
)
