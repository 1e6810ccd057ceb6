"""Settlement scenarios on the real dev server, read as worked examples.

Given the standard accounts (bob holds 1000 BOND-2030, alice 100,000.00 EUR, ...),
these trades, these balances after.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapters.sql import SqlLedger
from domain import (
    DuplicateTrade,
    Hold,
    InvalidInstruction,
    LedgerError,
    RequestRejected,
    TradeStatus,
    TradeView,
)
from starter.instructions import dvp_instruction

from ._fixtures_auth import token
from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls, wait_for_status


def dvp(trade_id: str, bonds: str = "100", cash: str = "9950.00", **extra: Any) -> dict[str, Any]:
    """Bob delivers ``bonds`` BOND-2030 to alice against ``cash`` EUR."""
    return dvp_instruction(trade_id, "bob", "alice", bonds, cash, **extra)


def events(view: TradeView) -> list[str]:
    return [e.event for e in view.timeline]


async def test_dvp_settles_with_exact_balances(settlement: Engine) -> None:
    view = await settlement.client.submit(dvp("T-dvp"))
    assert view.status in (TradeStatus.PENDING, TradeStatus.RESERVING, TradeStatus.COMMITTING)

    final = await settlement.client.wait("T-dvp")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert [leg.state.value for leg in final.legs] == ["COMMITTED", "COMMITTED"]
    assert settlement.balance("securities", "bob-sec") == Decimal("900")
    assert settlement.balance("securities", "alice-sec") == Decimal("100")
    assert settlement.balance("cash", "alice-cash") == Decimal("90050.00")
    assert settlement.balance("cash", "bob-cash") == Decimal("9950.00")
    assert settlement.open_holds() == []
    assert "commit decision recorded" in events(final)
    settlement.assert_invariants()


async def test_short_leg_recycles_then_expires_with_nothing_held(settlement: Engine) -> None:
    before = settlement.balances()

    await settlement.client.submit(dvp("T-short", bonds="1500", settle_within="PT2S"))
    final = await settlement.client.wait("T-short")

    assert final.status is TradeStatus.EXPIRED
    assert "short at the deadline" in final.reason
    assert "leg 0 short, recycling" in events(final)
    assert [leg.state.value for leg in final.legs] == ["RELEASED", "RELEASED"]
    assert settlement.open_holds() == []
    assert settlement.balances() == before
    settlement.assert_invariants()


async def test_short_leg_settles_once_the_seller_is_funded(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-late", bonds="1200", cash="1.00", settle_within="PT20S"))
    await wait_for_status(settlement, "T-late", TradeStatus.RESERVING)
    # carol delivers 500 bonds to bob in another trade, so bob can cover 1200
    await settlement.client.submit(
        {
            "trade_id": "T-fund",
            "legs": [
                {
                    "ledger": "securities",
                    "asset": "BOND-2030",
                    "from": "carol-sec",
                    "to": "bob-sec",
                    "amount": "500",
                },
                {
                    "ledger": "cash",
                    "asset": "EUR",
                    "from": "alice-cash",
                    "to": "carol-cash",
                    "amount": "1.00",
                },
            ],
        }
    )

    assert (await settlement.client.wait("T-fund")).status is TradeStatus.SETTLED
    final = await settlement.client.wait("T-late")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert settlement.balance("securities", "bob-sec") == Decimal("300")
    assert settlement.balance("securities", "alice-sec") == Decimal("1200")
    settlement.assert_invariants()


async def test_cancel_before_commit_releases_everything(settlement: Engine) -> None:
    before = settlement.balances()
    # the cash leg is held at once; the bond leg is short and recycles
    await settlement.client.submit(dvp("T-cancel", bonds="5000"))
    await wait_for_status(settlement, "T-cancel", TradeStatus.RESERVING)
    for _ in range(100):
        if any(h.hold_id == "T-cancel#1" for h in settlement.open_holds()):
            break
        await asyncio.sleep(0.1)
    assert [h.hold_id for h in settlement.open_holds()] == ["T-cancel#1"]

    decision = await settlement.acting("alice").cancel("T-cancel", reason="changed my mind")
    final = await settlement.client.wait("T-cancel")

    assert decision.accepted
    assert final.status is TradeStatus.CANCELLED
    assert final.reason == "cancelled by alice: changed my mind"
    assert settlement.open_holds() == []
    assert settlement.balances() == before
    settlement.assert_invariants()


async def test_cancel_by_a_stranger_is_rejected_and_leaves_no_trace(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-stranger", approvers=["notary"]))

    with pytest.raises(RequestRejected, match="neither a party to this trade nor an operator"):
        await settlement.acting("eve").cancel("T-stranger")
    view = await settlement.client.status("T-stranger")

    assert view.status is TradeStatus.AWAITING_APPROVAL
    assert not any("eve" in e for e in events(view))  # refused in the validator: nothing recorded
    # an operator may cancel any trade before its commit decision
    await settlement.client.cancel("T-stranger", "ops", reason="operator review")
    assert (await settlement.client.wait("T-stranger")).status is TradeStatus.CANCELLED


class GatedLedger(SqlLedger):
    """The real SQL ledger, whose commits wait until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        self.waiting.set()
        self.gate.wait(30)
        return super().commit_hold(hold_id, preimage)


async def test_cancel_after_the_commit_decision_is_rejected(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    urls = sqlite_urls(tmp_path)
    config = make_config(urls, task_queue_prefix)
    gated = GatedLedger("cash", urls["cash"])
    try:
        async with run_engine(temporal_client, config, instances={"cash": gated}) as engine:
            await engine.client.submit(dvp("T-late-cancel"))
            await wait_for_status(engine, "T-late-cancel", TradeStatus.COMMITTING)

            with pytest.raises(RequestRejected, match="commit decision is recorded"):
                await engine.acting("alice").cancel("T-late-cancel")
            gated.gate.set()
            final = await engine.client.wait("T-late-cancel")

            assert final.status is TradeStatus.SETTLED
            assert not any("cancel" in e for e in events(final))
            assert engine.balance("cash", "bob-cash") == Decimal("9950.00")
            engine.assert_invariants()
    finally:
        gated.gate.set()
        gated.close()


class RefusingLedger(SqlLedger):
    """The real SQL ledger, whose first ``refusals`` commits fail with an error no retry cures."""

    def __init__(self, *args: Any, refusals: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals = refusals

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        if self.refusals > 0:
            self.refusals -= 1
            raise LedgerError(f"commit of {hold_id} refused: the ledger is closed for the night")
        return super().commit_hold(hold_id, preimage)


async def test_a_commit_that_keeps_failing_shows_committing_and_settles_once_it_works(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """After the decision a failing commit is never given up: the failure is in the
    timeline, the trade is listed as COMMITTING (search attribute) while it lasts, and
    it settles, each leg once, when the ledger accepts the commit."""
    urls = sqlite_urls(tmp_path)
    config = make_config(urls, task_queue_prefix)
    refusing = RefusingLedger("cash", urls["cash"], refusals=2)
    try:
        async with run_engine(temporal_client, config, instances={"cash": refusing}) as engine:
            await engine.client.submit(dvp("T-stuck"))
            for _ in range(200):
                listed = await engine.client.list(status=TradeStatus.COMMITTING)
                if any(view.trade_id == "T-stuck" for view in listed):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("T-stuck was never listed as COMMITTING")
            final = await engine.client.wait("T-stuck", timeout=60)

            assert final.status is TradeStatus.SETTLED, final.reason
            failures = [e for e in final.timeline if e.event == "commit failed, retrying"]
            assert len(failures) == 2 and "closed for the night" in failures[0].detail
            assert engine.balance("cash", "bob-cash") == Decimal("9950.00")
            assert engine.balance("securities", "alice-sec") == Decimal("100")
            assert engine.open_holds() == []
            engine.assert_invariants()
    finally:
        refusing.close()


class RefusingReservations(SqlLedger):
    """The real SQL ledger, refusing every hold with an error no retry cures."""

    def place_hold(self, hold_id: str, *args: Any, **kwargs: Any) -> Hold:
        raise LedgerError(f"hold {hold_id} refused: account frozen by the bank")


async def test_a_ledger_refusing_a_reservation_rejects_the_trade_and_releases_the_rest(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    urls = sqlite_urls(tmp_path)
    config = make_config(urls, task_queue_prefix)
    refusing = RefusingReservations("cash", urls["cash"])
    try:
        async with run_engine(temporal_client, config, instances={"cash": refusing}) as engine:
            before = engine.balances()
            await engine.client.submit(dvp("T-frozen"))
            final = await engine.client.wait("T-frozen", timeout=60)

            assert final.status is TradeStatus.REJECTED
            assert "account frozen by the bank" in final.reason
            assert [leg.state.value for leg in final.legs] == ["RELEASED", "RELEASED"]
            assert engine.balances() == before
            assert engine.open_holds() == []
            engine.assert_invariants()
    finally:
        refusing.close()


async def test_wrong_approver_is_rejected_and_the_notary_lets_it_settle(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-approve", approvers=["notary"]))
    await wait_for_status(settlement, "T-approve", TradeStatus.AWAITING_APPROVAL)
    assert settlement.open_holds() == []  # nothing is reserved before approval

    with pytest.raises(RequestRejected, match="bob is not an approver"):
        await settlement.acting("bob").approve("T-approve")
    await settlement.client.client.get_workflow_handle("trade-T-approve").signal("approve", {"party": "eve"})
    assert (await settlement.client.status("T-approve")).status is TradeStatus.AWAITING_APPROVAL

    await settlement.acting("notary").approve("T-approve", "notary")
    final = await settlement.client.wait("T-approve")

    assert final.status is TradeStatus.SETTLED
    assert final.approved_by == ["notary"]
    assert "approved by notary" in events(final)
    # the refusals changed nothing: bob's update left no trace, eve's tokenless signal is counted
    assert not any("bob" in e or "eve" in e for e in events(final))
    assert final.refused_signals == 1
    with pytest.raises(RequestRejected, match="already SETTLED"):
        await settlement.acting("notary").approve("T-approve")


async def test_approval_signal_lets_the_trade_settle(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-signal", approvers=["notary", "custodian"]))
    handle = settlement.client.client.get_workflow_handle("trade-T-signal")
    await handle.signal("approve", {"party": "notary", "token": token("notary")})
    await handle.signal("approve", {"token": token("custodian")})

    assert (await settlement.client.wait("T-signal")).status is TradeStatus.SETTLED


async def test_missing_approval_expires_the_trade(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-no-notary", approvers=["notary"], settle_within="PT1S"))
    final = await settlement.client.wait("T-no-notary")

    assert final.status is TradeStatus.EXPIRED
    assert final.reason == "no approval from notary before the deadline"
    assert settlement.open_holds() == []


async def test_sanctioned_party_is_rejected_and_nothing_reserved(settlement: Engine) -> None:
    before = settlement.balances()
    trade = dvp("T-sanction")
    trade["legs"][0]["from"] = "mallory-sec"

    view = await settlement.client.submit(trade)
    final = await settlement.client.wait("T-sanction")

    assert view.status is TradeStatus.REJECTED
    assert final.status is TradeStatus.REJECTED
    assert final.reason == "sanctioned party: mallory"
    assert [leg.state.value for leg in final.legs] == ["PENDING", "PENDING"]
    assert not any(e.startswith("leg ") for e in events(final))
    assert settlement.balances() == before
    assert settlement.open_holds() == []


async def test_duplicate_trade_id_does_not_settle_twice(settlement: Engine) -> None:
    first, again = await asyncio.gather(
        settlement.client.submit(dvp("T-dup")), settlement.client.submit(dvp("T-dup"))
    )
    assert first.workflow_id == again.workflow_id
    assert (await settlement.client.wait("T-dup")).status is TradeStatus.SETTLED

    resubmitted = await settlement.client.submit(dvp("T-dup"))  # after it closed
    with pytest.raises(DuplicateTrade, match="T-dup already exists with different content"):
        await settlement.client.submit(dvp("T-dup", bonds="200"))

    assert resubmitted.status is TradeStatus.SETTLED
    assert settlement.balance("securities", "alice-sec") == Decimal("100")
    assert settlement.balance("cash", "bob-cash") == Decimal("9950.00")


async def test_different_content_while_running_is_refused(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-dup-run", approvers=["notary"]))
    with pytest.raises(DuplicateTrade):
        await settlement.client.submit(dvp("T-dup-run", cash="1.00", approvers=["notary"]))
    await settlement.client.cancel("T-dup-run", "ops")


def three_party(trade_id: str, usd: str = "10000.00") -> dict[str, Any]:
    """alice pays bob EUR, bob delivers bonds to carol, carol pays alice USD."""
    return {
        "trade_id": trade_id,
        "legs": [
            {"ledger": "cash", "asset": "EUR", "from": "alice-cash", "to": "bob-cash", "amount": "9950.00"},
            {
                "ledger": "securities",
                "asset": "BOND-2030",
                "from": "bob-sec",
                "to": "carol-sec",
                "amount": "100",
            },
            {"ledger": "fx", "asset": "USD", "from": "carol-usd", "to": "alice-usd", "amount": usd},
        ],
        "settle_within": "PT3S",
    }


async def test_three_party_three_ledger_trade_settles_atomically(settlement: Engine) -> None:
    final = await settlement.client.wait((await settlement.client.submit(three_party("T-3"))).trade_id)

    assert final.status is TradeStatus.SETTLED
    assert settlement.balance("cash", "bob-cash") == Decimal("9950.00")
    assert settlement.balance("securities", "carol-sec") == Decimal("600")
    assert settlement.balance("fx", "alice-usd") == Decimal("10000.00")
    settlement.assert_invariants()


async def test_three_party_trade_with_one_short_leg_moves_nothing(settlement: Engine) -> None:
    before = settlement.balances()

    final = await settlement.client.wait(
        (await settlement.client.submit(three_party("T-3s", "99999.00"))).trade_id
    )

    assert final.status is TradeStatus.EXPIRED
    assert [leg.state.value for leg in final.legs] == ["RELEASED", "RELEASED", "RELEASED"]
    assert settlement.balances() == before
    assert settlement.open_holds() == []


MALFORMED = [
    ({"legs": []}, "trade_id", "is required"),
    ({"trade_id": "T-m"}, "legs", "is required"),
    ({"trade_id": "T-m", "legs": [dvp("x")["legs"][0]]}, "legs", "at least 2"),
    (dvp("T-m", bonds="-5"), "legs[0].amount", "must be positive"),
    (dvp("T-m", bonds="lots"), "legs[0].amount", "not a decimal number"),
    (dvp("T-m", cash="9950.001"), "legs[1].amount", "has 3 decimals; EUR allows 2"),
    (dvp("T-m", bonds="1.5"), "legs[0].amount", "BOND-2030 allows 0"),
    ({**dvp("T-m"), "deadline": "2020-01-01T00:00:00Z", "settle_within": None}, "deadline", "in the past"),
    ({**dvp("T-m"), "settle_within": "PT0S"}, "settle_within", "positive"),
]


@pytest.mark.parametrize(("instruction", "field", "message"), MALFORMED)
async def test_malformed_instruction_is_refused_naming_the_field(
    settlement: Engine, instruction: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidInstruction) as refused:
        await settlement.client.submit(instruction)
    assert refused.value.field == field
    assert message in refused.value.message


async def test_unknown_ledger_same_account_and_float_are_refused(settlement: Engine) -> None:
    trade = dvp("T-m2")
    trade["legs"][1]["ledger"] = "gold"
    with pytest.raises(InvalidInstruction, match=r"legs\[1\]\.ledger: unknown ledger 'gold'"):
        await settlement.client.submit(trade)
    trade = dvp("T-m3")
    trade["legs"][0]["to"] = "bob-sec"
    with pytest.raises(InvalidInstruction, match="same account 'bob-sec'"):
        await settlement.client.submit(trade)
    trade = dvp("T-m4")
    trade["legs"][1]["amount"] = 9950.0
    with pytest.raises(InvalidInstruction, match="not a float"):
        await settlement.client.submit(trade)


async def test_unknown_account_is_refused_and_nothing_reaches_a_ledger(settlement: Engine) -> None:
    before = settlement.balances()
    trade = dvp("T-ghost")
    trade["legs"][1]["from"] = "ghost-cash"

    with pytest.raises(InvalidInstruction) as refused:
        await settlement.client.submit(trade)

    assert refused.value.field == "legs[1].from"
    assert "unknown account 'ghost-cash' on ledger 'cash'" in refused.value.message
    assert settlement.balances() == before
    assert settlement.open_holds() == []
    assert (await settlement.client.status("T-ghost")).status is TradeStatus.REJECTED


async def test_list_finds_trades_by_status(settlement: Engine) -> None:
    await settlement.client.submit(dvp("T-list-wait", approvers=["notary"]))
    await settlement.client.wait((await settlement.client.submit(dvp("T-list-done"))).trade_id)

    await asyncio.sleep(1.5)  # visibility is eventually consistent
    waiting = await settlement.client.list(status="AWAITING_APPROVAL")

    assert "T-list-wait" in [v.trade_id for v in waiting]
    assert "T-list-done" not in [v.trade_id for v in waiting]
    assert all(v.timeline == [] for v in waiting)
    await settlement.client.cancel("T-list-wait", "ops")
