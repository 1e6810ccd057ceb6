"""``dvp demo --cross-system``: bonds on an EVM chain settle against EUR at a bank.

Starts four real processes, each with its state under ``.dvp/demo-cross/`` (apart
from plain ``dvp demo``'s ``.dvp/demo/``): an anvil node with the dvp contracts (the
``chain`` ledger, kind ``evm``), the bank's core-ledger service on its own port (the
``bank`` ledger, kind ``http``, with a bearer token), a Temporal dev server and a
worker. It seeds both systems and settles two trades side by side:

* the headline trade: bob delivers 100 tokenised BOND-2030 on the chain to alice
  against 9,950.00 EUR at the bank: SETTLED, each leg once on its own system;
* erin buys 200 bonds but holds 500.00 EUR of the 19,900.00: bob's bonds are locked in
  the escrow while her cash leg recycles, and at the deadline the trade is EXPIRED and
  rolled back on both systems: the lock released on chain, nothing held at the bank.

It prints the outcomes and both systems' balances (the chain's read from the chain,
the bank's from its API) and exits 0 only if the outcomes and balances match.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from adapters import open_ledger
from adapters.evm import EvmLedger, deploy_contracts, load_artefact
from demos.settlement import _expected_balances, _sums, policy_sections
from domain import Config, LedgerError, TradeStatus, TradeView, parse_config
from identity import TokenIssuer
from processes.anvil import Anvil, AnvilError
from processes.bank import BankService
from processes.devserver import DevServer
from processes.ports import free_port
from processes.workers import WorkerProcess
from starter.cli.chain import render_section
from starter.cli.output import balances_table, table
from starter.client import SettlementClient
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, seed

DEMO_DIR = Path(".dvp") / "demo-cross"
BOND = "BOND-2030"

ACCOUNTS = [
    {"ledger": "chain", "id": "bob-bonds", "asset": BOND, "owner": "bob", "balance": "1000"},
    {"ledger": "chain", "id": "alice-bonds", "asset": BOND, "owner": "alice", "balance": "0"},
    {"ledger": "chain", "id": "erin-bonds", "asset": BOND, "owner": "erin", "balance": "0"},
    {"ledger": "bank", "id": "alice-eur", "asset": "EUR", "owner": "alice", "balance": "100000.00"},
    {"ledger": "bank", "id": "bob-eur", "asset": "EUR", "owner": "bob", "balance": "0.00"},
    {"ledger": "bank", "id": "erin-eur", "asset": "EUR", "owner": "erin", "balance": "500.00"},
]


def _dvp(trade_id: str, buyer: str, bonds: str, cash: str, within: str) -> dict[str, Any]:
    """Bob delivers ``bonds`` on the chain to ``buyer`` against ``cash`` EUR at the bank."""
    return {
        "trade_id": trade_id,
        "legs": [
            {"ledger": "chain", "asset": BOND, "from": "bob-bonds", "to": f"{buyer}-bonds", "amount": bonds},
            {"ledger": "bank", "asset": "EUR", "from": f"{buyer}-eur", "to": "bob-eur", "amount": cash},
        ],
        "settle_within": within,
    }


class _Bank(BankService):
    """``dvp bank serve`` in its own process, on a free port, with one client token."""

    def __init__(self, base: Path) -> None:
        port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.config_path = base / "bank.toml"
        self.config_path.write_text(
            "# written by `dvp demo --cross-system`: the bank's own configuration\n"
            f'[bank]\nurl = "sqlite:///{base / "bank.db"}"\nport = {port}\nname = "bank"\n\n'
            f'[bank.tokens]\ndvp-worker = "{self.token}"\n'
        )
        super().__init__(self.config_path, port, base / "bank.log", startup_timeout=60)


def demo_config(base: Path, chain: dict[str, Any], bank: _Bank, address: str) -> tuple[Config, str]:
    text = f"""# written by `dvp demo --cross-system`
{render_section("chain", chain)}
[ledgers.bank]
kind = "http"
url = "{bank.url}"
token = "{bank.token}"

{policy_sections(base)}
[assets."{BOND}"]
precision = 0

[temporal]
address = "{address}"
task_queue_prefix = "dvp-demo-cross"

[settlement]
recycle_interval = "PT0.5S"
max_recycle_interval = "PT2S"
"""
    return parse_config(tomllib.loads(text), "cross-system demo configuration"), text


class _Escrow:
    """The escrow contract's token balance, read from the chain without the adapter."""

    def __init__(self, chain: dict[str, Any]) -> None:
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(chain["rpc"]))
        registry = w3.eth.contract(address=chain["registry"], abi=load_artefact("AccountRegistry")["abi"])
        token = registry.functions.tokenOf(BOND).call()
        self._token = w3.eth.contract(address=token, abi=load_artefact("SecurityToken")["abi"])
        self.address = chain["escrow"]

    def bonds(self) -> int:
        return int(self._token.functions.balanceOf(self.address).call())


async def _run(config: Config, run: str) -> tuple[bool, list[TradeView]]:
    # the venue, an operator, submits the locked-in trades (a token from the local issuer)
    client = await SettlementClient.connect(config, TokenIssuer.from_config(config.auth).issue("ops"))
    chain = open_ledger("chain", config.ledgers["chain"])
    plays = [
        (
            "tokenised bonds on chain vs EUR at the bank",
            _dvp(f"{run}-bonds", "alice", "100", "9950.00", "PT60S"),
            TradeStatus.SETTLED,
        ),
        (
            "buyer short of cash: rolled back on both",
            _dvp(f"{run}-short", "erin", "200", "19900.00", "PT5S"),
            TradeStatus.EXPIRED,
        ),
    ]
    notes: list[str] = []

    async def locked_while_short(trade_id: str) -> None:
        # erin's cash cannot be reserved: show bob's bonds sitting in the escrow meanwhile
        for _ in range(300):
            view = await client.status(trade_id)
            if view.status.terminal:
                return
            if view.legs[0].state.value == "HELD":
                lock = await asyncio.to_thread(chain.get_hold, f"{trade_id}#0")
                notes.append(
                    f"while erin's cash was short, bob's {lock.amount} {BOND} sat in the escrow on chain "
                    f"(lock {lock.hold_id} {lock.status.value}), then went back to him"
                )
                return
            await asyncio.sleep(0.1)

    async def play(name: str, instruction: dict[str, Any]) -> TradeView:
        await client.submit(instruction)
        if instruction["trade_id"].endswith("-short"):
            await locked_while_short(instruction["trade_id"])
        final = await client.wait(instruction["trade_id"], timeout=120)
        print(f"  {final.trade_id:<22} {final.status.value:<10} {name}", flush=True)
        return final

    print(f"\nSettling {len(plays)} trades side by side...", flush=True)
    views = await asyncio.gather(*(play(name, instruction) for name, instruction, _ in plays))
    rows, ok = [], True
    for (name, _, expected), view in zip(plays, views, strict=True):
        match = view.status is expected
        ok &= match
        rows.append((name, view.trade_id, expected.value, view.status.value, "ok" if match else "MISMATCH",
                     view.reason))  # fmt: skip
    print("\nOutcomes")
    print(table(rows, ["scenario", "trade", "expected", "got", "", "reason"]))
    for note in notes:
        print(f"  - {note}")
    return ok, list(views)


def run_cross_demo(keep: bool = False) -> int:
    base = DEMO_DIR.resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    started = time.monotonic()
    node = Anvil(log_file=base / "anvil.log")
    bank = _Bank(base)
    server = DevServer(db_file=base / "temporal.db", log_file=base / "temporal.log")
    worker: WorkerProcess | None = None
    try:
        print("Starting anvil and deploying the dvp contracts...", flush=True)
        try:
            node.start()
        except AnvilError as exc:
            print(f"dvp demo: {exc}", file=sys.stderr)
            return 1
        chain = deploy_contracts(node.url, node.key(0), {BOND: 0})
        print(f"  chain  {node.url}  escrow {chain['escrow']}  {BOND} token {chain['tokens'][BOND]}")
        print("Starting the bank's core-ledger service...", flush=True)
        bank.start()
        print(f"  bank   {bank.url}  (bearer token in {bank.config_path})")
        config, text = demo_config(base, chain, bank, f"127.0.0.1:{server.port}")
        config_path = base / "dvp.toml"
        config_path.write_text(text)
        print(
            f"Starting the Temporal dev server (state in {base / 'temporal.db'}) and a worker...", flush=True
        )
        server.start()
        worker = WorkerProcess(config_path, base / "worker.log").start()

        with opened(config) as ledgers:
            seed(config, parse_seed({"accounts": ACCOUNTS}, config), ledgers)
            before = all_balances(ledgers)
            chain_ledger = ledgers["chain"]
            assert isinstance(chain_ledger, EvmLedger)
            wallets = [(a["id"], chain_ledger.wallet(a["id"])) for a in ACCOUNTS if a["ledger"] == "chain"]
        print(f"\nWorker pid {worker.pid}; wallets on chain (the escrow may pull from them):")
        print(table(wallets, ["account", "wallet"]))
        print("\nBalances before (chain: read from the chain; bank: from its API)")
        print(balances_table(before))

        run = time.strftime("X%H%M%S")
        matched, views = asyncio.run(_run(config, run))

        with opened(config) as ledgers:
            after = all_balances(ledgers)
            holds = all_open_holds(ledgers)
            problems = [
                f"{name}: {problem}" for name, ledger in ledgers.items() for problem in ledger.verify()
            ]
        in_escrow = _Escrow(chain).bonds()
        print("\nBalances after")
        print(balances_table(after))

        expected = _expected_balances(before, [v for v in views if v.status is TradeStatus.SETTLED])
        actual = {(b.ledger, b.account): b.balance for b in after}
        checks = {
            "balances = before + the settled trade's legs, on both systems": actual == expected,
            "every asset's balances sum to zero (the chain's with its issuer)": all(
                s == 0 for s in _sums(after).values()
            ),
            "no hold open: no lock in the escrow, no hold at the bank": not holds,
            f"the escrow contract holds no {BOND}": in_escrow == 0,
            "both ledgers' invariants verified": not problems,
        }
        print()
        for name, passed in checks.items():
            print(f"  [{'ok' if passed else 'FAILED'}] {name}")
        for problem in problems:
            print(f"      {problem}")
        print(f"\nDone in {time.monotonic() - started:.1f} s.")
        if server.ui_url:
            print(f"\nWeb UI: {server.ui_url}/namespaces/default/workflows")
        print(f"Configuration: {config_path}  (use it with: DVP_CONFIG={config_path} dvp ledger balances)")
        success = matched and all(checks.values())
        if keep:
            print("\n--keep: every process stays up; press Ctrl-C to stop them.", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0 if success else 1
    except (LedgerError, RuntimeError) as exc:
        print(f"dvp demo --cross-system: {exc}", file=sys.stderr)
        return 1
    finally:
        if worker is not None:
            worker.stop()
        server.stop(keep_log=True)
        bank.stop()
        node.stop()


__all__ = ["run_cross_demo"]


if __name__ == "__main__":
    sys.exit(run_cross_demo(keep="--keep" in sys.argv))
