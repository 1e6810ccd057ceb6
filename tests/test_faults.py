"""Faults: a worker process killed mid-settlement, a ledger worker that goes down.

Each test runs the real ``python worker.py --config FILE`` as a child process against
the session's dev server and two fresh SQLite ledgers, SIGKILLs it at a chosen
moment, starts a new one, and checks that every trade still ends whole: SETTLED with
every leg committed, or EXPIRED/CANCELLED with every leg released (or never
reserved), never half, and that the ledgers' balances are exactly the seeded ones
plus the settled legs.

Ledger calls run in the settlement worker by default (local activities, commits as
eagerly dispatched activities on its own queue: the first test), or through each
ledger's task queue (``local_activities = false``,
the other two, whose ledger activities run in another process). A killed worker's
workflow tasks and local activities pass to the next worker once the sticky queue's
3 s schedule-to-start timeout or the workflow task's 10 s timeout runs out; a queued
ledger activity cut off by a SIGKILL is retried once its 10 s heartbeat timeout
passes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapters import Ledger
from adapters.sql import SqlLedger
from domain import (
    Config,
    Hold,
    HoldStatus,
    Instruction,
    LegState,
    TradeStatus,
    TradeView,
    UnknownHold,
    load_config,
)
from processes.devserver import DevServer
from starter.client import SettlementClient
from starter.instructions import dvp_instruction
from starter.ledgers import all_open_holds, opened, parse_seed, seed
from worker import run_worker
from workflows import workflow_id_for
from workflows._saga import STATUS

from ._fixtures_auth import auth_toml, token
from ._fixtures_settlement import STANDARD_ACCOUNTS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LEDGERS = ("cash", "securities")
ACCOUNTS = [a for a in STANDARD_ACCOUNTS if a["ledger"] in LEDGERS]


# --------------------------------------------------------------------- helpers


def write_config(tmp_path: Path, server: DevServer, prefix: str, queued: tuple[str, ...] = ()) -> Path:
    """A TOML configuration: two SQLite ledgers in ``tmp_path``, the test server, our queues.

    The ledgers named in ``queued`` are called through their task queues, the others
    as local activities of the settlement worker.
    """
    ledgers = "".join(
        f'[ledgers.{name}]\nkind = "sql"\nurl = "sqlite:///{tmp_path / name}.db"\n'
        f"local_activities = {'false' if name in queued else 'true'}\n\n"
        for name in LEDGERS
    )
    path = tmp_path / "dvp.toml"
    path.write_text(
        ledgers
        + '[compliance]\nsanctioned = ["mallory"]\n\n'
        + '[roles]\noperators = ["ops"]\n\n'
        + f'[temporal]\naddress = "{server.address}"\nnamespace = "{server.namespace}"\n'
        + f'task_queue_prefix = "{prefix}"\n\n'
        + '[settlement]\nrecycle_interval = "PT0.2S"\nmax_recycle_interval = "PT1S"\n\n'
        + auth_toml()
    )
    return path


class WorkerProcess:
    """``python worker.py --config FILE [ARGS]`` as a child process, logging to a file."""

    def __init__(self, config_path: Path, log_path: Path, *args: str) -> None:
        self.command = [sys.executable, "worker.py", "--config", str(config_path), *args]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 30) -> WorkerProcess:
        """Spawn the worker and wait until it polls its task queues."""
        env = {k: v for k, v in os.environ.items() if k not in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while "worker running" not in self.log():
            assert self.process.poll() is None, f"worker exited {self.process.returncode}:\n{self.log()}"
            assert loop.time() < end, f"worker not running after {timeout}s:\n{self.log()}"
            await asyncio.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, whatever it was doing is cut off."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@asynccontextmanager
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    """Every worker process added to the list is killed on exit, whatever happened."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


@contextmanager
def seeded_ledgers(config: Config) -> Iterator[dict[str, Ledger]]:
    """The configured ledgers, opened in this process with the standard accounts seeded."""
    with opened(config) as ledgers:
        seed(config, parse_seed({"accounts": ACCOUNTS}, config), ledgers)
        yield ledgers


def balances(ledgers: dict[str, Ledger]) -> dict[tuple[str, str], Decimal]:
    return {(b.ledger, b.account): b.balance for lg in ledgers.values() for b in lg.balances()}


def leg(ledger: str, asset: str, source: str, to: str, amount: str) -> dict[str, str]:
    return {"ledger": ledger, "asset": asset, "from": source, "to": to, "amount": amount}


def dvp(trade_id: str, seller: str, bonds: str, cash: str, settle_within: str = "PT90S") -> dict[str, Any]:
    """``seller`` delivers ``bonds`` BOND-2030 to alice against ``cash`` EUR from alice."""
    return dvp_instruction(trade_id, seller, "alice", bonds, cash, settle_within=settle_within)


def four_legs(trade_id: str, n: int) -> dict[str, Any]:
    """bob and carol both deliver bonds to alice, alice pays each of them."""
    return {
        "trade_id": trade_id,
        "legs": [
            leg("securities", "BOND-2030", "bob-sec", "alice-sec", "5"),
            leg("cash", "EUR", "alice-cash", "bob-cash", f"50.{n:02d}"),
            leg("securities", "BOND-2030", "carol-sec", "alice-sec", "3"),
            leg("cash", "EUR", "alice-cash", "carol-cash", f"31.{n:02d}"),
        ],
        "settle_within": "PT90S",
    }


def expected_balances(
    seeded: dict[tuple[str, str], Decimal], instructions: list[Instruction], views: dict[str, TradeView]
) -> dict[tuple[str, str], Decimal]:
    """The seeded balances plus exactly the legs of the trades that SETTLED."""
    expected = dict(seeded)
    for instruction in instructions:
        if views[instruction.trade_id].status is TradeStatus.SETTLED:
            for lg in instruction.legs:
                expected[(lg.ledger, lg.from_)] -= lg.amount
                expected[(lg.ledger, lg.to)] += lg.amount
    return expected


def hold_or_none(ledger: Ledger, hold_id: str) -> Hold | None:
    try:
        return ledger.get_hold(hold_id)
    except UnknownHold:
        return None


def assert_whole(
    instructions: list[Instruction], views: dict[str, TradeView], ledgers: dict[str, Ledger]
) -> None:
    """Every trade ended all or nothing, in the workflow's view and at the ledgers."""
    for instruction in instructions:
        view = views[instruction.trade_id]
        states = [lv.state for lv in view.legs]
        holds = [
            hold_or_none(ledgers[lg.ledger], lv.hold_id)
            for lg, lv in zip(instruction.legs, view.legs, strict=True)
        ]
        if view.status is TradeStatus.SETTLED:
            assert states == [LegState.COMMITTED] * len(states), (view.trade_id, states)
            assert all(h is not None and h.status is HoldStatus.COMMITTED for h in holds), (
                view.trade_id,
                holds,
            )
        else:
            assert view.status in (TradeStatus.EXPIRED, TradeStatus.CANCELLED), (view.trade_id, view.reason)
            # PENDING: it ended before its reservation began, so nothing was ever held
            assert set(states) <= {LegState.RELEASED, LegState.PENDING}, (view.trade_id, view.reason, states)
            assert all(h is None or h.status is HoldStatus.RELEASED for h in holds), (view.trade_id, holds)
    assert all_open_holds(ledgers) == []
    for ledger in ledgers.values():
        assert ledger.verify() == [], ledger.name  # type: ignore[attr-defined]


def kill_window(
    ledgers: dict[str, Ledger], instructions: list[Instruction], candidates: set[str], elapsed: float
) -> str | None:
    """Which moment between reservation and commit the trades are in, if worth a kill now.

    A half-committed trade is worth it at once, a pinned hold after 3 s of looking
    for one, any held leg after 6 s.
    """
    holds = [h for h in all_open_holds(ledgers) if h.trade_id in candidates]
    pinned = {h.trade_id for h in holds if h.expires_at is None}
    by_id = {i.trade_id: i for i in instructions}
    for trade_id in pinned:
        legs = by_id[trade_id].legs
        resolved = [hold_or_none(ledgers[lg.ledger], f"{trade_id}#{n}") for n, lg in enumerate(legs)]
        if any(h is not None and h.status is HoldStatus.COMMITTED for h in resolved):
            return f"with {trade_id} half committed"
    if pinned and elapsed > 3:
        return f"with {len(pinned)} trades pinned"
    if holds and elapsed > 6:
        return "with legs held"
    return None


async def running_trades(client: SettlementClient, trade_ids: list[str]) -> dict[str, str]:
    """Trades whose workflow is still open, with the status it last published; needs no worker."""
    handles = [client.client.get_workflow_handle(workflow_id_for(t)) for t in trade_ids]
    described = await asyncio.gather(*(h.describe() for h in handles))
    return {
        t: d.typed_search_attributes.get(STATUS) or "?"
        for t, d in zip(trade_ids, described, strict=True)
        if d.close_time is None
    }


async def wait_all(client: SettlementClient, trade_ids: list[str], timeout: float) -> dict[str, TradeView]:
    views = await asyncio.wait_for(asyncio.gather(*(client.wait(t) for t in trade_ids)), timeout)
    return dict(zip(trade_ids, views, strict=True))


# ----------------------------------------------------------------------- tests


async def test_worker_killed_mid_settlement_leaves_every_trade_whole(
    temporal_server: DevServer, temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """30 trades in flight, the only worker SIGKILLed while legs are held: nothing half-settles.

    Given the standard accounts, 20 DvP trades bob -> alice, 5 four-leg trades (bob
    and carol deliver, alice pays both), 4 trades where carol sells more bonds than
    she has (short: the cash leg is held, the bond leg recycles until the 3 s
    deadline) and one such short trade with a long deadline that an operator
    cancels after the restart.
    """
    config_path = write_config(tmp_path, temporal_server, task_queue_prefix)
    config = load_config(config_path)
    client = SettlementClient(temporal_client, config, token("ops"))
    uid = task_queue_prefix.removeprefix("t-")
    good = [dvp(f"K-{uid}-dvp-{i}", "bob", "10", f"{100 + i}.25") for i in range(20)]
    good += [four_legs(f"K-{uid}-4leg-{i}", i) for i in range(5)]
    short = [dvp(f"K-{uid}-short-{i}", "carol", "5000", f"10.0{i}", settle_within="PT3S") for i in range(4)]
    to_cancel = dvp(f"K-{uid}-cancel", "carol", "5000", "12.00")
    trades = good + short + [to_cancel]
    instructions = [Instruction.model_validate(t) for t in trades]
    trade_ids = [i.trade_id for i in instructions]
    good_ids = {t["trade_id"] for t in good}

    with seeded_ledgers(config) as ledgers:
        seeded = balances(ledgers)
        async with workers() as started:
            first = WorkerProcess(config_path, tmp_path / "worker-1.log")
            started.append(first)
            await first.start()
            submitted = await client.submit_many(trades, wait_accepted=False)
            assert all(isinstance(v, TradeView) for v in submitted), submitted

            # Kill while trades that will settle are between their reservation and their
            # commit: best half-committed at the ledgers (the decision recorded, one leg
            # committed and another still open), else pinned, else merely held.
            loop = asyncio.get_running_loop()
            started_at = loop.time()
            while (window := kill_window(ledgers, instructions, good_ids, loop.time() - started_at)) is None:
                assert loop.time() < started_at + 20, "no trade ever had an open hold"
                await asyncio.sleep(0.002)
            first.kill()
            caught = all_open_holds(ledgers)
            running = await running_trades(client, trade_ids)
            pinned, by_status = sum(h.expires_at is None for h in caught), Counter(running.values())
            print(f"killed {window}: {len(caught)} open holds ({pinned} pinned), running {dict(by_status)}")
            # Caught mid-flight: holds open at the ledgers, trades still running. (Their
            # published status may still read PENDING: a trade publishes its search
            # attributes only where it waits, not at every step.)
            assert caught
            assert running

            second = WorkerProcess(config_path, tmp_path / "worker-2.log")
            started.append(second)
            await second.start()
            await client.cancel(to_cancel["trade_id"], "ops", reason="fault test")
            views = await wait_all(client, trade_ids, timeout=80)

        assert_whole(instructions, views, ledgers)
        assert {t: views[t].status for t in good_ids} == {t: TradeStatus.SETTLED for t in good_ids}
        assert {views[s["trade_id"]].status for s in short} == {TradeStatus.EXPIRED}
        assert views[to_cancel["trade_id"]].status is TradeStatus.CANCELLED
        assert balances(ledgers) == expected_balances(seeded, instructions, views)


class GatedLedger(SqlLedger):
    """The real SQL ledger, whose commits wait until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        self.waiting.set()
        self.gate.wait(25)
        return super().commit_hold(hold_id, preimage)


async def test_orchestrator_killed_while_a_commit_is_blocked_settles_after_restart(
    temporal_server: DevServer, temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Every leg held and pinned, the decision recorded, the cash commit blocked: kill the orchestrator.

    The cash ledger's activities run in this process on a ledger whose commits wait
    for a gate; the workflows and the securities ledger run in a child worker. Once
    the bond leg is committed and the cash commit is blocked, the child is SIGKILLed;
    the cash commit then completes with no orchestrator alive, and a new worker
    finishes the trade SETTLED, with each leg moved exactly once.
    """
    config_path = write_config(tmp_path, temporal_server, task_queue_prefix, queued=("cash",))
    config = load_config(config_path)
    client = SettlementClient(temporal_client, config, token("ops"))
    trade_id = f"K-{task_queue_prefix.removeprefix('t-')}-blocked"
    instruction = Instruction.model_validate(dvp(trade_id, "bob", "100", "9950.00"))

    with seeded_ledgers(config) as ledgers:
        seeded = balances(ledgers)
        gated = GatedLedger("cash", config.ledgers["cash"].url or "")
        stop = asyncio.Event()
        cash_worker = asyncio.create_task(
            run_worker(
                config,
                temporal_client,
                ledgers=["cash"],
                workflows=False,
                stop=stop,
                instances={"cash": gated},
            )
        )
        try:
            async with workers() as started:
                first = WorkerProcess(config_path, tmp_path / "worker-1.log", "--ledger", "securities")
                started.append(first)
                await first.start()
                await client.submit(instruction)
                assert await asyncio.to_thread(gated.waiting.wait, 20), "the cash commit never started"
                bond_hold = f"{trade_id}#0"
                for _ in range(200):
                    if ledgers["securities"].get_hold(bond_hold).status is HoldStatus.COMMITTED:
                        break
                    await asyncio.sleep(0.05)
                assert (await client.status(trade_id)).status is TradeStatus.COMMITTING

                first.kill()
                gated.gate.set()
                for _ in range(200):  # the blocked commit finishes with no orchestrator alive
                    if ledgers["cash"].get_hold(f"{trade_id}#1").status is HoldStatus.COMMITTED:
                        break
                    await asyncio.sleep(0.05)
                assert ledgers["cash"].get_hold(f"{trade_id}#1").status is HoldStatus.COMMITTED
                assert await running_trades(client, [trade_id]) == {trade_id: "COMMITTING"}

                second = WorkerProcess(config_path, tmp_path / "worker-2.log", "--ledger", "securities")
                started.append(second)
                await second.start()
                final = await client.wait(trade_id, timeout=40)
        finally:
            gated.gate.set()
            stop.set()
            await asyncio.wait_for(cash_worker, 30)
            gated.close()

        views = {trade_id: final}
        assert final.status is TradeStatus.SETTLED, final.reason
        assert [e.event for e in final.timeline].count("leg 1 committed") == 1
        assert_whole([instruction], views, ledgers)
        assert balances(ledgers) == expected_balances(seeded, [instruction], views)
        assert ledgers["cash"].account("bob-cash").balance == Decimal("9950.00")
        assert ledgers["securities"].account("alice-sec").balance == Decimal("100")


async def test_cash_ledger_worker_killed_and_restarted_leaves_every_trade_whole(
    temporal_server: DevServer, temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """The cash ledger's worker dies while trades wait on it; restarted, every trade ends whole.

    Workflows and the securities ledger run in one child worker, the cash ledger's
    activities in another (``--ledger cash --no-workflows``). Trades are submitted,
    the cash worker is SIGKILLed while cash holds are open, the trades wait with no
    cash ledger for two seconds, and a new cash worker is started.
    """
    config_path = write_config(tmp_path, temporal_server, task_queue_prefix, queued=("cash",))
    config = load_config(config_path)
    client = SettlementClient(temporal_client, config, token("ops"))
    uid = task_queue_prefix.removeprefix("t-")
    good = [dvp(f"K-{uid}-l-dvp-{i}", "bob", "7", f"{70 + i}.50") for i in range(8)]
    good += [four_legs(f"K-{uid}-l-4leg-{i}", i) for i in range(2)]
    short = [dvp(f"K-{uid}-l-short-{i}", "carol", "5000", f"20.0{i}", settle_within="PT2S") for i in range(2)]
    trades = good + short
    instructions = [Instruction.model_validate(t) for t in trades]
    trade_ids = [i.trade_id for i in instructions]

    with seeded_ledgers(config) as ledgers:
        seeded = balances(ledgers)
        async with workers() as started:
            orchestrator = WorkerProcess(config_path, tmp_path / "orchestrator.log", "--ledger", "securities")
            cash = WorkerProcess(config_path, tmp_path / "cash-1.log", "--ledger", "cash", "--no-workflows")
            started += [orchestrator, cash]
            await asyncio.gather(orchestrator.start(), cash.start())
            submitted = await client.submit_many(trades, wait_accepted=False)
            assert all(isinstance(v, TradeView) for v in submitted), submitted

            loop = asyncio.get_running_loop()
            give_up = loop.time() + 20
            while not ledgers["cash"].open_holds():
                assert loop.time() < give_up, "no cash leg was ever held"
                await asyncio.sleep(0.005)
            cash.kill()
            assert await running_trades(client, trade_ids), "every trade ended before the kill"
            await asyncio.sleep(2)  # trades wait on a ledger that is down

            restarted = WorkerProcess(
                config_path, tmp_path / "cash-2.log", "--ledger", "cash", "--no-workflows"
            )
            started.append(restarted)
            await restarted.start()
            views = await wait_all(client, trade_ids, timeout=80)

        assert_whole(instructions, views, ledgers)
        assert {views[g["trade_id"]].status for g in good} == {TradeStatus.SETTLED}
        assert {views[s["trade_id"]].status for s in short} == {TradeStatus.EXPIRED}
        assert balances(ledgers) == expected_balances(seeded, instructions, views)
