"""The shared drawing helpers: curves from a metrics table's rows, a line chart per panel, PNG bytes
that depend on the data only."""

from __future__ import annotations

import pytest

from tests.fixtures.pictures import check_png
from uniter.plots import curves_png, series

ROWS = [
    {"step": s, "name": n, "value": v}
    for s in range(40)
    for n, v in (("loss/mlm" if s % 2 else "loss/itm", 5.0 / (s + 1)), ("lr", 1e-4))
] + [{"step": s, "name": "val/mlm_acc", "value": s / 40} for s in (19, 39)]


def test_series_groups_by_name_under_a_prefix():
    losses = series(reversed(ROWS), "loss/")
    assert list(losses) == ["itm", "mlm"] and len(losses["mlm"]) == 20
    assert losses["itm"][:2] == [(0, 5.0), (2, 5.0 / 3)]  # sorted by step, whatever the rows' order
    assert series(ROWS, "val/") == {"mlm_acc": [(19, 19 / 40), (39, 39 / 40)]}


def test_curves_png_draws_each_panel_and_is_deterministic():
    panels = {"training loss": series(ROWS, "loss/"), "validation": series(ROWS, "val/"), "empty": {}}
    png = curves_png(panels, "pretraining")
    image = check_png(png)
    assert image.height >= 600  # two panels (the empty one left out)
    assert png == curves_png(panels, "pretraining") and b"matplotlib" not in png
    with pytest.raises(ValueError, match="no curve"):
        curves_png({"empty": {}}, "nothing")
