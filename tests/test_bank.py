"""The bank's core-ledger service and the ``http`` ledger adapter, over real HTTP.

The service runs for real on a free port of 127.0.0.1: a uvicorn server thread in
this process, or ``python -m bank serve`` as a child process where a test
kills it. Its state is a real SQL ledger (SQLite, and PostgreSQL in one test).

Given these balances, after these calls (raw HTTP or through ``HttpLedger``), these
balances; and the settlement engine settles a DvP whose cash leg is at the bank,
even when the bank goes down between reservation and commit.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

import bank.service as bank_service
from adapters import Ledger, open_ledger
from adapters.http import HttpLedger
from adapters.sql import SqlLedger
from domain import (
    AssetMismatch,
    Config,
    ConfigError,
    Hold,
    HoldNotOpen,
    HoldStatus,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerConfig,
    LedgerError,
    LedgerUnavailable,
    TradeStatus,
    UnknownAccount,
    UnknownHold,
)
from processes.bank import BankService
from processes.ports import free_port
from starter.instructions import dvp_instruction

from ._fixtures_settlement import STANDARD_ACCOUNTS, Engine, make_config, run_engine, sqlite_urls

D = Decimal
REPO = Path(__file__).resolve().parent.parent
TOKEN = "bk-test-token"
CLIENT = "dvp-worker"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LATER = datetime.now(UTC) + timedelta(days=1)


# --------------------------------------------------------------------- servers


class BankThread:
    """The service over ``ledger`` in a uvicorn server thread of this process."""

    def __init__(self, ledger: Ledger) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = bank_service.create_app(ledger, {TOKEN: CLIENT})
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bank", daemon=True)

    def __enter__(self) -> BankThread:
        self.thread.start()
        end = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < end, "the bank service did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class BankProcess(BankService):
    """``python -m bank serve --config FILE --port N``: the real command, killable."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        config_path = tmp_path / "bank.toml"
        config_path.write_text(  # port = 1 is never used: --port overrides it
            f'[bank]\nurl = "{url}"\nport = 1\nname = "bank"\n\n[bank.tokens]\n{CLIENT} = "{TOKEN}"\n'
        )
        # The port is kept across restarts: the bank comes back where it was.
        super().__init__(config_path, free_port(), tmp_path / "bank.log")


@pytest.fixture
def bank_sql(sqlite_url: str) -> Iterator[SqlLedger]:
    """The SQL ledger the bank keeps its state in (read directly to check effects)."""
    ledger = SqlLedger("bank", sqlite_url)
    try:
        yield ledger
    finally:
        ledger.close()


@pytest.fixture
def bank(bank_sql: SqlLedger) -> Iterator[BankThread]:
    with BankThread(bank_sql) as server:
        yield server


@pytest.fixture
def adapter(bank: BankThread) -> Iterator[HttpLedger]:
    ledger = HttpLedger("cash", bank.url, TOKEN, timeout=5, retries=2, backoff=0.05)
    try:
        yield ledger
    finally:
        ledger.close()


@pytest.fixture
def raw(bank: BankThread) -> Iterator[httpx.Client]:
    """A plain HTTP client of the bank, without a token (pass ``headers=AUTH``)."""
    with httpx.Client(base_url=bank.url, timeout=5) as client:
        yield client


@pytest.fixture(params=["sql", "http"])
def ledger(request: pytest.FixtureRequest, bank_sql: SqlLedger) -> Ledger:
    """The same behaviours, asked of the SQL ledger itself and of the adapter over the bank."""
    if request.param == "sql":
        return bank_sql
    return request.getfixturevalue("adapter")


# --------------------------------------------------------------------- helpers


def seed(ledger: Ledger, **balances: str) -> None:
    for account, amount in balances.items():
        ledger.open_account(account, "EUR", account, D(amount), precision=2)


def balances(ledger: Ledger) -> dict[str, Decimal]:
    return {b.account: b.balance for b in ledger.balances()}


def state(ledger: SqlLedger) -> tuple[list[tuple[str, Decimal, Decimal]], list[Hold]]:
    """Everything a request could change: every balance and held amount, every open hold."""
    return [(b.account, b.balance, b.held) for b in ledger.balances()], ledger.open_holds()


def hold_body(hold_id: str = "BK-1#0", amount: Any = "10.00", **changes: Any) -> dict[str, Any]:
    return {
        "hold_id": hold_id,
        "account": "alice",
        "to_account": "bob",
        "asset": "EUR",
        "amount": amount,
        "expires_at": LATER.isoformat(),
        "trade_id": hold_id.split("#")[0],
        **changes,
    }


def error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


# ------------------------------------------------------------------------ auth


def test_health_needs_no_token(raw: httpx.Client) -> None:
    response = raw.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "ledger": "bank"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ],
    ids=["no-header", "wrong-token", "not-bearer", "empty-token"],
)
def test_without_a_valid_token_every_call_is_401_and_nothing_changes(
    raw: httpx.Client, bank_sql: SqlLedger, headers: dict[str, str]
) -> None:
    seed(bank_sql, alice="100.00", bob="0")
    bank_sql.place_hold("BK-a#0", "alice", "bob", "EUR", D("10.00"), LATER, "BK-a")
    bank_sql.place_hold("BK-a#1", "alice", "bob", "EUR", D("5.00"), LATER, "BK-a")
    before = state(bank_sql)

    calls = [
        raw.post(
            "/accounts",
            json={"account": "eve", "asset": "EUR", "owner": "eve", "balance": "1"},
            headers=headers,
        ),
        raw.post("/holds", json=hold_body("BK-b#0"), headers=headers),
        raw.post("/holds/BK-a%230/pin", headers=headers),
        raw.post("/holds/BK-a%230/commit", headers=headers),
        raw.post("/holds/BK-a%231/release", headers=headers),
        raw.post("/holds/expire", json={"now": (LATER + timedelta(days=1)).isoformat()}, headers=headers),
        raw.get("/accounts", headers=headers),
        raw.get("/holds/BK-a%230", headers=headers),
        raw.post("/holds", content=b"{not json", headers=headers),  # refused before its body is read
    ]

    for response in calls:
        assert response.status_code == 401, (response.request.url, response.text)
        assert error(response)["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert state(bank_sql) == before
    assert bank_sql.get_hold("BK-a#0").expires_at is not None  # not even pinned


def test_adapter_with_a_wrong_token_is_refused_naming_the_setting(
    bank: BankThread, bank_sql: SqlLedger
) -> None:
    seed(bank_sql, alice="100.00", bob="0")
    wrong = HttpLedger("cash", bank.url, "not-the-token", retries=0)
    try:
        with pytest.raises(LedgerError, match=r"refused our token.*ledgers\.cash\.token") as refused:
            wrong.place_hold("BK-t#0", "alice", "bob", "EUR", D("1.00"), LATER)
    finally:
        wrong.close()

    assert not isinstance(refused.value, LedgerUnavailable)  # a bad token does not heal by retrying
    assert bank_sql.open_holds() == []


# ------------------------------------------------------------------ bad bodies


def _without(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {k: v for k, v in body.items() if k != key}


def _with(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {**body, **changes}


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (_with(amount=10.5), "amount", "decimal string"),
        (_with(amount=10), "amount", "decimal string"),
        (_with(amount="-10.00"), "amount", "positive"),
        (_with(amount="0"), "amount", "positive"),
        (_with(amount="ten"), "amount", "not a decimal number"),
        (_with(amount="NaN"), "amount", "not a finite number"),
        (_without("amount"), "amount", "required"),
        (_without("account"), "account", "required"),
        (_without("expires_at"), "expires_at", "required"),
        (_with(expires_at="2030-01-01T00:00:00"), "expires_at", "timezone"),
        (_with(hold_id=""), "hold_id", "at least 1 character"),
        (_with(amout="10.00"), "amout", "Extra inputs"),
    ],
    ids=[
        "float",
        "json-int",
        "negative",
        "zero",
        "not-a-number",
        "nan",
        "no-amount",
        "no-account",
        "no-expiry",
        "naive-expiry",
        "empty-key",
        "unknown-key",
    ],
)
def test_bad_hold_body_is_422_naming_the_field_and_changes_nothing(
    raw: httpx.Client,
    bank_sql: SqlLedger,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    field: str,
    says: str,
) -> None:
    seed(bank_sql, alice="100.00", bob="0")
    before = state(bank_sql)

    response = raw.post("/holds", json=change(hold_body()), headers=AUTH)

    assert response.status_code == 422
    refused = error(response)
    assert refused["code"] == "invalid_request"
    assert refused["field"] == field
    assert field in refused["message"] and says in refused["message"]
    assert state(bank_sql) == before


@pytest.mark.parametrize(
    ("request_args", "field"),
    [
        ({"content": b'{"hold_id": ', "headers": {"content-type": "application/json"}}, "body"),
        ({}, "body"),
        ({"json": [hold_body()]}, "body"),
    ],
    ids=["not-json", "no-body", "a-list"],
)
def test_a_body_that_is_not_an_object_is_422(
    raw: httpx.Client, bank_sql: SqlLedger, request_args: dict[str, Any], field: str
) -> None:
    seed(bank_sql, alice="100.00", bob="0")
    headers = {**AUTH, **request_args.pop("headers", {})}

    response = raw.post("/holds", headers=headers, **request_args)

    assert response.status_code == 422
    assert error(response)["code"] == "invalid_request"
    assert error(response)["field"] == field
    assert bank_sql.open_holds() == []


def test_bad_account_and_query_values_are_422_naming_the_field(
    raw: httpx.Client, bank_sql: SqlLedger
) -> None:
    account = {"account": "eve", "asset": "EUR", "owner": "eve", "precision": 2}
    cases = [
        (raw.post("/accounts", json={**account, "balance": 10.0}, headers=AUTH), "balance"),
        (raw.post("/accounts", json={**account, "balance": "-1"}, headers=AUTH), "balance"),
        (raw.post("/accounts", json={**account, "precision": 19}, headers=AUTH), "precision"),
        (raw.post("/accounts", json={**account, "precision": "2"}, headers=AUTH), "precision"),
        (raw.post("/holds/expire", json={"now": "yesterday"}, headers=AUTH), "now"),
        (raw.post("/holds/BK-x%230/commit", json={"preimage": 7}, headers=AUTH), "preimage"),
        (raw.get("/holds", params={"status": "committed"}, headers=AUTH), "status"),
    ]

    for response, field in cases:
        assert response.status_code == 422, response.text
        assert (error(response)["code"], error(response)["field"]) == ("invalid_request", field)
    assert bank_sql.balances() == []
    with pytest.raises(UnknownHold):
        bank_sql.get_hold("BK-x#0")


def test_adapter_refuses_a_float_before_it_reaches_the_bank(adapter: HttpLedger, bank_sql: SqlLedger) -> None:
    seed(bank_sql, alice="100.00", bob="0")

    with pytest.raises(InvalidAmount, match="not float"):
        adapter.place_hold("BK-f#0", "alice", "bob", "EUR", 10.5, LATER)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount, match="amount: must be positive"):
        adapter.place_hold("BK-f#0", "alice", "bob", "EUR", D("-1"), LATER)

    assert bank_sql.open_holds() == []


# ------------------------------------------------------------------ idempotency


def test_same_key_twice_over_raw_http_has_the_effect_of_once(raw: httpx.Client, bank_sql: SqlLedger) -> None:
    seed(bank_sql, alice="100.00", bob="0")

    placed = [raw.post("/holds", json=hold_body("BK-r#0", "30.00"), headers=AUTH) for _ in range(2)]
    assert [r.status_code for r in placed] == [200, 200]
    assert placed[0].json() == placed[1].json()
    assert placed[0].json()["amount"] == "30.00"  # a decimal string on the wire
    assert bank_sql.account("alice").held == D("30.00")

    committed = [raw.post("/holds/BK-r%230/commit", headers=AUTH) for _ in range(2)]
    assert [r.status_code for r in committed] == [200, 200]
    assert [r.json()["status"] for r in committed] == ["committed", "committed"]
    assert balances(bank_sql)["alice"] == D("70.00")
    assert balances(bank_sql)["bob"] == D("30.00")

    raw.post("/holds", json=hold_body("BK-r#1", "20.00"), headers=AUTH)
    released = [raw.post("/holds/BK-r%231/release", headers=AUTH) for _ in range(2)]
    assert [r.json()["status"] for r in released] == ["released", "released"]
    assert bank_sql.account("alice").available == D("70.00")

    # a resolved hold cannot be resolved the other way
    assert error(raw.post("/holds/BK-r%231/commit", headers=AUTH))["code"] == "hold_not_open"
    response = raw.post("/holds/BK-r%230/release", headers=AUTH)
    assert (response.status_code, error(response)["code"]) == (409, "hold_not_open")
    assert balances(bank_sql) == {"alice": D("70.00"), "bob": D("30.00"), "issuer:EUR": D("-100.00")}
    assert bank_sql.verify() == []


def test_same_key_with_different_terms_is_409_idempotency_conflict(
    raw: httpx.Client, adapter: HttpLedger, bank_sql: SqlLedger
) -> None:
    seed(bank_sql, alice="100.00", bob="0", carol="0")
    raw.post("/holds", json=hold_body("BK-c#0", "10.00"), headers=AUTH)

    response = raw.post("/holds", json=hold_body("BK-c#0", "11.00"), headers=AUTH)
    assert (response.status_code, error(response)["code"]) == (409, "idempotency_conflict")
    assert "amount 10.00 (asked 11.00)" in error(response)["message"]
    with pytest.raises(IdempotencyConflict, match="to_account 'bob'"):
        adapter.place_hold("BK-c#0", "alice", "carol", "EUR", D("10.00"), LATER, "BK-c")
    with pytest.raises(IdempotencyConflict, match="owned by 'alice'"):
        adapter.open_account("alice", "EUR", "mallory", precision=2)

    assert bank_sql.account("alice").held == D("10.00")
    assert bank_sql.get_hold("BK-c#0").to_account == "bob"


# ------------------------------------------------- the adapter behaves as the SQL ledger


def test_hold_then_commit_moves_exact_amounts(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="5.00")

    held = ledger.place_hold("BK-w/1#0", "alice", "bob", "EUR", D("40.25"), LATER, "BK-w/1")
    assert (held.ledger, held.status, held.amount, held.expires_at) == (
        ledger.name,
        HoldStatus.OPEN,
        D("40.25"),
        LATER,
    )
    alice = ledger.account("alice")
    assert (alice.balance, alice.held, alice.available) == (D("100.00"), D("40.25"), D("59.75"))
    assert [h.hold_id for h in ledger.open_holds()] == ["BK-w/1#0"]

    assert ledger.pin_hold("BK-w/1#0").expires_at is None
    committed = ledger.commit_hold("BK-w/1#0")

    assert committed.status is HoldStatus.COMMITTED
    assert balances(ledger) == {"alice": D("59.75"), "bob": D("45.25"), "issuer:EUR": D("-105.00")}
    assert str(ledger.account("bob").balance) == "45.25"
    assert ledger.open_holds() == []
    assert ledger.get_hold("BK-w/1#0") == committed


def test_hold_then_release_restores(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="0")
    before = balances(ledger)

    ledger.place_hold("BK-rel#0", "alice", "bob", "EUR", D("99.99"), LATER, "BK-rel")
    released = ledger.release_hold("BK-rel#0")

    assert released.status is HoldStatus.RELEASED
    assert balances(ledger) == before
    assert ledger.account("alice").available == D("100.00")
    assert ledger.open_holds() == []


def test_every_call_twice_has_the_effect_of_once(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="0")
    ledger.open_account("alice", "EUR", "alice", D("999"), precision=2)  # re-open issues nothing

    first = [ledger.place_hold("BK-i#0", "alice", "bob", "EUR", D("10.00"), LATER, "BK-i") for _ in range(2)]
    pins = [ledger.pin_hold("BK-i#0") for _ in range(2)]
    commits = [ledger.commit_hold("BK-i#0") for _ in range(2)]
    assert first[0] == first[1] and pins[0] == pins[1] and commits[0] == commits[1]
    assert ledger.pin_hold("BK-i#0").status is HoldStatus.COMMITTED  # a late pin answers the outcome

    ledger.place_hold("BK-i#1", "alice", "bob", "EUR", D("20.00"), LATER, "BK-i")
    assert ledger.release_hold("BK-i#1") == ledger.release_hold("BK-i#1")

    assert balances(ledger) == {"alice": D("90.00"), "bob": D("10.00"), "issuer:EUR": D("-100.00")}
    assert ledger.account("alice").held == D(0)


def test_release_of_an_unknown_key_refuses_the_late_hold(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="0")

    tombstone = ledger.release_hold("BK-late#0")
    late = ledger.place_hold("BK-late#0", "alice", "bob", "EUR", D("10.00"), LATER, "BK-late")

    assert tombstone.status is HoldStatus.RELEASED and tombstone.amount == 0
    assert late.status is HoldStatus.RELEASED and late.amount == 0
    assert ledger.account("alice").held == D(0)


def test_refusals_raise_the_same_domain_errors(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="0")
    ledger.open_account("bob-usd", "USD", "bob", precision=2)
    ledger.place_hold("BK-e#0", "alice", "bob", "EUR", D("10.00"), LATER, "BK-e")
    ledger.release_hold("BK-e#0")
    before = balances(ledger)

    with pytest.raises(UnknownAccount, match="'carol'"):
        ledger.account("carol")
    with pytest.raises(UnknownAccount):
        ledger.place_hold("BK-e#1", "carol", "bob", "EUR", D("1.00"), LATER)
    with pytest.raises(UnknownHold, match="'BK-nope#0'"):
        ledger.get_hold("BK-nope#0")
    with pytest.raises(UnknownHold):
        ledger.commit_hold("BK-nope#0")
    with pytest.raises(InsufficientFunds, match="100.00 EUR available"):
        ledger.place_hold("BK-e#2", "alice", "bob", "EUR", D("100.01"), LATER)
    with pytest.raises(InvalidAmount, match="more decimal places"):
        ledger.place_hold("BK-e#3", "alice", "bob", "EUR", D("1.001"), LATER)
    with pytest.raises(AssetMismatch):
        ledger.place_hold("BK-e#4", "alice", "bob-usd", "EUR", D("1.00"), LATER)
    with pytest.raises(HoldNotOpen, match="already released"):
        ledger.commit_hold("BK-e#0")
    with pytest.raises(HoldNotOpen):
        ledger.pin_hold("BK-e#0")

    assert balances(ledger) == before
    assert ledger.open_holds() == []


def test_a_hashlocked_hold_commits_only_with_its_preimage(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="0")
    secret = bytes(range(32))
    lock = hashlib.sha256(secret).hexdigest()
    ledger.place_hold("BK-h#0", "alice", "bob", "EUR", D("10.00"), LATER, "BK-h", hashlock=lock)

    with pytest.raises(LedgerError, match="preimage does not match"):
        ledger.commit_hold("BK-h#0", preimage="00" * 32)
    assert ledger.get_hold("BK-h#0").status is HoldStatus.OPEN

    assert ledger.commit_hold("BK-h#0", preimage=secret.hex()).status is HoldStatus.COMMITTED
    assert balances(ledger)["bob"] == D("10.00")


def test_expiry_sweep_releases_only_expired_unpinned_holds(ledger: Ledger) -> None:
    seed(ledger, alice="100.00", bob="0")
    past = datetime.now(UTC) - timedelta(seconds=1)
    ledger.place_hold("BK-x#0", "alice", "bob", "EUR", D("10.00"), past, "BK-x")
    ledger.place_hold("BK-x#1", "alice", "bob", "EUR", D("20.00"), past, "BK-x")
    ledger.place_hold("BK-x#2", "alice", "bob", "EUR", D("30.00"), LATER, "BK-x")
    ledger.pin_hold("BK-x#1")

    expired = ledger.expire_holds(datetime.now(UTC))

    assert [h.hold_id for h in expired] == ["BK-x#0"]
    assert [h.hold_id for h in ledger.open_holds()] == ["BK-x#1", "BK-x#2"]
    assert ledger.account("alice").held == D("50.00")


def test_the_bank_sweeps_by_its_own_clock(adapter: HttpLedger, bank_sql: SqlLedger) -> None:
    seed(bank_sql, alice="100.00", bob="0")
    adapter.place_hold("BK-clock#0", "alice", "bob", "EUR", D("10.00"), LATER, "BK-clock")

    # a client whose clock is days ahead cannot make the bank expire holds early
    assert adapter.expire_holds(LATER + timedelta(days=1)) == []
    assert bank_sql.get_hold("BK-clock#0").status is HoldStatus.OPEN


# -------------------------------------------------------------------- transport


class LosesFirstAnswer(SqlLedger):
    """The real SQL ledger whose first commit and first hold are applied, then fail.

    The service answers 500 after the change is made: the client never learns it
    happened, as when a connection drops just after the bank committed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: list[str] = []

    def _lose_once(self, what: str, hold: Hold) -> Hold:
        if what not in self.lost:
            self.lost.append(what)
            raise RuntimeError(f"the answer to {what} was lost")
        return hold

    def place_hold(self, *args: Any, **kwargs: Any) -> Hold:
        return self._lose_once("place", super().place_hold(*args, **kwargs))

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        return self._lose_once("commit", super().commit_hold(hold_id, preimage))


def test_a_lost_answer_is_retried_and_applied_once(sqlite_url: str) -> None:
    flaky = LosesFirstAnswer("bank", sqlite_url)
    try:
        seed(flaky, alice="100.00", bob="0")
        with BankThread(flaky) as server:
            adapter = HttpLedger("cash", server.url, TOKEN, retries=2, backoff=0.01)
            try:
                placed = adapter.place_hold("BK-lost#0", "alice", "bob", "EUR", D("25.00"), LATER, "BK-lost")
                committed = adapter.commit_hold("BK-lost#0")
            finally:
                adapter.close()

        assert flaky.lost == ["place", "commit"]  # both were answered 500 once, then retried
        assert placed.status is HoldStatus.OPEN and committed.status is HoldStatus.COMMITTED
        assert balances(flaky) == {"alice": D("75.00"), "bob": D("25.00"), "issuer:EUR": D("-100.00")}
        assert flaky.verify() == []
    finally:
        flaky.close()


def test_an_unreachable_bank_is_unavailable_after_a_few_quick_retries() -> None:
    port = free_port()  # nothing listens there
    adapter = HttpLedger("cash", f"http://127.0.0.1:{port}", TOKEN, retries=2, backoff=0.05)
    try:
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match=rf"127.0.0.1:{port}.*after 3 attempts.*ConnectError"):
            adapter.commit_hold("BK-down#0")
        assert time.monotonic() - started < 2
    finally:
        adapter.close()


class SlowLedger(SqlLedger):
    def account(self, account: str) -> Any:
        time.sleep(1)
        return super().account(account)


class UnavailableDatabase(SqlLedger):
    def pin_hold(self, hold_id: str) -> Hold:
        raise LedgerUnavailable("ledger 'bank': the database is unavailable: connection refused")


def test_a_slow_bank_times_out_within_the_deadline_and_a_503_is_unavailable(
    sqlite_url: str, tmp_path: Path
) -> None:
    slow = SlowLedger("bank", sqlite_url)
    down = UnavailableDatabase("bank", f"sqlite:///{tmp_path / 'down.db'}")
    try:
        with BankThread(slow) as slow_bank, BankThread(down) as down_bank:
            timed = HttpLedger("cash", slow_bank.url, TOKEN, timeout=0.3, retries=1, backoff=0.01)
            bounded = HttpLedger("cash", slow_bank.url, TOKEN, timeout=0.3, retries=20, deadline=0.8)
            refused = HttpLedger("cash", down_bank.url, TOKEN, retries=1, backoff=0.01)
            try:
                with pytest.raises(LedgerUnavailable, match="after 2 attempts: ReadTimeout"):
                    timed.account("alice")
                started = time.monotonic()
                with pytest.raises(LedgerUnavailable, match="ReadTimeout"):
                    bounded.account("alice")  # 21 attempts allowed, but not in 0.8 s
                assert time.monotonic() - started < 1.2
                with pytest.raises(
                    LedgerUnavailable, match="HTTP 503: ledger 'bank': the database is unavailable"
                ):
                    refused.pin_hold("BK-503#0")
            finally:
                timed.close()
                bounded.close()
                refused.close()
    finally:
        slow.close()
        down.close()


# ----------------------------------------------------------------- configuration


def test_the_http_ledger_is_built_from_its_configuration_section(
    bank: BankThread, bank_sql: SqlLedger
) -> None:
    seed(bank_sql, alice="100.00")
    config = LedgerConfig.model_validate(
        {"kind": "http", "url": bank.url, "token": TOKEN, "timeout": 2.5, "retries": 1, "deadline": 4}
    )

    ledger = open_ledger("cash", config)
    try:
        assert isinstance(ledger, HttpLedger)
        assert ledger.account("alice").balance == D("100.00")
    finally:
        ledger.close()

    refused = {
        "ledgers.cash.token": {"kind": "http", "url": bank.url},
        "ledgers.cash.url": {"kind": "http", "token": TOKEN},
        "ledgers.cash.url: 'ftp://x'": {"kind": "http", "url": "ftp://x", "token": TOKEN},
        "ledgers.cash.timeout": {"kind": "http", "url": bank.url, "token": TOKEN, "timeout": "5s"},
        "ledgers.cash.retries": {"kind": "http", "url": bank.url, "token": TOKEN, "retries": -1},
        "ledgers.cash.deadline": {"kind": "http", "url": bank.url, "token": TOKEN, "deadline": 0},
        "ledgers.cash.tokn: not an option": {"kind": "http", "url": bank.url, "tokn": TOKEN},
    }
    for message, section in refused.items():
        with pytest.raises(ConfigError, match=message):
            open_ledger("cash", LedgerConfig.model_validate(section))


def test_bank_serve_command_and_its_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # as the dvp CLI registers it: its own --config stays the engine's configuration
    parser = argparse.ArgumentParser(prog="dvp")
    parser.add_argument("--config")
    bank_service.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["--config", "dvp.toml", "bank", "serve", "--config", "bank.toml", "--port", "9"]
    )
    assert (args.config, args.bank_config, args.port) == ("dvp.toml", "bank.toml", 9)
    assert args.handler is bank_service.cmd_serve

    good = tmp_path / "bank.toml"
    good.write_text(
        '[bank]\nurl = "sqlite:///x.db"\nport = 8181\n\n[bank.tokens]\ndvp-worker = "s1"\nauditor = "s2"\n'
    )
    config = bank_service.load_bank_config(good)
    assert (config.url, config.host, config.port) == ("sqlite:///x.db", "127.0.0.1", 8181)
    assert config.tokens == {"s1": "dvp-worker", "s2": "auditor"}

    bad = {
        "bank.tokens: no client tokens": '[bank]\nurl = "sqlite:///x.db"\n',
        "bank.prot: Extra inputs": '[bank]\nprot = 1\n[bank.tokens]\na = "t"\n',
        "bank.port: Input should be less than or equal": '[bank]\nport = 70000\n[bank.tokens]\na = "t"\n',
        "bank.tokens.b: same token as client 'a'": '[bank.tokens]\na = "t"\nb = "t"\n',
        "ledgers: unknown section": '[ledgers.cash]\nkind = "sql"\n',
        "not valid TOML": "[bank\n",
    }
    for message, text in bad.items():
        good.write_text(text)
        with pytest.raises(ConfigError, match=message):
            bank_service.load_bank_config(good)
        assert bank_service.main(["serve", "--config", str(good)]) == 2
        assert message in capsys.readouterr().err
    assert bank_service.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_the_bank_keeps_its_state_in_postgresql(postgres_url: str) -> None:
    state_ledger = SqlLedger("bank", postgres_url)
    try:
        with BankThread(state_ledger) as server:
            adapter = HttpLedger("cash", server.url, TOKEN, retries=1, backoff=0.01)
            try:
                seed(adapter, alice="100.00", bob="0")
                for _ in range(2):
                    adapter.place_hold("BK-pg#0", "alice", "bob", "EUR", D("33.33"), LATER, "BK-pg")
                    adapter.pin_hold("BK-pg#0")
                    adapter.commit_hold("BK-pg#0")
                adapter.place_hold("BK-pg#1", "alice", "bob", "EUR", D("1.00"), LATER, "BK-pg")
                adapter.release_hold("BK-pg#1")
                with pytest.raises(IdempotencyConflict):
                    adapter.place_hold("BK-pg#0", "alice", "bob", "EUR", D("33.34"), LATER, "BK-pg")
                assert adapter.verify() == []
            finally:
                adapter.close()

        assert balances(state_ledger) == {"alice": D("66.67"), "bob": D("33.33"), "issuer:EUR": D("-100.00")}
        assert state_ledger.open_holds() == []
        assert state_ledger.verify() == []
    finally:
        state_ledger.close()


# -------------------------------------------------------------------- settlement


def bank_config(tmp_path: Path, prefix: str, bank: BankProcess) -> Config:
    """The standard engine configuration, with the ``cash`` ledger at the bank (kind http)."""
    config = make_config(sqlite_urls(tmp_path), prefix)
    cash = LedgerConfig.model_validate(
        {"kind": "http", "url": bank.url, "token": TOKEN, "timeout": 2, "retries": 2}
    )
    return config.model_copy(update={"ledgers": {**config.ledgers, "cash": cash}})


def dvp(trade_id: str, bonds: str, cash: str) -> dict[str, Any]:
    """Bob delivers ``bonds`` BOND-2030 to alice (SQL ledger) against ``cash`` EUR (at the bank)."""
    return dvp_instruction(trade_id, "bob", "alice", bonds, cash, settle_within="PT60S")


async def until(condition: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    end = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(condition)):
        assert time.monotonic() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)
    return value


def assert_settled_once(engine: Engine, bank_state: SqlLedger, bonds: str, cash: str) -> None:
    """Each leg moved exactly once: exact balances, nothing held, both ledgers consistent."""
    seeded = {(a["ledger"], a["id"]): D(a["balance"]) for a in STANDARD_ACCOUNTS}
    assert engine.balance("securities", "bob-sec") == seeded[("securities", "bob-sec")] - D(bonds)
    assert engine.balance("securities", "alice-sec") == seeded[("securities", "alice-sec")] + D(bonds)
    assert engine.balance("cash", "alice-cash") == seeded[("cash", "alice-cash")] - D(cash)
    assert engine.balance("cash", "bob-cash") == seeded[("cash", "bob-cash")] + D(cash)
    assert engine.open_holds() == []
    engine.assert_invariants()  # SqlLedger.verify() here, the bank's own through GET /verify
    assert bank_state.verify() == []  # and straight from the bank's database
    assert bank_state.open_holds() == []


@pytest.mark.slow
async def test_dvp_with_the_cash_leg_at_the_bank_settles(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Given the standard accounts, the EUR ones opened at the bank through the adapter:
    bob delivers 100 bonds against 9,950.00 EUR and both legs settle."""
    service = await asyncio.to_thread(BankProcess(tmp_path, f"sqlite:///{tmp_path / 'bank.db'}").start)
    bank_state = SqlLedger("bank", f"sqlite:///{tmp_path / 'bank.db'}")
    config = bank_config(tmp_path, task_queue_prefix, service)
    try:
        async with run_engine(temporal_client, config) as engine:
            assert isinstance(engine.ledgers["cash"], HttpLedger)
            assert bank_state.account("alice-cash").balance == D("100000.00")  # seeded over HTTP

            await engine.client.submit(dvp("BK-dvp", "100", "9950.00"))
            final = await engine.client.wait("BK-dvp", timeout=30)

            assert final.status is TradeStatus.SETTLED, final.reason
            assert [leg.state.value for leg in final.legs] == ["COMMITTED", "COMMITTED"]
            assert_settled_once(engine, bank_state, "100", "9950.00")
            assert bank_state.get_hold("BK-dvp#1").status is HoldStatus.COMMITTED
    finally:
        service.kill()
        bank_state.close()


async def failed_commit(watch: PinWatch, hold_id: str, timeout: float = 20) -> str:
    """The failure of a commit attempt of ``hold_id`` at the bank (the bank being down).

    Read from the adapter the worker calls, so it works whether the ledger's calls run
    as local activities (whose failed attempts the server never sees) or on its queue.
    """
    end = time.monotonic() + timeout
    while hold_id not in watch.commit_failures:
        assert time.monotonic() < end, f"no failed commit attempt of {hold_id}"
        await asyncio.sleep(0.1)
    return watch.commit_failures[hold_id]


class PinGate(SqlLedger):
    """The real securities ledger, whose pins wait until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def pin_hold(self, hold_id: str) -> Hold:
        self.waiting.set()
        self.gate.wait(30)
        return super().pin_hold(hold_id)


class PinWatch(HttpLedger):
    """The real adapter of the bank, telling the test when the bank has answered a pin
    and how a commit attempt failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pinned = threading.Event()
        self.commit_failures: dict[str, str] = {}  # hold id -> the last failure

    def pin_hold(self, hold_id: str) -> Hold:
        hold = super().pin_hold(hold_id)
        self.pinned.set()
        return hold

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        try:
            return super().commit_hold(hold_id, preimage)
        except Exception as exc:
            self.commit_failures[hold_id] = str(exc)
            raise


@pytest.mark.slow
async def test_bank_down_between_reserve_and_commit_settles_each_leg_once(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """The bank process is SIGKILLed once it has placed and pinned the trade's cash
    hold, while the securities pin is still under way; the commit decision is then
    made with the bank down, and the cash commit fails until the bank comes back on
    the same port and database. The trade settles with every leg exactly once."""
    bank_url = f"sqlite:///{tmp_path / 'bank.db'}"
    service = await asyncio.to_thread(BankProcess(tmp_path, bank_url).start)
    bank_state = SqlLedger("bank", bank_url)
    config = bank_config(tmp_path, task_queue_prefix, service)
    securities = PinGate("securities", str(config.ledgers["securities"].url))
    cash = PinWatch("cash", service.url, TOKEN, timeout=2, retries=2)
    instances: dict[str, Ledger] = {"securities": securities, "cash": cash}
    try:
        async with run_engine(temporal_client, config, instances) as engine:
            try:
                await engine.client.submit(dvp("BK-fault", "40", "3980.00"))
                await until(securities.waiting.is_set, "the securities pin is under way")
                await until(cash.pinned.is_set, "the bank answered the cash pin")
                cash_hold = bank_state.get_hold("BK-fault#1")
                assert (cash_hold.status, cash_hold.amount, cash_hold.expires_at) == (
                    HoldStatus.OPEN,
                    D("3980.00"),
                    None,
                )

                await asyncio.to_thread(service.kill)
                securities.gate.set()  # the decision is recorded with the bank down
                await until(
                    lambda: securities.get_hold("BK-fault#0").status is HoldStatus.COMMITTED,
                    "the securities leg is committed",
                )
                assert (await engine.client.status("BK-fault")).status is TradeStatus.COMMITTING
                failure = await failed_commit(cash, "BK-fault#1")
                assert "did not answer" in failure, failure
                assert bank_state.get_hold("BK-fault#1").status is HoldStatus.OPEN

                await asyncio.to_thread(service.start)  # same port, same database
                final = await engine.client.wait("BK-fault", timeout=40)

                assert final.status is TradeStatus.SETTLED, final.reason
                assert [leg.state.value for leg in final.legs] == ["COMMITTED", "COMMITTED"]
                assert_settled_once(engine, bank_state, "40", "3980.00")
                assert securities.verify() == []
            finally:
                securities.gate.set()  # never leave a worker thread parked at the gate
    finally:
        securities.gate.set()
        service.kill()
        bank_state.close()
        securities.close()
        cash.close()
