"""The Meta-Sum report: the paper's columns, partial rows marked, the chart is a real PNG."""

from __future__ import annotations

import struct

from uniter.finetune.report import Run, bar_chart_png, to_html, to_json, to_markdown
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
    png = bar_chart_png([full, part])
    # the header, not Image.open: another test may have lowered PIL's pixel limit in this process
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (720, 360)


def test_answer_types():
    assert [answer_type(a) for a in ("yes", "no", "2", "3.5", "red")] == [
        "yes/no",
        "yes/no",
        "number",
        "number",
        "other",
    ]
