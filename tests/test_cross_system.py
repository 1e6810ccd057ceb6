"""DvP across two systems that share nothing: bonds on an EVM chain, cash at a bank.

Everything is real: an anvil node with the dvp contracts (the ``securities`` ledger,
kind ``evm``), the bank's service as its own process on a free port (the ``cash``
ledger, kind ``http``), and the session's Temporal dev server with a worker in this
process. Token balances are read straight from the chain with web3 (``balanceOf``),
cash from the bank's REST API.

Given the standard accounts (bob holds 1,000 BOND-2030 on chain, alice 100,000.00 EUR
at the bank, carol 5,000.00 EUR), after these trades, these balances on both systems.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from web3 import Web3

from adapters import Ledger
from adapters.evm import EvmLedger, load_artefact
from adapters.sql import SqlLedger
from domain import Config, Hold, HoldStatus, LedgerConfig, TradeStatus
from processes.anvil import Anvil
from starter.instructions import dvp_instruction

from ._fixtures_evm import token_balance
from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls
from .test_bank import TOKEN, BankProcess, PinWatch, failed_commit, until

D = Decimal
pytestmark = pytest.mark.slow


def cross_config(tmp_path: Path, prefix: str, deployment: dict[str, Any], bank: BankProcess) -> Config:
    """The standard configuration with ``securities`` on the chain and ``cash`` at the bank."""
    config = make_config(sqlite_urls(tmp_path), prefix)
    securities = LedgerConfig.model_validate(deployment)
    cash = LedgerConfig.model_validate(
        {"kind": "http", "url": bank.url, "token": TOKEN, "timeout": 2, "retries": 2}
    )
    return config.model_copy(update={"ledgers": {**config.ledgers, "securities": securities, "cash": cash}})


def dvp(trade_id: str, buyer: str, bonds: str, cash: str, within: str = "PT60S") -> dict[str, Any]:
    """Bob delivers ``bonds`` BOND-2030 on chain to ``buyer`` against ``cash`` EUR at the bank."""
    return dvp_instruction(trade_id, "bob", buyer, bonds, cash, settle_within=within)


class Systems:
    """Each system read on its own terms: the chain through web3, the bank through its API."""

    def __init__(self, engine: Engine, deployment: dict[str, Any], bank: BankProcess) -> None:
        self.rpc = deployment["rpc"]
        self.deployment = deployment
        chain = engine.ledgers["securities"]
        assert isinstance(chain, EvmLedger)
        self.chain = chain
        self.bank = httpx.Client(base_url=bank.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)

    def bonds(self, account: str) -> int:
        """Tokens in the account's wallet (open locks sit in the escrow, not here)."""
        return token_balance(self.rpc, self.deployment, "BOND-2030", self.chain.wallet(account))

    def in_escrow(self) -> int:
        return token_balance(self.rpc, self.deployment, "BOND-2030", self.deployment["escrow"])

    def cash(self, account: str) -> tuple[Decimal, Decimal]:
        """(balance, held) of an account, as the bank's API reports it."""
        response = self.bank.get(f"/accounts/{account}")
        response.raise_for_status()
        return D(response.json()["balance"]), D(response.json()["held"])

    def open_cash_holds(self) -> list[dict[str, Any]]:
        response = self.bank.get("/holds", params={"status": "open"})
        response.raise_for_status()
        return list(response.json()["holds"])

    def close(self) -> None:
        self.bank.close()


async def test_bonds_on_chain_settle_against_cash_at_the_bank(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path, evm_deployment: dict[str, Any]
) -> None:
    """Bob delivers 100 bonds to alice against 9,950.00 EUR: both systems move, once."""
    service = await asyncio.to_thread(BankProcess(tmp_path, f"sqlite:///{tmp_path / 'bank.db'}").start)
    config = cross_config(tmp_path, task_queue_prefix, evm_deployment, service)
    try:
        async with run_engine(temporal_client, config) as engine:
            systems = Systems(engine, evm_deployment, service)
            assert (systems.bonds("bob-sec"), systems.bonds("alice-sec")) == (1000, 0)  # seeded on chain
            assert systems.cash("alice-cash") == (D("100000.00"), 0)  # seeded at the bank

            await engine.client.submit(dvp("X-dvp", "alice", "100", "9950.00"))
            final = await engine.client.wait("X-dvp", timeout=60)

            assert final.status is TradeStatus.SETTLED, final.reason
            assert [leg.state.value for leg in final.legs] == ["COMMITTED", "COMMITTED"]
            assert (systems.bonds("bob-sec"), systems.bonds("alice-sec"), systems.in_escrow()) == (
                900,
                100,
                0,
            )
            assert systems.cash("alice-cash") == (D("90050.00"), 0)
            assert systems.cash("bob-cash") == (D("9950.00"), 0)
            assert systems.open_cash_holds() == []
            assert engine.open_holds() == []
            engine.assert_invariants()  # the chain's sums and escrow, the bank's own check
            systems.close()
    finally:
        service.kill()


async def test_cash_that_cannot_be_reserved_releases_the_chain_escrow(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path, evm_deployment: dict[str, Any]
) -> None:
    """Carol (5,000.00 EUR) buys 100 bonds for 9,950.00: bob's bonds are locked in the
    escrow while her cash leg recycles; at the deadline the lock is released on chain
    and no cash hold is left at the bank."""
    service = await asyncio.to_thread(BankProcess(tmp_path, f"sqlite:///{tmp_path / 'bank.db'}").start)
    config = cross_config(tmp_path, task_queue_prefix, evm_deployment, service)
    try:
        async with run_engine(temporal_client, config) as engine:
            systems = Systems(engine, evm_deployment, service)
            await engine.client.submit(dvp("X-short", "carol", "100", "9950.00", within="PT6S"))

            async def held_on_chain() -> bool:
                view = await engine.client.status("X-short")
                return view.legs[0].state.value == "HELD" or view.status.terminal

            for _ in range(600):
                if await held_on_chain():
                    break
                await asyncio.sleep(0.02)
            view = await engine.client.status("X-short")
            assert not view.status.terminal, f"ended {view.status.value} before the bonds were locked"
            assert (systems.bonds("bob-sec"), systems.in_escrow()) == (900, 100)  # locked on chain

            final = await engine.client.wait("X-short", timeout=60)

            assert final.status is TradeStatus.EXPIRED, final.reason
            assert "short" in (final.reason or ""), final.reason
            assert (systems.bonds("bob-sec"), systems.bonds("carol-sec"), systems.in_escrow()) == (
                1000,
                500,
                0,
            )
            assert systems.cash("carol-cash") == (D("5000.00"), 0)
            assert systems.cash("bob-cash") == (0, 0)
            assert systems.open_cash_holds() == []
            assert engine.ledgers["securities"].get_hold("X-short#0").status is HoldStatus.RELEASED
            engine.assert_invariants()
            systems.close()
    finally:
        service.kill()


class ChainPinGate(EvmLedger):
    """The real chain ledger, whose pins wait until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def pin_hold(self, hold_id: str) -> Hold:
        self.waiting.set()
        self.gate.wait(30)
        return super().pin_hold(hold_id)


async def test_bank_down_between_reserve_and_commit_settles_chain_and_bank_once(
    temporal_client: Any,
    task_queue_prefix: str,
    tmp_path: Path,
    evm_deployment: dict[str, Any],
    anvil_node: Anvil,
) -> None:
    """The bank is SIGKILLed after it pinned the cash hold, while the chain pin is under
    way; the commit decision is made with the bank down, the chain lock is committed,
    the cash commit fails until the bank comes back on the same port and database.
    The trade settles, each leg exactly once on its own system."""
    bank_url = f"sqlite:///{tmp_path / 'bank.db'}"
    service = await asyncio.to_thread(BankProcess(tmp_path, bank_url).start)
    bank_state = SqlLedger("bank", bank_url)
    config = cross_config(tmp_path, task_queue_prefix, evm_deployment, service)
    chain = ChainPinGate.from_config("securities", config.ledgers["securities"])
    cash = PinWatch("cash", service.url, TOKEN, timeout=2, retries=2)
    instances: dict[str, Ledger] = {"securities": chain, "cash": cash}
    try:
        async with run_engine(temporal_client, config, instances) as engine:
            systems = Systems(engine, evm_deployment, service)
            try:
                await engine.client.submit(dvp("X-fault", "alice", "40", "3980.00"))
                await until(chain.waiting.is_set, "the chain pin is under way")
                await until(cash.pinned.is_set, "the bank answered the cash pin")

                await asyncio.to_thread(service.kill)
                chain.gate.set()  # the decision is recorded with the bank down
                await until(
                    lambda: chain.get_hold("X-fault#0").status is HoldStatus.COMMITTED,
                    "the chain leg is committed",
                )
                assert (await engine.client.status("X-fault")).status is TradeStatus.COMMITTING
                await failed_commit(cash, "X-fault#1")
                assert bank_state.get_hold("X-fault#1").status is HoldStatus.OPEN

                await asyncio.to_thread(service.start)  # same port, same database
                final = await engine.client.wait("X-fault", timeout=60)

                assert final.status is TradeStatus.SETTLED, final.reason
                assert (systems.bonds("bob-sec"), systems.bonds("alice-sec"), systems.in_escrow()) == (
                    960,
                    40,
                    0,
                )
                assert systems.cash("alice-cash") == (D("96020.00"), 0)
                assert systems.cash("bob-cash") == (D("3980.00"), 0)
                assert systems.open_cash_holds() == []
                w3 = Web3(Web3.HTTPProvider(anvil_node.url))
                escrow = w3.eth.contract(
                    address=evm_deployment["escrow"], abi=load_artefact("DvpEscrow")["abi"]
                )
                commits = escrow.events.Committed.get_logs(from_block=evm_deployment["from_block"])
                assert len(commits) == 1  # one payment on chain, whatever was retried
                assert bank_state.verify() == [] and chain.verify() == []
                systems.close()
            finally:
                chain.gate.set()  # never leave a worker thread parked at the gate
    finally:
        chain.gate.set()
        service.kill()
        bank_state.close()
        cash.close()


def test_the_cross_system_demo_settles_one_trade_and_rolls_back_the_other(
    tmp_path: Path, anvil_node: Anvil
) -> None:
    """``dvp demo --cross-system`` as a user runs it (anvil_node only checks anvil is installed)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvp"), "demo", "--cross-system"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SETTLED   SETTLED  ok" in out and "EXPIRED   EXPIRED  ok" in out
    assert out.count("[ok]") == 5 and "FAILED" not in out and "MISMATCH" not in out
    assert "bob's 200 BOND-2030 sat in the escrow on chain" in out
    assert (tmp_path / ".dvp" / "demo-cross" / "dvp.toml").is_file()
    assert not (tmp_path / ".dvp" / "demo").exists()  # plain `dvp demo`'s state is left alone
