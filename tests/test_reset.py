"""Trades reset through Temporal, read as worked examples.

``temporal workflow reset`` (the call the Web UI's Reset button makes) re-runs a trade
from an earlier point of its history. The ledgers keep what the earlier run did under
the trade's hold keys; these trades, reset, end with the status the ledgers show, and
the reset moves nothing a second time.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.worker import Replayer

from adapters import Ledger
from adapters.sql import SqlLedger
from connection import HEADER_CODEC
from domain import Hold, HoldStatus, LedgerUnavailable, LegState, TradeStatus, TradeView
from processes.devserver import DevServer, find_temporal_binary
from starter.instructions import dvp_instruction
from workflows import HtlcWorkflow, SettlementWorkflow, workflow_id_for

from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls
from ._fixtures_settlement import wait_for_status as _wait_for_status
from .test_htlc import BONDS_TO_ALICE, CASH_TO_BOB, htlc, new_secret
from .test_partial import deliver, fills, open_frank, partial_dvp

wait_for_status = functools.partial(_wait_for_status, timeout=60)


@pytest.fixture(scope="module")
def temporal_server() -> Iterator[DevServer]:
    """A dev server of this module's own: a reset trade has two runs, and the closed trades
    these tests leave have no worker to answer a query, which other tests' listings make."""
    with DevServer(headless=True) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def temporal_client(temporal_server: DevServer) -> Client:
    return await temporal_server.connect()


BONDS = {("securities", "bob-sec"): Decimal("-5"), ("securities", "alice-sec"): Decimal("5")}
CASH = {("cash", "alice-cash"): Decimal("-100.00"), ("cash", "bob-cash"): Decimal("100.00")}
STATUS = SearchAttributeKey.for_keyword("DvpStatus")


def dvp(trade_id: str, **extra: Any) -> dict[str, Any]:
    """Bob delivers 5 BOND-2030 to alice against 100.00 EUR."""
    return dvp_instruction(trade_id, "bob", "alice", "5", "100.00", **extra)


def cash_leg(payer: str, payee: str, amount: str) -> dict[str, str]:
    return {"ledger": "cash", "asset": "EUR", "from": payer, "to": payee, "amount": amount}


def moved(before: dict[Any, Decimal], after: dict[Any, Decimal]) -> dict[Any, Decimal]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def events(view: TradeView) -> list[str]:
    return [e.event for e in view.timeline]


class FlakyCommits(SqlLedger):
    """A real SQL ledger whose commits fail as unavailable while ``down`` is set."""

    def __init__(self, name: str, url: str) -> None:
        super().__init__(name, url)
        self.down = threading.Event()

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        if self.down.is_set():
            raise LedgerUnavailable(f"ledger {self.name!r} is down (test)")
        return super().commit_hold(hold_id, preimage)


async def reset(server: DevServer, trade_id: str, *how: str) -> None:
    """``temporal workflow reset`` of the trade's current run, as an operator types it."""
    process = await asyncio.create_subprocess_exec(
        str(find_temporal_binary()),
        "workflow",
        "reset",
        "--address",
        server.address,
        "--workflow-id",
        workflow_id_for(trade_id),
        "--reason",
        "test: re-run after an incident",
        *how,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, (out + err).decode()


async def task_that_scheduled(engine: Engine, trade_id: str, activity: str) -> int:
    """The id of the workflow task that first scheduled ``activity``: resetting to it re-runs that task."""
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == activity:
                return attributes.workflow_task_completed_event_id
    raise AssertionError(f"{trade_id} never scheduled {activity}")


async def hold_status(ledger: Ledger, hold_id: str, status: HoldStatus) -> None:
    for _ in range(300):
        if ledger.get_hold(hold_id).status is status:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"hold {hold_id} never {status.value}")


async def searched_status(engine: Engine, trade_id: str, status: TradeStatus) -> None:
    """The DvpStatus search attribute of the trade's current run (`dvp list` and the Web UI filter
    on it) reaches ``status``."""
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    for _ in range(100):  # visibility is eventually consistent
        described = await handle.describe()
        if described.typed_search_attributes.get(STATUS) == status.value:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{trade_id} never searchable as {status.value}")


async def assert_replays(engine: Engine, trade_id: str) -> None:
    """The reset run's history (the earlier run's up to the reset point, then its own) replays
    without non-determinism, as it must when a worker picks the trade up again."""
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    replayer = Replayer(
        workflows=[SettlementWorkflow, HtlcWorkflow],
        data_converter=engine.client.client.data_converter,  # the engine's codec: its payloads are encrypted
        header_codec_behavior=HEADER_CODEC,
    )
    result = await replayer.replay_workflow(await handle.fetch_history(), raise_on_replay_failure=False)
    assert result.replay_failure is None, repr(result.replay_failure)


async def wait_for_event(engine: Engine, trade_id: str, event: str) -> TradeView:
    for _ in range(300):
        view = await engine.client.status(trade_id)
        if event in events(view):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"{trade_id} never recorded {event!r}: {events(view)}")


# ------------------------------------------------------------ escrow trades


@pytest.mark.parametrize("local", [True, False], ids=["local-ledgers", "queued-ledgers"])
async def test_settled_trade_reset_to_its_start_stays_settled(
    temporal_client: Any, temporal_server: DevServer, task_queue_prefix: str, tmp_path: Path, local: bool
) -> None:
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix, local_activities=local)
    trade_id = f"R-settled-{'local' if local else 'queued'}"
    async with run_engine(temporal_client, config) as engine:
        opening = engine.balances()
        await engine.client.submit(dvp(trade_id))
        assert (await engine.client.wait(trade_id)).status is TradeStatus.SETTLED
        settled = engine.balances()

        await reset(temporal_server, trade_id, "--type", "FirstWorkflowTask")
        final = await engine.client.wait(trade_id, timeout=60)

        assert final.status is TradeStatus.SETTLED, final.reason
        assert [leg.state for leg in final.legs] == [LegState.COMMITTED, LegState.COMMITTED]
        assert "commit decision found taken by an earlier run" in events(final)
        assert engine.balances() == settled  # the reset moved nothing
        assert moved(opening, settled) == BONDS | CASH
        assert engine.open_holds() == []
        await searched_status(engine, trade_id, TradeStatus.SETTLED)
        await assert_replays(engine, trade_id)
        engine.assert_invariants()


@pytest.mark.parametrize(
    "task", ["ledger.pin", "ledger.commit"], ids=["reset-to-the-pins", "reset-to-the-decision"]
)
async def test_trades_reset_after_their_reservations_end_whole(
    temporal_client: Any, temporal_server: DevServer, task_queue_prefix: str, tmp_path: Path, task: str
) -> None:
    """Three trades past their deadline, reset to the workflow task that pinned their holds
    (or to the one that took the decision, which the reset discards): one had settled, one
    had committed its bond leg while the cash ledger was down, one had committed nothing.
    Each ends whole: the first two SETTLED (what was committed stands, the rest is
    committed), the third EXPIRED with nothing moved, as its deadline says."""
    urls = sqlite_urls(tmp_path)
    point = task.removeprefix("ledger.")
    r_whole, r_half, r_none = (f"R-{name}-{point}" for name in ("whole", "half", "none"))
    # queued ledgers: the reservations, the pins and the decision are separate workflow tasks
    config = make_config(urls, task_queue_prefix, local_activities=False)
    cash = FlakyCommits("cash", urls["cash"])
    try:
        async with run_engine(temporal_client, config, instances={"cash": cash}) as engine:
            opening = engine.balances()
            await engine.client.submit(dvp(r_whole, settle_within="PT3S"))
            assert (await engine.client.wait(r_whole)).status is TradeStatus.SETTLED
            cash.down.set()
            await engine.client.submit(dvp(r_half, settle_within="PT3S"))
            await engine.client.submit(
                {  # both legs on the cash ledger: neither can commit while it is down
                    "trade_id": r_none,
                    "settle_within": "PT3S",
                    "legs": [
                        cash_leg("alice-cash", "bob-cash", "10.00"),
                        cash_leg("carol-cash", "alice-cash", "5.00"),
                    ],
                }
            )
            await hold_status(engine.ledgers["securities"], f"{r_half}#0", HoldStatus.COMMITTED)
            deadlines = [
                (await wait_for_status(engine, trade_id, TradeStatus.COMMITTING)).deadline
                for trade_id in (r_half, r_none)
            ]
            while datetime.now(UTC) < max(d for d in deadlines if d is not None) + timedelta(seconds=1):
                await asyncio.sleep(0.2)

            for trade_id in (r_whole, r_half, r_none):
                event_id = await task_that_scheduled(engine, trade_id, task)
                await reset(temporal_server, trade_id, "--event-id", str(event_id))
            none = await engine.client.wait(r_none, timeout=60)
            whole = await engine.client.wait(r_whole, timeout=60)
            await wait_for_event(engine, r_half, "commit decision found taken by an earlier run")
            cash.down.clear()
            half = await engine.client.wait(r_half, timeout=90)

            assert whole.status is TradeStatus.SETTLED, whole.reason
            assert half.status is TradeStatus.SETTLED, half.reason
            assert none.status is TradeStatus.EXPIRED, none.reason
            for view in (whole, half):
                assert [leg.state for leg in view.legs] == [LegState.COMMITTED, LegState.COMMITTED]
            assert [leg.state for leg in none.legs] == [LegState.RELEASED, LegState.RELEASED]
            # opening plus exactly two settled trades: R-whole's and R-half's, once each
            twice = {k: 2 * v for k, v in (BONDS | CASH).items()}
            assert moved(opening, engine.balances()) == twice
            assert engine.open_holds() == []
            for trade_id in (r_whole, r_half, r_none):
                await assert_replays(engine, trade_id)
            engine.assert_invariants()
    finally:
        cash.down.clear()
        cash.close()


async def test_trade_reset_after_its_commit_decision_settles_each_leg_once(
    temporal_client: Any, temporal_server: DevServer, task_queue_prefix: str, tmp_path: Path
) -> None:
    """The decision was taken and the bond leg committed, but the cash ledger is down: an
    operator resets the COMMITTING trade to its start. The re-run finds the bond leg
    committed, keeps the decision and commits the cash leg once the ledger is back."""
    urls = sqlite_urls(tmp_path)
    config = make_config(urls, task_queue_prefix)
    cash = FlakyCommits("cash", urls["cash"])
    cash.down.set()
    try:
        async with run_engine(temporal_client, config, instances={"cash": cash}) as engine:
            opening = engine.balances()
            await engine.client.submit(dvp("R-decided", settle_within="PT3S"))
            await wait_for_status(engine, "R-decided", TradeStatus.COMMITTING)
            await hold_status(engine.ledgers["securities"], "R-decided#0", HoldStatus.COMMITTED)

            await reset(temporal_server, "R-decided", "--type", "FirstWorkflowTask")
            view = await wait_for_event(engine, "R-decided", "commit decision found taken by an earlier run")
            assert view.status is TradeStatus.COMMITTING
            assert [leg.state for leg in view.legs] == [LegState.COMMITTED, LegState.HELD]
            assert engine.ledgers["cash"].get_hold("R-decided#1").status is HoldStatus.OPEN  # never released
            cash.down.clear()
            final = await engine.client.wait("R-decided", timeout=90)

            assert final.status is TradeStatus.SETTLED, final.reason
            assert [leg.state for leg in final.legs] == [LegState.COMMITTED, LegState.COMMITTED]
            assert moved(opening, engine.balances()) == BONDS | CASH  # each leg once
            assert engine.open_holds() == []
            await assert_replays(engine, "R-decided")
            engine.assert_invariants()
    finally:
        cash.down.clear()
        cash.close()


# ------------------------------------------------------------ a partial trade


async def test_partial_trade_reset_to_its_start_keeps_its_fill(
    settlement: Engine, temporal_server: DevServer
) -> None:
    """frank can deliver 60 of 100 bonds: fill 1 settles 60 against 5,970.00 EUR and the
    rest recycles. Reset to its start, the trade finds fill 1 at the ledgers (its keys
    were sized by what frank had then), reports it, and settles the rest once frank is
    funded."""
    open_frank(settlement, "60")
    opening = settlement.balances()
    await settlement.client.submit(partial_dvp("R-partial", settle_within="PT60S"))
    view = await wait_for_status(settlement, "R-partial", TradeStatus.PARTIALLY_SETTLED)
    assert fills(view) == [("60", "5970.00")]
    after_fill = settlement.balances()

    await reset(temporal_server, "R-partial", "--type", "FirstWorkflowTask")
    view = await wait_for_event(settlement, "R-partial", "fill 1 settled")

    assert view.status is TradeStatus.PARTIALLY_SETTLED
    assert fills(view) == [("60", "5970.00")]
    assert [f.hold_ids for f in view.fills] == [["R-partial#0.2", "R-partial#1.2"]]
    assert settlement.balances() == after_fill  # the reset moved nothing
    await deliver(settlement, "R-partial-fund", "carol", "frank", "40", "1.00")
    final = await settlement.client.wait("R-partial", timeout=60)

    assert final.status is TradeStatus.SETTLED, final.reason
    assert fills(final) == [("60", "5970.00"), ("40", "3980.00")]
    assert moved(opening, settlement.balances()) == {
        ("securities", "carol-sec"): Decimal("-40"),
        ("securities", "frank-sec"): Decimal("-60"),  # 100 delivered, 40 received
        ("securities", "alice-sec"): Decimal("100"),
        ("cash", "alice-cash"): Decimal("-9950.00"),
        ("cash", "frank-cash"): Decimal("9949.00"),  # paid 1.00 for carol's 40
        ("cash", "carol-cash"): Decimal("1.00"),
    }
    assert settlement.open_holds() == []
    await assert_replays(settlement, "R-partial")
    settlement.assert_invariants()


async def test_partial_trade_that_ended_keeps_its_fill_when_reset(
    settlement: Engine, temporal_server: DevServer
) -> None:
    """The same trade, left to its deadline: 60 settled, the rest released. Reset after it
    ended, it ends SETTLED_PARTIAL again with the same fill, and nothing moves."""
    open_frank(settlement, "60")
    await settlement.client.submit(partial_dvp("R-partial-ended", settle_within="PT4S"))
    first = await settlement.client.wait("R-partial-ended", timeout=60)
    assert first.status is TradeStatus.SETTLED_PARTIAL, first.reason
    ended = settlement.balances()

    await reset(temporal_server, "R-partial-ended", "--type", "FirstWorkflowTask")
    final = await settlement.client.wait("R-partial-ended", timeout=60)

    assert final.status is TradeStatus.SETTLED_PARTIAL, final.reason
    assert final.reason.startswith("60 of 100 BOND-2030 settled, the rest released")
    assert fills(final) == fills(first) == [("60", "5970.00")]
    assert settlement.balances() == ended
    assert settlement.open_holds() == []
    await assert_replays(settlement, "R-partial-ended")
    settlement.assert_invariants()


# ---------------------------------------------------------------- HTLC trades


@pytest.mark.parametrize("ending", ["settled", "one-sided"])
async def test_htlc_trade_reset_keeps_its_claim(
    settlement: Engine, temporal_server: DevServer, ending: str
) -> None:
    preimage, hashlock = new_secret()
    trade_id = f"R-htlc-{ending}"
    if ending == "settled":  # bob claims the cash, the engine the bonds for alice
        instruction = htlc(trade_id, hashlock)
        expected = TradeStatus.SETTLED, [LegState.COMMITTED, LegState.COMMITTED]
    else:  # bob claims the cash; alice never claims the bonds, which go back at their timelock
        instruction = htlc(trade_id, hashlock, settle_within="PT4S", claim_window="PT1S", auto_claim=False)
        expected = TradeStatus.ONE_SIDED, [LegState.RELEASED, LegState.COMMITTED]
    opening = settlement.balances()
    await settlement.client.submit(instruction)
    await wait_for_status(settlement, trade_id, TradeStatus.AWAITING_CLAIM)
    await settlement.acting("bob").claim(trade_id, preimage)
    first = await settlement.client.wait(trade_id, timeout=60)
    assert (first.status, [leg.state for leg in first.legs]) == expected
    ended = settlement.balances()

    await reset(temporal_server, trade_id, "--type", "FirstWorkflowTask")
    final = await settlement.client.wait(trade_id, timeout=60)

    assert (final.status, [leg.state for leg in final.legs]) == expected, final.reason
    assert final.reason == first.reason
    assert settlement.balances() == ended  # the reset moved nothing
    expected_moves = CASH_TO_BOB | BONDS_TO_ALICE if ending == "settled" else CASH_TO_BOB
    assert moved(opening, ended) == expected_moves
    assert settlement.open_holds() == []
    await assert_replays(settlement, trade_id)
    settlement.assert_invariants()


async def test_htlc_trade_reset_between_its_claims_keeps_the_first_and_takes_the_second(
    settlement: Engine, temporal_server: DevServer
) -> None:
    """Bob has claimed the cash (the preimage is public now); alice has not claimed the
    bonds yet. Reset, the trade keeps bob's claim and still takes alice's."""
    preimage, hashlock = new_secret()
    opening = settlement.balances()
    await settlement.client.submit(htlc("R-htlc-between", hashlock, auto_claim=False))
    await wait_for_status(settlement, "R-htlc-between", TradeStatus.AWAITING_CLAIM)
    await settlement.acting("bob").claim("R-htlc-between", preimage)

    await reset(temporal_server, "R-htlc-between", "--type", "FirstWorkflowTask")
    view = await wait_for_status(settlement, "R-htlc-between", TradeStatus.AWAITING_CLAIM)
    assert [leg.state for leg in view.legs] == [LegState.HELD, LegState.COMMITTED]
    assert "leg 1 found claimed at the ledger" in events(view)
    await settlement.acting("alice").claim("R-htlc-between", preimage)  # with the public preimage
    final = await settlement.client.wait("R-htlc-between", timeout=60)

    assert final.status is TradeStatus.SETTLED, final.reason
    assert moved(opening, settlement.balances()) == CASH_TO_BOB | BONDS_TO_ALICE
    assert settlement.open_holds() == []
    await assert_replays(settlement, "R-htlc-between")
    settlement.assert_invariants()
