"""Where output goes: results on stdout; progress, warnings and errors on stderr.

Progress bars (tqdm, with rate and ETA) are drawn on stderr only when stderr is a
terminal, so logs, pipes and CI output hold plain lines and no carriage returns.
Imports nothing of the project (usable from every layer).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def eprint(*args: Any, sep: str = " ", end: str = "\n") -> None:
    """``print`` to stderr (a progress or status line, a warning, an error), flushed; above
    any live progress bar, which is redrawn below it."""
    if progress_enabled():
        tqdm.write(sep.join(map(str, args)), file=sys.stderr, end=end)
        sys.stderr.flush()
    else:
        print(*args, sep=sep, end=end, file=sys.stderr, flush=True)


def progress_enabled() -> bool:
    """True when stderr is a terminal (a person is watching): bars are drawn then only."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress_bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr with elapsed time, rate and ETA; disabled unless ``enabled`` and
    stderr is a terminal (a disabled bar still iterates and accepts ``update``/``set_postfix``).

    ``leave=False`` (default) clears the bar when it closes, so the line printed after it
    (an epoch summary, a table) starts on a clean line.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave,
                disable=not (enabled and progress_enabled()), dynamic_ncols=True, **kwargs)
