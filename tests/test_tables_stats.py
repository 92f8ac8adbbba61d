"""The shared helpers under compare and the benchmarks: seed statistics and table layout, by hand."""

from __future__ import annotations

import math
import warnings

import pytest

from zosam.plotting import pyplot, save
from zosam.stats import mean_or_none, seed_stats
from zosam.tables import cell, distinct_digits, markdown_table, mean_pm, text_table


def test_seed_stats_by_hand() -> None:
    s = seed_stats([1.0, 2.0, 6.0])
    assert s.n == 3 and s.mean == 3.0
    assert s.std == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert s.ci95 == pytest.approx(4.302652729911275 * s.std / math.sqrt(3))  # t(0.975, df=2)
    one, none = seed_stats([0.5]), seed_stats([])
    assert (one.mean, one.std, one.ci95) == (0.5, None, None)
    assert none.n == 0 and math.isnan(none.mean)
    assert mean_or_none([None, 1.0, math.nan, 3.0]) == 2.0 and mean_or_none([None]) is None


def test_cells_and_digits() -> None:
    assert [cell(v) for v in (None, True, 0.08171890156969401, 1.5e-5, 0.0, 12)] == \
        ["", "yes", "0.08172", "1.50e-05", "0", "12"]
    assert mean_pm(0.61234, 0.0123, scale=100) == "61.23 ± 1.23" and mean_pm(0.5, math.nan, scale=100) == "50.00 ± n/a"
    assert mean_pm(math.nan) == "-"
    shown = distinct_digits(["0.08171890156969401", "0.0817189", "0.05", "0.050", "adam", None])
    assert shown == {"0.08171890156969401": "0.081718902", "0.0817189": "0.0817189", "0.05": "0.05",
                     "0.050": "0.05", "adam": "adam"}


def test_text_and_markdown_layout() -> None:
    text = text_table(["a", "value"], [["x", 1.23456], ["long cell", "y"]], align="<>")
    assert text.splitlines() == ["a          value", "---------  -----", "x          1.235", "long cell      y"]
    md = markdown_table(["k", "v"], [["a|b", 0.5]])
    assert md == "| k | v |\n|---|---|\n| a\\|b | 0.5 |\n"


def test_plotting_uses_agg_and_crops_to_what_is_drawn(tmp_path) -> None:
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1], label="a label much longer than the axes are wide, placed outside on the right")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save(fig, tmp_path / "f.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.width > 3 * 110 * 1.5  # widened to hold the legend, not cut at the figure's 3 inches
    assert not plt.fignum_exists(fig.number)  # closed
