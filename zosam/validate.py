"""Boundary checks with one error format: the field, the bad value, and what is allowed.

Every rejection of user input is a :class:`ConfigError` (a ``ValueError``): the CLI turns
exactly that type into one line and exit status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

MAX_MESSAGE = 1000  # characters: a message is one readable line, whatever the input
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class ConfigError(ValueError):
    """Bad user input (config, spec, option), found before any work: one line naming the field.

    The message is cut to ``MAX_MESSAGE`` characters and to its first line, so a huge or
    multi-line value (a YAML alias bomb, a pasted file) cannot make a huge message.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        first, _, rest = text.partition("\n")
        if rest.strip():
            first += " ..."
        if len(first) > MAX_MESSAGE:
            first = first[:MAX_MESSAGE - 40] + f" ... ({len(first)} characters in all)"
        super().__init__(first)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def show(value: Any) -> str:
    """``repr(value)``, bounded: nested or long values are elided (never expanded in full)."""
    return _repr.repr(value)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def section(name: str, d: Any, allowed: Iterable[str]) -> dict[str, Any]:
    """Return mapping ``d`` (``None`` -> ``{}``) as a dict, or raise naming ``name`` and the allowed keys.

    The one unknown-key check: every YAML section (run configs, sweep specs, data and
    sparsity settings) goes through it, so the message reads the same everywhere:
    ``unknown key <name>.<key>; allowed: a, b, c``.
    """
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{name or 'the document'} must be a mapping, got {type(d).__name__}")
    allowed = set(allowed)
    unknown = sorted(set(d) - allowed, key=str)
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) else show(unknown[0])
        key = show(key)[1:-1] if len(key) > 80 else key
        raise ConfigError(f"unknown key {name + '.' if name else ''}{key}; allowed: {', '.join(sorted(allowed))}")
    return dict(d)


def choice(field: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise ``ConfigError`` naming both."""
    allowed = list(allowed)
    try:
        ok = value in allowed
    except TypeError:  # an unhashable or incomparable value is simply not allowed
        ok = False
    if not ok:
        raise ConfigError(f"{field}={show(value)} is invalid; allowed: {', '.join(map(repr, allowed))}")
    return value


def in_range(
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """Check ``low <(=) value <(=) high`` (open or closed ends) and finiteness.

    The message states the interval in mathematical notation, e.g. ``must be in (0, 1]``.
    """
    lo_s = "-inf" if low is None else _num(low)
    hi_s = "inf" if high is None else _num(high)
    interval = f"{'(' if low_open or low is None else '['}{lo_s}, {hi_s}{')' if high_open or high is None else ']'}"
    kind = "an integer" if integer else "a number"
    bad = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
    if not bad and not integer:
        try:
            bad = not math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            bad = True
    if not bad:
        if low is not None and (value < low or (low_open and value == low)):
            bad = True
        if high is not None and (value > high or (high_open and value == high)):
            bad = True
    if bad:
        raise ConfigError(f"{field}={show(value)} is invalid; must be {kind} in {interval}")
    return value


def safe_name(field: str, value: Any) -> str:
    """A name that becomes one path component (``runs/<name>``, a Ray experiment folder).

    Letters, digits, ``.``, ``_``, ``+`` and ``-``, starting with a letter or digit, at most
    128 characters: no ``/``, no ``..``, nothing a shell or a URL would need to quote.
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{field}={show(value)} is invalid; must be 1-128 characters of letters, digits, "
                          "'.', '_', '+', '-', starting with a letter or digit (it becomes a folder name)")
    return value


_FIELD_MESSAGE = re.compile(r"^[A-Za-z_][\w.]*=")  # the zosam.validate format: ``field=value is invalid``


def prefixed(prefix: str, fn, *args, **kwargs):
    """Run a validator and put ``prefix.`` in front of the field its error names.

    Messages in another format (torch's own checks, e.g. ``Invalid learning rate: -1``,
    or a ``TypeError`` from a value of the wrong type) become ``prefix: message``. Every
    one becomes a :class:`ConfigError`: ``fn`` only checks user values (constructors on
    the meta device or on a dummy tensor), so whatever it rejects is bad input.
    """
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError, OverflowError, AttributeError, IndexError, KeyError) as e:
        msg = str(e)
        if msg.startswith((prefix + ".", prefix + ":", "unknown key")):
            raise ConfigError(msg) from None
        if _FIELD_MESSAGE.match(msg):
            raise ConfigError(f"{prefix}.{msg}") from None
        raise ConfigError(f"{prefix}: {msg or type(e).__name__}") from None


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")


def check_tracking_uri_format(field: str, uri: Any) -> str:
    """An MLflow tracking URI, checked by its form only (no connection, nothing created)."""
    from urllib.parse import urlsplit

    hint = "e.g. sqlite:////abs/path/mlflow.db or http://127.0.0.1:5000"
    if not isinstance(uri, str) or not uri or any(c.isspace() or ord(c) < 32 for c in uri):
        raise ConfigError(f"{field}={show(uri)} is invalid; must be an MLflow tracking URI, {hint}")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ConfigError(f"{field}={show(uri)} is invalid; must be an MLflow tracking URI with a scheme "
                          f"({', '.join(TRACKING_SCHEMES)}), {hint}")
    if scheme.split("+")[0].lower() not in TRACKING_SCHEMES:
        raise ConfigError(f"{field}={show(uri)} is invalid; the scheme must be one of {', '.join(TRACKING_SCHEMES)}")
    if scheme == "sqlite" and (not rest.startswith("/") or rest.strip("/") in ("", ":memory:")):
        raise ConfigError(f"{field}={show(uri)} is invalid; a sqlite store is sqlite:///<path of the .db file>")
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError as e:
            raise ConfigError(f"{field}={show(uri)} is invalid; {e}") from None
        if not parts.hostname:
            raise ConfigError(f"{field}={show(uri)} is invalid; no host name, {hint}")
    return uri


def check_experiment_name(field: str, name: Any) -> str:
    """An MLflow experiment name: a non-empty single-line string of at most 500 characters."""
    if not isinstance(name, str) or not name.strip() or len(name) > 500 or any(ord(c) < 32 for c in name):
        raise ConfigError(f"{field}={show(name)} is invalid; must be a non-empty single-line string "
                          "of at most 500 characters")
    return name


def check_writable_dir(field: str, path: Any, *, create: bool = False) -> Any:
    """A folder that will be written to: every existing part of ``path`` is a folder and the
    deepest existing one accepts a new file (probed with a temporary file, removed at once,
    so read-only mounts are caught even as root). With ``create`` the folder is made first."""
    import os
    import tempfile
    from pathlib import Path

    p = Path(path)
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{field}={str(path)!r} cannot be created: {e.strerror or e}") from None
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is invalid; {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{field}={str(path)!r} is not writable ({probe}: {e.strerror or e})") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={str(path)!r} is not writable ({probe})")
    return path


def check_sqlite_path(field: str, url: str, path: Any, *, folder_must_exist: bool = False) -> Any:
    """A sqlite database file about to be opened (nothing is created): ``path`` is not a folder,
    and its folder is writable (must already exist with ``folder_must_exist``, else the deepest
    existing part is probed). The message names ``field`` and the whole ``url``."""
    from pathlib import Path

    db = Path(path)
    if db.is_dir():
        raise ConfigError(f"{field}={url!r} is invalid; {db} is a folder, not a database file")
    if folder_must_exist and not db.parent.is_dir():
        raise ConfigError(f"{field}={url!r} is invalid; the folder {db.parent} does not exist "
                          "(create it, or point the URI at an existing folder)")
    check_writable_dir(field, db.parent)
    return path


def check_reachable(field: str, url: str, host: str, port: int, what: str, *, timeout_s: float) -> str:
    """A server (``what``: "database", "MLflow server") answers a TCP connection at ``host:port``
    within ``timeout_s``: checked before any work, because the clients themselves retry for minutes."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(f"{field}={url!r}: no {what} answers at {host}:{port} "
                          f"({reason}, {timeout_s:g} s timeout)") from None
    return url
