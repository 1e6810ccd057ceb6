"""Trades that live long: continue-as-new with the whole state carried, on the real dev server.

The engine here continues a trade as new at its first wait point past 100 events (the
smallest ``[settlement] continue_as_new_after``; the default is 2,000) and recycles a
short leg every 0.05 s to 0.1 s, so a trade goes through several runs in seconds.
Every run's history is read back from the server: none may grow past the bound and
its headroom (``workflows._saga.HISTORY_HEADROOM``).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory

from domain import (
    BatchRequest,
    BatchStatus,
    Carried,
    CarriedBatch,
    CarriedEscrow,
    ConfigError,
    HoldStatus,
    Instruction,
    LegState,
    SettlementConfig,
    TradeStatus,
    UnknownHold,
)
from starter.instructions import dvp_instruction
from workflows import HtlcWorkflow, NettingBatchWorkflow, SettlementWorkflow, workflow_id_for
from workflows._saga import HISTORY_HEADROOM, TIMELINE_FOLD_AT, TIMELINE_HEAD, TIMELINE_KINDS

from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls, wait_for_status

BOUND = 100
FAST: dict[str, Any] = {
    "continue_as_new_after": BOUND,
    "recycle_interval": "PT0.05S",
    "max_recycle_interval": "PT0.1S",
}


@pytest.fixture
async def engine(temporal_client: Client, task_queue_prefix: str, tmp_path: Path) -> AsyncIterator[Engine]:
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix, **FAST)
    async with run_engine(temporal_client, config) as running:
        yield running


def dvp(trade_id: str, bonds: str = "1200", cash: str = "1.00", **extra: Any) -> dict[str, Any]:
    """Bob delivers ``bonds`` BOND-2030 to alice against ``cash`` EUR (he holds 1000)."""
    return dvp_instruction(trade_id, "bob", "alice", bonds, cash, **extra)


async def runs(engine: Engine, trade_id: str) -> list[WorkflowHistory]:
    """Every run of the trade's workflow, first to latest, as the server stores them."""
    client = engine.client.client
    workflow_id = workflow_id_for(trade_id)
    run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
    histories: list[WorkflowHistory] = []
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(history)
        run_id = history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
    return histories[::-1]


async def until_runs(engine: Engine, trade_id: str, count: int, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(await runs(engine, trade_id)) < count:
        assert loop.time() < end, f"{trade_id} never reached {count} runs"
        await asyncio.sleep(0.2)


def assert_bounded(histories: list[WorkflowHistory]) -> None:
    """Each run but the last continued as new, and none grew past the bound and its headroom."""
    for history in histories[:-1]:
        assert history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    for history in histories:
        assert len(history.events) <= BOUND + HISTORY_HEADROOM, len(history.events)


def fund(engine: Engine, ledger: str, source: str, target: str, asset: str, amount: str, key: str) -> None:
    """Move ``amount`` from ``source`` to ``target`` on the ledger itself (funds arriving)."""
    lg = engine.ledgers[ledger]
    lg.place_hold(key, source, target, asset, Decimal(amount), None, "funding")
    lg.commit_hold(key)


async def test_a_short_trade_settles_in_a_later_run_with_the_holds_of_its_first(engine: Engine) -> None:
    submitted = await engine.client.submit(dvp("L-late"))
    await wait_for_status(engine, "L-late", TradeStatus.RESERVING)
    for _ in range(100):
        if [h.hold_id for h in engine.open_holds()] == ["L-late#1"]:
            break
        await asyncio.sleep(0.02)
    first = await runs(engine, "L-late")
    assert len(first) == 1  # the cash leg is held, by the trade's first run
    assert [h.hold_id for h in engine.open_holds()] == ["L-late#1"]

    await until_runs(engine, "L-late", 3)
    view = await engine.client.status("L-late")
    assert view.status is TradeStatus.RESERVING
    assert [leg.state for leg in view.legs] == [LegState.SHORT, LegState.HELD]
    assert view.deadline == submitted.deadline  # counted from the trade's start, not the run's
    assert any(e.event.startswith("recycled") for e in view.timeline)
    listed = [t for t in await engine.client.list() if t.trade_id == "L-late"]
    assert len(listed) == 1 and listed[0].status is TradeStatus.RESERVING
    assert listed[0].started_at is not None and listed[0].started_at <= first[0].events[
        0
    ].event_time.ToDatetime(UTC) + timedelta(seconds=1)

    fund(engine, "securities", "carol-sec", "bob-sec", "BOND-2030", "200", "fund-bob")
    final = await engine.client.wait("L-late", timeout=30)

    assert final.status is TradeStatus.SETTLED, final.reason
    assert [leg.hold_id for leg in final.legs] == ["L-late#0", "L-late#1"]
    cash_hold = engine.ledgers["cash"].get_hold("L-late#1")  # placed in the first run
    assert cash_hold.status is HoldStatus.COMMITTED
    assert engine.balance("securities", "alice-sec") == Decimal("1200")
    assert engine.balance("cash", "bob-cash") == Decimal("1.00")
    assert engine.open_holds() == []
    histories = await runs(engine, "L-late")
    assert len(histories) >= 3
    assert_bounded(histories)
    listed = [t for t in await engine.client.list() if t.trade_id == "L-late"]
    assert [(t.status, t.workflow_status) for t in listed] == [(TradeStatus.SETTLED, "COMPLETED")]
    engine.assert_invariants()


async def test_a_short_trade_expires_at_its_deadline_with_every_hold_released(engine: Engine) -> None:
    before = engine.balances()
    submitted = await engine.client.submit(dvp("L-expire", settle_within="PT12S"))

    final = await engine.client.wait("L-expire", timeout=30)

    assert final.status is TradeStatus.EXPIRED
    assert "short at the deadline" in final.reason
    assert final.deadline == submitted.deadline
    assert [leg.state for leg in final.legs] == [LegState.RELEASED, LegState.RELEASED]
    assert engine.ledgers["cash"].get_hold("L-expire#1").status is HoldStatus.RELEASED
    assert engine.open_holds() == []
    assert engine.balances() == before
    histories = await runs(engine, "L-expire")
    assert len(histories) >= 3
    assert_bounded(histories)
    engine.assert_invariants()


async def test_a_partial_trade_settles_forty_fills_across_runs_summing_to_its_legs(engine: Engine) -> None:
    engine.ledgers["securities"].open_account("frank-sec", "BOND-2030", "frank", Decimal(0))
    engine.ledgers["cash"].open_account("frank-cash", "EUR", "frank", Decimal("0.00"), precision=2)
    trade = dvp_instruction("L-fills", "frank", "alice", "40", "399.99", partial={}, settle_within="PT300S")
    await engine.client.submit(trade)

    for i in range(1, 41):
        fund(engine, "securities", "carol-sec", "frank-sec", "BOND-2030", "1", f"fund-frank-{i}")
        for _ in range(300):
            view = await engine.client.status("L-fills")
            if len(view.fills) >= i:
                break
            await asyncio.sleep(0.05)
        assert len(view.fills) == i, view.reason
    final = await engine.client.wait("L-fills", timeout=30)

    assert final.status is TradeStatus.SETTLED, final.reason
    assert len(final.fills) == 40
    assert sum(f.quantity for f in final.fills) == Decimal(40)
    assert sum(f.amount for f in final.fills) == Decimal("399.99")
    assert len({h for f in final.fills for h in f.hold_ids}) == 80  # every fill under its own keys
    # 40 fills of 2 legs make far more entries than a view shows: the middle is folded by kind
    assert len(final.timeline) <= TIMELINE_HEAD + TIMELINE_KINDS + TIMELINE_FOLD_AT
    folded = {e.event for e in final.timeline if e.event.endswith(" times")}
    assert any(e.startswith("fill N settled: ") for e in folded)
    assert any(e.startswith("leg N committed: ") for e in folded)
    assert engine.balance("securities", "alice-sec") == Decimal(40)
    assert engine.balance("cash", "frank-cash") == Decimal("399.99")
    assert engine.open_holds() == []
    histories = await runs(engine, "L-fills")
    assert len(histories) >= 3
    assert_bounded(histories)
    engine.assert_invariants()


async def test_two_thousand_refused_signals_leave_every_run_bounded_and_the_trade_settles(
    engine: Engine,
) -> None:
    # a deadline far enough off for the flood on a loaded machine (the default 60 s is not)
    trade = dvp("L-flood", bonds="100", cash="9950.00", approvers=["notary"], settle_within="PT10M")
    await engine.client.submit(trade)
    await wait_for_status(engine, "L-flood", TradeStatus.AWAITING_APPROVAL)
    handle = engine.client.client.get_workflow_handle(workflow_id_for("L-flood"))

    for chunk in range(40):  # tokenless: each is refused, counted, and recorded by Temporal
        await asyncio.gather(*(handle.signal("approve", {"party": f"eve-{chunk}-{i}"}) for i in range(50)))
    for _ in range(200):
        view = await engine.client.status("L-flood")
        if view.refused_signals == 2000:
            break
        await asyncio.sleep(0.1)
    assert view.refused_signals == 2000
    assert view.status is TradeStatus.AWAITING_APPROVAL
    assert engine.open_holds() == []  # nothing reserved before the approval, in any run
    await engine.acting("notary").approve("L-flood", "notary")
    final = await engine.client.wait("L-flood", timeout=30)

    assert final.status is TradeStatus.SETTLED, final.reason
    assert final.approved_by == ["notary"]
    assert final.refused_signals == 2000
    assert engine.balance("securities", "alice-sec") == Decimal(100)
    assert engine.balance("cash", "bob-cash") == Decimal("9950.00")
    histories = await runs(engine, "L-flood")
    assert len(histories) >= 3
    assert_bounded(histories)
    engine.assert_invariants()


async def test_an_htlc_trade_continues_as_new_while_locking_and_awaiting_its_claim(engine: Engine) -> None:
    secret = secrets.token_bytes(32)
    hashlock = hashlib.sha256(secret).hexdigest()
    trade = dvp("L-htlc", protocol="htlc", hashlock=hashlock, settle_within="PT120S")
    await engine.client.submit(trade)
    await until_runs(engine, "L-htlc", 2)  # bob is short of bonds: leg 0's lock recycles
    assert (await engine.client.status("L-htlc")).status is TradeStatus.RESERVING

    fund(engine, "securities", "carol-sec", "bob-sec", "BOND-2030", "200", "fund-bob")
    await wait_for_status(engine, "L-htlc", TradeStatus.AWAITING_CLAIM, timeout=30)
    locked = len(await runs(engine, "L-htlc"))
    handle = engine.client.client.get_workflow_handle(workflow_id_for("L-htlc"))
    for chunk in range(4):  # refused: an htlc needs no approval; they grow the history
        await asyncio.gather(*(handle.signal("approve", {"party": f"eve-{chunk}-{i}"}) for i in range(50)))
    await until_runs(engine, "L-htlc", locked + 1)
    assert (await engine.client.status("L-htlc")).status is TradeStatus.AWAITING_CLAIM

    final = await engine.acting("bob").claim("L-htlc", secret.hex())
    for _ in range(100):
        if final.status.terminal:
            break
        await asyncio.sleep(0.1)
        final = await engine.client.status("L-htlc")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert final.refused_signals == 200
    assert engine.balance("securities", "alice-sec") == Decimal(1200)
    assert engine.balance("cash", "bob-cash") == Decimal("1.00")
    assert engine.open_holds() == []
    histories = await runs(engine, "L-htlc")
    assert len(histories) >= 3
    assert_bounded(histories)
    engine.assert_invariants()


def forged(instruction: Instruction, protocol: str) -> Carried:
    """State a client might claim: approved, consented, decided, holds placed."""
    now = datetime.now(UTC)
    legs = len(instruction.legs)
    return Carried(
        phase="commit" if protocol == "escrow" else "claim",
        runs=1,
        started=now,
        deadline=now + timedelta(minutes=5),
        trusted=True,
        submitter="ops",
        consent_known=True,
        consent_from=["bob", "alice"],
        consented=["bob", "alice"],
        status=TradeStatus.COMMITTING,
        owners={"bob-sec": "bob", "alice-sec": "alice", "alice-cash": "alice", "bob-cash": "bob"},
        policy_known=True,
        escrow=CarriedEscrow(
            attempt=1,
            amounts=[leg.amount for leg in instruction.legs],
            settled=[Decimal(0)] * legs,
            fills=[],
            hold_ids=[f"{instruction.trade_id}#{i}" for i in range(legs)],
            leg_states=[LegState.HELD] * legs,
            leg_details=[""] * legs,
            approved=["notary"],
            decided=True,
        ),
    )


@pytest.mark.parametrize("protocol", ["escrow", "htlc"])
async def test_a_start_that_carries_state_is_rejected_with_nothing_reserved(
    engine: Engine, protocol: str
) -> None:
    before = engine.balances()
    trade_id = f"L-forged-{protocol}"
    extra: dict[str, Any] = {"approvers": ["notary"]}
    if protocol == "htlc":
        extra = {"protocol": "htlc", "hashlock": hashlib.sha256(b"x" * 32).hexdigest()}
    instruction = Instruction.model_validate(dvp(trade_id, bonds="100", cash="9950.00", **extra))
    request = engine.client.settlement_request(instruction).model_copy(
        update={"carried": forged(instruction, protocol), "settlement": SettlementConfig()}
    )
    workflow: Any = HtlcWorkflow if protocol == "htlc" else SettlementWorkflow

    handle = await engine.client.client.start_workflow(
        workflow.run, request, id=workflow_id_for(trade_id), task_queue=engine.config.settlement_queue()
    )
    final = await handle.result()

    assert final.status is TradeStatus.REJECTED
    assert [e.field for e in final.errors] == ["carried"]
    assert final.approved_by == [] and final.consented == []
    assert engine.open_holds() == []
    assert engine.balances() == before
    for name in ("cash", "securities"):
        with pytest.raises(UnknownHold):
            engine.ledgers[name].get_hold(f"{trade_id}#{0 if name == 'securities' else 1}")
    (history,) = await runs(engine, trade_id)
    assert not any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED for e in history.events)
    markers = [
        e.marker_recorded_event_attributes.marker_name
        for e in history.events
        if e.marker_recorded_event_attributes.marker_name
    ]
    assert "core_local_activity" not in markers  # no ledger called, not even the admission


async def test_a_batch_start_that_carries_state_is_rejected_and_records_nothing(engine: Engine) -> None:
    request = BatchRequest(
        batch_id="L-forged-batch",
        trade_count=1,
        fingerprint="f",
        settle_within=timedelta(minutes=1),
        carried=CarriedBatch(
            phase="end",
            runs=1,
            deadline=datetime.now(UTC) + timedelta(minutes=1),
            trusted=True,
            status=BatchStatus.COMMITTING,
            decided=True,
            abort_status=BatchStatus.SETTLED,
        ),
    )
    handle = await engine.client.client.start_workflow(
        NettingBatchWorkflow.run,
        request,
        id="batch-L-forged-batch",
        task_queue=engine.config.settlement_queue(),
    )

    final = await handle.result()

    assert final.status is BatchStatus.REJECTED
    assert final.reason.startswith("carried:")
    history = await handle.fetch_history()
    assert not any(e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED for e in history.events)


def test_a_trade_short_for_sixty_days_recycles_a_bounded_number_of_times_a_day() -> None:
    settlement = SettlementConfig()  # 1 s doubling to 10 s, then 1 % of the wait, at most 15 min
    pause, waited, per_day = settlement.recycle_interval, timedelta(0), [0] * 60
    while waited < timedelta(days=60):
        per_day[waited.days] += 1
        assert pause <= settlement.longest_recycle_interval  # funds arriving are found within it
        waited += pause
        pause = settlement.recycle_after(pause, waited)

    assert per_day[0] < 600  # the first day: every 10 s for 17 minutes, then slower
    assert max(per_day[2:]) <= 97  # then every 15 minutes
    assert sum(per_day) * 6 < 60 * 1000  # 6 history events an attempt: under 1,000 a day
    early = [settlement.recycle_after(timedelta(seconds=s), timedelta(seconds=s)) for s in (1, 2, 4, 8)]
    assert early == [timedelta(seconds=s) for s in (2, 4, 8, 10)]  # the doubling is unchanged


def test_a_bound_outside_its_range_is_refused_naming_the_key(tmp_path: Path) -> None:
    for value in (99, 8001):
        with pytest.raises(ConfigError, match=r"settlement\.continue_as_new_after"):
            make_config(sqlite_urls(tmp_path), "t", continue_as_new_after=value)
