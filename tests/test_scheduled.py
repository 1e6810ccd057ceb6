"""An intended settlement time: ``settle_after`` (an instant) or ``settle_on`` (a date in the
settlement calendar's time zone). The trade is checked, screened, consented and approved
at once, then waits in SCHEDULED, holding nothing, until that time; then it settles as
any other, its ``settle_within`` counted from then.

On the real dev server, with the ledgers' own hold tables as the witness that nothing was
reserved: a ledger keeps a record of every key a trade placed or released, so a key it
has never heard of was never called with.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from domain import Instruction, InvalidInstruction, SettlementRequest, TradeStatus, UnknownHold
from processes.devserver import DevServer
from starter.instructions import dvp_instruction
from workflows import SettlementWorkflow, initial_search_attributes, workflow_id_for

from ._fixtures_auth import token
from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls, wait_for_status
from .test_cli import config_file, dvp
from .test_reset import searched_status

CALENDAR = "America/New_York"


def scheduled_trade(trade_id: str, **when: Any) -> dict[str, Any]:
    """Bob delivers 100 bonds to alice against 9,950.00 EUR, at the time ``when`` gives."""
    if "deadline" in when:
        when = {"settle_within": None, **when}
    return dvp_instruction(trade_id, "bob", "alice", "100", "9950.00", **when)


def never_called(engine: Engine, trade_id: str) -> bool:
    """Neither ledger has a record of either leg's hold key: no reserve, no release, nothing."""
    for i, ledger in enumerate(("securities", "cash")):
        with pytest.raises(UnknownHold):
            engine.ledgers[ledger].get_hold(f"{trade_id}#{i}")
    return True


async def activities_called(engine: Engine, trade_id: str) -> list[str]:
    """Every activity the trade's history records, local or not, by type, in order."""
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    called: list[str] = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            called.append(event.activity_task_scheduled_event_attributes.activity_type.name)
        elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker = event.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity":  # the SDK's own record, not encrypted
                called.append(json.loads(marker.details["data"].payloads[0].data)["activity_type"])
    return called


async def test_settle_after_reserves_nothing_before_it_then_settles_with_the_deadline_counted_from_it(
    settlement: Engine,
) -> None:
    engine = settlement
    before = engine.balances()
    settle_after = (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0)
    instruction = scheduled_trade("TS-after", settle_after=settle_after.isoformat(), settle_within="PT30S")

    submitted = await engine.client.submit(instruction)
    scheduled = await wait_for_status(engine, "TS-after", TradeStatus.SCHEDULED)
    await searched_status(engine, "TS-after", TradeStatus.SCHEDULED)  # DvpStatus, as `dvp list` filters
    await asyncio.sleep(1)  # a reservation would have been made by now
    held_before = engine.open_holds()
    balances_before = engine.balances()
    called_before = never_called(engine, "TS-after")
    looked_at = datetime.now(UTC)

    assert looked_at < settle_after, "the test took too long to look before settle_after"
    assert submitted.errors == []  # validated and screened at once, as any trade
    assert held_before == [] and balances_before == before and called_before
    assert scheduled.deadline == settle_after + timedelta(seconds=30)  # counted from settle_after
    assert scheduled.reason == f"nothing is reserved before {settle_after.isoformat()}"

    final = await engine.client.wait("TS-after", timeout=60)

    assert final.status is TradeStatus.SETTLED, final.reason
    held = [e.at for e in final.timeline if e.event.startswith("leg ") and e.event.endswith(" held")]
    assert len(held) == 2 and min(held) >= settle_after
    assert engine.balance("securities", "alice-sec") == before[("securities", "alice-sec")] + 100
    engine.assert_invariants()


async def test_a_cancel_while_scheduled_ends_it_cancelled_with_no_ledger_call_but_the_account_checks(
    settlement: Engine,
) -> None:
    engine = settlement
    before = engine.balances()
    later = datetime.now(UTC) + timedelta(hours=1)
    await engine.client.submit(scheduled_trade("TS-cancel", settle_after=later.isoformat()))
    await wait_for_status(engine, "TS-cancel", TradeStatus.SCHEDULED)

    await engine.acting("alice").cancel("TS-cancel", reason="changed our mind")
    final = await engine.client.wait("TS-cancel", timeout=30)

    assert final.status is TradeStatus.CANCELLED
    assert final.reason == "cancelled by alice: changed our mind"
    assert [leg.state.value for leg in final.legs] == ["PENDING", "PENDING"]
    assert never_called(engine, "TS-cancel")
    assert engine.balances() == before and engine.open_holds() == []
    called = await activities_called(engine, "TS-cancel")
    # the account checks only (run with the admission, settlement.admit_checked, or on their own)
    assert {a for a in called if a.startswith("ledger.")} <= {"ledger.check_accounts_local"}
    assert called[0] in ("settlement.admit_checked", "settlement.admit") and "settlement.screen" in called


@pytest.mark.parametrize("given", ["settle_after", "settle_on"])
async def test_a_deadline_before_the_settlement_time_is_refused_naming_it_and_nothing_starts(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path, given: str
) -> None:
    engine = settlement
    deadline = datetime.now(UTC) + timedelta(hours=1)
    when = {
        "settle_after": (deadline + timedelta(minutes=1)).isoformat(),
        "settle_on": (deadline + timedelta(days=2)).date().isoformat(),
    }[given]
    trade_id = f"TS-late-{given}"
    instruction = scheduled_trade(trade_id, deadline=deadline.isoformat(), **{given: when})
    file = tmp_path / "trade.json"
    file.write_text(json.dumps(instruction))

    refused = await dvp(config_file(engine, temporal_server.address, tmp_path), "submit", str(file))
    with pytest.raises(InvalidInstruction) as raised:
        await engine.client.submit(instruction)

    assert refused.returncode == 2, refused.stderr
    assert f"refused: deadline: {deadline.isoformat()} is not after {given} {when}" in refused.stderr
    assert raised.value.field == "deadline"
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    with pytest.raises(RPCError) as missing:
        await handle.describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND  # nothing started


async def test_a_workflow_started_directly_with_its_deadline_before_settle_on_is_rejected_holding_nothing(
    settlement: Engine,
) -> None:
    """A client that skips the check: the workflow refuses by the worker's calendar."""
    engine = settlement
    before = engine.balances()
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    deadline = datetime.combine(tomorrow, time(0), UTC) - timedelta(minutes=1)
    instruction = Instruction.model_validate(
        scheduled_trade("TS-direct", settle_on=tomorrow.isoformat(), deadline=deadline.isoformat())
    )
    request = SettlementRequest(
        instruction=instruction, fingerprint=instruction.fingerprint(), token=token("ops")
    )

    handle = await engine.client.client.start_workflow(
        SettlementWorkflow.run,
        request,
        id=workflow_id_for("TS-direct"),
        task_queue=engine.config.settlement_queue(),
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=initial_search_attributes(instruction),
    )
    final = await asyncio.wait_for(handle.result(), 30)

    assert final.status is TradeStatus.REJECTED
    assert [e.field for e in final.errors] == ["deadline"]
    assert "is not after settle_on" in final.reason
    assert {a for a in await activities_called(engine, "TS-direct")} <= {
        "settlement.admit",
        "settlement.admit_checked",  # with the local account checks, which reserve nothing
    }
    assert engine.balances() == before and never_called(engine, "TS-direct")


@pytest.fixture
async def new_york(temporal_client: Client, task_queue_prefix: str, tmp_path: Path) -> AsyncIterator[Engine]:
    """An engine whose settlement calendar is New York's."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix, time_zone=CALENDAR)
    async with run_engine(temporal_client, config) as engine:
        yield engine


async def test_settle_on_starts_at_midnight_in_the_settlement_calendars_time_zone(
    new_york: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    engine = new_york
    day = datetime.now(ZoneInfo(CALENDAR)).date() + timedelta(days=2)
    midnight = datetime.combine(day, time(0), ZoneInfo(CALENDAR))
    # after midnight in UTC, before midnight in New York: refused here, accepted by a UTC calendar
    early = (midnight - timedelta(hours=1)).astimezone(UTC)
    file = tmp_path / "early.json"
    file.write_text(
        json.dumps(scheduled_trade("TS-early", settle_on=day.isoformat(), deadline=early.isoformat()))
    )

    config = config_file(engine, temporal_server.address, tmp_path)
    refused = await dvp(config, "submit", str(file))
    await engine.client.submit(scheduled_trade("TS-on", settle_on=day.isoformat(), settle_within="PT2H"))
    scheduled = await wait_for_status(engine, "TS-on", TradeStatus.SCHEDULED)
    await searched_status(engine, "TS-on", TradeStatus.SCHEDULED)
    listed = await dvp(config, "list", "--status", "SCHEDULED", "--json")
    shown = await dvp(config, "status", "TS-on")

    assert refused.returncode == 2 and "refused: deadline:" in refused.stderr
    assert f"is not after settle_on {day} (from {midnight.astimezone(UTC).isoformat()})" in refused.stderr
    assert scheduled.deadline == midnight + timedelta(hours=2)
    assert scheduled.reason == f"nothing is reserved before {midnight.astimezone(UTC).isoformat()}"
    assert never_called(engine, "TS-on")
    assert [t["status"] for t in json.loads(listed.stdout) if t["trade_id"] == "TS-on"] == ["SCHEDULED"]
    assert f"SCHEDULED   nothing is reserved before {midnight.astimezone(UTC).isoformat()}" in shown.stdout
    await engine.client.cancel("TS-on")
    assert (await engine.client.wait("TS-on", timeout=30)).status is TradeStatus.CANCELLED


def test_settle_on_and_settle_after_exclude_each_other_and_apply_to_escrow_only() -> None:
    trade = scheduled_trade(
        "TS-both", settle_on=date.today().isoformat(), settle_after=datetime.now(UTC).isoformat()
    )
    with pytest.raises(ValueError, match="settle_after\n.*give 'settle_on' or 'settle_after', not both"):
        Instruction.model_validate(trade)
    htlc = {
        **scheduled_trade("TS-htlc", settle_on=date.today().isoformat()),
        "protocol": "htlc",
        "hashlock": "ab" * 32,
    }
    with pytest.raises(ValueError, match="settle_on\n.*applies only to protocol escrow"):
        Instruction.model_validate(htlc)
