"""The evaluation report in the paper's layout (Table 2): VQA, IR R@1, TR R@1, NLVR2, RefCOCO+ and
their sum, Meta-Sum — as JSON, Markdown, HTML, and a bar chart (PNG, drawn with Pillow).

A run lacking a column (its task not configured) shows "–" there, and its Meta-Sum is marked
partial (the sum of what it has), so rows are never silently compared over different columns.
The columns, and any lines under the table, are the tasks' (`tasks/`).
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from uniter.finetune.tasks import FINETUNE_TASKS

COLUMNS = tuple(column for task in FINETUNE_TASKS.values() for column in task.columns)  # (score key, label)


@dataclass
class Run:
    name: str  # a row: "this config", or an ablation variant
    scores: dict[str, float]  # column key → score in %
    details: dict[str, dict] = field(default_factory=dict)  # per task: answer-type confusion, recall curves…

    @property
    def meta_sum(self) -> float:
        return sum(self.scores.get(k, 0.0) for k, _ in COLUMNS)

    @property
    def complete(self) -> bool:
        return all(k in self.scores for k, _ in COLUMNS)


def _cell(run: Run, key: str) -> str:
    return f"{run.scores[key]:.2f}" if key in run.scores else "–"


def _meta(run: Run) -> str:
    return f"{run.meta_sum:.2f}" + ("" if run.complete else " (partial)")


def to_json(runs: list[Run]) -> dict:
    return {
        "columns": [label for _, label in COLUMNS] + ["Meta-Sum"],
        "runs": [
            {
                "name": r.name,
                "scores": r.scores,
                "meta_sum": round(r.meta_sum, 4),
                "complete": r.complete,
                "details": r.details,
            }
            for r in runs
        ],
    }


def to_markdown(runs: list[Run]) -> str:
    head = "| run | " + " | ".join(label for _, label in COLUMNS) + " | Meta-Sum |"
    rule = "|---|" + "---:|" * (len(COLUMNS) + 1)
    rows = [f"| {r.name} | " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + f" | {_meta(r)} |" for r in runs]
    out = [head, rule, *rows]
    for r in runs:
        for name, task in FINETUNE_TASKS.items():
            if task.notes is not None and name in r.details:
                out += task.notes(r.name, r.details[name])
    return "\n".join(out) + "\n"


def to_html(runs: list[Run], chart_name: str = "meta_sum.png") -> str:
    cells = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td>"
        + "".join(f"<td>{_cell(r, k)}</td>" for k, _ in COLUMNS)
        + f"<td><b>{html.escape(_meta(r))}</b></td></tr>"
        for r in runs
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>UNITER evaluation</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:4px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>"
        "<h1>UNITER evaluation</h1>"
        f"<table><tr><th>run</th>{cells}<th>Meta-Sum</th></tr>{body}</table>"
        f"<p><img src='{html.escape(chart_name)}' alt='scores per run'></p></body></html>\n"
    )


def bar_chart_png(runs: list[Run], width: int = 720, height: int = 360) -> bytes:
    """Grouped bars: one group per column, one bar per run (scores 0–100)."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, bottom, top = 40, height - 60, 20
    draw.line([(left, top), (left, bottom), (width - 10, bottom)], fill="black")
    for tick in range(0, 101, 25):
        y = bottom - (bottom - top) * tick / 100
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((6, y - 6), str(tick), fill="black")
    group_w = (width - left - 20) / len(COLUMNS)
    bar_w = max(2.0, (group_w - 10) / max(1, len(runs)))
    for g, (key, label) in enumerate(COLUMNS):
        x0 = left + 10 + g * group_w
        for i, run in enumerate(runs):
            if key in run.scores:
                h = (bottom - top) * max(0.0, min(100.0, run.scores[key])) / 100
                draw.rectangle(
                    [x0 + i * bar_w, bottom - h, x0 + (i + 1) * bar_w - 2, bottom], fill=palette[i % len(palette)]
                )
        draw.text((x0, bottom + 6), label, fill="black")
    for i, run in enumerate(runs):  # legend
        y = bottom + 24 + 12 * (i % 3)
        x = left + 200 * (i // 3)
        draw.rectangle([x, y, x + 8, y + 8], fill=palette[i % len(palette)])
        draw.text((x + 12, y - 2), f"{run.name}: Meta-Sum {_meta(run)}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
