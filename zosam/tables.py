"""Tables for people and for spreadsheets: one formatter for every command and benchmark.

Cells are formatted once (``cell``: floats to significant digits, booleans as yes/no,
``None`` as empty), then laid out as fixed-width text (``text_table``), Markdown
(``markdown_table``) or written raw to CSV (``write_csv``). Nothing here imports from
``zosam``: every layer may use it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without trailing zeros (``0.0817189`` -> ``0.0817``)."""
    if math.isnan(x):
        return "-"
    return f"{x:.{digits}g}"


def cell(v: Any, digits: int = 4) -> str:
    """One table cell: floats to ``digits`` significant digits (scientific below 1e-3), bools yes/no."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def mean_pm(mean: float, std: float | None = None, *, decimals: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` with fixed decimals (``scale=100`` for fractions shown in percent).

    ``-`` for a missing mean (NaN); ``n/a`` for a missing spread (one seed) when one was asked for.
    """
    if math.isnan(mean):
        return "-"
    out = f"{scale * mean:.{decimals}f}"
    if std is not None:
        out += " ± " + ("n/a" if math.isnan(std) else f"{scale * std:.{decimals}f}")
    return out


def distinct_digits(values: Iterable[str | None], digits: int = 3) -> dict[str, str]:
    """How to show a column of numbers kept as strings (MLflow params): the fewest significant
    digits, at least ``digits``, that keep different values different.

    Returns ``{raw: shown}``; values that are not numbers are shown as they are.
    """
    raw = sorted({v for v in values if v is not None})
    nums: dict[str, float] = {}
    for v in raw:
        try:
            nums[v] = float(v)
        except ValueError:
            continue
    shown = {v: v for v in raw}
    for d in range(digits, 18):
        trial = {v: sig(x, d) for v, x in nums.items()}
        # Two raw spellings of one number ("0.1", "0.10") may share a label; different numbers may not.
        if len({trial[v] for v in nums}) == len(set(nums.values())):
            shown.update(trial)
            break
    return shown


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A fixed-width table: header, a rule, one line per row. ``align``: ``<`` or ``>`` per column."""
    cells = [[c if isinstance(c, str) else cell(c) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=True)]
    align = list(align) if align is not None else ["<"] * len(header)

    def line(items: Sequence[str]) -> str:
        return "  ".join(f"{x:{a}{w}}" for x, a, w in zip(items, align, widths, strict=True)).rstrip()

    return "\n".join([line(list(header)), line(["-" * w for w in widths]), *map(line, cells)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown (GitHub) table; ``|`` inside cells is escaped."""
    esc = lambda x: (x if isinstance(x, str) else cell(x)).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(out) + "\n"


def dict_rows(rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of dict rows (``columns`` default: the first row's keys)."""
    columns = list(columns or (rows[0].keys() if rows else ()))
    return columns, [[cell(r.get(c)) for c in columns] for r in rows]


def format_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Dict rows as a fixed-width text table (``(no rows)`` when empty)."""
    return text_table(*dict_rows(rows, columns)) if rows else "(no rows)"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Dict rows as CSV, raw values; the columns are every key in first-seen order."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return Path(path)
