"""Stopping exactly the processes a test started (never ``ray stop``: it kills every Ray)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from /proc (psutil is not a dependency)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def kill_tree(proc: subprocess.Popen, known: set[int] | None = None, sig: int = signal.SIGKILL) -> None:
    """Signal the process group we started (``start_new_session=True``) and every descendant seen."""
    pids = set(known or ()) | set(descendants(proc.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
