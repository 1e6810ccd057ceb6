"""Fixtures for settlement tests: fresh ledgers, a worker in this process, a client.

``settlement`` gives a running engine on the session's real dev server with two
fresh SQLite ledgers (``cash`` and ``securities``), its own task queues, and the
accounts of ``STANDARD_ACCOUNTS``. The engine trusts the test issuer
(``tests/_fixtures_auth.py``); its ``client`` acts as the operator ``ops``, and
``engine.acting("alice")`` is a client that acts as alice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapters import Ledger
from domain import Config, TradeStatus, TradeView, parse_config
from starter.client import SettlementClient
from starter.ledgers import opened, parse_seed, seed
from worker import run_worker

from ._fixtures_auth import auth_section, token

STANDARD_ACCOUNTS = [
    {"ledger": "securities", "id": "bob-sec", "asset": "BOND-2030", "owner": "bob", "balance": "1000"},
    {"ledger": "securities", "id": "alice-sec", "asset": "BOND-2030", "owner": "alice", "balance": "0"},
    {"ledger": "securities", "id": "carol-sec", "asset": "BOND-2030", "owner": "carol", "balance": "500"},
    {"ledger": "securities", "id": "mallory-sec", "asset": "BOND-2030", "owner": "mallory", "balance": "100"},
    {"ledger": "cash", "id": "alice-cash", "asset": "EUR", "owner": "alice", "balance": "100000.00"},
    {"ledger": "cash", "id": "bob-cash", "asset": "EUR", "owner": "bob", "balance": "0.00"},
    {"ledger": "cash", "id": "carol-cash", "asset": "EUR", "owner": "carol", "balance": "5000.00"},
    {"ledger": "cash", "id": "mallory-cash", "asset": "EUR", "owner": "mallory", "balance": "50000.00"},
    {"ledger": "fx", "id": "carol-usd", "asset": "USD", "owner": "carol", "balance": "20000.00"},
    {"ledger": "fx", "id": "alice-usd", "asset": "USD", "owner": "alice", "balance": "0.00"},
]


def make_config(
    urls: Mapping[str, str],
    prefix: str,
    *,
    local_activities: bool | Collection[str] = True,
    auth: dict[str, Any] | None = None,
    **settlement: Any,
) -> Config:
    """SQL ledgers at ``urls``: ``local_activities`` true, false, or the names of the local ones.

    ``auth`` replaces the test issuer's ``[auth]``.
    """

    def local(name: str) -> bool:
        return local_activities if isinstance(local_activities, bool) else name in local_activities

    return parse_config(
        {
            "ledgers": {
                name: {"kind": "sql", "url": url, "local_activities": local(name)}
                for name, url in urls.items()
            },
            "compliance": {"sanctioned": ["mallory"]},
            "roles": {"operators": ["ops"]},
            "temporal": {"task_queue_prefix": prefix},
            "settlement": {"recycle_interval": "PT0.2S", "max_recycle_interval": "PT1S", **settlement},
            "auth": auth if auth is not None else auth_section(),
        }
    )


async def wait_for_status(
    engine: Engine, trade_id: str, status: TradeStatus, timeout: float = 20
) -> TradeView:
    """The trade's view once it reaches ``status``; fails if it ends otherwise or takes too long."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        view = await engine.client.status(trade_id)
        if view.status is status:
            return view
        assert not view.status.terminal, f"{trade_id} ended {view.status}: {view.reason}"
        assert loop.time() < end, f"{trade_id} still {view.status}"
        await asyncio.sleep(0.1)


@dataclass
class Engine:
    """A running engine for one test."""

    client: SettlementClient
    config: Config
    ledgers: dict[str, Ledger]
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def acting(self, subject: str, *roles: str) -> SettlementClient:
        """A client on the engine's connection that acts as ``subject`` (a test issuer's token)."""
        return self.client.with_token(token(subject, roles))

    def balance(self, ledger: str, account: str) -> Decimal:
        return self.ledgers[ledger].account(account).balance

    def balances(self) -> dict[tuple[str, str], Decimal]:
        return {(b.ledger, b.account): b.balance for name, lg in self.ledgers.items() for b in lg.balances()}

    def open_holds(self) -> list[Any]:
        return [h for lg in self.ledgers.values() for h in lg.open_holds()]

    def assert_invariants(self) -> None:
        for ledger in self.ledgers.values():
            assert ledger.verify() == [], ledger.name  # type: ignore[attr-defined]


def sqlite_urls(tmp_path: Path) -> dict[str, str]:
    return {name: f"sqlite:///{tmp_path / name}.db" for name in ("cash", "securities", "fx")}


@pytest.fixture
async def settlement(temporal_client: Any, task_queue_prefix: str, tmp_path: Path) -> AsyncIterator[Engine]:
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    async with run_engine(temporal_client, config) as engine:
        yield engine


@contextlib.asynccontextmanager
async def run_engine(
    temporal_client: Any, config: Config, instances: dict[str, Ledger] | None = None
) -> AsyncIterator[Engine]:
    """Seed the standard accounts and run a worker in this process while the block runs.

    The worker stops when the block ends, whether the test passed or failed.
    """
    with opened(config) as ledgers:
        seed(config, parse_seed({"accounts": STANDARD_ACCOUNTS}, config), ledgers)
        engine = Engine(SettlementClient(temporal_client, config, token("ops")), config, ledgers)
        task = asyncio.create_task(
            run_worker(config, temporal_client, stop=engine._stop, instances={**ledgers, **(instances or {})})
        )
        try:
            yield engine
        finally:
            engine._stop.set()
            await asyncio.wait_for(task, 30)


__all__ = [
    "Engine",
    "STANDARD_ACCOUNTS",
    "make_config",
    "run_engine",
    "settlement",
    "sqlite_urls",
    "wait_for_status",
]
