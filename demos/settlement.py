"""``dvp demo``: the seed document's scenarios, end to end, on a real Temporal server.

Starts the embedded Temporal dev server (file-backed, under ``.dvp/demo/``) and a
worker process, seeds two SQLite ledgers, settles eight trades side by side, and
prints each outcome against the one the seed documents call for, with the balances
before and after. Exits 0 only if every outcome matches and the ledgers balance.

Every actor acts with its own token from the local development issuer (its key pair
is made under ``.dvp/demo/auth/``): the venue ``ops`` (an operator) submits the
locked-in trades, alice cancels, the notary approves, bob claims; and in one
scenario bob submits a trade himself, which waits until alice affirms the debit of
her cash.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from connection import connect_client
from connection.codec import codec_for, create_key_file
from connection.codec_server import serve_ui
from domain import AccountBalance, BatchStatus, Config, RequestRejected, TradeStatus, TradeView, parse_config
from identity import TokenIssuer
from processes.devserver import DevServer
from processes.ports import free_port, port_in_use
from processes.workers import WorkerProcess
from starter.cli.output import balances_table, table
from starter.client import SettlementClient
from starter.instructions import dvp_instruction
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, seed

DEMO_DIR = Path(".dvp") / "demo"

ACCOUNTS = [
    {"ledger": "securities", "id": "bob-sec", "asset": "BOND-2030", "owner": "bob", "balance": "1000"},
    {"ledger": "securities", "id": "alice-sec", "asset": "BOND-2030", "owner": "alice", "balance": "0"},
    {"ledger": "securities", "id": "dave-sec", "asset": "BOND-2030", "owner": "dave", "balance": "50"},
    {"ledger": "securities", "id": "erin-sec", "asset": "BOND-2030", "owner": "erin", "balance": "0"},
    {"ledger": "securities", "id": "mallory-sec", "asset": "BOND-2030", "owner": "mallory", "balance": "500"},
    {"ledger": "securities", "id": "frank-sec", "asset": "BOND-2030", "owner": "frank", "balance": "60"},
    {"ledger": "securities", "id": "grace-sec", "asset": "BOND-2030", "owner": "grace", "balance": "0"},
    {"ledger": "cash", "id": "alice-cash", "asset": "EUR", "owner": "alice", "balance": "100000.00"},
    {"ledger": "cash", "id": "bob-cash", "asset": "EUR", "owner": "bob", "balance": "0.00"},
    {"ledger": "cash", "id": "dave-cash", "asset": "EUR", "owner": "dave", "balance": "0.00"},
    {"ledger": "cash", "id": "erin-cash", "asset": "EUR", "owner": "erin", "balance": "30000.00"},
    {"ledger": "cash", "id": "mallory-cash", "asset": "EUR", "owner": "mallory", "balance": "0.00"},
    {"ledger": "cash", "id": "frank-cash", "asset": "EUR", "owner": "frank", "balance": "0.00"},
    {"ledger": "cash", "id": "grace-cash", "asset": "EUR", "owner": "grace", "balance": "10000.00"},
    # the netting batch's participants
    *(
        {"ledger": ledger, "id": f"{who}-{kind}", "asset": asset, "owner": who, "balance": balance}
        for who, cash, bonds in (
            ("ivan", "50000.00", "500"),
            ("judy", "50000.00", "500"),
            ("kim", "50000.00", "500"),
            ("leo", "1000.00", "0"),
        )
        for ledger, kind, asset, balance in (
            ("cash", "cash", "EUR", cash),
            ("securities", "sec", "BOND-2030", bonds),
        )
    ),
]

# (trade, seller, buyer, bonds, cash): a ring of trades that largely offset, and leo
# buying more than his 1,000.00 EUR can pay for.
BATCH = [
    ("B1", "ivan", "judy", "100", "9950.00"),
    ("B2", "judy", "kim", "100", "9950.00"),
    ("B3", "kim", "ivan", "100", "9950.00"),
    ("B4", "ivan", "kim", "50", "4975.00"),
    ("B5", "kim", "judy", "50", "4975.00"),
    ("B6", "judy", "ivan", "40", "3980.00"),
    ("B7", "ivan", "leo", "20", "1990.00"),
    ("B8", "judy", "leo", "5", "497.50"),
]
BATCH_REMOVED = ["B7"]  # leo owes 2,487.50 net: his largest purchase goes, the rest is covered


@dataclass
class Scenario:
    name: str
    instruction: dict[str, Any]
    expected: TradeStatus
    act: Callable[[SettlementClient, str, _Tokens], Awaitable[list[str]]] | None = None
    submitter: str = "ops"  # the venue, an operator: its trades are locked in, every debit consented


class _Tokens:
    """Each actor's token, from the local development issuer."""

    def __init__(self, config: Config) -> None:
        self._issuer = TokenIssuer.from_config(config.auth)

    def __call__(self, subject: str) -> str:
        return self._issuer.issue(subject)


async def _buyer_cancels(client: SettlementClient, trade_id: str, tokens: _Tokens) -> list[str]:
    # alice's cash is held; dave cannot deliver, so the trade recycles until alice walks away
    await _until(client, trade_id, lambda v: v.legs[1].state.value == "HELD")
    await client.cancel(trade_id, "alice", reason="seller cannot deliver", token=tokens("alice"))
    return ["alice cancelled while her cash was held: the hold was released"]


async def _notary_approves(client: SettlementClient, trade_id: str, tokens: _Tokens) -> list[str]:
    await _until(client, trade_id, lambda v: v.status is TradeStatus.AWAITING_APPROVAL)
    notes = []
    try:
        await client.approve(trade_id, "bob", token=tokens("bob"))
    except RequestRejected as exc:
        notes.append(f"bob tried to approve: rejected ({exc.reason})")
    await client.approve(trade_id, "notary", token=tokens("notary"))
    notes.append("notary approved")
    return notes


async def _buyer_affirms(client: SettlementClient, trade_id: str, tokens: _Tokens) -> list[str]:
    await _until(client, trade_id, lambda v: v.status is TradeStatus.AWAITING_AFFIRMATION)
    waiting = await client.status(trade_id)
    held = [leg.index for leg in waiting.legs if leg.state.value != "PENDING"]
    await client.affirm(trade_id, "alice", token=tokens("alice"))
    return [
        f"bob submitted it himself: it waited for alice ({waiting.reason}; legs held: {held or 'none'})",
        "alice affirmed the debit of her cash; then it settled",
    ]


async def _first_fill(client: SettlementClient, trade_id: str, tokens: _Tokens) -> list[str]:
    await _until(client, trade_id, lambda v: v.status is TradeStatus.PARTIALLY_SETTLED)
    view = await client.status(trade_id)
    return [
        f"fill {f.number}: {f.quantity} BOND-2030 against {f.amount} EUR, the rest recycling"
        for f in view.fills
    ]


async def _until(client: SettlementClient, trade_id: str, condition: Callable[[TradeView], bool]) -> None:
    for _ in range(300):
        view = await client.status(trade_id)
        if condition(view) or view.status.terminal:
            return
        await asyncio.sleep(0.1)


def _htlc(
    trade_id: str,
) -> tuple[dict[str, Any], Callable[[SettlementClient, str, _Tokens], Awaitable[list[str]]]]:
    """Bob sells alice 20 bonds under a hashed timelock; only bob knows the secret."""
    secret = secrets.token_bytes(32)
    instruction = dvp_instruction(
        trade_id,
        "bob",
        "alice",
        "20",
        "1990.00",
        protocol="htlc",
        hashlock=hashlib.sha256(secret).hexdigest(),
    )

    async def bob_claims(client: SettlementClient, trade_id: str, tokens: _Tokens) -> list[str]:
        await _until(client, trade_id, lambda v: v.status is TradeStatus.AWAITING_CLAIM)
        await client.claim(trade_id, secret.hex(), token=tokens("bob"))
        return ["bob claimed the cash with the secret; the engine claimed the bonds for alice with it"]

    return instruction, bob_claims


def scenarios(run: str) -> list[Scenario]:
    htlc_instruction, htlc_act = _htlc(f"{run}-htlc")
    return [
        Scenario(
            "simple DvP",
            dvp_instruction(f"{run}-simple", "bob", "alice", "100", "9950.00"),
            TradeStatus.SETTLED,
        ),
        Scenario(
            "seller short: recycles, then expires",
            dvp_instruction(f"{run}-short", "dave", "erin", "200", "19900.00", settle_within="PT4S"),
            TradeStatus.EXPIRED,
        ),
        Scenario(
            "buyer cancels before the commit",
            dvp_instruction(f"{run}-cancel", "dave", "alice", "300", "29850.00"),
            TradeStatus.CANCELLED,
            _buyer_cancels,
        ),
        Scenario(
            "waits for the notary's approval",
            dvp_instruction(f"{run}-notary", "bob", "erin", "50", "4975.00", approvers=["notary"]),
            TradeStatus.SETTLED,
            _notary_approves,
        ),
        Scenario(
            "seller short, partial allowed: 60 of 100 settle",
            dvp_instruction(
                f"{run}-partial",
                "frank",
                "grace",
                "100",
                "9950.00",
                settle_within="PT6S",
                partial={"min_fill": "0.25"},
            ),
            TradeStatus.SETTLED_PARTIAL,
            _first_fill,
        ),
        Scenario(
            "sanctioned party refused",
            dvp_instruction(f"{run}-sanctioned", "mallory", "alice", "10", "995.00"),
            TradeStatus.REJECTED,
        ),
        Scenario("hashed timelock (HTLC) swap", htlc_instruction, TradeStatus.SETTLED, htlc_act),
        Scenario(
            "submitted by the seller: waits for the buyer's affirmation",
            dvp_instruction(f"{run}-affirm", "bob", "alice", "30", "2985.00"),
            TradeStatus.SETTLED,
            _buyer_affirms,
            submitter="bob",
        ),
    ]


def policy_sections(base: Path) -> str:
    """The demos' sanctions, operators, local token issuer and key ring (under ``base``), as TOML.

    Makes the key ring first: the worker, the demo and the Web UI's codec server share it.
    """
    create_key_file(base / "codec-keys.json")
    return f'''[compliance]
sanctioned = ["mallory"]

[roles]
operators = ["ops"]

[auth]
local_issuer = true
local_keys = "{base / "auth"}"

[codec]                 # the worker, this process and the Web UI's codec server share one ring
key_file = "{base / "codec-keys.json"}"
'''


def demo_config(base: Path, address: str) -> tuple[Config, str]:
    text = f"""# written by `dvp demo`
[ledgers.cash]
kind = "sql"
url = "sqlite:///{base / "cash.db"}"

[ledgers.securities]
kind = "sql"
url = "sqlite:///{base / "securities.db"}"

{policy_sections(base)}
[temporal]
address = "{address}"
task_queue_prefix = "dvp-demo"

[batches]
url = "sqlite:///{base / "batches.db"}"

[settlement]
recycle_interval = "PT0.5S"
max_recycle_interval = "PT2S"
"""
    import tomllib

    return parse_config(tomllib.loads(text), "demo configuration"), text


def _sums(balances: list[AccountBalance]) -> dict[str, Decimal]:
    sums: dict[str, Decimal] = {}
    for b in balances:
        sums[b.asset] = sums.get(b.asset, Decimal(0)) + b.balance
    return sums


def _expected_balances(
    before: list[AccountBalance], settled: list[TradeView]
) -> dict[tuple[str, str], Decimal]:
    expected = {(b.ledger, b.account): b.balance for b in before}
    for view in settled:
        # a partial trade moved what its fills settled; any other, its legs in full
        moved = [[f.quantity, f.amount] for f in view.fills] or [[leg.amount for leg in view.legs]]
        for amounts in moved:
            for leg, amount in zip(view.legs, amounts, strict=True):
                expected[(leg.ledger, leg.from_)] -= amount
                expected[(leg.ledger, leg.to)] += amount
    return expected


async def _netting(config: Config, run: str, tokens: _Tokens) -> tuple[bool, list[dict[str, Any]]]:
    """One netting batch: its liquidity saving, and leo's unaffordable trade removed."""
    from starter.batch import BatchClient
    from starter.cli.output import batch_text

    trades = [dvp_instruction(f"{run}-{t}", s, b, bonds, cash) for t, s, b, bonds, cash in BATCH]
    for trade in trades:
        del trade["settle_within"]  # a batch has its own time limit
    print(f"\nSettling {len(trades)} trades as one netting batch...", flush=True)
    connection = await connect_client(config.temporal.address, codec=config.codec)
    async with BatchClient(connection, config, token=tokens("ops")) as client:  # batches: operators only
        view = await client.submit(trades, batch_id=f"{run}-batch", wait=True, timeout=120)
    print(batch_text(view))
    removed = [r.trade_id.removeprefix(f"{run}-") for r in view.removed_trades]
    ok = view.status is BatchStatus.SETTLED and removed == BATCH_REMOVED
    print(
        f"\n  expected SETTLED with {', '.join(BATCH_REMOVED)} removed; got {view.status.value} with "
        f"{', '.join(removed) or 'nothing'} removed: {'ok' if ok else 'MISMATCH'}"
    )
    gone = {r.trade_id for r in view.removed_trades}
    return ok, [t for t in trades if t["trade_id"] not in gone] if view.status is BatchStatus.SETTLED else []


async def _play(client: SettlementClient, scenario: Scenario, tokens: _Tokens) -> tuple[TradeView, list[str]]:
    trade_id = scenario.instruction["trade_id"]
    await client.submit(scenario.instruction, token=tokens(scenario.submitter))
    notes = await scenario.act(client, trade_id, tokens) if scenario.act else []
    final = await client.wait(trade_id, timeout=120)
    print(f"  {final.trade_id:<28} {final.status.value:<15} {scenario.name}", flush=True)
    return final, notes


async def _run(config: Config, run: str, tokens: _Tokens) -> tuple[bool, list[TradeView]]:
    client = await SettlementClient.connect(config)  # each call sends its actor's token
    plays = scenarios(run)
    print(f"\nSettling {len(plays)} trades side by side...", flush=True)
    outcomes = await asyncio.gather(*(_play(client, s, tokens) for s in plays), return_exceptions=True)
    for scenario, outcome in zip(plays, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            print(f"\n{scenario.name}: failed: {outcome}", file=sys.stderr)
            return False, []
    results = [o for o in outcomes if not isinstance(o, BaseException)]

    rows, ok = [], True
    for scenario, (view, notes) in zip(plays, results, strict=True):
        match = view.status is scenario.expected
        ok &= match
        rows.append(
            (
                scenario.name,
                view.trade_id,
                scenario.expected.value,
                view.status.value,
                "ok" if match else "MISMATCH",
                view.reason or "; ".join(notes),
            )
        )
    print("\nOutcomes")
    print(table(rows, ["scenario", "trade", "expected", "got", "", "reason"]))
    for scenario, (_view, notes) in zip(plays, results, strict=True):
        for note in notes:
            print(f"  - {scenario.name}: {note}")
    return ok, [view for view, _ in results]


def run_demo(keep: bool = False) -> int:
    base = DEMO_DIR.resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    port = None if port_in_use(7233) or port_in_use(8233) else 7233
    server = DevServer(port=port, db_file=base / "temporal.db", log_file=base / "temporal.log")
    config, text = demo_config(base, f"127.0.0.1:{server.port}")
    config_path = base / "dvp.toml"
    config_path.write_text(text)

    # The codec server first, so the Web UI decodes the trades from its first page.
    host, _, codec_port = config.codec.server.rpartition(":")
    codec_address = config.codec.server if not port_in_use(int(codec_port)) else f"{host}:{free_port()}"
    codec, server.ui_codec_endpoint, _ = serve_ui(config, server.ui_url or "", codec_address)
    print(f"Starting the Temporal dev server (state in {base / 'temporal.db'})...", flush=True)
    started = time.monotonic()
    try:
        server.start()
    except BaseException:
        codec.stop()
        raise
    worker = WorkerProcess(config_path, base / "worker.log").start()
    try:
        with opened(config) as ledgers:
            seed(config, parse_seed({"accounts": ACCOUNTS}, config), ledgers)
            before = all_balances(ledgers)
        print(f"Worker pid {worker.pid}; ledgers seeded: {', '.join(sorted(config.ledgers))}\n")
        print("Balances before")
        print(balances_table(before))

        run = time.strftime("D%H%M%S")
        tokens = _Tokens(config)
        matched, views = asyncio.run(_run(config, run, tokens))
        batch_ok, batch_settled = asyncio.run(_netting(config, run, tokens)) if matched else (False, [])

        with opened(config) as ledgers:
            after = all_balances(ledgers)
            holds = all_open_holds(ledgers)
            problems = [p for ledger in ledgers.values() for p in ledger.verify()]
        print("\nBalances after")
        print(balances_table(after))

        moved = (TradeStatus.SETTLED, TradeStatus.SETTLED_PARTIAL)
        expected = _expected_balances(before, [v for v in views if v.status in moved])
        for trade in batch_settled:
            for leg in trade["legs"]:
                expected[(leg["ledger"], leg["from"])] -= Decimal(leg["amount"])
                expected[(leg["ledger"], leg["to"])] += Decimal(leg["amount"])
        actual = {(b.ledger, b.account): b.balance for b in after if not b.account.startswith("clearing:")}
        checks = {
            "every asset's balances sum to zero": all(s == 0 for s in _sums(after).values()),
            "balances = before + the settled trades' legs, exactly": actual == expected,
            "clearing accounts back at zero": all(
                b.balance == 0 for b in after if b.account.startswith("clearing:")
            ),
            "no hold left open": not holds,
            "ledger invariants verified": not problems,
        }
        print()
        for name, passed in checks.items():
            print(f"  [{'ok' if passed else 'FAILED'}] {name}")
        for problem in problems:
            print(f"      {problem}")
        print(f"\nDone in {time.monotonic() - started:.1f} s.")
        if server.ui_url:
            print(f"\nWeb UI: {server.ui_url}/namespaces/default/workflows")
            print(f"  payloads encrypted in Temporal, decoded for the UI by the codec server at {codec.url}")
            alice = codec_for(config.codec).party_tag
            parties = f'DvpParties = "{alice("alice") if alice else "alice"}"'
            print(f'  search, e.g.:  DvpStatus = "SETTLED"     {parties}  (alice, hashed)')
            print('                 DvpStatus = "EXPIRED"     DvpStatus = "SETTLED_PARTIAL"')
        print(
            f"Configuration: {config_path}  (use it with: DVP_CONFIG={config_path} dvp status {run}-simple)"
        )
        success = matched and batch_ok and all(checks.values())
        if keep:
            print("\n--keep: server and worker stay up; press Ctrl-C to stop them.", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0 if success else 1
    finally:
        worker.stop()
        server.stop(keep_log=True)
        codec.stop()


if __name__ == "__main__":
    sys.exit(run_demo(keep="--keep" in sys.argv))
