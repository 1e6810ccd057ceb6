"""The HTLC protocol on the real dev server, and how it differs from the escrow saga.

Bob (the seller) holds the secret and delivers 100 BOND-2030 to alice (legs[0],
the longer timelock); alice pays bob 9,950.00 EUR (legs[1], refunds at the
deadline). Bob claims the payment with the preimage, which reveals it; the engine
then claims the bonds for alice.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapters.sql import SqlLedger
from connection import party_tagger
from connection.codec import history_payloads
from domain import (
    Hold,
    HoldStatus,
    InvalidInstruction,
    LedgerError,
    LedgerUnavailable,
    LegState,
    RequestRejected,
    TradeStatus,
    TradeView,
)
from starter.instructions import dvp_instruction
from workflows import workflow_id_for

from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls
from ._fixtures_settlement import wait_for_status as _wait_for_status


def new_secret() -> tuple[str, str]:
    """A fresh 32-byte secret in hex and its SHA-256 (the hashlock)."""
    secret = secrets.token_bytes(32)
    return secret.hex(), hashlib.sha256(secret).hexdigest()


def htlc(trade_id: str, hashlock: str, settle_within: str = "PT60S", **extra: Any) -> dict[str, Any]:
    return dvp_instruction(
        trade_id,
        "bob",
        "alice",
        "100",
        "9950.00",
        protocol="htlc",
        hashlock=hashlock,
        settle_within=settle_within,
        **extra,
    )


wait_for_status = functools.partial(_wait_for_status, timeout=60)


def event_at(view: TradeView, event: str) -> datetime:
    found = [e.at for e in view.timeline if e.event == event]
    assert found, f"no {event!r} in {[e.event for e in view.timeline]}"
    return found[0]


async def history_bytes(engine: Engine, trade_id: str) -> bytes:
    """The workflow's whole history as the server stores it, and each of its payloads decrypted."""
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    history = await handle.fetch_history()
    codec = engine.client.client.data_converter.payload_codec
    assert codec is not None
    decoded = await codec.decode(history_payloads(history))
    return b"".join(item.SerializeToString() for item in [*history.events, *decoded])


def secret_in(raw: bytes, preimage: str) -> bool:
    return any(
        form in raw for form in (preimage.encode(), preimage.upper().encode(), bytes.fromhex(preimage))
    )


def moved(
    before: dict[tuple[str, str], Decimal], after: dict[tuple[str, str], Decimal]
) -> dict[Any, Decimal]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


BONDS_TO_ALICE = {("securities", "bob-sec"): Decimal("-100"), ("securities", "alice-sec"): Decimal("100")}
CASH_TO_BOB = {("cash", "alice-cash"): Decimal("-9950.00"), ("cash", "bob-cash"): Decimal("9950.00")}


# ------------------------------------------------------------------- protocol


async def test_htlc_trade_settles_when_the_seller_claims(settlement: Engine) -> None:
    preimage, hashlock = new_secret()
    before = settlement.balances()
    await settlement.client.submit(htlc("H-settle", hashlock))
    locked = await wait_for_status(settlement, "H-settle", TradeStatus.AWAITING_CLAIM)
    assert [leg.state for leg in locked.legs] == [LegState.HELD, LegState.HELD]
    holds = {h.hold_id: h for h in settlement.open_holds()}
    assert {h.hashlock for h in holds.values()} == {hashlock}
    # the seller's leg has the longer timelock
    assert holds["H-settle#0"].expires_at > holds["H-settle#1"].expires_at

    await settlement.acting("bob").claim("H-settle", preimage)
    final = await settlement.client.wait("H-settle", timeout=60)

    assert final.status is TradeStatus.SETTLED, final.reason
    assert [leg.state for leg in final.legs] == [LegState.COMMITTED, LegState.COMMITTED]
    assert moved(before, settlement.balances()) == BONDS_TO_ALICE | CASH_TO_BOB
    assert event_at(final, "leg 1 claimed") <= event_at(final, "leg 0 claimed")
    assert settlement.open_holds() == []
    settlement.assert_invariants()


async def test_unclaimed_htlc_refunds_each_leg_at_its_timelock(settlement: Engine) -> None:
    _, hashlock = new_secret()
    before = settlement.balances()
    await settlement.client.submit(htlc("H-refund", hashlock, settle_within="PT3S", claim_window="PT2S"))

    final = await settlement.client.wait("H-refund", timeout=90)

    assert final.status is TradeStatus.EXPIRED, final.reason
    assert [leg.state for leg in final.legs] == [LegState.RELEASED, LegState.RELEASED]
    assert settlement.balances() == before
    assert final.deadline is not None
    payment_refunded, delivery_refunded = event_at(final, "leg 1 refunded"), event_at(final, "leg 0 refunded")
    assert payment_refunded >= final.deadline  # legs[1]'s timelock is the deadline
    assert delivery_refunded >= final.deadline + timedelta(seconds=2)  # legs[0]'s, the claim window later
    assert "leg 1 locked" in [e.event for e in final.timeline]
    assert settlement.open_holds() == []
    settlement.assert_invariants()


async def test_wrong_preimage_is_rejected_and_changes_nothing(settlement: Engine) -> None:
    preimage, hashlock = new_secret()
    wrong, _ = new_secret()
    await settlement.client.submit(htlc("H-wrong", hashlock))
    await wait_for_status(settlement, "H-wrong", TradeStatus.AWAITING_CLAIM)
    before, holds_before = settlement.balances(), settlement.open_holds()

    with pytest.raises(RequestRejected, match="preimage: its SHA-256 does not match"):
        await settlement.acting("bob").claim("H-wrong", wrong)
    with pytest.raises(InvalidInstruction, match="preimage"):
        await settlement.acting("bob").claim("H-wrong", "not-hex")

    view = await settlement.client.status("H-wrong")
    assert view.status is TradeStatus.AWAITING_CLAIM
    assert [leg.state for leg in view.legs] == [LegState.HELD, LegState.HELD]
    assert settlement.balances() == before
    assert settlement.open_holds() == holds_before
    assert not secret_in(await history_bytes(settlement, "H-wrong"), wrong)  # rejected before recording

    await settlement.acting("bob").claim("H-wrong", preimage)
    assert (await settlement.client.wait("H-wrong", timeout=60)).status is TradeStatus.SETTLED


async def test_preimage_is_in_no_workflow_payload_before_the_claim(settlement: Engine) -> None:
    preimage, hashlock = new_secret()
    await settlement.client.submit(htlc("H-secret", hashlock))
    await wait_for_status(settlement, "H-secret", TradeStatus.AWAITING_CLAIM)

    raw = await history_bytes(settlement, "H-secret")
    assert hashlock.encode() in raw  # the history does carry the instruction...
    assert not secret_in(raw, preimage)  # ...but not the secret, in any form
    handle = settlement.client.client.get_workflow_handle(workflow_id_for("H-secret"))
    described = await handle.describe()
    assert not secret_in(repr(described.raw_description).encode(), preimage)  # memo, search attributes

    await settlement.acting("bob").claim("H-secret", preimage)
    assert secret_in(await history_bytes(settlement, "H-secret"), preimage)  # the claim reveals it
    assert (await settlement.client.wait("H-secret", timeout=60)).status is TradeStatus.SETTLED


async def test_htlc_refuses_what_it_cannot_do_naming_the_field(settlement: Engine) -> None:
    _, hashlock = new_secret()
    three_legs = htlc("H-bad", hashlock)
    three_legs["legs"].append(
        {"ledger": "fx", "asset": "USD", "from": "carol-usd", "to": "alice-usd", "amount": "1.00"}
    )
    with pytest.raises(InvalidInstruction, match="protocol: htlc needs a two-leg DvP"):
        await settlement.client.submit(three_legs)
    with pytest.raises(InvalidInstruction, match="hashlock: is required"):
        await settlement.client.submit({**htlc("H-bad", hashlock), "hashlock": None})
    not_a_swap = htlc("H-bad", hashlock)
    not_a_swap["legs"][1]["to"] = "carol-cash"
    with pytest.raises(InvalidInstruction, match=r"legs\[1\]: htlc needs a swap"):
        await settlement.client.submit(not_a_swap)
    assert settlement.open_holds() == []


# ------------------------------------------------------ escrow versus htlc


class FlakyCommits(SqlLedger):
    """A real SQL ledger whose commits fail as unavailable while ``down`` is set."""

    def __init__(self, name: str, url: str) -> None:
        super().__init__(name, url)
        self.down = threading.Event()

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        if self.down.is_set():
            raise LedgerUnavailable(f"ledger {self.name!r} is down (test)")
        return super().commit_hold(hold_id, preimage)


async def test_escrow_never_ends_one_sided_when_a_ledger_is_down_at_commit(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    urls = sqlite_urls(tmp_path)
    config = make_config(urls, task_queue_prefix, hold_backstop="PT1S", sweep_interval="PT0.2S")
    cash = FlakyCommits("cash", urls["cash"])
    cash.down.set()
    try:
        async with run_engine(temporal_client, config, instances={"cash": cash}) as engine:
            before = engine.balances()
            trade = htlc("E-down", "0" * 64, settle_within="PT3S")
            del trade["protocol"], trade["hashlock"]
            await engine.client.submit(trade)
            view = await wait_for_status(engine, "E-down", TradeStatus.COMMITTING)
            assert view.deadline is not None
            # well past deadline + backstop, with the sweep running: nothing expires a pinned hold
            while datetime.now(UTC) < view.deadline + timedelta(seconds=3):
                await asyncio.sleep(0.2)
            cash_hold = cash.get_hold("E-down#1")
            assert cash_hold.status is HoldStatus.OPEN and cash_hold.expires_at is None

            cash.down.clear()
            final = await engine.client.wait("E-down", timeout=90)

            assert final.status is TradeStatus.SETTLED, final.reason
            assert moved(before, engine.balances()) == BONDS_TO_ALICE | CASH_TO_BOB
            engine.assert_invariants()
    finally:
        cash.down.clear()
        cash.close()


async def test_htlc_ends_one_sided_when_the_other_claim_does_not_get_through(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    urls = sqlite_urls(tmp_path)
    config = make_config(urls, task_queue_prefix, sweep_interval="PT0.2S")
    securities = FlakyCommits("securities", urls["securities"])
    preimage, hashlock = new_secret()
    try:
        async with run_engine(temporal_client, config, instances={"securities": securities}) as engine:
            before = engine.balances()
            await engine.client.submit(htlc("H-down", hashlock, settle_within="PT10S", claim_window="PT2S"))
            await wait_for_status(engine, "H-down", TradeStatus.AWAITING_CLAIM)
            securities.down.set()  # alice's claim of the bonds will not get through

            await engine.acting("bob").claim("H-down", preimage)
            final = await engine.client.wait("H-down", timeout=90)

            assert final.status is TradeStatus.ONE_SIDED, final.reason
            assert [leg.state for leg in final.legs] == [LegState.RELEASED, LegState.COMMITTED]
            # bob has alice's cash and his bonds back; alice paid and got nothing
            assert moved(before, engine.balances()) == CASH_TO_BOB
            assert event_at(final, "leg 1 claimed") < event_at(final, "leg 0 refunded")
            assert engine.open_holds() == []
            engine.assert_invariants()
    finally:
        securities.down.clear()
        securities.close()


async def test_htlc_buyer_who_never_claims_is_left_one_sided(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Without auto_claim each party claims its own leg: alice walks away after bob claimed."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    preimage, hashlock = new_secret()
    async with run_engine(temporal_client, config) as engine:
        before = engine.balances()
        instruction = htlc("H-walk", hashlock, settle_within="PT10S", claim_window="PT2S", auto_claim=False)
        await engine.client.submit(instruction)
        await wait_for_status(engine, "H-walk", TradeStatus.AWAITING_CLAIM)

        claimed = await engine.acting("bob").claim("H-walk", preimage)  # bob takes the cash
        assert [leg.state for leg in claimed.legs] == [LegState.HELD, LegState.COMMITTED]
        assert any(preimage in e.detail for e in claimed.timeline)  # public now, for alice to use
        final = await engine.client.wait("H-walk", timeout=90)  # ...but alice never does

        assert final.status is TradeStatus.ONE_SIDED, final.reason
        assert [leg.state for leg in final.legs] == [LegState.RELEASED, LegState.COMMITTED]
        assert moved(before, engine.balances()) == CASH_TO_BOB
        assert final.deadline is not None
        assert event_at(final, "leg 0 refunded") >= final.deadline + timedelta(seconds=2)
        assert engine.open_holds() == []
        engine.assert_invariants()


# --------------------------------------------------------- ledger backstop


def test_sql_ledger_enforces_the_hashlock_and_the_timelock(tmp_path: Path) -> None:
    preimage, hashlock = new_secret()
    wrong, _ = new_secret()
    ledger = SqlLedger("cash", f"sqlite:///{tmp_path / 'cash.db'}")
    try:
        ledger.open_account("alice-cash", "EUR", "alice", Decimal("100.00"), precision=2)
        ledger.open_account("bob-cash", "EUR", "bob", precision=2)
        future = datetime.now(UTC) + timedelta(hours=1)
        past = datetime.now(UTC) - timedelta(seconds=1)
        ledger.place_hold("live", "alice-cash", "bob-cash", "EUR", Decimal("10.00"), future, "T", hashlock)
        ledger.place_hold("late", "alice-cash", "bob-cash", "EUR", Decimal("20.00"), past, "T", hashlock)

        with pytest.raises(LedgerError, match="preimage does not match"):
            ledger.commit_hold("live", wrong)
        with pytest.raises(LedgerError, match="timelock passed"):
            ledger.commit_hold("late", preimage)  # even with no sweep run yet
        assert ledger.account("bob-cash").balance == 0
        assert [h.hold_id for h in ledger.expire_holds(datetime.now(UTC))] == ["late"]
        assert ledger.commit_hold("live", preimage).status is HoldStatus.COMMITTED
        assert ledger.account("bob-cash").balance == Decimal("10.00")
        assert ledger.account("alice-cash").balance == Decimal("90.00")
        assert ledger.verify() == []
    finally:
        ledger.close()


async def test_dvp_claim_command_exit_codes(settlement: Engine, temporal_server: Any, tmp_path: Path) -> None:
    from .test_cli import config_file, dvp

    preimage, hashlock = new_secret()
    config = config_file(settlement, temporal_server.address, tmp_path)
    await settlement.client.submit(htlc("H-cli", hashlock))
    # the client sets the search attributes at start, as for an escrow trade
    started = await settlement.client.client.get_workflow_handle(workflow_id_for("H-cli")).describe()
    attributes = {pair.key.name: pair.value for pair in started.typed_search_attributes}
    assert attributes["DvpTradeId"] == "H-cli"
    assert attributes["DvpAssets"] == ["BOND-2030", "EUR"]
    tag = party_tagger(settlement.client.client)  # keyed hashes, not names ([codec] hash_parties)
    assert tag is not None
    assert {tag("alice-cash"), tag("bob-sec")} <= set(attributes["DvpParties"])
    await wait_for_status(settlement, "H-cli", TradeStatus.AWAITING_CLAIM)

    for _ in range(300):  # visibility is eventually consistent
        listed = await settlement.client.list(status="AWAITING_CLAIM")
        if "H-cli" in [v.trade_id for v in listed]:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("H-cli never listed as AWAITING_CLAIM")

    listed_json = await dvp(config, "list", "--status", "AWAITING_CLAIM", "--json")
    listed_text = await dvp(config, "list", "--status", "AWAITING_CLAIM")
    assert listed_json.returncode == 0, listed_json.stderr
    assert "H-cli" in [t["trade_id"] for t in json.loads(listed_json.stdout)]
    assert listed_text.returncode == 0 and "H-cli" in listed_text.stdout

    malformed = await dvp(config, "claim", "H-cli", "--preimage", "xyz")
    wrong = await dvp(config, "claim", "H-cli", "--preimage", new_secret()[0], as_="bob")
    right = await dvp(config, "claim", "H-cli", "--preimage", preimage, "--json", as_="bob")

    assert malformed.returncode == 2 and "preimage: must be a 32-byte secret" in malformed.stderr
    assert wrong.returncode == 1 and "does not match the trade's hashlock" in wrong.stderr
    assert right.returncode == 0, right.stderr
    assert [leg["state"] for leg in json.loads(right.stdout)["legs"]] == ["COMMITTED", "COMMITTED"]
    assert (await settlement.client.status("H-cli")).status is TradeStatus.SETTLED
