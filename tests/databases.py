"""Databases for tests, on the machine's own servers (loopback only)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new PostgreSQL database on the machine's server (127.0.0.1:5432, trust auth), dropped
    afterwards: where a cluster keeps its MLflow store and Optuna study. No server is an error,
    not a skip."""
    import psycopg  # SQLAlchemy 2.1's driver for plain postgresql:// URLs

    name = f"zosam_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True,
                         connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
