"""How long ``dvp list`` takes over many trades: visibility alone, no worker.

    python -m bench.listing [--trades 10000] [--page 1000] [--json]

Starts an in-memory dev server of its own and that many ``Settlement`` workflows
carrying a trade's search attributes and memo as a real trade would, on the settlement
queue of its configuration, which no worker polls (statuses spread over the terminal
ones and the open ones); half of them are then terminated, so the listing reads closed
workflows (whose reason it takes from the
memo) as well as open ones. Then it times ``dvp list`` as a user runs it: the first page
(``--limit 100``), every page of ``--limit N`` in turn through ``--page-token``, the
whole list at once (``--json``) and an empty listing (the process's own start), each a
fresh ``dvp`` process; and the whole list in this process (``SettlementClient.list``).
The results go in docs/performance.md, "Listing trades".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from domain import TradeStatus, load_config
from processes.devserver import DevServer
from starter.client import SettlementClient

REPO = Path(__file__).resolve().parents[1]
STATUSES = [
    TradeStatus.SETTLED,
    TradeStatus.SETTLED,
    TradeStatus.SETTLED,
    TradeStatus.CANCELLED,
    TradeStatus.REJECTED,
    TradeStatus.EXPIRED,
    TradeStatus.AWAITING_APPROVAL,
    TradeStatus.RESERVING,
]
_STATUS = SearchAttributeKey.for_keyword("DvpStatus")
_TRADE = SearchAttributeKey.for_keyword("DvpTradeId")
_PARTIES = SearchAttributeKey.for_keyword_list("DvpParties")
_ASSETS = SearchAttributeKey.for_keyword_list("DvpAssets")


async def start_trades(client: Client, queue: str, count: int, concurrency: int = 64) -> float:
    """Start ``count`` never-running Settlement workflows; terminate every other one. Seconds taken."""
    began = time.perf_counter()
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        status = STATUSES[i % len(STATUSES)]
        attributes = TypedSearchAttributes(
            [
                SearchAttributePair(_STATUS, status.value),
                SearchAttributePair(_TRADE, f"LB-{i:05d}"),
                SearchAttributePair(_PARTIES, ["alice", "alice-cash", "bob", "bob-sec"]),
                SearchAttributePair(_ASSETS, ["BOND-2030", "EUR"]),
            ]
        )
        async with semaphore:
            handle = await client.start_workflow(
                "Settlement",
                {"bench": i},
                id=f"trade-LB-{i:05d}",
                task_queue=queue,
                search_attributes=attributes,
                memo={"reason": "" if status is TradeStatus.SETTLED else f"bench: {status.value.lower()}"},
            )
            if i % 2:
                await handle.terminate(reason="bench: a closed workflow")

    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - began


def dvp(config: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "DVP_CONFIG": str(config)}
    env.pop("TEMPORAL_ADDRESS", None)
    began = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "starter.cli", *args], capture_output=True, text=True, cwd=REPO, env=env
    )
    elapsed = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"dvp {' '.join(args)} failed: {result.stderr}")
    return elapsed, result


async def visible(client: Client, count: int, timeout: float = 120) -> None:
    """Until visibility counts every trade (it is eventually consistent)."""
    end = time.monotonic() + timeout
    while (await client.count_workflows('WorkflowType = "Settlement"')).count < count:
        if time.monotonic() > end:
            raise SystemExit("visibility never counted every trade")
        await asyncio.sleep(0.5)


def measure(config: Path, count: int, page: int) -> dict[str, Any]:
    first, _ = dvp(config, "list", "--limit", "100", "--json")
    pages, token, seen, paging = 0, None, 0, 0.0
    while True:
        elapsed, result = dvp(
            config, "list", "--json", "--limit", str(page), *(["--page-token", token] if token else [])
        )
        listed = json.loads(result.stdout)
        paging += elapsed
        pages += 1
        seen += len(listed["trades"])
        token = listed["next_page_token"]
        if token is None:
            break
    whole, result = dvp(config, "list", "--json")
    everything = json.loads(result.stdout)
    startup, _ = dvp(config, "list", "--status", "ONE_SIDED")  # an empty answer: the process's own cost
    assert seen == count == len(everything), (seen, count, len(everything))
    return {
        "trades": count,
        "first_page_100_s": round(first, 3),
        "pages": pages,
        "page_size": page,
        "all_pages_s": round(paging, 3),
        "per_page_s": round(paging / pages, 3),
        "whole_list_s": round(whole, 3),
        "empty_list_s": round(startup, 3),
    }


async def run(count: int, page: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dvp-bench-listing-") as tmp, DevServer(headless=True) as server:
        config = Path(tmp) / "dvp.toml"
        config.write_text(
            f'[ledgers.cash]\nkind = "sql"\nurl = "sqlite:///{tmp}/cash.db"\n\n'
            f'[temporal]\naddress = "{server.address}"\ntask_queue_prefix = "bench-listing"\n'
        )
        loaded = load_config(config)
        client = await server.connect(codec=loaded.codec)
        # dvp list shows the trades of its configuration's settlement queue, which no worker polls here
        started = await start_trades(client, loaded.settlement_queue(), count)
        await visible(client, count)
        results = await asyncio.to_thread(measure, config, count, page)
        # The same listing in this process: what the listing costs without a process's start.
        dvp_client = SettlementClient(client, loaded)
        began = time.perf_counter()
        listed = await dvp_client.list()
        in_process = time.perf_counter() - began
        assert len(listed) == count
        return {"start_s": round(started, 1), **results, "in_process_whole_list_s": round(in_process, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=10_000)
    parser.add_argument("--page", type=int, default=1000, help="--limit of each page (1 to 1000)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.trades, args.page))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:18} {value}")
    return 0


if __name__ == "__main__":
    from connection import exit_without_teardown

    exit_without_teardown(main())
