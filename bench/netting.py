"""The netting part of ``dvp bench``: trades per second through one netting batch.

End to end, as ``dvp batch submit --wait`` runs it: from the trades in memory
(parsed JSON) through checking them, storing them in the batch store and the batch
workflow, to the result once every net leg is committed on the ledgers. One worker
process (``worker.py``), fresh ledgers and a fresh batch store; a small batch first
warms the worker up and proves it is polling. Then the balances are checked against
the trades settled one by one (gross), each ledger's ``verify()`` and open holds.
"""

from __future__ import annotations

import random
import time
import tomllib
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from connection import connect_client
from connection.codec import KeyRing
from domain import BatchStatus, Config, parse_config
from identity import TokenIssuer
from processes.workers import WorkerProcess
from starter.batch import BatchClient, parse_batch
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, seed

PARTICIPANTS = 20
SEED = 20240601
MEASURE = "trades in memory -> checked, stored, netted, every net leg committed (client clock)"


def _accounts() -> list[dict[str, str]]:
    accounts = []
    for k in range(PARTICIPANTS):
        p = f"n{k:02d}"
        accounts += [
            {"ledger": "cash", "id": f"{p}-cash", "asset": "EUR", "owner": p, "balance": "1000000000.00"},
            {"ledger": "securities", "id": f"{p}-sec", "asset": "BOND-2030", "owner": p, "balance": "99999"},
        ]
    return accounts


def random_trades(n: int, prefix: str, seed_value: int = SEED) -> list[dict[str, Any]]:
    """``n`` DvP trades between random pairs of the participants (seeded)."""
    rng = random.Random(seed_value)
    trades = []
    for i in range(n):
        s, b = rng.sample(range(PARTICIPANTS), 2)
        trades.append(
            {
                "trade_id": f"{prefix}{i:07d}",
                "legs": [
                    {
                        "ledger": "securities",
                        "asset": "BOND-2030",
                        "from": f"n{s:02d}-sec",
                        "to": f"n{b:02d}-sec",
                        "amount": str(rng.randint(1, 100)),
                    },
                    {
                        "ledger": "cash",
                        "asset": "EUR",
                        "from": f"n{b:02d}-cash",
                        "to": f"n{s:02d}-cash",
                        "amount": f"{rng.randint(100, 10_000_000) / 100:.2f}",
                    },
                ],
            }
        )
    return trades


def _config_text(urls: dict[str, str], batches: str, address: str, namespace: str, prefix: str) -> str:
    ledgers = "".join(f'[ledgers.{name}]\nkind = "sql"\nurl = "{url}"\n\n' for name, url in urls.items())
    keys = Path(batches.removeprefix("sqlite:///")).parent / "auth"
    return (
        f"# written by dvp bench (netting)\n{ledgers}"
        f'[batches]\nurl = "{batches}"\n\n'
        f'[temporal]\naddress = "{address}"\nnamespace = "{namespace}"\ntask_queue_prefix = "{prefix}"\n\n'
        '[roles]\noperators = ["ops"]\n\n'
        f'[auth]\nlocal_issuer = true\nlocal_keys = "{keys}"\n\n'
        f'[codec]\nkey_file = "{keys.parent / "codec-keys.json"}"\n'
    )


async def run_netting(
    n: int, address: str, namespace: str, base: Path, urls: dict[str, str], timeout: float
) -> dict[str, Any]:
    """Settle one batch of ``n`` random trades; the figures and the correctness check."""
    run = f"nb{uuid.uuid4().hex[:6]}"
    text = _config_text(urls, f"sqlite:///{base / 'netting-batches.db'}", address, namespace, f"bench-{run}")
    config = parse_config(tomllib.loads(text), "bench netting configuration")
    keys = config.codec.key_path()
    if not keys.exists():  # dvp bench made it for the whole run; alone, the batch makes its own
        keys.write_text(KeyRing.generate().to_json())
    config_path = base / "dvp-netting.toml"
    config_path.write_text(text)
    with opened(config) as ledgers:
        seed(config, parse_seed({"accounts": _accounts()}, config), ledgers)
        before = all_balances(ledgers)
    worker = WorkerProcess(config_path, base / "worker-netting.log", stop_timeout=30).start()
    try:
        token = TokenIssuer.from_config(config.auth).issue("ops", ttl=timedelta(hours=12))  # an operator's
        connection = await connect_client(address, namespace, codec=config.codec)
        client = BatchClient(connection, config, token=token)
        warm = random_trades(20, f"{run}w", SEED + 1)
        warm_view = await client.submit(warm, batch_id=f"{run}-warm", wait=True, timeout=timeout)
        trades = random_trades(n, f"{run}t")
        started = time.perf_counter()
        batch = parse_batch(trades, config)
        checked = time.perf_counter()
        view = await client.submit(batch, batch_id=f"{run}-batch", wait=True, timeout=timeout)
        done = time.perf_counter()
        client.store.close()
    finally:
        worker.stop()
    wall = done - started
    return {
        "trades": n,
        "participants": PARTICIPANTS,
        "status": view.status.value,
        "settled": view.settled,
        "removed": view.removed,
        "wall_s": round(wall, 3),
        "check_s": round(checked - started, 3),
        "rate_per_s": round(n / wall, 1),
        "assets": [a.model_dump(mode="json") for a in view.assets],
        "net_positions": len(view.positions),
        "measure": MEASURE,
        "correctness": _check(config, before, [warm, trades], [warm_view.status, view.status]),
    }


def _check(
    config: Config, before: list[Any], batches: list[list[dict[str, Any]]], statuses: list[BatchStatus]
) -> dict[str, Any]:
    expected = {(b.ledger, b.account): b.balance for b in before}
    for trades in batches:
        for trade in trades:
            for leg in trade["legs"]:
                amount = Decimal(leg["amount"])
                expected[(leg["ledger"], leg["from"])] -= amount
                expected[(leg["ledger"], leg["to"])] += amount
    with opened(config) as ledgers:
        after = {
            (b.ledger, b.account): b.balance
            for b in all_balances(ledgers)
            if not b.account.startswith("clearing:") or b.balance != 0
        }
        holds = all_open_holds(ledgers)
        problems = [f"{n}: {p}" for n, lg in ledgers.items() for p in lg.verify()]
    wrong = [f"{k[0]}/{k[1]}: {after.get(k)} != {v}" for k, v in expected.items() if after.get(k) != v]
    wrong += [f"{k[0]}/{k[1]}: unexpected {v}" for k, v in after.items() if k not in expected]
    checks = {
        "every batch settled": all(s is BatchStatus.SETTLED for s in statuses),
        "balances = seed + every trade's legs": not wrong,
        "no hold left open": not holds,
        "ledger verify() empty": not problems,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "problems": (wrong + [f"open hold {h.hold_id}" for h in holds] + problems)[:20],
    }


def render(netting: dict[str, Any]) -> list[str]:
    """Lines for ``dvp bench``'s table."""
    lines = [
        f"netting batch: {netting['trades']:,} trades among {netting['participants']} participants: "
        f"{netting['rate_per_s']:,.0f} trades/s end to end ({netting['wall_s']} s, "
        f"of which checking {netting['check_s']} s); {netting['status']}, "
        f"{netting['settled']:,} settled through {netting['net_positions']} net positions",
    ]
    for a in netting["assets"]:
        lines.append(
            f"  {a['asset']}: gross {a['gross']}, net {a['net']}, saved {a['saved_percent']}% of liquidity"
        )
    lines.append(f"  measured: {netting['measure']}")
    return lines
