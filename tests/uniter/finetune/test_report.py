"""The Meta-Sum report: the paper's columns, partial rows marked; the HTML holds every table of the
Markdown and every picture inline; the pictures are real, readable PNGs."""

from __future__ import annotations

import base64
import html
import re

from tests.fixtures.pictures import check_png
from uniter.finetune.report import (
    PICTURES,
    Run,
    bar_chart_png,
    pictures,
    to_html,
    to_json,
    to_markdown,
)
from uniter.finetune.tasks.vqa import answer_type


def test_meta_sum_table():
    full = Run("L11", {"vqa": 72.47, "ir_r1": 83.72, "tr_r1": 93.03, "nlvr2": 76.91, "refcoco+": 74.80})
    part = Run("vqa only", {"vqa": 70.0})
    assert round(full.meta_sum, 2) == 400.93 and full.complete  # the paper's L11 row sums to its Meta-Sum
    md = to_markdown([full, part]).splitlines()
    assert md[0] == "| run | VQA | IR R@1 | TR R@1 | NLVR2 | RefCOCO+ | Meta-Sum |"
    assert md[2] == "| L11 | 72.47 | 83.72 | 93.03 | 76.91 | 74.80 | 400.93 |"
    assert md[3] == "| vqa only | 70.00 | – | – | – | – | 70.00 (partial) |"
    data = to_json([full, part])
    assert data["runs"][1]["complete"] is False and data["columns"][-1] == "Meta-Sum"
    assert "<td>–</td>" in to_html([full, part])
    check_png(bar_chart_png([full, part]))


def _runs() -> list[Run]:
    confusion = {"yes/no": {"yes/no": 5, "other": 1}, "other": {"other": 3, "number": 1}}
    curves = {"vqa": {"vqa_overall": [(15, 40.0), (30, 55.5)], "vqa_yes/no": [(15, 50.0), (30, 70.0)]}}
    return [
        Run("L11 full", {"vqa": 72.47, "ir_r1": 83.72, "tr_r1": 93.03, "nlvr2": 76.91, "refcoco+": 74.80}),
        Run("MLM only", {"vqa": 70.0}, {"vqa": {"answer_type_confusion": confusion}}, curves),
    ]


def test_html_holds_every_markdown_table_and_every_picture():
    runs = _runs()
    md = to_markdown(runs)
    assert "VQA answer types, MLM only" in md  # the task's notes: a second table
    images = pictures(runs, ablation=True)
    assert list(images) == ["meta_sum.png", "ablation.png", "finetune_curves.png"] and set(images) <= set(PICTURES)
    page = to_html(runs, images)
    # every Markdown table, row for row and cell for cell: its header as <th>, the rest as <td>
    lines = md.splitlines()
    headers = [i for i in range(len(lines) - 1) if lines[i].startswith("|") and lines[i + 1].startswith("|--")]
    assert len(headers) == 2
    for i, line in enumerate(lines):
        if not line.startswith("|") or line.startswith("|--"):
            continue
        tag = "th" if i in headers else "td"
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>" in page, line
    assert html.escape("VQA answer types, MLM only (rows: the question's type") in page
    # each picture inline, byte for byte
    inline = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert [base64.b64decode(x) for x in inline] == list(images.values())
    for name, data in images.items():
        check_png(data)
        assert html.escape(PICTURES[name]) in page


def test_pictures_without_curves_or_ablation():
    runs = _runs()[:1]
    assert list(pictures(runs)) == ["meta_sum.png"]
    assert "<img" not in to_html(runs) and "<img" in to_html(runs, pictures(runs))


def test_answer_types():
    assert [answer_type(a) for a in ("yes", "no", "2", "3.5", "red")] == [
        "yes/no",
        "yes/no",
        "number",
        "number",
        "other",
    ]
