"""Ledger databases for tests: a throwaway PostgreSQL database, or a SQLite file.

PostgreSQL is the server at ``$BUDGETGUARD_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth): each use creates a database
of its own and drops it afterwards. Without a server the PostgreSQL tests skip, except
under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ADMIN_URL = os.environ.get("BUDGETGUARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=3)


@contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped on exit."""
    try:
        admin = _connect(ADMIN_URL)
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no PostgreSQL at {ADMIN_URL}: {exc}")
        pytest.skip(f"no PostgreSQL at {ADMIN_URL} ({type(exc).__name__})")
    name = f"bg_ledger_test_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(f"CREATE DATABASE {name}")
        base = ADMIN_URL.rsplit("/", 1)[0]
        yield f"{base}/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@contextmanager
def ledger_database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
