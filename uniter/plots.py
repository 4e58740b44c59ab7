"""Pictures with matplotlib, shared by the stages and the analysis: a figure on the Agg canvas (no
pyplot, no display, no global state), its PNG bytes, and line charts of metrics tables' curves.

matplotlib is imported inside the functions: the modules that import this one are also read by
commands that never draw, which must start without it (tests/test_layers.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
Points = Sequence[tuple[int, float]]  # (step, value), by step


def figure(width_px: int, height_px: int) -> Figure:
    """An empty figure of that size on its own Agg canvas, laid out so labels are never cut."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 -- matplotlib: only when drawing
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # NOTE: no "Software" text chunk: the bytes then depend on the data only, not on matplotlib's
    # version (artifacts' digests cover these files; PNG carries no date unless asked).
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def series(rows: Iterable[Mapping[str, Any]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """A metrics table's rows (step, name, value) whose name starts with `prefix`, as one curve per
    name (the prefix cut off), each sorted by step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["name"].startswith(prefix):
            out.setdefault(r["name"][len(prefix) :], []).append((int(r["step"]), float(r["value"])))
    return {name: sorted(points) for name, points in sorted(out.items())}


def curves_png(panels: Mapping[str, Mapping[str, Points]], title: str, width_px: int = 960) -> bytes:
    """One panel per entry (titled by its key, empty ones left out), one line per curve over steps.
    Curves of a few points (a validation every N steps) get markers, so a single point shows."""
    panels = {name: curves for name, curves in panels.items() if any(curves.values())}
    if not panels:
        raise ValueError(f"{title}: no curve to draw")
    fig = figure(width_px, 120 + 300 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (name, curves) in zip(axes, panels.items(), strict=True):
        for label, points in curves.items():
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            few = len(points) <= 30
            ax.plot(steps, values, label=label, marker="o" if few else None, markersize=4, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    return png_bytes(fig)
