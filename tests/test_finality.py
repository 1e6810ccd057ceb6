"""Finality on chains: a reorganisation never moves one leg of a trade without the other.

Two real anvil nodes with distinct chain ids hold the two legs: bonds on the
``securities`` chain, an EUR token on the ``cash`` chain, both ledgers with
``confirmations = 3``. ``anvil_reorg`` replaces the newest blocks the way a real
reorganisation does: the transactions in them are gone. The first test starts the
chains as a user does (``dvp chain up``, a block every 0.3 s); the others start anvil
themselves with ``--mixed-mining`` as well (a block every 0.3 s and one per
transaction), so that seeding takes a second, not ten; blocks are dropped alike.
Balances are read straight from the chains with web3; the Temporal dev server and a
worker in this process run the trades, as in the other settlement tests.

Given the standard accounts (bob 1,000 BOND-2030 and carol 500; alice 100,000.00 EUR
and carol 5,000.00), after these trades and reorganisations, these balances.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from eth_utils import keccak
from web3 import Web3

from adapters.evm import EvmLedger, deploy_contracts, load_artefact
from domain import Config, ConfigError, Hold, LedgerConfig, TradeNotFound, TradeStatus, TradeView, load_config
from processes.anvil import Anvil, AnvilError, dev_key, find_anvil
from processes.ports import free_port
from starter.instructions import dvp_instruction

from ._fixtures_evm import need, token_balance
from ._fixtures_settlement import (
    STANDARD_ACCOUNTS,
    Engine,
    make_config,
    run_engine,
    sqlite_urls,
    write_config,
)
from .test_bank import until

D = Decimal
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BLOCK_TIME = 0.3
CONFIRMATIONS = 3
ASSETS = {"securities": ("BOND-2030", 0), "cash": ("EUR", 2)}
ACCOUNTS = {
    "securities": ["bob-sec", "alice-sec", "carol-sec"],
    "cash": ["alice-cash", "bob-cash", "carol-cash"],
}
OPEN, COMMITTED = 1, 2  # DvpEscrow.State


def dvp(
    trade_id: str, seller: str, buyer: str, bonds: str, cash: str, within: str = "PT60S"
) -> dict[str, Any]:
    return dvp_instruction(trade_id, seller, buyer, bonds, cash, settle_within=within)


@dataclass
class Chain:
    """One chain (its node's JSON-RPC URL) and a deployment of the dvp contracts on it, read with web3."""

    rpc: str
    deployment: dict[str, Any]

    @property
    def w3(self) -> Web3:
        return Web3(Web3.HTTPProvider(self.rpc))

    def escrow(self) -> Any:
        return self.w3.eth.contract(address=self.deployment["escrow"], abi=load_artefact("DvpEscrow")["abi"])

    def tokens(self, asset: str, wallet: str) -> int:
        return token_balance(self.rpc, self.deployment, asset, wallet)

    def lock(self, hold_id: str) -> tuple[int, int]:
        """(state, expiry) of the hold's lock in the latest block."""
        fields = self.escrow().functions.locks(keccak(text=hold_id)).call()
        return int(fields[2]), int(fields[1])

    def mined_in(self, event: str, hold_id: str) -> int:
        """The block of the hold's latest ``event`` (Locked, Pinned, Committed) on the chain now."""
        logs = getattr(self.escrow().events, event).get_logs(
            from_block=self.deployment["from_block"], argument_filters={"lockId": keccak(text=hold_id)}
        )
        assert logs, f"no {event} event for {hold_id}"
        return int(logs[-1]["blockNumber"])

    def events(self, event: str, hold_id: str) -> int:
        logs = getattr(self.escrow().events, event).get_logs(
            from_block=self.deployment["from_block"], argument_filters={"lockId": keccak(text=hold_id)}
        )
        return len(logs)

    def reorg(self, depth: int) -> None:
        """Replace the newest ``depth`` blocks with empty ones (anvil): their transactions are gone."""
        reply = self.w3.provider.make_request("anvil_reorg", [depth, []])  # type: ignore[arg-type]
        assert "error" not in reply, reply

    def undo_from(self, block: int, still: Callable[[], bool]) -> None:
        """Replace every block from ``block`` on (a reorganisation that deep) until ``still()`` is false."""
        for _ in range(10):
            if not still():
                return
            self.reorg(self.w3.eth.block_number - block + 1)
        raise AssertionError(f"blocks from {block} on kept coming back")

    def send_tokens(self, asset: str, key: str, to: str, units: int) -> None:
        """A plain ERC-20 transfer signed with ``key``: the holder moving their own tokens."""
        w3 = self.w3
        registry = w3.eth.contract(
            address=self.deployment["registry"], abi=load_artefact("AccountRegistry")["abi"]
        )
        token = w3.eth.contract(
            address=registry.functions.tokenOf(asset).call(), abi=load_artefact("SecurityToken")["abi"]
        )
        sender = w3.eth.account.from_key(key)
        tx = token.functions.transfer(to, units).build_transaction(
            {"from": sender.address, "nonce": w3.eth.get_transaction_count(sender.address, "pending")}
        )
        receipt = w3.eth.wait_for_transaction_receipt(
            w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction), poll_latency=0.02
        )
        assert receipt["status"] == 1


def section(chain: Chain, confirmations: int | str = CONFIRMATIONS) -> LedgerConfig:
    return LedgerConfig.model_validate(
        {**chain.deployment, "confirmations": confirmations, "block_time": BLOCK_TIME}
    )


def on_chains(tmp_path: Path, prefix: str, chains: dict[str, Chain]) -> Config:
    """The standard configuration with ``securities`` and ``cash`` each on its own chain."""
    config = make_config(sqlite_urls(tmp_path), prefix)
    ledgers = {**config.ledgers, **{name: section(chain) for name, chain in chains.items()}}
    return config.model_copy(update={"ledgers": ledgers})


def books(engine: Engine, chains: dict[str, Chain]) -> dict[tuple[str, str], Decimal]:
    """Each account's tokens in its wallet, read from its chain (the adapter only names the wallet)."""
    found = {}
    for ledger, accounts in ACCOUNTS.items():
        asset, decimals = ASSETS[ledger]
        for account in accounts:
            wallet = engine.ledgers[ledger].wallet(account)  # type: ignore[attr-defined]
            found[(ledger, account)] = D(chains[ledger].tokens(asset, wallet)).scaleb(-decimals)
    return found


def opening() -> dict[tuple[str, str], Decimal]:
    wanted = {(ledger, account) for ledger, accounts in ACCOUNTS.items() for account in accounts}
    return {
        (a["ledger"], a["id"]): D(a["balance"]) for a in STANDARD_ACCOUNTS if (a["ledger"], a["id"]) in wanted
    }


def after(
    views: list[TradeView], before: dict[tuple[str, str], Decimal] | None = None
) -> dict[tuple[str, str], Decimal]:
    """The balances ``before`` (the opening ones by default) plus exactly the legs of the SETTLED
    trades among ``views``."""
    expected = dict(before or opening())
    for view in views:
        if view.status is TradeStatus.SETTLED:
            for leg in view.legs:
                expected[(leg.ledger, leg.from_)] -= leg.amount
                expected[(leg.ledger, leg.to)] += leg.amount
    return expected


def escrows_empty(chains: dict[str, Chain]) -> bool:
    return all(
        chain.tokens(ASSETS[name][0], chain.deployment["escrow"]) == 0
        and not chain.escrow().functions.openLocks().call()
        for name, chain in chains.items()
    )


def assert_exactly(
    engine: Engine,
    chains: dict[str, Chain],
    views: list[TradeView],
    before: dict[tuple[str, str], Decimal] | None = None,
) -> None:
    """Both chains read directly: ``before`` plus exactly the settled trades, nothing left in escrow."""
    assert books(engine, chains) == after(views, before)
    assert escrows_empty(chains)
    engine.assert_invariants()


def wait_final(chains: dict[str, Chain]) -> None:
    """Let every chain mine past the confirmations, so that what is read now stays."""
    targets = {name: chain.w3.eth.block_number + CONFIRMATIONS for name, chain in chains.items()}
    end = time.monotonic() + 10
    while any(chains[name].w3.eth.block_number < target for name, target in targets.items()):
        assert time.monotonic() < end, "the chains stopped mining"
        time.sleep(BLOCK_TIME / 2)


# ---------------------------------------------------------------- fixtures


def _anvil_or_skip() -> None:
    try:
        find_anvil()
    except AnvilError as exc:
        need(str(exc))


def _two_nodes(first_id: int, *mining: str) -> Iterator[dict[str, Anvil]]:
    _anvil_or_skip()
    args = ["--block-time", str(BLOCK_TIME), *mining]
    with (
        Anvil(chain_id=first_id, extra_args=args) as sec,
        Anvil(chain_id=first_id + 1, extra_args=args) as cash,
    ):
        yield {"securities": sec, "cash": cash}


def _deploy(nodes: dict[str, Anvil]) -> dict[str, Chain]:
    with ThreadPoolExecutor(2) as pool:
        deployed = pool.map(lambda node: deploy_contracts(node.url, node.key(0), {}), nodes.values())
        return {
            name: Chain(nodes[name].url, deployment) for name, deployment in zip(nodes, deployed, strict=True)
        }


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Anvil]]:
    """Two anvil nodes (chain ids 31401, 31402), a block every 0.3 s and one per transaction."""
    yield from _two_nodes(31401, "--mixed-mining")


@pytest.fixture
def chains(nodes: dict[str, Anvil]) -> dict[str, Chain]:
    """Fresh contracts on both nodes for each test."""
    return _deploy(nodes)


@pytest.fixture(scope="module")
def interval_chains() -> Iterator[dict[str, Chain]]:
    """Two nodes (31411, 31412) that mine only every 0.3 s, as a real chain does: the
    transactions of those 0.3 s share one block, so a reorganisation of the newest blocks
    takes everything sent just before it. Deployed and seeded once (it takes a while at
    that pace); the tests on them compare with the balances they started from."""
    for nodes in _two_nodes(31411):
        chains = _deploy(nodes)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda name: _seed(name, chains[name]), chains))  # noqa: B023 - used at once
        yield chains


def _seed(name: str, chain: Chain) -> None:
    """The standard accounts of ledger ``name`` on ``chain``, as ``dvp ledger seed`` opens them."""
    ledger = EvmLedger.from_config(name, section(chain))
    for a in STANDARD_ACCOUNTS:
        if a["ledger"] == name:
            ledger.open_account(a["id"], a["asset"], a["owner"], D(a["balance"]), ASSETS[name][1])


class Gate(EvmLedger):
    """The real chain ledger, whose ``at`` step ("pin" or "commit") waits until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at = ""
        self.waiting = threading.Event()
        self.gate = threading.Event()
        self.before_commit: Callable[[], Any] = lambda: None
        self.seen_before_commit: list[Any] = []

    def _pause(self, step: str) -> None:
        if step == self.at and not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(60)

    def pin_hold(self, hold_id: str) -> Hold:
        self._pause("pin")
        return super().pin_hold(hold_id)

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        self.seen_before_commit.append(self.before_commit())
        self._pause("commit")
        return super().commit_hold(hold_id, preimage)


def gates(config: Config) -> dict[str, Gate]:
    return {name: Gate.from_config(name, config.ledgers[name]) for name in ("securities", "cash")}


# ------------------------------------------------------------------- tests


def test_confirmations_must_be_a_number_of_blocks_or_a_finality_tag() -> None:
    base = {
        "kind": "evm",
        "rpc": "http://127.0.0.1:1",
        "registry": "0x" + "11" * 20,
        "operator_key": dev_key(0),
    }
    for bad in (0, -2, "soon", True, 2.5):
        with pytest.raises(ConfigError, match=r"ledgers\.chain\.confirmations: expected a number of blocks"):
            EvmLedger.from_config("chain", LedgerConfig.model_validate({**base, "confirmations": bad}))
    with pytest.raises(ConfigError, match=r"ledgers\.chain\.block_time: expected a positive number"):
        EvmLedger.from_config("chain", LedgerConfig.model_validate({**base, "block_time": 0}))
    for good in (1, 12, "safe", "finalized"):
        EvmLedger.from_config("chain", LedgerConfig.model_validate({**base, "confirmations": good}))


def _chain_up(config: Path, ledger: str) -> subprocess.Popen[str]:
    """``dvp chain up`` as a user runs it, returned once the chain is written into ``config``."""
    args = ["--ledger", ledger, "--port", str(free_port()), "--block-time", str(BLOCK_TIME)]
    process = subprocess.Popen(
        [sys.executable, "-m", "starter.cli", "chain", "up", "--config", str(config), *args,
         "--confirmations", str(CONFIRMATIONS)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    end = time.monotonic() + 60
    while not any("Ctrl-C" in line for line in lines):
        line = process.stdout.readline()
        assert line or process.poll() is None, "".join(lines)
        assert time.monotonic() < end, "".join(lines)
        lines.append(line)
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


async def test_a_trade_across_two_chains_from_chain_up_settles_and_a_short_one_releases_both(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Two ``dvp chain up`` in one configuration that has no [ledgers] yet: two chain ids.

    Bob delivers 100 bonds on one chain against alice's 9,950.00 EUR on the other; carol
    is short of cash for 100 bonds and bob of bonds for 900 more: those two end with
    both of their locks released, on both chains.
    """
    _anvil_or_skip()
    path = tmp_path / "dvp.toml"
    settings = make_config({}, task_queue_prefix).model_dump(mode="json", exclude_none=True)
    del settings["ledgers"]
    path.write_text(tomli_w.dumps(settings))
    processes = []
    try:
        processes.append(await asyncio.to_thread(_chain_up, path, "securities"))
        processes.append(await asyncio.to_thread(_chain_up, path, "cash"))
        written = tomllib.loads(path.read_text())["ledgers"]
        assert written["securities"]["chain_id"] != written["cash"]["chain_id"]
        for name in ("securities", "cash"):
            assert (
                written[name]["confirmations"] == CONFIRMATIONS and written[name]["block_time"] == BLOCK_TIME
            )
        # The chain_id check tells the chains apart: one chain's id, the other's node.
        mixed = {**written["cash"], "chain_id": written["securities"]["chain_id"]}
        with pytest.raises(ConfigError, match=f"is chain {written['cash']['chain_id']}"):
            EvmLedger.from_config("cash", LedgerConfig.model_validate(mixed)).balances()

        config = load_config(path)
        fx = LedgerConfig(kind="sql", url=f"sqlite:///{tmp_path / 'fx.db'}")
        config = config.model_copy(update={"ledgers": {**config.ledgers, "fx": fx}})
        chains = {name: Chain(written[name]["rpc"], written[name]) for name in ("securities", "cash")}
        async with run_engine(temporal_client, config) as engine:
            trades = [
                dvp("F-two", "bob", "alice", "100", "9950.00"),
                dvp("F-short-cash", "bob", "carol", "100", "9950.00", within="PT8S"),
                dvp("F-short-bonds", "bob", "carol", "900", "90.00", within="PT8S"),
            ]
            for trade in trades:
                await engine.client.submit(trade)
            views = [await engine.client.wait(t["trade_id"], timeout=60) for t in trades]

            assert [v.status for v in views] == [
                TradeStatus.SETTLED,
                TradeStatus.EXPIRED,
                TradeStatus.EXPIRED,
            ]
            assert [leg.state.value for v in views[1:] for leg in v.legs] == ["RELEASED"] * 4
            await asyncio.to_thread(wait_final, chains)
            assert books(engine, chains) == {
                **opening(),
                ("securities", "bob-sec"): D(900), ("securities", "alice-sec"): D(100),
                ("cash", "alice-cash"): D("90050.00"), ("cash", "bob-cash"): D("9950.00"),
            }  # fmt: skip
            assert_exactly(engine, chains, views)
    finally:
        for process in processes:
            _stop(process)


@pytest.mark.parametrize("moment", ["lock mined", "pin mined", "decision recorded", "chain commit mined"])
async def test_a_reorg_of_two_blocks_at_any_moment_leaves_both_legs_or_neither(
    temporal_client: Any,
    task_queue_prefix: str,
    tmp_path: Path,
    interval_chains: dict[str, Chain],
    moment: str,
) -> None:
    """A reorganisation of depth 2 on the securities chain (3 confirmations) right after
    the bond lock, its pin, the commit decision or the bond commit: the dropped transaction
    is sent again, and the trade settles with each leg moved once on its chain."""
    chains = interval_chains
    sec = chains["securities"]
    trade_id = "F-reorg-" + moment.split()[-2]
    hold = f"{trade_id}#0"
    mined: dict[str, tuple[Callable[[], bool], str]] = {  # the moment, and the event of its transaction
        "lock mined": (lambda: sec.lock(hold)[0] == OPEN, "Locked"),
        "pin mined": (lambda: sec.lock(hold) == (OPEN, 0), "Pinned"),
        "chain commit mined": (lambda: sec.lock(hold)[0] == COMMITTED, "Committed"),
    }
    async with run_engine(temporal_client, on_chains(tmp_path, task_queue_prefix, chains)) as engine:

        async def decided() -> bool:
            try:
                view = await engine.client.status(trade_id)
            except TradeNotFound:  # not started yet
                return False
            return any(e.event == "commit decision recorded" for e in view.timeline)

        async def reorg_at_the_moment() -> None:
            if moment == "decision recorded":
                while not await decided():
                    await asyncio.sleep(0.01)
                sec.reorg(2)
                return
            seen, event = mined[moment]
            await until(seen, moment, timeout=30)
            block = sec.mined_in(event, hold)
            was = sec.w3.eth.get_block(block)["hash"]
            await asyncio.sleep(0.1)  # past a mined receipt: a ledger that trusts one has answered
            sec.reorg(2)
            # The block with the transaction was replaced: the transaction is gone with it.
            assert sec.w3.eth.get_block(block)["hash"] != was, f"the reorganisation missed the {moment}"

        before = books(engine, chains)
        # Watched from before the submission: its answer comes only with the reservations.
        watch = asyncio.create_task(reorg_at_the_moment())
        await asyncio.sleep(0)
        try:
            await engine.client.submit(dvp(trade_id, "bob", "alice", "100", "9950.00"))
            await asyncio.wait_for(watch, 30)
        finally:
            watch.cancel()
        final = await engine.client.wait(trade_id, timeout=60)

        assert final.status is TradeStatus.SETTLED, final.reason
        assert [leg.state.value for leg in final.legs] == ["COMMITTED", "COMMITTED"]
        await asyncio.to_thread(wait_final, chains)
        # The lock, the pin the decision rested on and the commit: each once, on the chain that counts.
        for chain, leg in ((sec, hold), (chains["cash"], f"{trade_id}#1")):
            assert [chain.events(e, leg) for e in ("Locked", "Pinned", "Committed")] == [1, 1, 1], leg
        assert_exactly(engine, chains, [final], before)


async def test_a_storm_of_one_block_reorgs_settles_every_trade_exactly(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path, interval_chains: dict[str, Chain]
) -> None:
    """Six trades across both chains while the securities chain is reorganised by one
    block every one to two seconds (the newest block, once it carries transactions): every
    trade ends, the five that can settle do, the short one releases both legs, and the
    chains hold exactly the settled trades' moves."""
    chains = interval_chains
    sec = chains["securities"]
    trades = [
        dvp("F-storm-1", "bob", "alice", "50", "4975.00"),
        dvp("F-storm-2", "bob", "carol", "20", "1990.00"),
        dvp("F-storm-3", "carol", "alice", "30", "2985.00"),
        dvp("F-storm-4", "bob", "alice", "10", "995.00"),
        dvp("F-storm-5", "carol", "alice", "40", "3980.00"),
        # Carol has 5,000.00 and earns 6,965.00 from her sales: never enough for this one.
        dvp("F-storm-short", "bob", "carol", "200", "19900.00", within="PT15S"),
    ]
    stop = threading.Event()
    dropped: list[int] = []  # transactions in each block a reorganisation replaced

    def storm() -> None:
        pace = random.Random(17)
        while not stop.wait(pace.uniform(1.0, 2.0)):
            end = time.monotonic() + 2
            while not stop.is_set() and time.monotonic() < end:
                newest = sec.w3.eth.get_block("latest")
                if newest["transactions"]:
                    sec.reorg(1)
                    if sec.w3.eth.get_block(newest["number"])["hash"] != newest["hash"]:
                        dropped.append(len(newest["transactions"]))
                    break
                time.sleep(0.01)

    async with run_engine(temporal_client, on_chains(tmp_path, task_queue_prefix, chains)) as engine:
        before = books(engine, chains)
        storming = threading.Thread(target=storm, name="reorg-storm")
        storming.start()
        try:
            await asyncio.gather(*(engine.client.submit(t) for t in trades))
            views = list(
                await asyncio.gather(*(engine.client.wait(t["trade_id"], timeout=120) for t in trades))
            )
        finally:
            stop.set()
            storming.join()

        assert {v.trade_id: v.status for v in views} == {
            **{f"F-storm-{n}": TradeStatus.SETTLED for n in range(1, 6)},
            "F-storm-short": TradeStatus.EXPIRED,
        }, {v.trade_id: v.reason for v in views}
        assert len(dropped) >= 2, f"only {len(dropped)} blocks with transactions were replaced"
        await asyncio.to_thread(wait_final, chains)
        assert_exactly(engine, chains, views, before)


async def _decided_with_the_bond_commit_held(engine: Engine, bonds: Gate, trade_id: str) -> None:
    await engine.client.submit(dvp(trade_id, "bob", "alice", "100", "9950.00"))
    await until(bonds.waiting.is_set, "the bond commit is under way, after the decision")
    view = await engine.client.status(trade_id)
    assert view.status is TradeStatus.COMMITTING
    assert any(e.event == "commit decision recorded" for e in view.timeline)


def _lock_removed(sec: Chain, hold: str) -> None:
    """A reorganisation deeper than the confirmations takes the bond lock (and its pin) away."""
    sec.undo_from(sec.mined_in("Locked", hold), lambda: sec.lock(hold)[0] != 0)


async def test_a_lock_removed_after_the_decision_is_placed_again_before_any_other_leg_moves(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path, chains: dict[str, Chain]
) -> None:
    """After the decision, with the bond commit held back, a reorganisation deeper than the
    confirmations removes the bond lock (bob's bonds are back in his wallet). The engine
    finds it gone, locks the bonds again under the same id, commits them, and only then
    commits the cash: the trade settles, each leg moved once."""
    sec, hold = chains["securities"], "F-deep#0"
    config = on_chains(tmp_path, task_queue_prefix, chains)
    ledgers = gates(config)
    bonds, cash = ledgers["securities"], ledgers["cash"]
    bonds.at = "commit"
    cash.before_commit = lambda: sec.lock(hold)[0]
    try:
        async with run_engine(temporal_client, config, dict(ledgers)) as engine:
            await _decided_with_the_bond_commit_held(engine, bonds, "F-deep")
            await asyncio.to_thread(_lock_removed, sec, hold)
            assert sec.tokens("BOND-2030", bonds.wallet("bob-sec")) == 1000
            assert cash.seen_before_commit == []  # nothing committed on the cash chain yet

            bonds.gate.set()
            final = await engine.client.wait("F-deep", timeout=60)

            assert final.status is TradeStatus.SETTLED, final.reason
            events = [e.event for e in final.timeline]
            assert events.index("leg 0 hold vanished") < events.index("leg 0 held again")
            assert (
                events.index("leg 0 held again")
                < events.index("leg 0 committed")
                < events.index("leg 1 committed")
            )
            assert cash.seen_before_commit and set(cash.seen_before_commit) == {COMMITTED}
            await asyncio.to_thread(wait_final, chains)
            assert sec.events("Committed", hold) == 1
            assert_exactly(engine, chains, [final])
    finally:
        bonds.gate.set()


async def test_a_lock_that_cannot_be_placed_again_waits_for_an_operator_with_nothing_committed(
    temporal_client: Any,
    temporal_server: Any,
    task_queue_prefix: str,
    tmp_path: Path,
    chains: dict[str, Chain],
) -> None:
    """As above, but once the reorganisation returned bob's bonds to his wallet he moves them
    away: the lock cannot be placed again. The trade waits in AWAITING_OPERATOR (``dvp list``
    shows it), the cash still held and nothing committed on either chain. When the bonds
    are back in bob's wallet, the engine locks them again and the trade settles."""
    sec, hold = chains["securities"], "F-operator#0"
    config = on_chains(tmp_path, task_queue_prefix, chains)
    ledgers = gates(config)
    bonds, cash = ledgers["securities"], ledgers["cash"]
    bonds.at = "commit"
    elsewhere = sec.w3.eth.account.from_key(dev_key(5))
    try:
        async with run_engine(temporal_client, config, dict(ledgers)) as engine:
            await _decided_with_the_bond_commit_held(engine, bonds, "F-operator")
            await asyncio.to_thread(_lock_removed, sec, hold)
            bob = bonds.wallet("bob-sec")
            key = bonds.wallet_key("bob-sec")
            assert key is not None
            await asyncio.to_thread(sec.send_tokens, "BOND-2030", key, elsewhere.address, 1000)

            bonds.gate.set()
            view = await until_status(engine, "F-operator", TradeStatus.AWAITING_OPERATOR)

            assert "leg 0" in view.reason and "cannot be placed again" in view.reason
            assert [leg.state.value for leg in view.legs] == ["PENDING", "HELD"]
            assert cash.seen_before_commit == [] and sec.events("Committed", hold) == 0
            cash_chain = chains["cash"]
            assert cash_chain.lock("F-operator#1")[0] == OPEN  # alice's euros still in the escrow
            assert cash_chain.tokens("EUR", cash.wallet("bob-cash")) == 0
            listed = await until(
                lambda: _listed(config, temporal_server.address, tmp_path, "AWAITING_OPERATOR"),
                "dvp list shows the trade",
            )
            assert "F-operator" in listed

            await asyncio.to_thread(
                sec.send_tokens, "BOND-2030", dev_key(5), bob, 1000
            )  # the operator gets bob's bonds back
            final = await engine.client.wait("F-operator", timeout=90)

            assert final.status is TradeStatus.SETTLED, final.reason
            await asyncio.to_thread(wait_final, chains)
            assert sec.events("Committed", hold) == 1
            assert_exactly(engine, chains, [final])
    finally:
        bonds.gate.set()


async def until_status(engine: Engine, trade_id: str, status: TradeStatus, timeout: float = 60) -> TradeView:
    end = time.monotonic() + timeout
    while (view := await engine.client.status(trade_id)).status is not status:
        assert not view.status.terminal, f"{trade_id} ended {view.status}: {view.reason}"
        assert time.monotonic() < end, f"{trade_id} still {view.status}: {view.reason}"
        await asyncio.sleep(0.1)
    return view


def _dvp(config: Config, address: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = write_config(tmp_path / "dvp-cli.toml", config, address=address)
    env = {**os.environ, "DVP_CONFIG": str(path)}
    env.pop("TEMPORAL_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "starter.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def _listed(config: Config, address: str, tmp_path: Path, status: str) -> list[str]:
    result = _dvp(config, address, tmp_path, "list", "--status", status, "--json")
    assert result.returncode == 0, result.stderr
    return [row["trade_id"] for row in json.loads(result.stdout)]


async def test_a_lock_gone_before_the_pin_ends_released_not_rejected(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path, chains: dict[str, Chain]
) -> None:
    """A reorganisation deeper than the confirmations removes the bond lock before its pin:
    the ledger refuses the pin, the cash lock (placed) is released, and the trade ends
    RELEASED, which says holds were placed and given back; REJECTED means nothing was."""
    sec = chains["securities"]
    config = on_chains(tmp_path, task_queue_prefix, chains)
    ledgers = gates(config)
    bonds = ledgers["securities"]
    bonds.at = "pin"
    try:
        async with run_engine(temporal_client, config, {"securities": bonds}) as engine:
            await engine.client.submit(dvp("F-gone", "bob", "alice", "100", "9950.00"))
            await until(bonds.waiting.is_set, "the bond pin is under way")
            await asyncio.to_thread(_lock_removed, sec, "F-gone#0")
            bonds.gate.set()
            final = await engine.client.wait("F-gone", timeout=60)

            assert final.status is TradeStatus.RELEASED, final.reason
            assert "no hold 'F-gone#0'" in final.reason and "released" in final.reason
            assert [leg.state.value for leg in final.legs] == ["RELEASED", "RELEASED"]
            events = {e.event: e.detail for e in final.timeline}
            assert events["leg 1 released"] == "hold returned"
            await asyncio.to_thread(wait_final, chains)
            assert_exactly(engine, chains, [final])
    finally:
        bonds.gate.set()


async def test_verify_trades_reports_a_settled_trade_whose_commit_a_deep_reorg_undid(
    temporal_client: Any,
    temporal_server: Any,
    task_queue_prefix: str,
    tmp_path: Path,
    chains: dict[str, Chain],
) -> None:
    """A trade settles (each commit 3 blocks deep); ``dvp ledger verify-trades`` finds both
    commits final. A reorganisation deeper than that then undoes the bond commit: dvp still
    says SETTLED, the chain's own checks are clean, and verify-trades reports it (exit 1)."""
    sec = chains["securities"]
    since = datetime.now(UTC).isoformat()
    config = on_chains(tmp_path, task_queue_prefix, chains)
    async with run_engine(temporal_client, config) as engine:
        await engine.client.submit(dvp("F-verify", "bob", "alice", "100", "9950.00"))
        final = await engine.client.wait("F-verify", timeout=60)
        assert final.status is TradeStatus.SETTLED, final.reason

        def verify(*more: str) -> subprocess.CompletedProcess[str]:
            args = ("ledger", "verify-trades", "--since", since, *more)
            return _dvp(config, temporal_server.address, tmp_path, *args)

        def listed() -> dict[str, Any] | None:  # the trade's end reaches the list soon, not at once
            result = verify("--json")
            assert result.returncode == 0, result.stdout + result.stderr
            found: dict[str, Any] = json.loads(result.stdout)
            return found if found["trades"] == 1 else None

        assert await until(listed, "verify-trades lists the trade") == {
            "trades": 1,
            "commits": 2,
            "not_final": [],
        }

        await asyncio.to_thread(
            sec.undo_from,
            sec.mined_in("Committed", "F-verify#0"),
            lambda: sec.lock("F-verify#0")[0] == COMMITTED,
        )
        await asyncio.to_thread(wait_final, chains)
        assert engine.ledgers["securities"].verify() == []
        assert (await engine.client.status("F-verify")).status is TradeStatus.SETTLED

        found = await asyncio.to_thread(verify, "--json")
        assert found.returncode == 1, found.stdout + found.stderr
        undone = {"trade_id": "F-verify", "leg": 0, "ledger": "securities", "hold_id": "F-verify#0"}
        assert json.loads(found.stdout)["not_final"] == [{**undone, "found": "open"}]
        text = await asyncio.to_thread(verify)
        assert text.returncode == 1 and "1 NOT final" in text.stdout and "F-verify#0" in text.stdout


async def test_finalized_tag_reports_a_lock_only_once_the_node_calls_its_block_finalized(
    tmp_path: Path,
) -> None:
    """``confirmations = "finalized"``: the lock is reported once its block is at or below the
    node's finalized block (anvil with one slot per epoch: two blocks below the latest)."""
    _anvil_or_skip()
    mining = ["--block-time", str(BLOCK_TIME), "--mixed-mining", "--slots-in-an-epoch", "1"]
    with Anvil(chain_id=31403, extra_args=mining) as node:
        chain = Chain(node.url, deploy_contracts(node.url, node.key(0), {"BOND": 0}))
        ledger = EvmLedger.from_config("chain", section(chain, "finalized"))
        ledger.open_account("tag-bob", "BOND", "bob", D(10))
        ledger.open_account("tag-alice", "BOND", "alice", D(0))

        hold = ledger.place_hold("T-tag#0", "tag-bob", "tag-alice", "BOND", D(4), None, "T-tag")

        locked_in = chain.mined_in("Locked", "T-tag#0")
        assert hold.amount == 4
        assert int(node.rpc("eth_getBlockByNumber", ["finalized", False])["number"], 16) >= locked_in
        assert ledger.final_hold("T-tag#0").status.value == "open"
