"""The evaluation report in the paper's layout (Table 2): VQA, IR R@1, TR R@1, NLVR2, RefCOCO+ and
their sum, Meta-Sum — as JSON, Markdown, and a self-contained HTML page (every Markdown table, the
pictures inline), and pictures drawn with matplotlib (`PICTURES`): `meta_sum.png` (scores and
Meta-Sum per run), `ablation.png` (a bar group per variant) and `finetune_curves.png` (validation
metrics over fine-tuning steps, per task).

A run lacking a column (its task not configured) shows "–" there, and its Meta-Sum is marked
partial (the sum of what it has), so rows are never silently compared over different columns.
The columns, and any lines under the table, are the tasks' (`tasks/`).
"""

from __future__ import annotations

import base64
import html
import textwrap
from dataclasses import dataclass, field

from uniter import plots
from uniter.finetune.tasks import FINETUNE_TASKS

COLUMNS = tuple(column for task in FINETUNE_TASKS.values() for column in task.columns)  # (score key, label)


@dataclass
class Run:
    name: str  # a row: "this config", or an ablation variant
    scores: dict[str, float]  # column key → score in %
    details: dict[str, dict] = field(default_factory=dict)  # per task: answer-type confusion, recall curves…
    # per task: validation metric → (step, value) over fine-tuning (the finetune_metrics table)
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

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


PICTURES = {  # file name → what it shows (the HTML's caption); written beside the report
    "meta_sum.png": "scores per task and Meta-Sum, per run",
    "ablation.png": "scores per ablation variant, a bar per task",
    "finetune_curves.png": "fine-tuning validation metrics over steps, per task",
}


def pictures(runs: list[Run], ablation: bool = False) -> dict[str, bytes]:
    """The report's pictures by file name: Meta-Sum bars, with `ablation` the per-variant chart, and
    the validation curves when the runs carry any."""
    out = {"meta_sum.png": bar_chart_png(runs)}
    if ablation:
        out["ablation.png"] = ablation_chart_png(runs)
    if any(r.curves for r in runs):
        out["finetune_curves.png"] = finetune_curves_png(runs)
    return out


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _table_html(rows: list[str]) -> str:
    head, rest = _cells(rows[0]), rows[1:]
    if rest and all(set(c) <= set("-:") and c for c in _cells(rest[0])):  # the Markdown rule row
        rest = rest[1:]
    th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rest)
    return f"<table><tr>{th}</tr>{body}</table>"


def markdown_html(markdown: str) -> str:
    """The report's Markdown as HTML: pipe tables and plain lines, all that `to_markdown` and the
    tasks' notes write (so the HTML holds every table of the Markdown, by construction)."""
    out: list[str] = []
    table: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(_table_html(table))
            table = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def to_html(runs: list[Run], images: dict[str, bytes] | None = None) -> str:
    """A self-contained page: the Markdown report's tables, and `images` (PNG bytes by file name,
    see `pictures`) inline as data URIs."""
    figures = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(data).decode()}' "
        f"alt='{html.escape(PICTURES.get(name, name))}'>"
        f"<figcaption>{html.escape(PICTURES.get(name, name))} ({html.escape(name)})</figcaption></figure>"
        for name, data in (images or {}).items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>UNITER evaluation</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;"
        "padding:4px 8px;text-align:right}td:first-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>UNITER evaluation</h1>\n{markdown_html(to_markdown(runs))}\n{figures}</body></html>\n"
    )


def _bar_values(ax, bars, fmt: str = "{:.1f}") -> None:
    ax.bar_label(bars, labels=[fmt.format(b.get_height()) for b in bars], fontsize=7, padding=2)


def bar_chart_png(runs: list[Run], width: int = 1000, height: int = 460) -> bytes:
    """Left: a group per column, a bar per run (scores 0–100); right: each run's Meta-Sum. Values on the bars."""
    fig = plots.figure(width, height)
    scores, meta = fig.subplots(1, 2, width_ratios=[3, 1])
    colours = [f"C{i % 10}" for i in range(len(runs))]
    bar_w = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        have = [(g, run.scores[key]) for g, (key, _) in enumerate(COLUMNS) if key in run.scores]
        if have:
            xs = [g - 0.4 + (i + 0.5) * bar_w for g, _ in have]
            _bar_values(scores, scores.bar(xs, [v for _, v in have], bar_w, color=colours[i], label=run.name))
    scores.set_xticks(range(len(COLUMNS)), [label for _, label in COLUMNS])
    scores.set_ylim(0, 110)
    scores.set_ylabel("score (%)")
    scores.set_title("scores per task (missing: not configured)", fontsize=10)
    names = [textwrap.fill(r.name, 14) + ("" if r.complete else "\n(partial)") for r in runs]
    bars = meta.bar(range(len(runs)), [r.meta_sum for r in runs], 0.6, color=colours)
    _bar_values(meta, bars, "{:.2f}")
    meta.set_xticks(range(len(runs)), names, fontsize=8)
    meta.set_ylim(0, max([100.0, *(r.meta_sum for r in runs)]) * 1.12)
    meta.set_title("Meta-Sum", fontsize=10)
    if runs:
        fig.legend(loc="outside lower center", ncols=min(len(runs), 4), fontsize=9)
    fig.suptitle("UNITER evaluation")
    return plots.png_bytes(fig)


def ablation_chart_png(runs: list[Run], height: int = 480) -> bytes:
    """A group per variant (run), a bar per task column it has, values on the bars."""
    columns = [(key, label) for key, label in COLUMNS if any(key in r.scores for r in runs)]
    fig = plots.figure(max(900, 160 * len(runs) * max(1, len(columns)) // 2 + 200), height)
    ax = fig.subplots()
    bar_w = 0.8 / max(1, len(columns))
    for c, (key, label) in enumerate(columns):
        have = [(i, r.scores[key]) for i, r in enumerate(runs) if key in r.scores]
        xs = [i - 0.4 + (c + 0.5) * bar_w for i, _ in have]
        _bar_values(ax, ax.bar(xs, [v for _, v in have], bar_w, color=f"C{c % 10}", label=label))
    ax.set_xticks(range(len(runs)), [textwrap.fill(r.name, 18) for r in runs], fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_ylabel("score (%)")
    ax.set_xlabel("variant")
    if columns:
        ax.legend(title="task", fontsize=8, loc="upper right")
    fig.suptitle("ablation: scores per pretraining variant")
    return plots.png_bytes(fig)


def finetune_curves_png(runs: list[Run]) -> bytes:
    """A panel per task, a line per (run, validation metric) over fine-tuning steps."""
    tasks = sorted({task for r in runs for task in r.curves})
    panels = {
        task: {
            (metric if len(runs) == 1 else f"{r.name}: {metric}"): points
            for r in runs
            for metric, points in r.curves.get(task, {}).items()
        }
        for task in tasks
    }
    return plots.curves_png(panels, "fine-tuning: validation metrics")
