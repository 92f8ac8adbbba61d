"""YAML as users write it: strict reading (duplicate keys, size limits, one-line errors) and
``key.path=value`` overrides. Used for run configs, sweep specs and command-line values."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from zosam.validate import ConfigError, show


class _Loader(yaml.SafeLoader):
    """YAML with exponent floats written without a dot (``1e-3``, ``5e-4``) read as numbers.

    Plain YAML 1.1 reads them as strings, so ``optimizer.mu=1e-3`` would be rejected as
    ``'1e-3'``; this resolver accepts what Python's ``float`` does for such literals.
    A key written twice in one mapping is an error (plain YAML keeps the last silently).
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {show(key)} (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

MAX_VALUES = 100_000  # values in one YAML document, aliases expanded: a config has a few hundred
MAX_FILE_BYTES = 1 << 20


def yaml_load(text: str, where: str = "YAML") -> Any:
    """Parse YAML (safe: ``_Loader`` is a SafeLoader subclass); every problem is a ``ConfigError``
    naming ``where`` and the line. Documents that expand to more than ``MAX_VALUES`` values
    through aliases (an "alias bomb") are refused."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}:{at}: invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    _check_size(data, where)
    return data


def _check_size(data: Any, where: str) -> None:
    stack, count = [data], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (nested YAML aliases?); "
                              "a config holds a few hundred")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def read_yaml_file(path: str | Path, what: str) -> Any:
    """Read a YAML file that a user named (``what``: ``config file``, ``sweep spec``, ...).

    Missing, a directory, too big, not UTF-8, not YAML, empty: each a one-line ``ConfigError``.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {str(p)!r} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {str(p)!r} is {size} bytes; a YAML config is far below {MAX_FILE_BYTES}")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(p)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") \
            from None
    data = yaml_load(text, str(p))
    if data is None:
        raise ConfigError(f"{what} {str(p)!r} is empty (no YAML mapping in it)")
    return data


def parse_value(text: str) -> Any:
    """Command-line override values are YAML scalars: ``0.05``, ``1e-3``, ``true``, ``null``, ``[1, 2]``."""
    return yaml_load(text, f"value {show(text)}")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (missing sections are created)."""
    d = copy.deepcopy(d)
    for item in overrides:
        if not isinstance(item, str):
            raise ConfigError(f"override {show(item)} is invalid; expected key.path=value")
        key, eq, value = item.partition("=")
        if not eq or not key or "" in key.split("."):
            raise ConfigError(f"override {show(item)} is invalid; expected key.path=value")
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {show(item)}: {p} is not a section")
        try:
            node[leaf] = parse_value(value)
        except ConfigError as e:
            raise ConfigError(f"override {show(item)}: {e}") from None
    return d
