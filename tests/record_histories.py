"""Record the settlement workflow histories that ``tests/test_replay.py`` replays.

    .venv/bin/python -m tests.record_histories [--out tests/histories] [--only NAME ...]

Starts its own dev server, an in-process worker and fresh SQLite ledgers in a
temporary directory, runs one trade per scenario below, and writes each finished
workflow's history to ``<out>/<workflow id>.json``. Re-record after an intended
change to the workflow (and say so in the commit), keeping the old histories in a
folder of their own: a replay failure on them is exactly what a running trade would
hit on upgrade. The trades act with the test issuer's tokens (the venue ``ops``
submits, except where a party does); none of the histories holds an accepted signal,
so replaying them needs no key.

The histories are written as the server stores them: encrypted, under the fixture
key ring ``tests/codec-fixture-keys.json`` (a key for these fixtures only, public on
purpose), which the replay tests decrypt them with.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHistory

from domain import CodecConfig, Config, RequestRejected, TradeStatus
from processes.devserver import DevServer
from starter.instructions import dvp_instruction
from workflows import workflow_id_for

from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls

HISTORIES = Path(__file__).resolve().parent / "histories"
FIXTURE_KEYS = Path(__file__).resolve().parent / "codec-fixture-keys.json"
FIXTURE_CODEC = CodecConfig(key_file=str(FIXTURE_KEYS))


def dvp(trade_id: str, bonds: str = "100", cash: str = "9950.00", **extra: Any) -> dict[str, Any]:
    """Bob delivers ``bonds`` BOND-2030 to alice against ``cash`` EUR."""
    return dvp_instruction(trade_id, "bob", "alice", bonds, cash, **extra)


async def _until(engine: Engine, trade_id: str, ready: Callable[[Engine], bool]) -> None:
    for _ in range(200):
        if ready(engine):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{trade_id}: the expected moment never came")


async def settled(engine: Engine) -> str:
    """A plain DvP that settles."""
    await engine.client.submit(dvp("R-settled"))
    return "R-settled"


async def expired(engine: Engine) -> str:
    """Bob is short of bonds: the cash leg is held, the bond leg recycles, the deadline passes."""
    await engine.client.submit(dvp("R-expired", bonds="1500", settle_within="PT2S"))
    return "R-expired"


async def cancelled(engine: Engine) -> str:
    """A short trade cancelled by a party while its cash leg is held."""
    await engine.client.submit(dvp("R-cancelled", bonds="5000"))
    await _until(engine, "R-cancelled", lambda e: any(h.hold_id == "R-cancelled#1" for h in e.open_holds()))
    await engine.acting("alice").cancel("R-cancelled", reason="changed my mind")
    return "R-cancelled"


async def cancelled_through_temporal(engine: Engine) -> str:
    """A short trade cancelled with a Temporal cancel request (not the cancel update)."""
    await engine.client.submit(dvp("R-temporal-cancel", bonds="5000"))
    await _until(
        engine, "R-temporal-cancel", lambda e: any(h.hold_id == "R-temporal-cancel#1" for h in e.open_holds())
    )
    await engine.client.client.get_workflow_handle(workflow_id_for("R-temporal-cancel")).cancel()
    return "R-temporal-cancel"


async def approval(engine: Engine) -> str:
    """A trade needing the notary: bob (update) and eve (tokenless signal) are refused; notary approves."""
    await engine.client.submit(dvp("R-approval", approvers=["notary"]))
    try:
        await engine.acting("bob").approve("R-approval")
    except RequestRejected:
        pass  # as intended: refused in the validator, so not in the history at all
    else:
        raise RuntimeError("R-approval: bob's approval was accepted")
    handle = engine.client.client.get_workflow_handle(workflow_id_for("R-approval"))
    await handle.signal("approve", {"party": "eve"})  # in the history; the trade counts it
    await engine.acting("notary").approve("R-approval", "notary")
    return "R-approval"


async def affirmed(engine: Engine) -> str:
    """Bob submits himself: the trade waits for alice's affirmation of her cash's debit, then settles."""
    await engine.acting("bob").submit(dvp("R-affirmed"))
    for _ in range(200):
        if (await engine.client.status("R-affirmed")).status is TradeStatus.AWAITING_AFFIRMATION:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("R-affirmed: never awaited an affirmation")
    await engine.acting("alice").affirm("R-affirmed")
    return "R-affirmed"


async def sanctioned(engine: Engine) -> str:
    """Mallory is sanctioned: the trade is rejected before anything is reserved."""
    trade = dvp("R-sanctioned")
    trade["legs"][0]["from"] = "mallory-sec"
    await engine.client.submit(trade)
    return "R-sanctioned"


async def released(engine: Engine) -> str:
    """The securities ledger already has a hold under the bond leg's key, with other terms: it
    refuses the reservation after the cash leg was held, and the cash hold is released."""
    engine.ledgers["securities"].place_hold(
        "R-released#0", "carol-sec", "alice-sec", "BOND-2030", Decimal(1), None, "placed-by-hand"
    )
    await engine.client.submit(dvp("R-released"))
    return "R-released"


async def settled_queued(engine: Engine) -> str:
    """A plain DvP whose ledger calls go through the ledgers' task queues."""
    await engine.client.submit(dvp("R-settled-queued"))
    return "R-settled-queued"


async def settled_mixed(engine: Engine) -> str:
    """A plain DvP whose cash ledger is called locally and whose securities ledger on its queue."""
    await engine.client.submit(dvp("R-settled-mixed"))
    return "R-settled-mixed"


async def settled_partial(engine: Engine) -> str:
    """Carol sells 600 bonds in parts but holds 500: 500 settle, the rest is released at the deadline."""
    trade = dvp("R-settled-partial", bonds="600", cash="59700.00", settle_within="PT3S")
    trade["legs"][0]["from"], trade["legs"][1]["to"] = "carol-sec", "carol-cash"
    await engine.client.submit({**trade, "partial": {"min_fill": "0.5"}})
    return "R-settled-partial"


SECRET = bytes(range(32)).hex()  # a fixed secret: the histories are fixtures, not secrets


def htlc(trade_id: str, **extra: Any) -> dict[str, Any]:
    """The same DvP under the HTLC protocol, locked by ``SECRET``'s SHA-256."""
    hashlock = hashlib.sha256(bytes.fromhex(SECRET)).hexdigest()
    return dvp(trade_id, protocol="htlc", hashlock=hashlock, **extra)


async def scheduled(engine: Engine) -> str:
    """A DvP with settle_after 3 s ahead: SCHEDULED, holding nothing, then it settles."""
    when = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    await engine.client.submit(dvp("R-scheduled", settle_after=when))
    return "R-scheduled"


async def scheduled_cancelled(engine: Engine) -> str:
    """Cancelled while SCHEDULED (settle_on a week ahead): no ledger call but the account checks."""
    day = (datetime.now(UTC) + timedelta(days=7)).date().isoformat()
    await engine.client.submit(dvp("R-scheduled-cancelled", settle_on=day))
    for _ in range(200):
        if (await engine.client.status("R-scheduled-cancelled")).status is TradeStatus.SCHEDULED:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("R-scheduled-cancelled: never SCHEDULED")
    await engine.acting("alice").cancel("R-scheduled-cancelled", reason="not this week")
    return "R-scheduled-cancelled"


async def _locked(engine: Engine, trade_id: str) -> None:
    await _until(engine, trade_id, lambda e: len([h for h in e.open_holds() if h.trade_id == trade_id]) == 2)
    for _ in range(200):
        if (await engine.client.status(trade_id)).status is TradeStatus.AWAITING_CLAIM:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{trade_id}: never awaited a claim")


async def htlc_settled(engine: Engine) -> str:
    """Bob claims the cash with the secret; the engine claims the bonds for alice with it."""
    await engine.client.submit(htlc("R-htlc-settled"))
    await _locked(engine, "R-htlc-settled")
    await engine.acting("bob").claim("R-htlc-settled", SECRET)
    return "R-htlc-settled"


async def htlc_expired(engine: Engine) -> str:
    """Nobody claims: each leg refunds at its timelock."""
    await engine.client.submit(htlc("R-htlc-expired", settle_within="PT2S", claim_window="PT1S"))
    return "R-htlc-expired"


async def htlc_one_sided(engine: Engine) -> str:
    """Without auto_claim, bob claims the cash and alice never claims the bonds."""
    await engine.client.submit(
        htlc("R-htlc-one-sided", settle_within="PT10S", claim_window="PT1S", auto_claim=False)
    )
    await _locked(engine, "R-htlc-one-sided")
    await engine.acting("bob").claim("R-htlc-one-sided", SECRET)
    return "R-htlc-one-sided"


async def _runs(engine: Engine, trade_id: str) -> list[WorkflowHistory]:
    """Every run of the trade's workflow, first to latest."""
    client, workflow_id = engine.client.client, workflow_id_for(trade_id)
    run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
    histories: list[WorkflowHistory] = []
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(history)
        run_id = history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
    return histories[::-1]


async def continued(engine: Engine) -> str:
    """Bob is short of bonds: the cash leg is held in the first run, the bond leg recycles
    through two more (continue-as-new past 100 events), then carol's bonds arrive and it settles."""
    await engine.client.submit(dvp("R-continued", bonds="1200", cash="1.00", settle_within="PT60S"))
    for _ in range(600):
        if len(await _runs(engine, "R-continued")) >= 3:
            break
        await asyncio.sleep(0.1)
    else:
        raise RuntimeError("R-continued: never reached its third run")
    securities = engine.ledgers["securities"]
    securities.place_hold("fund-bob", "carol-sec", "bob-sec", "BOND-2030", Decimal(200), None, "funding")
    securities.commit_hold("fund-bob")
    return "R-continued"


SCENARIOS: dict[str, tuple[Callable[[Engine], Awaitable[str]], TradeStatus]] = {
    "settled": (settled, TradeStatus.SETTLED),
    "expired": (expired, TradeStatus.EXPIRED),
    "cancelled": (cancelled, TradeStatus.CANCELLED),
    "cancelled_through_temporal": (cancelled_through_temporal, TradeStatus.CANCELLED),
    "approval": (approval, TradeStatus.SETTLED),
    "affirmed": (affirmed, TradeStatus.SETTLED),
    "sanctioned": (sanctioned, TradeStatus.REJECTED),
    "released": (released, TradeStatus.RELEASED),
    "settled_partial": (settled_partial, TradeStatus.SETTLED_PARTIAL),
    "scheduled": (scheduled, TradeStatus.SETTLED),
    "scheduled_cancelled": (scheduled_cancelled, TradeStatus.CANCELLED),
    "htlc_settled": (htlc_settled, TradeStatus.SETTLED),
    "htlc_expired": (htlc_expired, TradeStatus.EXPIRED),
    "htlc_one_sided": (htlc_one_sided, TradeStatus.ONE_SIDED),
}


# Recorded with every ledger configured ``local_activities = false``.
QUEUED_SCENARIOS: dict[str, tuple[Callable[[Engine], Awaitable[str]], TradeStatus]] = {
    "settled_queued": (settled_queued, TradeStatus.SETTLED),
}

# Recorded with only the cash ledger local: each step calls the securities ledger on
# its queue beside the local ones' call.
MIXED_SCENARIOS: dict[str, tuple[Callable[[Engine], Awaitable[str]], TradeStatus]] = {
    "settled_mixed": (settled_mixed, TradeStatus.SETTLED),
}


# Recorded with a bound of 100 events and fast recycling: every run of the trade is
# written, to continued/<run>/<workflow id>.json.
CONTINUED_SCENARIOS: dict[str, tuple[Callable[[Engine], Awaitable[str]], TradeStatus]] = {
    "continued": (continued, TradeStatus.SETTLED),
}
CONTINUED_SETTLEMENT = {
    "continue_as_new_after": 100,
    "recycle_interval": "PT0.05S",
    "max_recycle_interval": "PT0.1S",
}


async def record(out: Path, only: list[str] | None = None) -> list[Path]:
    written: list[Path] = []
    with DevServer(headless=True) as server, tempfile.TemporaryDirectory(prefix="dvp-record-") as tmp:
        client = await server.connect(codec=FIXTURE_CODEC)
        layouts: list[tuple[str, bool | set[str], dict[str, Any], dict[str, Any]]] = [
            ("local", True, SCENARIOS, {}),
            ("queued", False, QUEUED_SCENARIOS, {}),
            ("mixed", {"cash"}, MIXED_SCENARIOS, {}),
            ("continued", True, CONTINUED_SCENARIOS, CONTINUED_SETTLEMENT),
        ]
        for label, local_activities, scenarios, settlement in layouts:
            base = Path(tmp) / label
            base.mkdir()
            config = make_config(
                sqlite_urls(base),
                f"rec-{uuid.uuid4().hex[:8]}",
                local_activities=local_activities,
                **settlement,
            )
            chosen = {name: s for name, s in scenarios.items() if not only or name in only}
            if chosen:
                written += await _record(client, config, chosen, out, every_run=label == "continued")
    return written


async def _record(
    client: Client,
    config: Config,
    scenarios: dict[str, tuple[Callable[[Engine], Awaitable[str]], TradeStatus]],
    out: Path,
    every_run: bool = False,
) -> list[Path]:
    written: list[Path] = []
    async with run_engine(client, config) as engine:
        for name, (scenario, expected) in scenarios.items():
            trade_id = await scenario(engine)
            final = await engine.client.wait(trade_id, timeout=60)
            if final.status is not expected:
                raise RuntimeError(
                    f"{name}: {trade_id} ended {final.status} ({final.reason}), not {expected}"
                )
            workflow_id = workflow_id_for(trade_id)
            if every_run:
                for n, history in enumerate(await _runs(engine, trade_id), 1):
                    path = out / "continued" / str(n) / f"{workflow_id}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(history.to_json() + "\n")
                    written.append(path)
                    print(f"  {name}: {trade_id} run {n}, {len(history.events)} events -> {path}")
                continue
            history = await client.get_workflow_handle(workflow_id).fetch_history()
            path = out / f"{workflow_id}.json"
            path.write_text(history.to_json() + "\n")
            written.append(path)
            print(f"  {name}: {trade_id} {final.status.value}, {len(history.events)} events -> {path}")
        engine.assert_invariants()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.record_histories", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=HISTORIES, help=f"directory to write to (default {HISTORIES})"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted({**SCENARIOS, **QUEUED_SCENARIOS, **MIXED_SCENARIOS, **CONTINUED_SCENARIOS}),
        help="record only this scenario (repeatable)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(record(args.out, args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
