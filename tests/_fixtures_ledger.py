"""Ledger fixtures: a fresh SQLite file or PostgreSQL database per test.

``ledger_url`` runs a test on both backends. PostgreSQL is the server on
127.0.0.1:5432 (user ``postgres``, trust auth); without it the PostgreSQL cases
skip, except in CI (``CI=true`` or ``DVP_REQUIRE_POSTGRES=1``), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from adapters.sql import SqlLedger

POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_required() -> bool:
    """True in CI, where a missing PostgreSQL must fail the run rather than skip tests."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("DVP_REQUIRE_POSTGRES") == "1"


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {POSTGRES_ADMIN_DSN}: {exc}"
        if postgres_required():
            pytest.fail(message + " (required: CI=true or DVP_REQUIRE_POSTGRES=1)")
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    name = f"dvp_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a SQLite file that does not exist yet (its directory need not either)."""
    return f"sqlite:///{tmp_path / 'ledger' / 'ledger.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL, once for SQLite and once for PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def sql_ledger(ledger_url: str) -> Iterator[SqlLedger]:
    """An empty ``SqlLedger`` named ``cash`` on each backend, closed after the test."""
    ledger = SqlLedger("cash", ledger_url)
    try:
        yield ledger
    finally:
        ledger.close()
