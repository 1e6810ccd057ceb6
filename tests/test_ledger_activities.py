"""The ledger activities' heartbeats: what a worker sends while it calls a ledger.

A heartbeat from a thread's activity is a hop to the worker's event loop and, the first
time, a call to the server; the server's heartbeat timeout runs from the attempt's
start. So quick calls send none, and a long one beats between its holds.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from temporalio.testing import ActivityEnvironment

from activities import LedgerActivities
from adapters.sql import SqlLedger
from domain import Hold, HoldRefs, HoldStatus

LATER = datetime.now(UTC) + timedelta(days=1)


class SlowLedger(SqlLedger):
    """A real SQLite ledger whose commits each take ``pause`` seconds (a slow ledger's stand-in)."""

    pause = 0.3

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        time.sleep(self.pause)
        return super().commit_hold(hold_id, preimage)


def held(ledger: SqlLedger, count: int) -> list[str]:
    ledger.open_account("alice", "USD", "alice", Decimal("100.00"), precision=2)
    ledger.open_account("bob", "USD", "bob", Decimal(0), precision=2)
    ids = [f"t1#{i}" for i in range(count)]
    for hold_id in ids:
        ledger.place_hold(hold_id, "alice", "bob", "USD", Decimal("1.00"), LATER, trade_id="t1")
        ledger.pin_hold(hold_id)
    return ids


def commit(ledger: SqlLedger, hold_ids: list[str]) -> tuple[list[Any], list[str]]:
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.extend(details)
    outcomes = env.run(LedgerActivities(ledger).commit, HoldRefs(hold_ids=hold_ids, ledger=ledger.name))
    assert [o.status for o in outcomes.outcomes] == [HoldStatus.COMMITTED] * len(hold_ids)
    return beats, hold_ids


def test_a_commit_that_takes_no_time_sends_no_heartbeat(sqlite_url: str) -> None:
    ledger = SqlLedger("cash", sqlite_url)

    beats, _ = commit(ledger, held(ledger, 3))

    assert beats == []


def test_a_slow_commit_heartbeats_between_its_holds_once_half_a_second_passed(sqlite_url: str) -> None:
    ledger = SlowLedger("cash", sqlite_url)

    beats, ids = commit(ledger, held(ledger, 4))

    # 0.3 s per hold: nothing before the second (0.3 s in), a beat before the third
    # (0.6 s), none before the fourth (0.3 s after that beat)
    assert beats == [ids[2]]
