"""``dvp bench``: how fast trades settle, against what the engine could do at best.

    dvp bench [-n 300] [-c 20] [--workers 1,2] [--rounds 5] [--idle 10] [--warmup 20]
              [--server-storage file|memory] [--ledger sqlite|postgres] [--ledger-calls local|queue]
              [--submit start|nowait|accepted] [--server-config KEY=VALUE ...]
              [--netting N] [--json] [--output FILE]

Starts everything it measures: the embedded Temporal dev server (unless
``TEMPORAL_ADDRESS`` names one), fresh ledgers and worker processes
(``bench/worker.py``: the real worker plus the reference workflows of
``bench/workflows.py``). For each worker count it settles trades one at a time
(idle latency), then ``N`` trades at concurrency ``C`` (throughput and latency
under load) and the same numbers of two reference workflows on the same server and
workers, taking turns in ``--rounds`` rounds so the machine's other load is shared.
Each part starts with ``--warmup`` unmeasured workflows of each kind at its own
concurrency. The reference workflows are:

* the **ceiling**: a trade's activities (2 check_accounts, a local screen, 2
  reserve, 2 pin, 2 commit, with the same parallelism) doing nothing;
* the **naive saga**: six ordinary no-op activities one after another.

Latency is measured from the start of the submit call (client clock) to the
workflow's ``close_time`` from ``describe()`` (server clock, same host); the
client-observed latency (until the awaited result arrived) is reported beside it.
Throughput is the number of workflows over the time from the first submit to the
last close of each batch, summed over the rounds. CPU seconds come from /proc
(process trees of the server and the worker processes) and are also given per
workflow, which depends far less than rates on what else the machine runs.

Last, the netting batch (``bench/netting.py``): ``--netting N`` random
trades (default 100,000) through one batch, end to end, in trades per second.

Then it checks that every trade settled, no hold is open, each SQL ledger's
``verify()`` is empty and the balances moved by exactly the settled legs; it exits
1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest, GetSystemInfoRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy

from bench.workflows import CeilingWorkflow, NaiveSagaWorkflow
from connection import connect_client
from connection.codec import EncryptionCodec, KeyRing, codec_cost, history_payloads
from domain import (
    CodecConfig,
    Config,
    DvpError,
    SettlementRequest,
    TradeStatus,
    TradeView,
    parse_config,
)
from identity import TokenIssuer, Verifier
from processes.devserver import DYNAMIC_CONFIG, DevServer, find_temporal_binary
from processes.workers import WorkerProcess
from starter.client import SettlementClient, parse_instruction
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, seed
from workflows import SettlementWorkflow, initial_search_attributes, workflow_id_for

__all__ = ["BenchFailed", "BenchOptions", "add_parser", "run_bench"]

REPO = Path(__file__).resolve().parent.parent
POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
LEDGERS = ("cash", "securities")
PAIRS = 20  # seller/buyer pairs the trades rotate over
KINDS = ("trades", "ceiling", "naive")
LATENCY_MEASURE = (
    "submit call start (client clock) -> workflow close_time from describe() (server clock, same host)"
)
CLIENT_LATENCY_MEASURE = "submit call start -> awaited workflow result received (client clock)"
TOKEN_ROUNDS = 500
TOKEN_MEASURE = (
    "thread CPU, in the bench process, of one token check as the worker runs it when a trade is "
    "admitted (signature, issuer, audience, expiry: identity.Verifier.verify of the bench's "
    f"operator token), averaged over {TOKEN_ROUNDS} checks; a bench trade is checked once"
)
CODEC_ROUNDS = 200
CODEC_MEASURE = (
    "thread CPU, in the bench process, of decoding then encoding once each encrypted payload of the "
    f"first loaded workflow's history (AES-256-GCM, the run's key ring), averaged over {CODEC_ROUNDS} rounds"
)
SUBMIT_MODES = {
    "start": "client.start_workflow with the request SettlementClient builds (one RPC, like the references)",
    "nowait": "SettlementClient.submit(wait_accepted=False): start_workflow, then a status query",
    "accepted": "SettlementClient.submit(): update-with-start, returns once validated and screened",
}
LEDGER_CALLS = {
    "local": "local activities of the settlement worker (local_activities = true, the default)",
    "queue": "activities on each ledger's task queue (local_activities = false)",
}
_TICK = os.sysconf("SC_CLK_TCK")
# One of the keys DevServer sets (processes/devserver.py, DYNAMIC_CONFIG); --server-config
# overrides them or adds others.
TRANSFER_RPS = "history.transferProcessorMaxPollRPS"


class BenchFailed(DvpError):
    """The bench could not run (a server, worker or ledger did not come up)."""


@dataclass
class BenchOptions:
    """What ``dvp bench`` runs; the CLI flags map one to one."""

    trades: int = 300
    concurrency: int = 20
    workers: list[int] = field(default_factory=lambda: [1, 2])
    idle: int = 10
    warmup: int = 20  # before the idle figures, and again at the load's concurrency before the load
    rounds: int = 5  # more, shorter batches: what the machine does meanwhile evens out
    server_storage: str = "file"
    ledger: str = "sqlite"
    ledger_calls: str = "local"  # each ledger's local_activities setting: local or queue
    submit: str = "start"
    postgres: str = POSTGRES_SERVER
    server_config: list[str] = field(default_factory=list)  # KEY=VALUE dynamic config of the dev server
    timeout: float = 300.0
    netting: int = 100_000  # trades in the netting batch (0: skip it)
    output: str | None = None
    json: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})

    def check(self) -> None:
        for name in ("trades", "concurrency", "idle", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: {getattr(self, name)} must be at least 1")
        if self.netting < 0:
            raise ValueError(f"--netting: {self.netting} must be 0 or more")
        if self.warmup < 0:
            raise ValueError(f"--warmup: {self.warmup} must be 0 or more")
        if not self.workers or any(w < 1 for w in self.workers):
            raise ValueError(f"--workers: {self.workers} must list worker counts of at least 1")
        if self.server_storage not in ("file", "memory"):
            raise ValueError(f"--server-storage: {self.server_storage!r}: expected file or memory")
        if self.ledger not in ("sqlite", "postgres"):
            raise ValueError(f"--ledger: {self.ledger!r}: expected sqlite or postgres")
        if self.ledger_calls not in LEDGER_CALLS:
            raise ValueError(f"--ledger-calls: {self.ledger_calls!r}: expected local or queue")
        for item in self.server_config:
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise ValueError(f"--server-config: {item!r}: expected KEY=VALUE, e.g. {TRANSFER_RPS}=1000")
        if self.submit not in SUBMIT_MODES:
            raise ValueError(f"--submit: {self.submit!r}: expected one of {', '.join(SUBMIT_MODES)}")


# ------------------------------------------------------------------ processes


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from "state" (field 3) on


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU of a process tree, reaped children included (from /proc)."""
    total = 0
    for pid in _tree(root):
        stat = _proc_stat(pid)
        if stat is not None:  # utime stime cutime cstime are fields 14-17
            total += sum(int(v) for v in stat[11:15])
    return total / _TICK


def tree_peak_rss_mb(root: int) -> float:
    """The sum of VmHWM (peak resident set) over a process tree, in MiB."""
    total_kb = 0
    for pid in _tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


class _WorkerProcess(WorkerProcess):
    """One ``bench.worker`` process, as a worker would be deployed."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        super().__init__(config_path, log_path, module="bench.worker", stop_timeout=30)
        self.start()

    @property
    def pid(self) -> int:
        pid = super().pid
        assert pid is not None, "started in __init__"
        return pid

    def check_alive(self) -> None:
        if not self.running:
            raise BenchFailed(
                f"bench worker {self.pid} exited with code {self.returncode}:\n{self.log_tail(30)}"
            )


@dataclass
class _Meters:
    """CPU of the server, the worker processes and this process."""

    server_pid: int | None
    worker_pids: list[int]

    def read(self) -> dict[str, float | None]:
        return {
            "server": tree_cpu_seconds(self.server_pid) if self.server_pid else None,
            "workers": sum(tree_cpu_seconds(p) for p in self.worker_pids),
            "client": time.process_time(),
        }

    async def quiet(self, window: float = 0.5, busy: float = 0.1, limit: float = 15.0) -> float:
        """Wait until the server and workers use under ``busy`` of a core; return the seconds waited.

        The server finishes a batch's work after its last workflow closes (visibility
        writes, task cleanup): without this, the next batch, of another kind, would be
        measured paying for it.
        """
        started = time.monotonic()
        last = self._busy()
        while time.monotonic() - started < limit:
            await asyncio.sleep(window)
            now = self._busy()
            if now - last < busy * window:
                break
            last = now
        return time.monotonic() - started

    def _busy(self) -> float:
        pids = ([self.server_pid] if self.server_pid else []) + self.worker_pids
        return sum(tree_cpu_seconds(p) for p in pids)

    @staticmethod
    def delta(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for key, value in after.items():
            start = before.get(key)
            out[key] = None if value is None or start is None else round(value - start, 3)
        return out


# ------------------------------------------------------------------ ledgers


@contextmanager
def _fresh_ledgers(kind: str, base: Path, postgres: str, tag: str) -> Iterator[dict[str, str]]:
    """URLs of empty databases for each ledger; PostgreSQL ones are dropped on exit."""
    if kind == "sqlite":
        yield {name: f"sqlite:///{base / f'{tag}-{name}.db'}" for name in LEDGERS}
        return
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(postgres)
    admin_dsn = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    names = {ledger: f"dvp_bench_{tag}_{ledger}_{uuid.uuid4().hex[:8]}" for ledger in LEDGERS}
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
            for db in names.values():
                admin.execute(f'CREATE DATABASE "{db}"')
    except psycopg.OperationalError as exc:
        raise BenchFailed(f"--ledger postgres: cannot reach PostgreSQL at {admin_dsn}: {exc}") from None
    try:
        yield {
            ledger: url.set(database=db).render_as_string(hide_password=False) for ledger, db in names.items()
        }
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
            for db in names.values():
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def codec_keys(base: Path) -> Path:
    """The run's key ring: fresh for each run, shared by its client and workers."""
    return base / "codec-keys.json"


def _config_text(
    urls: dict[str, str],
    address: str,
    namespace: str,
    prefix: str,
    ledger_calls: str = "local",
    auth_dir: Path | None = None,
    codec_keys: Path | None = None,
) -> str:
    local = "true" if ledger_calls == "local" else "false"
    ledgers = "".join(
        f'[ledgers.{name}]\nkind = "sql"\nurl = "{url}"\nlocal_activities = {local}\n\n'
        for name, url in urls.items()
    )
    return (
        f"# written by dvp bench\n{ledgers}"
        '[compliance]\nsanctioned = ["mallory"]\n\n'
        '[roles]\noperators = ["ops"]\n\n'
        f'[temporal]\naddress = "{address}"\nnamespace = "{namespace}"\ntask_queue_prefix = "{prefix}"\n\n'
        # the local development issuer: the bench's client acts with an operator's token
        f'[auth]\nlocal_issuer = true\nlocal_keys = "{auth_dir or Path(".dvp") / "auth"}"\n\n'
        # every payload encrypted, for all three kinds alike (the ratios compare like with like)
        + (f'[codec]\nkey_file = "{codec_keys}"\n' if codec_keys else "")
    )


def _accounts() -> list[dict[str, str]]:
    """Seller ``s<k>`` holds bonds, buyer ``b<k>`` cash; enough for any number of trades."""
    accounts = []
    for k in range(PAIRS):
        for ledger, account, asset, owner, balance in (
            ("securities", f"s{k}-sec", "BOND-2030", f"s{k}", "1000000"),
            ("securities", f"b{k}-sec", "BOND-2030", f"b{k}", "0"),
            ("cash", f"b{k}-cash", "EUR", f"b{k}", "1000000000.00"),
            ("cash", f"s{k}-cash", "EUR", f"s{k}", "0.00"),
        ):
            accounts.append(
                {"ledger": ledger, "id": account, "asset": asset, "owner": owner, "balance": balance}
            )
    return accounts


def _instruction(trade_id: str, i: int) -> dict[str, Any]:
    k, bonds = i % PAIRS, 1 + i % 5
    return {
        "trade_id": trade_id,
        "legs": [
            {
                "ledger": "securities",
                "asset": "BOND-2030",
                "from": f"s{k}-sec",
                "to": f"b{k}-sec",
                "amount": str(bonds),
            },
            {
                "ledger": "cash",
                "asset": "EUR",
                "from": f"b{k}-cash",
                "to": f"s{k}-cash",
                "amount": f"{bonds * Decimal('99.50'):.2f}",
            },
        ],  # fmt: skip
        "settle_within": "PT10M",
    }


# ------------------------------------------------------------------ measuring


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile, linearly interpolated between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = p / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _latency(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {f"p{p}": round(percentile(ms, p), 1) for p in (50, 95, 99)} | {"max": round(max(ms), 1)}


@dataclass
class _Done:
    handle: WorkflowHandle[Any, Any]
    submitted: float  # time.time() before the submit call
    returned: float  # time.time() when the awaited result arrived
    result: Any


@dataclass
class _Batch:
    kind: str
    concurrency: int
    done: list[_Done]
    closes: list[float]  # each workflow's close_time, same order as ``done``
    cpu: dict[str, float | None]

    @property
    def wall(self) -> float:
        """From the first submit to the last close."""
        return max(self.closes) - min(d.submitted for d in self.done)


def _summary(batches: list[_Batch]) -> dict[str, Any]:
    """One figure set over batches of the same kind (run in rounds, interleaved with others)."""
    done = [d for b in batches for d in b.done]
    closes = [c for b in batches for c in b.closes]
    wall = sum(b.wall for b in batches)
    cpu: dict[str, float | None] = {}
    for key in batches[0].cpu:
        values = [b.cpu[key] for b in batches]
        cpu[key] = None if any(v is None for v in values) else round(sum(v or 0 for v in values), 3)
    if batches[0].kind == "trades":
        ok = sum(1 for d in done if d.result.status is TradeStatus.SETTLED)
    else:
        ok = sum(1 for d in done if d.result == "done")
    engine_cpu = (cpu["workers"] or 0) + (cpu["server"] or 0)
    return {
        "count": len(done),
        "completed": ok,
        "concurrency": batches[0].concurrency,
        "batches": len(batches),
        "wall_s": round(wall, 3),
        "rate_per_s": round(len(done) / wall, 2),
        "latency_ms": _latency([c - d.submitted for c, d in zip(closes, done, strict=True)]),
        "client_latency_ms": _latency([d.returned - d.submitted for d in done]),
        "cpu_s": cpu,
        "cpu_ms_per_item": round(engine_cpu * 1000 / len(done), 2) if cpu["server"] is not None else None,
    }


class _Phase:
    """One worker count: its config, workers, ledgers and measurements."""

    def __init__(self, client: Client, config: Config, options: BenchOptions, run: str) -> None:
        self.client = client
        self.config = config
        self.options = options
        self.run = run
        # an operator's token: the bench's trades are a venue's, submitted locked-in
        token = TokenIssuer.from_config(config.auth).issue("ops", ttl=timedelta(hours=12))
        self.dvp = SettlementClient(client, config, token)
        self.prefix = config.temporal.task_queue_prefix
        self.trade_views: list[TradeView] = []
        self.references_failed = 0
        self.counter = 0

    # what one item of each kind is -----------------------------------------

    def _trade_request(self, trade_id: str, i: int) -> SettlementRequest:
        instruction = parse_instruction(_instruction(trade_id, i), self.config)
        return self.dvp.settlement_request(instruction, self.dvp.token or "")

    def _reference_request(self, ref_id: str, i: int) -> SettlementRequest:
        # The references route themselves (a trade's routing is its worker's): the same
        # input as a trade's, token included, plus their own queues.
        request = self._trade_request(ref_id, i)
        return request.model_copy(
            update={
                "settlement_queue": f"{self.prefix}-bench",
                "ledger_queues": {name: f"{self.prefix}-bench-ledger-{name}" for name in sorted(LEDGERS)},
                "local_ledgers": [name for name in self.config.local_ledgers() if name in LEDGERS],
                "settlement": self.config.settlement,
            }
        )

    def starter(self, kind: str, segment: str) -> Callable[[int], Awaitable[WorkflowHandle[Any, Any]]]:
        async def trade(i: int) -> WorkflowHandle[Any, Any]:
            trade_id = f"{self.run}-{segment}-{i}"
            mode = self.options.submit
            if mode == "start":
                request = self._trade_request(trade_id, i)
                return await self.client.start_workflow(
                    SettlementWorkflow.run,
                    request,
                    id=workflow_id_for(trade_id),
                    task_queue=self.config.settlement_queue(),
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    search_attributes=initial_search_attributes(request.instruction),
                )
            await self.dvp.submit(_instruction(trade_id, i), wait_accepted=mode == "accepted")
            return self.client.get_workflow_handle_for(SettlementWorkflow.run, workflow_id_for(trade_id))

        async def reference(i: int) -> WorkflowHandle[Any, Any]:
            ref_id = f"{self.run}-{segment}-{i}"
            run = CeilingWorkflow.run if kind == "ceiling" else NaiveSagaWorkflow.run
            return await self.client.start_workflow(
                run,
                self._reference_request(ref_id, i),
                id=f"bench-{kind}-{ref_id}",
                task_queue=f"{self.prefix}-bench",
            )

        return trade if kind == "trades" else reference

    # driving ----------------------------------------------------------------

    async def drive(self, kind: str, segment: str, count: int, concurrency: int) -> list[_Done]:
        """Closed loop: ``concurrency`` slots, each submits one and awaits its end."""
        start = self.starter(kind, segment)
        next_index = iter(range(count))
        done: list[_Done] = []

        async def slot() -> None:
            for i in next_index:
                submitted = time.time()
                handle = await start(i)
                result = await handle.result()
                done.append(_Done(handle, submitted, time.time(), result))

        await asyncio.wait_for(asyncio.gather(*(slot() for _ in range(concurrency))), self.options.timeout)
        for item in done:
            if kind == "trades":
                self.trade_views.append(item.result)
            elif item.result != "done":
                self.references_failed += 1
        return done

    async def warm_up(self, count: int, concurrency: int, tag: str) -> None:
        """``count`` unmeasured workflows of each kind, ``concurrency`` at a time (at most ``count``)."""
        if count:
            for kind in KINDS:
                await self.drive(kind, f"warm{tag}{kind[0]}", count, min(concurrency, count))

    async def batch(self, kind: str, segment: str, count: int, concurrency: int, meters: _Meters) -> _Batch:
        """Run one batch from a quiet machine; CPU is read around the driving only."""
        await meters.quiet()
        before = meters.read()
        done = await self.drive(kind, segment, count, concurrency)
        cpu = _Meters.delta(before, meters.read())
        closes = await self._close_times([d.handle for d in done])
        return _Batch(kind, concurrency, done, closes, cpu)

    async def measure(
        self, kind: str, segment: str, count: int, concurrency: int, meters: _Meters
    ) -> dict[str, Any]:
        return _summary([await self.batch(kind, segment, count, concurrency, meters)])

    async def _close_times(self, handles: list[WorkflowHandle[Any, Any]]) -> list[float]:
        semaphore = asyncio.Semaphore(20)

        async def one(handle: WorkflowHandle[Any, Any]) -> float:
            async with semaphore:
                description = await handle.describe()
            if description.status is not WorkflowExecutionStatus.COMPLETED or description.close_time is None:
                raise BenchFailed(f"workflow {handle.id} is {description.status}, not completed")
            return description.close_time.timestamp()

        return list(await asyncio.gather(*(one(h) for h in handles)))

    async def codec_cost(self, handle: WorkflowHandle[Any, Any]) -> dict[str, Any]:
        """The codec's CPU for one workflow: encode + decode, once each, of every payload of its history."""
        history = await handle.fetch_history()
        codec = self.client.data_converter.payload_codec
        assert isinstance(codec, EncryptionCodec)
        return codec_cost(codec, history_payloads(history), CODEC_ROUNDS)

    def token_cost(self) -> dict[str, Any]:
        """The token check's CPU for one trade: one verification of its submitter's token."""
        verifier, token = Verifier.from_config(self.config.auth), self.dvp.token or ""
        now = datetime.now(UTC)
        verifier.verify(token, now)  # the first check loads what the rest reuse
        started = time.thread_time()
        for _ in range(TOKEN_ROUNDS):
            verifier.verify(token, now)
        cpu_ms = (time.thread_time() - started) / TOKEN_ROUNDS * 1000
        return {"checks": 1, "cpu_ms": round(cpu_ms, 3), "measure": TOKEN_MEASURE}

    async def history_shape(self, handle: WorkflowHandle[Any, Any]) -> dict[str, int]:
        """Round trips of one workflow, counted from its history."""
        history = await handle.fetch_history()
        counts: dict[int, int] = {}
        local_activities = 0
        for event in history.events:
            counts[event.event_type] = counts.get(event.event_type, 0) + 1
            # A local activity's result is a marker; other markers (patches) are not counted.
            if event.marker_recorded_event_attributes.marker_name == "core_local_activity":
                local_activities += 1
        return {
            "events": len(history.events),
            "workflow_tasks": counts.get(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED, 0),
            "activity_tasks": counts.get(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, 0),
            "local_activities": local_activities,
            "search_attribute_upserts": counts.get(EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES, 0),
        }

    async def wait_for_pollers(self, workers: list[_WorkerProcess], timeout: float = 90.0) -> None:
        """Until every worker process polls every task queue of the layout."""
        queued = [n for n in LEDGERS if n not in self.config.local_ledgers()]
        queues = [(self.config.settlement_queue(), TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)]
        queues += [(self.config.ledger_queue(n), TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY) for n in queued]
        queues += [(f"{self.prefix}-bench", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)]
        queues += [
            (f"{self.prefix}-bench-ledger-{n}", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY) for n in queued
        ]
        wanted = {str(w.pid) for w in workers}
        deadline = time.monotonic() + timeout
        while True:
            for w in workers:
                w.check_alive()
            missing = []
            for name, kind in queues:
                response = await self.client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=self.client.namespace, task_queue=TaskQueue(name=name), task_queue_type=kind
                    )
                )
                polling = {p.identity.split("@")[0] for p in response.pollers}
                if wanted - polling:
                    missing.append(name)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise BenchFailed(f"bench workers did not poll {', '.join(missing)} within {timeout:.0f}s")
            await asyncio.sleep(0.2)


# ------------------------------------------------------------------ the run


async def _run_phase(
    options: BenchOptions, n_workers: int, address: str, namespace: str, base: Path, server_pid: int | None
) -> dict[str, Any]:
    run = f"b{datetime.now(UTC):%H%M%S}-w{n_workers}-{uuid.uuid4().hex[:4]}"
    with _fresh_ledgers(options.ledger, base, options.postgres, f"w{n_workers}") as urls:
        text = _config_text(
            urls, address, namespace, f"bench-{run}", options.ledger_calls, base / "auth", codec_keys(base)
        )
        config = parse_config(tomllib.loads(text), "bench configuration")
        config_path = base / f"dvp-w{n_workers}.toml"
        config_path.write_text(text)
        with opened(config) as ledgers:
            seed(config, parse_seed({"accounts": _accounts()}, config), ledgers)
            before = all_balances(ledgers)
        client = await connect_client(address, namespace, codec=config.codec)
        phase = _Phase(client, config, options, run)
        workers = [
            _WorkerProcess(config_path, base / f"worker-w{n_workers}-{k}.log") for k in range(n_workers)
        ]
        try:
            await phase.wait_for_pollers(workers)
            meters = _Meters(server_pid, [w.pid for w in workers])
            n, c = options.trades, options.concurrency
            warm = options.warmup
            result: dict[str, Any] = {
                "workers": n_workers,
                # unmeasured workflows of each kind, and how many at once, before each part
                "warmup": {"before_idle": [warm, min(1, warm)], "before_load": [warm, min(c, warm)]},
                "idle": {},
            }
            await phase.warm_up(warm, 1, "i")
            for kind in KINDS:
                result["idle"][kind] = await phase.measure(kind, f"idle{kind[0]}", options.idle, 1, meters)
            # Warm again at the load's concurrency: the first batch under load otherwise paid
            # for what twenty at once need first (threads, caches, the server's queues), and
            # it is always a batch of trades (they lead every round).
            await phase.warm_up(warm, c, "l")
            # Under load the kinds take turns, round after round, so that a change in the
            # machine's other load is shared between them rather than landing on one; and
            # the order changes every round, so that no kind always runs right after the
            # same other one (whatever a batch leaves the server to finish lands on every
            # kind alike, not always on the one after the naive saga).
            batches: dict[str, list[_Batch]] = {kind: [] for kind in KINDS}
            for r in range(options.rounds):
                count = n // options.rounds + (1 if r < n % options.rounds else 0)
                for kind in _round_order(KINDS, r):
                    batches[kind].append(await phase.batch(kind, f"load{kind[0]}{r}", count, c, meters))
            loaded = {kind: _summary(batches[kind]) for kind in KINDS}
            result |= loaded
            trades = loaded["trades"]
            result["ratios"] = {
                "trades_per_ceiling": round(trades["rate_per_s"] / loaded["ceiling"]["rate_per_s"], 3),
                "trades_per_naive": round(trades["rate_per_s"] / loaded["naive"]["rate_per_s"], 3),
                # CPU per item hardly depends on what else the machine runs: the steadier figure
                "ceiling_cpu_per_trade_cpu": _ratio(
                    loaded["ceiling"]["cpu_ms_per_item"], trades["cpu_ms_per_item"]
                ),
            }
            # Each round's own ratios: how much the machine's speed moved the figures above.
            result["ratios"]["per_round"] = {
                "trades_per_ceiling": _round_ratios(batches["trades"], batches["ceiling"]),
                "trades_per_naive": _round_ratios(batches["trades"], batches["naive"]),
            }
            samples = {
                "trades": client.get_workflow_handle(workflow_id_for(f"{run}-loadt0-0")),
                "ceiling": client.get_workflow_handle(f"bench-ceiling-{run}-loadc0-0"),
                "naive": client.get_workflow_handle(f"bench-naive-{run}-loadn0-0"),
            }
            result["history_per_workflow"] = {k: await phase.history_shape(h) for k, h in samples.items()}
            result["codec_per_workflow"] = {k: await phase.codec_cost(h) for k, h in samples.items()}
            result["codec_per_workflow"]["measure"] = CODEC_MEASURE
            result["ratios"]["codec_cpu_per_trade_cpu"] = _ratio(
                result["codec_per_workflow"]["trades"]["cpu_ms"], trades["cpu_ms_per_item"]
            )
            result["token_check_per_trade"] = phase.token_cost()
            result["ratios"]["token_cpu_per_trade_cpu"] = _ratio(
                result["token_check_per_trade"]["cpu_ms"], trades["cpu_ms_per_item"]
            )
            result["rss_peak_mb"] = {
                "workers": [round(tree_peak_rss_mb(w.pid), 1) for w in workers],
                "server": round(tree_peak_rss_mb(server_pid), 1) if server_pid else None,
            }
        finally:
            for w in workers:
                w.stop()
        result["correctness"] = _check(config, phase, before)
        result["task_queue_prefix"] = config.temporal.task_queue_prefix
    return result


def _round_order(kinds: tuple[str, ...], r: int) -> tuple[str, ...]:
    """The kinds in the order round ``r`` runs them: every other round, the kinds after the
    first in reverse. Over two rounds (three kinds) each kind runs once right after each
    other kind, and the first one leads every round."""
    return kinds if r % 2 == 0 else (kinds[0], *reversed(kinds[1:]))


def _round_ratios(numerators: list[_Batch], denominators: list[_Batch]) -> list[float]:
    """Rate over rate, round by round (batch ``r`` of one kind against batch ``r`` of the other)."""
    return [
        round((len(a.done) / a.wall) / (len(b.done) / b.wall), 3)
        for a, b in zip(numerators, denominators, strict=True)
    ]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if not numerator or not denominator else round(numerator / denominator, 3)


def _check(config: Config, phase: _Phase, before: list[Any]) -> dict[str, Any]:
    views = phase.trade_views
    with opened(config) as ledgers:
        after = all_balances(ledgers)
        holds = all_open_holds(ledgers)
        problems = [f"{name}: {p}" for name, ledger in ledgers.items() for p in ledger.verify()]
    expected = {(b.ledger, b.account): b.balance for b in before}
    for view in views:
        if view.status is TradeStatus.SETTLED:
            for leg in view.legs:
                expected[(leg.ledger, leg.from_)] -= leg.amount
                expected[(leg.ledger, leg.to)] += leg.amount
    actual = {(b.ledger, b.account): b.balance for b in after}
    not_settled = [
        f"{v.trade_id}: {v.status.value} {v.reason}" for v in views if v.status is not TradeStatus.SETTLED
    ]
    wrong = [
        f"{k[0]}/{k[1]}: {actual.get(k)} != expected {v}" for k, v in expected.items() if actual.get(k) != v
    ]
    checks = {
        "every trade settled": not not_settled,
        "no hold left open": not holds,
        "ledger verify() empty": not problems,
        "balances = seed + settled legs": not wrong and set(actual) == set(expected),
        "every reference workflow completed": phase.references_failed == 0,
    }
    return {
        "passed": all(checks.values()),
        "trades": len(views),
        "settled": len(views) - len(not_settled),
        "checks": checks,
        "problems": (not_settled + [f"open hold {h.hold_id}" for h in holds] + problems + wrong)[:20],
    }


def _version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


async def _environment(
    options: BenchOptions, address: str, namespace: str, embedded: bool, base: Path
) -> dict[str, Any]:
    client = await connect_client(address, namespace, codec=CodecConfig(key_file=str(codec_keys(base))))
    info = await client.workflow_service.get_system_info(GetSystemInfoRequest())
    env: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # Without .pyc files the workflow sandbox compiles the workflow modules for every new run.
        "python_dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "temporalio": metadata.version("temporalio"),
        "temporal_cli": _version(find_temporal_binary()) if embedded else None,
        "temporal_server": info.server_version,
        "server": "embedded dev server" if embedded else f"external at {address}",
        "server_storage": (
            (
                "SQLite file, journal_mode=wal, synchronous=normal"
                if options.server_storage == "file"
                else "memory"
            )
            if embedded
            else "unknown (external server)"
        ),
        "server_config": (
            [
                f"{k}={v}"
                for k, v in {**DYNAMIC_CONFIG, **dict(i.split("=", 1) for i in options.server_config)}.items()
            ]
            if embedded
            else None
        ),
        "sqlite_ledger": sqlite3.sqlite_version,
        "ledger": options.ledger,
        "ledger_calls": f"{options.ledger_calls}: {LEDGER_CALLS[options.ledger_calls]}",
        "submit": f"{options.submit}: {SUBMIT_MODES[options.submit]}",
        "latency_measure": LATENCY_MEASURE,
        "client_latency_measure": CLIENT_LATENCY_MEASURE,
    }
    if options.ledger == "postgres":
        import psycopg
        from sqlalchemy.engine import make_url

        dsn = make_url(options.postgres).set(drivername="postgresql", database="postgres")
        with psycopg.connect(dsn.render_as_string(hide_password=False), connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            env["postgres"] = row[0] if row else None
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def run_bench(options: BenchOptions | argparse.Namespace) -> dict[str, Any]:
    """Run the bench and return its result (the JSON document ``dvp bench --json`` prints)."""
    if isinstance(options, argparse.Namespace):
        options = BenchOptions.from_args(options)
    options.check()
    started = time.monotonic()
    started_at = datetime.now(UTC)
    base = Path(tempfile.mkdtemp(prefix="dvp-bench-"))
    codec_keys(base).write_text(KeyRing.generate().to_json())
    codec_keys(base).chmod(0o600)
    external = os.environ.get("TEMPORAL_ADDRESS")
    namespace = os.environ.get("TEMPORAL_NAMESPACE", "default")
    server: DevServer | None = None
    ok = False
    try:
        if external:
            address, server_pid = external, None
        else:
            db_file = base / "temporal.db" if options.server_storage == "file" else None
            dynamic = dict(item.split("=", 1) for item in options.server_config)
            server = DevServer(
                headless=True, db_file=db_file, namespace=namespace, dynamic_config=dynamic
            ).start()
            address, server_pid = server.address, server.pid

        async def main() -> dict[str, Any]:
            env = await _environment(options, address, namespace, server is not None, base)
            runs = []
            for n_workers in options.workers:
                runs.append(await _run_phase(options, n_workers, address, namespace, base, server_pid))
            netting = await _netting_section(options, address, namespace, base)
            env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
            return {"environment": env, "runs": runs, **netting}

        body = asyncio.run(main())
        netting_check = body.get("netting", {}).get("correctness", {})
        result: dict[str, Any] = {
            "bench": "dvp",
            "started_at": started_at.isoformat(),
            "duration_s": round(time.monotonic() - started, 1),
            "options": {k: v for k, v in asdict(options).items() if k not in ("json", "output")},
            **body,
            "correctness": {
                "passed": all(r["correctness"]["passed"] for r in body["runs"])
                and netting_check.get("passed", True),
                "checks": sorted({name for r in body["runs"] for name in r["correctness"]["checks"]})
                + [f"netting: {name}" for name in netting_check.get("checks", {})],
            },
        }
        ok = result["correctness"]["passed"]
        return result
    finally:
        if server is not None:
            server.stop(keep_log=not ok)
        if ok:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"dvp bench: worker logs and ledgers kept in {base}", file=sys.stderr)


# ------------------------------------------------------------------ netting


async def _netting_section(options: BenchOptions, address: str, namespace: str, base: Path) -> dict[str, Any]:
    """``{"netting": {...}}``: one netting batch of ``--netting`` trades (see bench/netting.py)."""
    if not options.netting:
        return {}
    from bench.netting import run_netting

    with _fresh_ledgers(options.ledger, base, options.postgres, "netting") as urls:
        result = await run_netting(options.netting, address, namespace, base, urls, options.timeout)
    return {"netting": result}


# ------------------------------------------------------------------ output


_TABLE: list[tuple[str, str, int]] = [
    ("trades/s", "trades.rate_per_s", 1),
    ("  latency p50 ms", "trades.latency_ms.p50", 0),
    ("  latency p95 ms", "trades.latency_ms.p95", 0),
    ("  latency p99 ms", "trades.latency_ms.p99", 0),
    ("  client-observed p50 ms", "trades.client_latency_ms.p50", 0),
    ("  idle latency p50 ms", "idle.trades.latency_ms.p50", 0),
    ("ceiling/s (no-op trade shape)", "ceiling.rate_per_s", 1),
    ("  idle latency p50 ms", "idle.ceiling.latency_ms.p50", 0),
    ("  trades/s ÷ ceiling/s", "ratios.trades_per_ceiling", 2),
    ("    in each round", "ratios.per_round.trades_per_ceiling", 2),
    ("  ceiling CPU ÷ trade CPU", "ratios.ceiling_cpu_per_trade_cpu", 2),
    ("naive saga/s (6 sequential no-ops)", "naive.rate_per_s", 1),
    ("  idle latency p50 ms", "idle.naive.latency_ms.p50", 0),
    ("  trades/s ÷ naive/s", "ratios.trades_per_naive", 2),
    ("    in each round", "ratios.per_round.trades_per_naive", 2),
    ("CPU s, trades under load: server", "trades.cpu_s.server", 2),
    ("  workers", "trades.cpu_s.workers", 2),
    ("  bench client", "trades.cpu_s.client", 2),
    ("  server+workers ms per trade", "trades.cpu_ms_per_item", 1),
    ("CPU ms per ceiling workflow", "ceiling.cpu_ms_per_item", 1),
    ("CPU ms per naive saga", "naive.cpu_ms_per_item", 1),
    ("peak RSS MiB: server (so far)", "rss_peak_mb.server", 0),
    ("  each worker", "rss_peak_mb.workers", 0),
    ("history per trade: events", "history_per_workflow.trades.events", 0),
    ("  workflow tasks", "history_per_workflow.trades.workflow_tasks", 0),
    ("  activity tasks", "history_per_workflow.trades.activity_tasks", 0),
    ("  local activities", "history_per_workflow.trades.local_activities", 0),
    ("  search attribute upserts", "history_per_workflow.trades.search_attribute_upserts", 0),
    ("codec CPU ms per trade", "codec_per_workflow.trades.cpu_ms", 3),
    ("  payloads encrypted / in its history", "codec_per_workflow.trades.encrypted", 0),
    ("  codec CPU ÷ trade CPU", "ratios.codec_cpu_per_trade_cpu", 3),
    ("token check CPU ms per trade", "token_check_per_trade.cpu_ms", 3),
    ("  token check CPU ÷ trade CPU", "ratios.token_cpu_per_trade_cpu", 3),
    ("codec CPU ms per ceiling workflow", "codec_per_workflow.ceiling.cpu_ms", 3),
    ("codec CPU ms per naive saga", "codec_per_workflow.naive.cpu_ms", 3),
    ("workflow tasks per ceiling", "history_per_workflow.ceiling.workflow_tasks", 0),
    ("workflow tasks per naive saga", "history_per_workflow.naive.workflow_tasks", 0),
    ("correctness", "correctness.passed", 0),
]


def _cell(run: dict[str, Any], path: str, digits: int) -> str:
    value: Any = run
    for key in path.split("."):
        value = value[key]
    if isinstance(value, bool):
        return "ok" if value else "FAILED"
    if isinstance(value, list):
        return " ".join(_cell({"v": v}, "v", digits) for v in value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def render(result: dict[str, Any]) -> str:
    """The human-readable table of a result."""
    runs = result["runs"]
    opts, env = result["options"], result["environment"]
    headers = ["", *(f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in runs)]
    cells = [[label, *(_cell(r, path, digits) for r in runs)] for label, path, digits in _TABLE]
    widths = [max(len(row[i]) for row in [headers, *cells]) for i in range(len(headers))]
    server = env["temporal_cli"] or f"server {env['temporal_server']}"
    postgres = f" (PostgreSQL {env['postgres']})" if env.get("postgres") else ""
    lines = [
        f"dvp bench: {opts['trades']} trades at concurrency {opts['concurrency']}, "
        f"in {opts['rounds']} round(s); idle {opts['idle']} one at a time, warm-up {opts['warmup']}; "
        f"submit: {opts['submit']}",
        "",
        _row(headers, widths),
        _row(["-" * w for w in widths], widths),
        *(_row(row, widths) for row in cells),
        "",
        f"latency: {env['latency_measure']}",
        f"ran on: {env['cores']} cores ({env['cores_usable']} usable), load average "
        f"{env['loadavg_at_start']} at start, {env.get('loadavg_at_end')} at end; "
        f"Python {env['python']}"
        + (" (PYTHONDONTWRITEBYTECODE: no .pyc)" if env.get("python_dont_write_bytecode") else "")
        + f", temporalio {env['temporalio']}",
        f"server: {env['server']}, {server}; storage {env['server_storage']}"
        + (f"; dynamic config {', '.join(env['server_config'])}" if env.get("server_config") else ""),
        f"ledgers: {env['ledger']}{postgres}, SQLite {env['sqlite_ledger']}; calls {env['ledger_calls']}",
        f"took {result['duration_s']} s",
    ]
    if result.get("netting"):
        from bench.netting import render as render_netting

        lines += ["", *render_netting(result["netting"])]
        lines += [f"  netting: {problem}" for problem in result["netting"]["correctness"]["problems"]]
    for r in runs:
        lines += [f"  {r['workers']} worker(s): {problem}" for problem in r["correctness"]["problems"]]
    verdict = "passed" if result["correctness"]["passed"] else "FAILED"
    lines.append(f"correctness check {verdict}: " + "; ".join(result["correctness"]["checks"]))
    return "\n".join(lines)


def _workers_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected worker counts such as 1,2") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every worker count must be at least 1")
    return counts


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    p.add_argument(
        "-n",
        "--trades",
        type=_positive,
        default=d.trades,
        help=f"trades under load per worker count (default {d.trades})",
    )
    p.add_argument(
        "-c",
        "--concurrency",
        type=_positive,
        default=d.concurrency,
        help=f"trades in flight (default {d.concurrency})",
    )
    p.add_argument(
        "--workers",
        type=_workers_list,
        default=d.workers,
        help="worker process counts to run, e.g. 1,2 (default)",
    )
    p.add_argument(
        "--idle",
        type=_positive,
        default=d.idle,
        help=f"trades run one at a time for the idle latency (default {d.idle})",
    )
    p.add_argument(
        "--warmup",
        type=_not_negative,
        default=d.warmup,
        help=f"unmeasured workflows of each kind before the idle figures, and again at the load's "
        f"concurrency before the load (default {d.warmup})",
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        default=d.rounds,
        help=f"under load, trades, ceiling and naive saga take turns, this many rounds (default {d.rounds})",
    )
    p.add_argument(
        "--server-storage",
        choices=["file", "memory"],
        default=d.server_storage,
        help="embedded server keeps its state in a temporary SQLite file (WAL; default) or in memory",
    )
    p.add_argument(
        "--ledger",
        choices=["sqlite", "postgres"],
        default=d.ledger,
        help="fresh SQLite files (default) or fresh PostgreSQL databases, dropped afterwards",
    )
    p.add_argument(
        "--ledger-calls",
        choices=list(LEDGER_CALLS),
        default=d.ledger_calls,
        help="ledger calls as local activities of the settlement worker (default) or on each ledger's queue",
    )
    p.add_argument(
        "--postgres",
        default=d.postgres,
        help=f"PostgreSQL server for --ledger postgres (default {d.postgres})",
    )
    p.add_argument(
        "--server-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"dynamic config of the embedded server (repeatable), e.g. {TRANSFER_RPS}=20 "
        "(overrides the defaults in processes/devserver.py DYNAMIC_CONFIG)",
    )
    p.add_argument(
        "--submit",
        choices=list(SUBMIT_MODES),
        default=d.submit,
        help="how trades are submitted: " + "; ".join(f"{k}: {v}" for k, v in SUBMIT_MODES.items()),
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=d.timeout,
        help=f"seconds one measured batch may take (default {d.timeout:.0f})",
    )
    p.add_argument(
        "--netting",
        type=_not_negative,
        default=d.netting,
        metavar="N",
        help=f"trades in the netting batch measured end to end, 0 to skip (default {d.netting})",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument(
        "--output", help="write the JSON result here (default bench-results/bench-<timestamp>.json)"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench, print the table (or JSON), write the JSON file; exit 1 if the check failed."""
    options = BenchOptions.from_args(args)
    try:
        result = run_bench(options)
    except (DvpError, ValueError) as exc:
        print(f"dvp bench: {exc}", file=sys.stderr)
        return 1
    except WorkflowFailureError as exc:
        print(f"dvp bench: a workflow failed: {exc.cause or exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(
            f"dvp bench: a measured batch did not finish within --timeout {options.timeout:.0f} s",
            file=sys.stderr,
        )
        return 1
    output = Path(options.output or f"bench-results/bench-{datetime.now():%Y%m%d-%H%M%S}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
        print(f"\nresult: {output}")
    return 0 if result["correctness"]["passed"] else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dvp bench`` on the dvp CLI's subparsers."""
    summary = "measure settled trades/s and latency against the engine's ceiling and a naive saga"
    p: argparse.ArgumentParser = subparsers.add_parser("bench", help=summary, description=summary)
    _add_arguments(p)
    p.set_defaults(handler=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvp bench", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
