"""The SQL ledger on real SQLite and PostgreSQL, as worked examples.

Each test reads: given these balances, after these operations, these balances.
Amounts are USD with 2 decimals unless a test says otherwise.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue as queue_module
import re
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import QueuePool

from adapters.sql import SqlLedger
from domain import (
    AssetMismatch,
    HoldNotOpen,
    HoldStatus,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    LedgerUnavailable,
    UnknownAccount,
    UnknownHold,
)

D = Decimal
LATER = datetime.now(UTC) + timedelta(days=1)


def seed(ledger: SqlLedger, **balances: str) -> None:
    for account, balance in balances.items():
        ledger.open_account(account, "USD", account, D(balance), precision=2)


def available(ledger: SqlLedger) -> dict[str, Decimal]:
    return {b.account: b.available for b in ledger.balances()}


def balance(ledger: SqlLedger) -> dict[str, Decimal]:
    return {b.account: b.balance for b in ledger.balances()}


# ------------------------------------------------------------------------ accounts


def test_opening_balances_are_issued_once_from_the_issuer(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")

    again = sql_ledger.open_account("alice", "USD", "alice", D("999"), precision=2)

    assert again.balance == D("500.00")  # re-opening issues nothing
    assert [(b.account, b.owner, b.balance, b.held, b.available) for b in sql_ledger.balances()] == [
        ("alice", "alice", D("500.00"), D(0), D("500.00")),
        ("bob", "bob", D(0), D(0), D(0)),
        ("issuer:USD", "issuer", D("-500.00"), D(0), D("-500.00")),
    ]
    assert str(sql_ledger.account("alice").balance) == "500.00"  # scale of the asset
    with pytest.raises(IdempotencyConflict, match="owned by 'alice'"):
        sql_ledger.open_account("alice", "USD", "mallory")
    with pytest.raises(IdempotencyConflict, match="asset USD"):
        sql_ledger.open_account("alice", "EUR", "alice", precision=2)
    with pytest.raises(UnknownAccount, match="'carol'"):
        sql_ledger.account("carol")
    assert sql_ledger.verify() == []


def test_each_asset_keeps_its_own_precision(sql_ledger: SqlLedger) -> None:
    sql_ledger.open_account("alice", "USD", "alice", D("10.25"), precision=2)
    sql_ledger.open_account("alice-jpy", "JPY", "alice", D("1000"), precision=0)
    sql_ledger.open_account("bob-jpy", "JPY", "bob")

    with pytest.raises(InvalidAmount, match=r"asset JPY allows \(precision 0\)"):
        sql_ledger.place_hold("h", "alice-jpy", "bob-jpy", "JPY", D("0.5"), LATER)

    hold = sql_ledger.place_hold("h", "alice-jpy", "bob-jpy", "JPY", D("250"), LATER)
    assert str(hold.amount) == "250"
    assert sql_ledger.commit_hold("h").status is HoldStatus.COMMITTED
    assert balance(sql_ledger) == {
        "alice": D("10.25"),
        "issuer:USD": D("-10.25"),
        "alice-jpy": D(750),
        "bob-jpy": D(250),
        "issuer:JPY": D(-1000),
    }
    assert sql_ledger.verify() == []


# --------------------------------------------------------------------------- holds


def test_hold_then_commit_moves_the_exact_amount(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")

    hold = sql_ledger.place_hold("t1:0", "alice", "bob", "USD", D("120.25"), LATER, trade_id="t1")

    assert (hold.status, hold.amount, hold.ledger, hold.trade_id) == (
        HoldStatus.OPEN,
        D("120.25"),
        "cash",
        "t1",
    )
    alice = sql_ledger.account("alice")
    assert (alice.balance, alice.held, alice.available) == (D("500.00"), D("120.25"), D("379.75"))

    committed = sql_ledger.commit_hold("t1:0")

    assert committed.status is HoldStatus.COMMITTED
    assert balance(sql_ledger) == {"alice": D("379.75"), "bob": D("120.25"), "issuer:USD": D(-500)}
    assert sql_ledger.account("alice").held == 0
    assert sql_ledger.open_holds() == []
    assert sql_ledger.verify() == []


def test_hold_then_release_restores_the_available_amount(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    sql_ledger.place_hold("t1:0", "alice", "bob", "USD", D("200"), LATER)
    assert available(sql_ledger)["alice"] == D("300.00")

    released = sql_ledger.release_hold("t1:0")

    assert released.status is HoldStatus.RELEASED
    assert available(sql_ledger) == {"alice": D("500.00"), "bob": D(0), "issuer:USD": D(-500)}
    assert balance(sql_ledger)["bob"] == 0
    assert sql_ledger.verify() == []


def test_every_operation_twice_has_the_effect_of_once(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")

    first = sql_ledger.place_hold("k1", "alice", "bob", "USD", D("100"), LATER, trade_id="t")
    assert sql_ledger.place_hold("k1", "alice", "bob", "USD", D("100.00"), LATER, trade_id="t") == first
    assert sql_ledger.account("alice").held == D(100)  # reserved once

    pinned = sql_ledger.pin_hold("k1")
    assert pinned.expires_at is None
    assert sql_ledger.pin_hold("k1") == pinned

    committed = sql_ledger.commit_hold("k1")
    assert sql_ledger.commit_hold("k1") == committed
    assert sql_ledger.pin_hold("k1") == committed  # pinning a committed hold is harmless
    # A late replay of the placement returns the committed hold and reserves nothing.
    assert sql_ledger.place_hold("k1", "alice", "bob", "USD", D("100"), LATER, trade_id="t") == committed

    sql_ledger.place_hold("k2", "alice", "bob", "USD", D("50"), LATER)
    released = sql_ledger.release_hold("k2")
    assert sql_ledger.release_hold("k2") == released

    assert balance(sql_ledger) == {"alice": D(400), "bob": D(100), "issuer:USD": D(-500)}
    assert available(sql_ledger)["alice"] == D(400)
    assert sql_ledger.verify() == []


@pytest.mark.parametrize(
    ("field", "terms"),
    [
        ("amount", dict(amount=D("100.01"))),
        ("to_account", dict(to_account="carol")),
        ("trade_id", dict(trade_id="other")),
        ("hashlock", dict(hashlock="ab" * 32)),
    ],
)
def test_same_key_with_different_terms_is_a_conflict(
    sql_ledger: SqlLedger, field: str, terms: dict[str, Any]
) -> None:
    seed(sql_ledger, alice="500.00", bob="0", carol="0")
    original: dict[str, Any] = dict(
        account="alice", to_account="bob", asset="USD", amount=D(100), trade_id="t"
    )
    sql_ledger.place_hold("k1", expires_at=LATER, **original)

    with pytest.raises(IdempotencyConflict, match=rf"'k1' exists with different terms: {field}"):
        sql_ledger.place_hold("k1", expires_at=LATER, **{**original, **terms})

    assert sql_ledger.account("alice").held == D(100)
    assert sql_ledger.verify() == []


def test_a_hold_is_committed_or_released_never_both(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    sql_ledger.place_hold("released", "alice", "bob", "USD", D(10), LATER)
    sql_ledger.place_hold("committed", "alice", "bob", "USD", D(20), LATER)
    sql_ledger.release_hold("released")
    sql_ledger.commit_hold("committed")

    with pytest.raises(HoldNotOpen, match="'released' is already released"):
        sql_ledger.commit_hold("released")
    with pytest.raises(HoldNotOpen, match="'released' is already released"):
        sql_ledger.pin_hold("released")
    with pytest.raises(HoldNotOpen, match="'committed' is already committed"):
        sql_ledger.release_hold("committed")

    assert balance(sql_ledger) == {"alice": D(480), "bob": D(20), "issuer:USD": D(-500)}
    assert sql_ledger.verify() == []


def test_release_of_an_unknown_key_leaves_a_tombstone(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")

    # The compensation runs before the reservation it undoes has arrived.
    tombstone = sql_ledger.release_hold("late")
    late = sql_ledger.place_hold("late", "alice", "bob", "USD", D(100), LATER)

    assert tombstone.status is late.status is HoldStatus.RELEASED
    assert late.amount == 0
    assert sql_ledger.get_hold("late") == tombstone
    assert available(sql_ledger)["alice"] == D(500)  # nothing was placed
    assert sql_ledger.open_holds() == []
    with pytest.raises(HoldNotOpen):
        sql_ledger.commit_hold("late")
    assert sql_ledger.verify() == []


@pytest.mark.parametrize("facts", ["not cached", "cached"])  # cached: SQLite's fast path places
def test_insufficient_funds_says_who_asked_for_what(sql_ledger: SqlLedger, facts: str) -> None:
    (warm if facts == "cached" else seed)(sql_ledger, alice="500.00", bob="0")
    sql_ledger.place_hold("first", "alice", "bob", "USD", D(450), LATER)

    with pytest.raises(InsufficientFunds) as raised:
        sql_ledger.place_hold("second", "alice", "bob", "USD", D("50.01"), LATER)

    assert raised.value.message == (
        "account 'alice' has 50.00 USD available; hold 'second' requested 50.01 USD"
    )
    with pytest.raises(UnknownHold):
        sql_ledger.get_hold("second")  # nothing half-written (the fast path's insert rolled back)
    assert sql_ledger.account("alice").held == D(450)
    assert sql_ledger.place_hold("second", "alice", "bob", "USD", D(50), LATER).status is HoldStatus.OPEN
    assert sql_ledger.verify() == []


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (D("1.005"), r"amount 1.005 has more decimal places than asset USD allows \(precision 2\)"),
        (D(0), "amount must be positive, got 0 USD"),
        (D(-5), "amount must be positive, got -5 USD"),
        (1.5, "not float"),
    ],
)
def test_bad_amounts_are_refused_and_change_nothing(sql_ledger: SqlLedger, amount: Any, message: str) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    before = sql_ledger.balances()

    with pytest.raises(InvalidAmount, match=message):
        sql_ledger.place_hold("h", "alice", "bob", "USD", amount, LATER)

    assert sql_ledger.balances() == before
    with pytest.raises(UnknownHold):
        sql_ledger.get_hold("h")


def test_an_opening_balance_with_too_many_decimals_opens_nothing(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00")

    with pytest.raises(InvalidAmount, match=r"opening balance 1.001 .* asset USD .*precision 2"):
        sql_ledger.open_account("bob", "USD", "bob", D("1.001"), precision=2)

    with pytest.raises(UnknownAccount):
        sql_ledger.account("bob")
    assert balance(sql_ledger) == {"alice": D(500), "issuer:USD": D(-500)}


def test_holds_need_known_accounts_of_the_same_asset(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    sql_ledger.open_account("bob-eur", "EUR", "bob", precision=2)

    with pytest.raises(UnknownAccount, match="no account 'nobody'"):
        sql_ledger.place_hold("h", "alice", "nobody", "USD", D(1), LATER)
    with pytest.raises(AssetMismatch, match="'bob-eur' holds asset EUR, not USD"):
        sql_ledger.place_hold("h", "alice", "bob-eur", "USD", D(1), LATER)
    with pytest.raises(UnknownHold):
        sql_ledger.commit_hold("never-placed")
    with pytest.raises(UnknownHold):
        sql_ledger.pin_hold("never-placed")
    assert sql_ledger.verify() == []


def test_account_facts_name_asset_and_owner_and_see_accounts_opened_elsewhere(
    sql_ledger: SqlLedger, ledger_url: str
) -> None:
    sql_ledger.open_account("alice-usd", "USD", "alice", D("5.00"), precision=2)
    sql_ledger.open_account("bob-eur", "EUR", "bob", precision=2)

    facts = sql_ledger.account_facts(["alice-usd", "bob-eur", "carol-usd"])
    assert facts == {"alice-usd": ("USD", "alice"), "bob-eur": ("EUR", "bob")}

    # An account another process opens after a miss is found: a miss is never cached.
    other = SqlLedger("cash", ledger_url)
    try:
        other.open_account("carol-usd", "USD", "carol", precision=2)
    finally:
        other.close()
    assert sql_ledger.account_facts(["carol-usd"]) == {"carol-usd": ("USD", "carol")}


def test_expiry_releases_expired_holds_but_never_pinned_ones(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    now = datetime.now(UTC)
    sql_ledger.place_hold("expired", "alice", "bob", "USD", D(100), now - timedelta(seconds=1))
    sql_ledger.place_hold("pinned", "alice", "bob", "USD", D(100), now - timedelta(seconds=1))
    sql_ledger.place_hold("running", "alice", "bob", "USD", D(100), now + timedelta(hours=1))
    sql_ledger.pin_hold("pinned")
    assert available(sql_ledger)["alice"] == D(200)

    expired = sql_ledger.expire_holds(now)

    assert [(h.hold_id, h.status) for h in expired] == [("expired", HoldStatus.RELEASED)]
    assert [h.hold_id for h in sql_ledger.open_holds()] == ["pinned", "running"]
    assert available(sql_ledger)["alice"] == D(300)
    assert sql_ledger.expire_holds(now) == []
    assert [h.hold_id for h in sql_ledger.expire_holds(now + timedelta(hours=2))] == ["running"]
    assert sql_ledger.commit_hold("pinned").status is HoldStatus.COMMITTED
    assert balance(sql_ledger) == {"alice": D(400), "bob": D(100), "issuer:USD": D(-500)}
    assert sql_ledger.verify() == []


def test_two_sweepers_at_once_release_each_expired_hold_once(sql_ledger: SqlLedger, ledger_url: str) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    past = datetime.now(UTC) - timedelta(minutes=1)
    for n in range(20):
        sql_ledger.place_hold(f"h{n}", "alice", "bob", "USD", D(5), past)
    other = SqlLedger("cash", ledger_url)  # a second worker process would hold its own engine
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            sweeps = list(
                pool.map(lambda ledger: ledger.expire_holds(datetime.now(UTC)), [sql_ledger, other])
            )
    finally:
        other.close()

    swept = sorted(h.hold_id for sweep in sweeps for h in sweep)
    assert swept == sorted(f"h{n}" for n in range(20))  # each exactly once, between them
    assert available(sql_ledger)["alice"] == D(500)
    assert sql_ledger.verify() == []


def test_a_hashlocked_hold_commits_only_with_the_preimage(sql_ledger: SqlLedger) -> None:
    seed(sql_ledger, alice="500.00", bob="0")
    secret = bytes(range(32))
    lock = hashlib.sha256(secret).hexdigest()
    hold = sql_ledger.place_hold("h", "alice", "bob", "USD", D(100), LATER, hashlock=lock)
    assert hold.hashlock == lock

    for wrong in (None, "00" * 32, "not hex"):
        with pytest.raises(LedgerError, match="preimage does not match the hashlock"):
            sql_ledger.commit_hold("h", wrong)
    assert sql_ledger.get_hold("h").status is HoldStatus.OPEN

    assert sql_ledger.commit_hold("h", secret.hex()).status is HoldStatus.COMMITTED
    assert balance(sql_ledger)["bob"] == D(100)
    assert sql_ledger.verify() == []


def test_the_database_itself_refuses_an_overdraft(sql_ledger: SqlLedger, ledger_url: str) -> None:
    """The CHECK constraints hold even for SQL that bypasses the ledger."""
    seed(sql_ledger, alice="500.00")
    engine = create_engine(ledger_url)
    try:
        for statement in (
            "UPDATE accounts SET held = 50001 WHERE id = 'alice'",
            "UPDATE accounts SET held = -1 WHERE id = 'alice'",
            "INSERT INTO holds (hold_id, amount, status, trade_id, created_at)"
            " VALUES ('ghost', 0, 'open', '', CURRENT_TIMESTAMP)",
        ):
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(text(statement))
        # Tampering the constraints allow is what verify() is for.
        with engine.begin() as conn:
            conn.execute(text("UPDATE accounts SET balance = balance + 1 WHERE id = 'alice'"))
    finally:
        engine.dispose()

    assert sql_ledger.verify() == [
        "account 'alice': balance 500.01 but its journal sums to 500.00",
        "asset USD: balances sum to 0.01, not 0",
    ]


@pytest.mark.postgres
def test_a_dropped_postgres_connection_is_retried(postgres_url: str) -> None:
    """Every operation is idempotent, so one cut off by a server restart simply runs again."""
    ledger = SqlLedger("cash", postgres_url)
    try:
        seed(ledger, alice="500.00", bob="0")
        database = make_url(postgres_url).database
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (database,),
            ).fetchall()
        assert killed  # the pooled connection is gone

        assert ledger.place_hold("h", "alice", "bob", "USD", D(10), LATER).status is HoldStatus.OPEN
        assert ledger.account("alice").available == D(490)
    finally:
        ledger.close()


def test_an_unreachable_database_is_unavailable_not_an_error_of_the_caller() -> None:
    with pytest.raises(LedgerUnavailable, match="ledger 'cash': the database is unavailable"):
        SqlLedger("cash", "postgresql+psycopg://postgres@127.0.0.1:1/nowhere")


# ------------------------------------------------------------ SQLite's fast path
#
# On SQLite the common case of place, pin, commit and release runs on the fast path
# (adapters/_sqlite_fast.py), and anything else falls back to the general path,
# PostgreSQL's only one. The tests below run on three ledgers: SQLite with its fast
# path, SQLite with the fast path off, and PostgreSQL; each asserts the same answers
# from all three, and which operations the fast path answered itself. They warm the
# ledger's cache of account facts, as a worker does, so that the fast path can run.

HOLD_OPERATIONS = ("place_hold", "pin_hold", "commit_hold", "release_hold")


class Answers(NamedTuple):
    """Which hold operations the fast path answered, and which it left to the general path."""

    fast: list[str]
    general: list[str]


def watch(ledger: SqlLedger) -> Answers:
    """Record, from now on, who answers each of ``ledger``'s hold operations."""
    answers = Answers([], [])
    fast = ledger._fast
    if fast is None:
        return answers  # every operation takes the general path

    def watched(name: str) -> Callable[..., Any]:
        method = getattr(fast, name)

        def call(*args: Any) -> Any:
            hold = method(*args)
            (answers.fast if hold is not None else answers.general).append(name)
            return hold

        return call

    for name in HOLD_OPERATIONS:
        setattr(fast, name, watched(name))
    return answers


def warm(ledger: SqlLedger, **balances: str) -> Answers:
    """Seed ``balances`` and cache their facts; then ``watch`` the ledger."""
    seed(ledger, **balances)
    ledger.account_facts(balances)
    return watch(ledger)


def fast(ledger: SqlLedger, *operations: str) -> list[str]:
    """``operations``, if ``ledger`` has a fast path to answer them; else none."""
    return list(operations) if ledger._fast is not None else []


@pytest.fixture(
    params=["sqlite-fast", "sqlite-general", pytest.param("postgres-general", marks=pytest.mark.postgres)]
)
def hold_ledger(request: pytest.FixtureRequest) -> Iterator[SqlLedger]:
    """An empty ledger ``cash``: SQLite with its fast path, SQLite without, PostgreSQL."""
    backend, path = request.param.split("-")
    ledger = SqlLedger("cash", request.getfixturevalue(f"{backend}_url"))
    if path == "general":
        ledger._fast = None
    try:
        yield ledger
    finally:
        ledger.close()


def test_a_fast_placement_replayed_reserves_once(hold_ledger: SqlLedger) -> None:
    answers = warm(hold_ledger, alice="500.00", bob="0")

    first = hold_ledger.place_hold("k1", "alice", "bob", "USD", D("100"), LATER, trade_id="t")
    assert answers.fast == fast(hold_ledger, "place_hold")

    assert hold_ledger.place_hold("k1", "alice", "bob", "USD", D("100.00"), LATER, trade_id="t") == first
    with pytest.raises(IdempotencyConflict, match="'k1' exists with different terms: amount"):
        hold_ledger.place_hold("k1", "alice", "bob", "USD", D("99"), LATER, trade_id="t")
    assert answers.general == fast(hold_ledger, "place_hold", "place_hold")  # replays: the general path
    assert hold_ledger.get_hold("k1") == first
    assert hold_ledger.account("alice").held == D(100)  # reserved once
    assert hold_ledger.verify() == []


def test_fast_pins_commits_and_releases_answer_like_the_general_path(hold_ledger: SqlLedger) -> None:
    answers = warm(hold_ledger, alice="500.00", bob="0")
    placed = hold_ledger.place_hold("paid", "alice", "bob", "USD", D("120.25"), LATER, trade_id="t")
    hold_ledger.place_hold("refunded", "alice", "bob", "USD", D(30), LATER)

    pinned = hold_ledger.pin_hold("paid")
    committed = hold_ledger.commit_hold("paid")
    released = hold_ledger.release_hold("refunded")

    assert pinned == placed.model_copy(update={"expires_at": None})
    assert committed == pinned.model_copy(update={"status": HoldStatus.COMMITTED})
    assert (released.status, released.amount, released.expires_at) == (HoldStatus.RELEASED, D(30), LATER)
    assert [hold_ledger.get_hold(k) for k in ("paid", "refunded")] == [committed, released]
    assert answers == Answers(fast(hold_ledger, "place_hold", "place_hold", *HOLD_OPERATIONS[1:]), [])

    # Replays and resolved holds: the general path answers, as before.
    assert hold_ledger.commit_hold("paid") == committed
    assert hold_ledger.pin_hold("paid") == committed
    assert hold_ledger.release_hold("refunded") == released
    with pytest.raises(HoldNotOpen, match="'refunded' is already released; it cannot be pinned"):
        hold_ledger.pin_hold("refunded")
    with pytest.raises(HoldNotOpen, match="'refunded' is already released; it cannot be committed"):
        hold_ledger.commit_hold("refunded")
    with pytest.raises(HoldNotOpen, match="'paid' is already committed; it cannot be released"):
        hold_ledger.release_hold("paid")
    with pytest.raises(UnknownHold):
        hold_ledger.commit_hold("never-placed")
    assert answers.general == fast(
        hold_ledger,
        "commit_hold",
        "pin_hold",
        "release_hold",
        "pin_hold",
        "commit_hold",
        "release_hold",
        "commit_hold",
    )

    assert balance(hold_ledger) == {"alice": D("379.75"), "bob": D("120.25"), "issuer:USD": D(-500)}
    assert available(hold_ledger)["alice"] == D("379.75")
    assert hold_ledger.open_holds() == []
    assert hold_ledger.verify() == []


def test_a_fast_placed_hashlocked_hold_commits_only_with_the_preimage(hold_ledger: SqlLedger) -> None:
    answers = warm(hold_ledger, alice="500.00", bob="0")
    secret = bytes(range(32))
    lock = hashlib.sha256(secret).hexdigest()

    hold = hold_ledger.place_hold("h", "alice", "bob", "USD", D(100), LATER, hashlock="0x" + lock.upper())
    assert hold.hashlock == lock
    assert hold_ledger.pin_hold("h").hashlock == lock
    assert answers.fast == fast(hold_ledger, "place_hold", "pin_hold")

    for wrong in (None, "00" * 32):
        with pytest.raises(LedgerError, match="preimage does not match the hashlock"):
            hold_ledger.commit_hold("h", wrong)
    assert hold_ledger.get_hold("h").status is HoldStatus.OPEN
    assert hold_ledger.account("alice").held == D(100)

    assert hold_ledger.commit_hold("h", secret.hex()).status is HoldStatus.COMMITTED
    assert answers.general == fast(hold_ledger, "commit_hold", "commit_hold", "commit_hold")  # hashlocked
    assert balance(hold_ledger)["bob"] == D(100)
    assert hold_ledger.verify() == []


def test_expiry_sees_fast_placed_holds(hold_ledger: SqlLedger) -> None:
    answers = warm(hold_ledger, alice="500.00", bob="0")
    now = datetime.now(UTC)
    due = now - timedelta(microseconds=1)
    hold_ledger.place_hold("due", "alice", "bob", "USD", D(100), due)
    hold_ledger.place_hold("running", "alice", "bob", "USD", D(100), now + timedelta(hours=1))
    hold_ledger.place_hold(
        "naive", "alice", "bob", "USD", D(100), (now + timedelta(hours=2)).replace(tzinfo=None)
    )
    hold_ledger.place_hold(
        "zoned",
        "alice",
        "bob",
        "USD",
        D(100),
        (now + timedelta(hours=3)).astimezone(timezone(timedelta(hours=2))),
    )
    assert answers.fast == fast(hold_ledger, *["place_hold"] * 4)

    assert hold_ledger.get_hold("due").expires_at == due  # to the microsecond, in UTC
    assert hold_ledger.get_hold("naive").expires_at == now + timedelta(hours=2)  # naive is UTC
    assert hold_ledger.get_hold("zoned").expires_at == now + timedelta(hours=3)
    assert [h.hold_id for h in hold_ledger.open_holds()] == ["due", "running", "naive", "zoned"]
    assert [h.hold_id for h in hold_ledger.expire_holds(now)] == ["due"]
    assert [h.hold_id for h in hold_ledger.expire_holds(now + timedelta(hours=1))] == ["running"]
    assert [h.hold_id for h in hold_ledger.expire_holds(now + timedelta(hours=2, minutes=30))] == ["naive"]
    assert available(hold_ledger)["alice"] == D(400)
    assert hold_ledger.verify() == []


def test_a_refused_fast_commit_changes_nothing(hold_ledger: SqlLedger) -> None:
    """The database's own checks still hold: the fast path rolls back, the general path reports."""
    answers = warm(hold_ledger, alice="1.01")
    max_balance = D(2**63 - 1).scaleb(-2)  # BIGINT's largest, in cents
    hold_ledger.open_account("bob", "USD", "bob", max_balance - D("1.00"), precision=2)
    hold_ledger.account_facts(["bob"])
    hold_ledger.place_hold("h", "alice", "bob", "USD", D("1.01"), LATER)
    before = hold_ledger.balances()

    with pytest.raises(LedgerError, match="ledger 'cash': the database refused the change|out of range"):
        hold_ledger.commit_hold("h")  # bob's balance would overflow

    assert answers == Answers(fast(hold_ledger, "place_hold"), fast(hold_ledger, "commit_hold"))
    assert hold_ledger.get_hold("h").status is HoldStatus.OPEN
    assert hold_ledger.balances() == before  # (verify() cannot sum the issuer's journal: it overflows)


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except LedgerError as exc:
        return f"{type(exc).__name__}: {exc.message}"


def _script(ledger: SqlLedger) -> list[Any]:
    """A day of one ledger's hold operations, common and unusual; what each one answered."""
    secret = bytes(range(32))
    lock = hashlib.sha256(secret).hexdigest()
    expires = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    place = ledger.place_hold
    steps: list[Callable[[], Any]] = [
        lambda: place("paid", "alice", "bob", "USD", D("120.25"), expires, trade_id="t1"),
        lambda: place("paid", "alice", "bob", "USD", D("120.250"), expires, trade_id="t1"),  # replay
        lambda: place("paid", "alice", "bob", "USD", D("120"), expires, trade_id="t1"),  # conflict
        lambda: place("refunded", "alice", "carol", "USD", D(30), expires, trade_id="t2"),
        lambda: place("open-ended", "alice", "carol", "USD", D("0.01"), None, trade_id="t3"),
        lambda: place("locked", "alice", "bob", "USD", D(5), expires, hashlock="0x" + lock.upper()),
        lambda: place("short", "alice", "bob", "USD", D(400), expires),  # insufficient funds
        lambda: place("wrong asset", "alice", "bob-eur", "USD", D(1), expires),
        lambda: place("unknown", "alice", "nobody", "USD", D(1), expires),
        lambda: place("self", "alice", "alice", "USD", D(1), expires),
        lambda: place("odd", "alice", "bob", "USD", D("0.001"), expires),
        lambda: ledger.pin_hold("paid"),
        lambda: ledger.pin_hold("paid"),
        lambda: ledger.commit_hold("paid"),
        lambda: ledger.commit_hold("paid"),
        lambda: ledger.pin_hold("paid"),
        lambda: ledger.release_hold("paid"),
        lambda: ledger.release_hold("refunded"),
        lambda: ledger.release_hold("refunded"),
        lambda: ledger.commit_hold("refunded"),
        lambda: ledger.commit_hold("locked", "00" * 32),
        lambda: ledger.commit_hold("locked", secret.hex()),
        lambda: ledger.release_hold("late"),  # a tombstone
        lambda: place("late", "alice", "bob", "USD", D(1), expires),
        lambda: ledger.commit_hold("never placed"),
        lambda: ledger.pin_hold("never placed"),
    ]
    outcomes = [_outcome(step) for step in steps]
    outcomes.append([ledger.get_hold(k) for k in ("paid", "refunded", "open-ended", "locked", "late")])
    outcomes.append(ledger.open_holds())
    outcomes.append(ledger.balances())
    outcomes.append(ledger.verify())
    return outcomes


@pytest.mark.parametrize("general_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_fast_path_answers_every_case_as_the_general_path_does(
    sqlite_url: str, general_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The same script on a ledger with the fast path and on one without: the same answers."""
    if general_backend == "sqlite":
        general_url = f"sqlite:///{tmp_path / 'general.db'}"
    else:
        general_url = str(request.getfixturevalue("postgres_url"))
    with_fast, general = SqlLedger("cash", sqlite_url), SqlLedger("cash", general_url)
    general._fast = None
    try:
        runs, answers = [], []
        for ledger in (with_fast, general):
            answers.append(warm(ledger, alice="500.00", bob="0", carol="0"))
            ledger.open_account("bob-eur", "EUR", "bob", precision=2)
            ledger.account_facts(["bob-eur"])
            runs.append(_script(ledger))
    finally:
        with_fast.close()
        general.close()

    assert runs[0] == runs[1]
    # The script's common cases ran on the fast path; everything else fell back.
    assert answers[0].fast == ["place_hold"] * 4 + ["pin_hold"] * 2 + ["commit_hold", "release_hold"]
    assert len(answers[0].general) == 18
    assert (
        runs[0][2]
        == "IdempotencyConflict: hold 'paid' exists with different terms: amount 120.25 (asked 120)"
    )
    assert runs[0][6] == (
        "InsufficientFunds: account 'alice' has 344.74 USD available; hold 'short' requested 400.00 USD"
    )


def test_fast_and_general_paths_store_the_same_text(sqlite_url: str) -> None:
    ledger = SqlLedger("cash", sqlite_url)
    try:
        seed(ledger, alice="500.00", bob="0")
        answers = watch(ledger)
        expires = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)  # no microseconds: still six digits
        ledger.place_hold("general", "alice", "bob", "USD", D(10), expires)  # facts not yet cached
        ledger.place_hold("fast", "alice", "bob", "USD", D(10), expires)
        ledger.release_hold("fast")
        ledger.release_hold("general")
        assert answers == Answers(["place_hold", "release_hold", "release_hold"], ["place_hold"])
        engine = create_engine(sqlite_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT hold_id, expires_at, created_at, resolved_at FROM holds ORDER BY hold_id")
                ).all()
        finally:
            engine.dispose()
    finally:
        ledger.close()

    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}"  # SQLAlchemy's, so text order is time order
    assert [r.expires_at for r in rows] == ["2030-01-02 03:04:05.000000"] * 2
    for row in rows:
        assert re.fullmatch(stamp, row.created_at) and re.fullmatch(stamp, row.resolved_at), row


def test_the_fast_path_uses_the_one_writer_connection_whichever_it_is(sqlite_url: str) -> None:
    ledger = SqlLedger("cash", sqlite_url)
    try:
        answers = warm(ledger, alice="500.00", bob="0")
        assert ledger._fast is not None

        def pooled() -> Any:
            with ledger._writer.connect() as conn:
                return conn.connection.driver_connection

        assert ledger._fast._driver.connection is pooled()
        with ledger._writer.connect() as conn:
            conn.invalidate()  # as after a failure: the pool closes it and opens another
        ledger.place_hold("a", "alice", "bob", "USD", D(10), LATER)  # the general path reopens
        ledger.close()  # disposes of the pool; the next write opens a connection again
        ledger.commit_hold("a")
        assert answers == Answers([], ["place_hold", "commit_hold"])

        ledger.place_hold("b", "alice", "bob", "USD", D(10), LATER)
        ledger.commit_hold("b")
        assert answers == Answers(
            ["place_hold", "commit_hold"], ["place_hold", "commit_hold"]
        )  # on the new one
        assert ledger._fast is not None
        assert ledger._fast._driver.connection is pooled()
        assert isinstance(ledger._writer.pool, QueuePool)  # a file database's default pool
        assert ledger._writer.pool.checkedin() == 1
        assert balance(ledger) == {"alice": D(480), "bob": D(20), "issuer:USD": D(-500)}
        assert ledger.verify() == []
    finally:
        ledger.close()


def test_a_sqlite_write_lock_held_past_the_busy_timeout_is_unavailable(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("adapters.sql.SQLITE_BUSY_TIMEOUT_S", 0.2)
    ledger = SqlLedger("cash", sqlite_url)
    database = make_url(sqlite_url).database
    assert database is not None
    other = sqlite3.connect(database, isolation_level=None)
    try:
        answers = warm(ledger, alice="500.00", bob="0")
        ledger.place_hold("a", "alice", "bob", "USD", D(10), LATER)
        other.execute("BEGIN IMMEDIATE")  # another process writing, for longer than the timeout
        for operation in (
            lambda: ledger.place_hold("b", "alice", "bob", "USD", D(10), LATER),  # fast path
            lambda: ledger.open_account("carol", "USD", "carol"),  # general path
        ):
            with pytest.raises(LedgerUnavailable, match="ledger 'cash': the database is unavailable"):
                operation()
        other.execute("ROLLBACK")
        ledger.commit_hold("a")
        # "b" was not left to the general path: it would only have waited a second time.
        assert answers == Answers(["place_hold", "commit_hold"], [])
        assert balance(ledger) == {"alice": D(490), "bob": D(10), "issuer:USD": D(-500)}
        assert ledger.verify() == []
    finally:
        other.close()
        ledger.close()


# --------------------------------------------------------------------- concurrency

WORKERS = 4
HOLDS_EACH = 25


def _race(url: str, index: int, barrier: Any, results: Any) -> None:
    """One worker process: race the others placing holds, then resolving shared holds."""
    placed = short = 0
    lowest = None
    outcomes: dict[str, str] = {}
    errors: list[str] = []
    ledger = SqlLedger("cash", url)
    try:
        barrier.wait(timeout=120)
        for n in range(HOLDS_EACH):
            try:
                ledger.place_hold(f"race-{index}-{n}", "alice", "bob", "USD", D(10), LATER)
                placed += 1
            except InsufficientFunds:
                short += 1
            seen = ledger.account("alice").available
            lowest = seen if lowest is None else min(lowest, seen)
        barrier.wait(timeout=120)
        outcomes["contested"] = ledger.commit_hold("contested").status.value
        try:
            hold = ledger.commit_hold("mixed") if index % 2 else ledger.release_hold("mixed")
            outcomes["mixed"] = hold.status.value
        except HoldNotOpen:
            outcomes["mixed"] = "lost"
    except Exception as exc:  # reported to the parent, which fails the test
        errors.append(repr(exc))
    finally:
        ledger.close()
        results.put(
            {"placed": placed, "short": short, "lowest": lowest, "outcomes": outcomes, "errors": errors}
        )


def test_processes_racing_for_one_balance_never_overdraw(ledger_url: str) -> None:
    """Given alice 500, 4 processes x 25 holds of 10 at once: exactly 50 succeed."""
    ledger = SqlLedger("cash", ledger_url)
    try:
        seed(ledger, alice="500.00", bob="0", carol="200.00")
        ledger.place_hold("contested", "carol", "bob", "USD", D(100), LATER)
        ledger.place_hold("mixed", "carol", "bob", "USD", D(50), LATER)

        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(WORKERS)
        results = ctx.Queue()
        workers = [ctx.Process(target=_race, args=(ledger_url, i, barrier, results)) for i in range(WORKERS)]
        for worker in workers:
            worker.start()
        try:
            reports = [results.get(timeout=120) for _ in workers]
        except queue_module.Empty:
            pytest.fail("a worker process did not report")
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.kill()

        assert [r["errors"] for r in reports] == [[]] * WORKERS
        assert sum(r["placed"] for r in reports) == 50
        assert sum(r["short"] for r in reports) == WORKERS * HOLDS_EACH - 50
        assert min(r["lowest"] for r in reports) >= 0
        alice = ledger.account("alice")
        assert (alice.balance, alice.held, alice.available) == (D(500), D(500), D(0))

        # Every process committed "contested" and was told so; the money moved once.
        assert {r["outcomes"]["contested"] for r in reports} == {"committed"}
        # "mixed" was committed by some and released by others: one side won, the other lost.
        mixed = ledger.get_hold("mixed").status.value
        assert {r["outcomes"]["mixed"] for r in reports} == {mixed, "lost"}
        assert balance(ledger)["bob"] == D(100) + (D(50) if mixed == "committed" else 0)
        assert balance(ledger)["carol"] == D(100) - (D(50) if mixed == "committed" else 0)

        engine = create_engine(ledger_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT count(*) FROM journal WHERE hold_id = 'contested'")).scalar()
        finally:
            engine.dispose()
        assert rows == 1
        assert ledger.verify() == []
    finally:
        ledger.close()
