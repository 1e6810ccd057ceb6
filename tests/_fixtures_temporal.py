"""Temporal fixtures: one real dev server per test session, one task queue prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import pytest_asyncio
from temporalio.client import Client

from processes.devserver import DevServer


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[DevServer]:
    """An in-memory, headless ``temporal server start-dev`` shared by the whole session."""
    with DevServer(headless=True) as server:
        yield server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_client(temporal_server: DevServer) -> Client:
    """A client of ``temporal_server`` with the pydantic data converter."""
    return await temporal_server.connect()


@pytest.fixture
def task_queue_prefix() -> str:
    """``t-<uuid8>``: task queues named from it keep each test's workers to itself."""
    return f"t-{uuid.uuid4().hex[:8]}"
