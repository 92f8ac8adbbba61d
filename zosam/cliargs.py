"""Command-line conventions shared by ``zosam`` and every benchmark.

One spelling for each thing, so a flag learnt on one command works on the others:

- ``KEY=VALUE`` positional arguments override fields (``zosam train ... optimizer.rho=0.1``,
  ``zosam sweep tune/quick.yaml num_trials=4``, ``zosam bench flatness epochs=5``) or, for
  ``zosam compare``, select runs by tag. ``--set KEY=VALUE`` (and ``--tag`` on compare) are
  deprecated aliases that still work and say so on stderr.
- ``--tracking-uri URI`` names the MLflow store; the benchmarks' old ``--mlflow`` and
  ``--mlflow-uri`` are deprecated aliases.

Argument parsing only: imports nothing heavy and nothing of the project but the console.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from zosam.console import eprint

_KEY_VALUES = "_key_values_dest"  # set by add_key_values: which attribute takes stray KEY=VALUE items


def _deprecated(old: str, new: str) -> None:
    eprint(f"zosam: {old} is deprecated; write {new} instead")


class _Extend(argparse.Action):
    """Positional ``KEY=VALUE ...``: extends the list (values given with the deprecated flag
    before it are kept)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *(values or [])])


class _AppendDeprecated(argparse.Action):
    """``--set KEY=VALUE`` (repeatable): appends, and says on stderr what to write instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _deprecated(f"{option_string} {values}", f"{values} (a positional KEY=VALUE)")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])


class _StoreAliased(argparse.Action):
    """A value option with deprecated spellings: stores; warns when an old spelling is used."""

    def __init__(self, *args: Any, preferred: str, **kwargs: Any) -> None:
        self.preferred = preferred
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is not None and option_string != self.preferred:
            _deprecated(option_string, self.preferred)
        setattr(namespace, self.dest, values)


def add_key_values(parser: argparse.ArgumentParser, dest: str = "overrides", *, deprecated: str = "--set",
                   help: str = "override a field, e.g. optimizer.rho=0.1") -> None:
    """Positional ``KEY=VALUE ...`` into ``args.<dest>`` (a list, ``[]`` when none), plus the
    deprecated ``--set KEY=VALUE`` (repeatable) into the same list.

    Parse with :func:`parse_args`, which also takes ``KEY=VALUE`` items placed after other
    options (``spec --resume a=1``, where argparse alone stops at the option). After an option
    that takes several values (``--methods a b``), put ``--`` before them.
    """
    parser.add_argument(dest, nargs="*", action=_Extend, default=[], metavar="KEY=VALUE", help=help)
    parser.set_defaults(**{_KEY_VALUES: dest})
    parser.add_argument(deprecated, dest=dest, action=_AppendDeprecated, metavar="KEY=VALUE",
                        help="deprecated alias of a positional KEY=VALUE (repeatable)")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that ``KEY=VALUE`` items argparse left over (after
    another option) join the command's ``KEY=VALUE`` list; anything else left over is an error
    (exit 2, as argparse)."""
    args, extra = parser.parse_known_args(argv)
    dest = getattr(args, _KEY_VALUES, None)
    stray = [a for a in extra if dest is None or a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if dest is not None:
        setattr(args, dest, [*getattr(args, dest), *extra])
        delattr(args, _KEY_VALUES)
    return args


def add_tracking_uri(parser: argparse.ArgumentParser, *deprecated: str, dest: str = "tracking_uri",
                     default: str | None = None, help: str = "MLflow tracking URI") -> None:
    """``--tracking-uri URI`` into ``args.<dest>``; ``deprecated`` old spellings still work (with a
    warning on stderr) and are hidden from ``--help``."""
    parser.add_argument("--tracking-uri", *deprecated, dest=dest, default=default, metavar="URI",
                        action=_StoreAliased, preferred="--tracking-uri",
                        help=help + (f" ({', '.join(deprecated)}: deprecated aliases)" if deprecated else ""))

