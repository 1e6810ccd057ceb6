"""The dvp worker: settlement workflows and ledger activities.

    python worker.py [--config FILE] [--ledger NAME ...] [--no-workflows] [--metrics-port N]

Runs the settlement workflows on ``<prefix>-settlement``, with the ledger calls of
every ledger configured with ``local_activities = true`` (the default) as local
activities beside them; and, for each configured ledger (or each ``--ledger``
named), that ledger's activities on ``<prefix>-ledger-<name>``, for ledgers whose
calls go through their own task queue so that they run only where the credentials
are. Any number of workers may run side by side against the same server and
ledgers. Every ledger a worker opens is also swept for expired holds, the backstop
for an orchestrator that vanished, and its open holds are measured (the
``dvp_open_holds`` and ``dvp_held_amount`` gauges).

A worker that runs the workflows loads the keys of ``[auth]`` when it starts, and
refuses to start without any: the workflows check every acting message's token
with them (docs/trust.md).

``--metrics-port N`` serves Prometheus metrics at ``http://127.0.0.1:N/metrics``: the
Temporal SDK's and dvp's (docs/operations.md, "Metrics"). Traces are exported when the
``OTEL_*`` environment asks for them (``connection.telemetry``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from pydantic import TypeAdapter, ValidationError
from temporalio.client import Client
from temporalio.common import MetricMeter
from temporalio.runtime import Runtime
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities import BatchActivities, LedgerActivities, NettingLedgerActivities, SettlementActivities
from adapters import Ledger, open_ledger
from connection import connect_client, exit_without_teardown, party_tagger
from connection.telemetry import configure_tracing, metrics_runtime
from domain import Config, DvpError, load_config
from identity import Verifier, install_verifier, uninstall_verifier
from operations import reconcile
from stores import BatchStore
from workflows import HtlcWorkflow, NettingBatchWorkflow, SettlementWorkflow

log = logging.getLogger("dvp.worker")

ACTIVITY_THREADS = 16

# The trade workflows' modules (sagas and definitions), passed through the sandbox so
# they are loaded once per process, not afresh for every trade; they keep the workflow
# rules on their own. Why: docs/decisions/0003-sagas-passed-through-the-sandbox.md
TRADE_WORKFLOW_MODULES = (
    "identity",  # the worker's verifier, installed for the workflows (identity.install_verifier)
    "workflows.calls",
    "workflows._saga",
    "workflows._trade",
    "workflows._htlc",
    "workflows.settlement",
    "workflows.htlc",
)
WORKFLOW_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(*TRADE_WORKFLOW_MODULES)
)


class HoldGauges:
    """``dvp_open_holds`` and ``dvp_held_amount`` of one ledger, by asset, as last measured."""

    def __init__(self, meter: MetricMeter, ledger: str) -> None:
        self._ledger = ledger
        self._count = meter.create_gauge("dvp_open_holds", "Open holds, by ledger and asset")
        self._amount = meter.create_gauge_float(
            "dvp_held_amount", "Amount held by open holds, by ledger and asset"
        )
        self._assets: set[str] = set()  # every asset measured so far: one with no hold left reads 0

    def measure(self, ledger: Ledger) -> None:
        totals: dict[str, tuple[int, Decimal]] = {}
        for hold in ledger.open_holds():
            count, amount = totals.get(hold.asset, (0, Decimal(0)))
            totals[hold.asset] = (count + 1, amount + hold.amount)
        self._assets.update(totals)
        for asset in self._assets:
            count, amount = totals.get(asset, (0, Decimal(0)))
            labels = {"ledger": self._ledger, "asset": asset}
            self._count.set(count, labels)
            self._amount.set(float(amount), labels)


async def _sweep(ledger: Ledger, config: Config, stop: asyncio.Event, gauges: HoldGauges) -> None:
    interval = config.settlement.sweep_interval.total_seconds()
    while not stop.is_set():
        try:
            expired = await asyncio.to_thread(ledger.expire_holds, datetime.now(UTC))
            for hold in expired:
                log.warning("ledger %s: hold %s expired and was released", ledger.name, hold.hold_id)
            await asyncio.to_thread(gauges.measure, ledger)
        except DvpError as exc:
            log.warning("ledger %s: sweep failed: %s", ledger.name, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _reconcile(
    client: Client,
    ledgers: dict[str, Ledger],
    queue: str,
    every: timedelta,
    stop: asyncio.Event,
    meter: MetricMeter,
) -> None:
    """``dvp ledger reconcile`` on a schedule, reporting only: what it finds is logged and measured."""
    findings = meter.create_gauge("dvp_reconcile_findings", "What the last reconciliation found, by kind")
    runs = meter.create_counter("dvp_reconcile_runs", "Reconciliations run, by result")
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every.total_seconds())
        if stop.is_set():
            return
        try:
            found = await reconcile(client, ledgers, settlement_queue=queue)
        except Exception as exc:  # Temporal or a ledger down: the next run tries again
            log.warning("reconcile failed: %s", exc)
            runs.add(1, {"result": "failed"})
            continue
        for orphan in found.orphans:
            log.warning(
                "reconcile: ledger %s: hold %s is open but its trade's workflow %s is %s (%s)",
                orphan.ledger,
                orphan.hold_id,
                orphan.workflow_id or "-",
                orphan.workflow_status,
                orphan.why,
            )
        for trade in found.stuck:
            log.warning(
                "reconcile: trade %s is stuck in %s (started %s)",
                trade.trade_id,
                trade.status,
                trade.started_at,
            )
        for problem in found.problems:
            log.warning("reconcile: ledger %s: %s", problem.ledger, problem.problem)
        for kind, items in (("orphans", found.orphans), ("stuck", found.stuck), ("problems", found.problems)):
            findings.set(len(items), {"kind": kind})
        runs.add(1, {"result": "found" if found.found else "clean"})


async def run_worker(
    config: Config,
    client: Client,
    *,
    ledgers: list[str] | None = None,
    workflows: bool = True,
    stop: asyncio.Event | None = None,
    instances: dict[str, Ledger] | None = None,
    reconcile_every: timedelta | None = None,
    verifier: Verifier | None = None,
) -> None:
    """Run until ``stop`` is set (or forever).

    ``instances`` supplies already opened ledgers (they are not closed here);
    otherwise each ledger is opened from its configuration. ``verifier`` checks the
    workflows' tokens; by default it is built from ``[auth]``. ``reconcile_every``, on a
    settlement worker, reconciles the ledgers it opened with their trades that often.
    """
    stop = stop or asyncio.Event()
    # Keys first: a worker that cannot check tokens must not run a single trade.
    if workflows and verifier is None:
        verifier = Verifier.from_config(config.auth)
    # Ledger queues to serve. A local ledger's queue still serves the netting batches.
    names = list(config.ledgers) if ledgers is None else ledgers
    unknown = [n for n in names if n not in config.ledgers]
    if unknown:
        raise DvpError(f"--ledger: unknown ledger {unknown[0]!r} (configured: {', '.join(config.ledgers)})")
    given = instances or {}
    # The settlement workflows need every local ledger, whatever --ledger says.
    local = config.local_ledgers() if workflows else []
    opened = {
        name: given.get(name) or open_ledger(name, config.ledgers[name])
        for name in dict.fromkeys([*names, *local])
    }
    executor = ThreadPoolExecutor(max_workers=ACTIVITY_THREADS, thread_name_prefix="dvp-activity")
    workers: list[Worker] = []
    store = BatchStore(config.batches_url()) if workflows else None  # connects on first use
    if store is not None:
        local_ledgers = LedgerActivities(*(opened[name] for name in local))
        workers.append(
            Worker(
                client,
                task_queue=config.settlement_queue(),
                workflows=[SettlementWorkflow, HtlcWorkflow, NettingBatchWorkflow],
                workflow_runner=WORKFLOW_RUNNER,
                activities=[
                    *SettlementActivities(
                        config, verifier, party_tagger(client), local_ledgers.check_accounts_local
                    ).all(),
                    *BatchActivities(store).all(),
                    *local_ledgers.all(),
                ],
                activity_executor=executor,
                max_concurrent_local_activities=ACTIVITY_THREADS,
                # the commits of local ledgers, handed back to this worker eagerly
                max_concurrent_activities=ACTIVITY_THREADS,
                # hand a dead worker's cached workflows to another worker quickly
                sticky_queue_schedule_to_start_timeout=timedelta(seconds=3),
            )
        )
    for name in names:
        workers.append(
            Worker(
                client,
                task_queue=config.ledger_queue(name),
                activities=[
                    *LedgerActivities(opened[name]).all(),
                    *NettingLedgerActivities(opened[name], config).all(),
                ],
                activity_executor=executor,
                max_concurrent_activities=ACTIVITY_THREADS,
            )
        )
    meter = (client.service_client.config.runtime or Runtime.default()).metric_meter
    sweepers = [
        asyncio.create_task(_sweep(ledger, config, stop, HoldGauges(meter, name)))
        for name, ledger in opened.items()
    ]
    if reconcile_every and workflows:
        sweepers.append(
            asyncio.create_task(
                _reconcile(client, opened, config.settlement_queue(), reconcile_every, stop, meter)
            )
        )
    if verifier is not None:
        install_verifier(config.settlement_queue(), verifier)
    try:
        async with _all_running(workers):
            log.info(
                "worker running: workflows=%s ledgers=%s on %s",
                workflows,
                ",".join(names),
                config.temporal.address,
            )
            await stop.wait()
    finally:
        stop.set()
        if verifier is not None:
            uninstall_verifier(config.settlement_queue(), verifier)
        await asyncio.gather(*sweepers, return_exceptions=True)
        executor.shutdown(wait=True)
        if store is not None:
            store.close()
        for name, ledger in opened.items():
            if name not in given:
                ledger.close()


class _all_running:  # lower case: used as a context manager, like a function
    """Run several workers together; shut them all down on exit."""

    def __init__(self, workers: list[Worker]) -> None:
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> None:
        self._tasks = [asyncio.create_task(w.run()) for w in self._workers]
        await asyncio.sleep(0)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(w.shutdown() for w in self._workers), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)


# Python's default is (700, 10, 10); see tune_process.
GC_THRESHOLDS = (20_000, 10, 10)


def tune_process() -> None:
    """Settings of a worker process: the cyclic garbage collector and the bytecode cache.

    The sandbox's per-workflow imports leave reference cycles, so the collector must
    run, but at the default thresholds it walks the whole heap far too often: freeze
    what was loaded at start and collect less often. See
    docs/decisions/0005-gc-and-bytecode-tuning.md.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    cache_bytecode()


def cache_bytecode() -> None:
    """Let this process reuse compiled bytecode even where writing it is turned off.

    With ``PYTHONDONTWRITEBYTECODE`` set, every sandbox import would compile its module
    again. The bytecode goes under a cache directory outside the source tree
    (``sys.pycache_prefix``), so the tree stays as clean as the variable intends. See
    docs/decisions/0005-gc-and-bytecode-tuning.md.
    """
    if sys.dont_write_bytecode and sys.pycache_prefix is None:
        sys.pycache_prefix = str(Path(tempfile.gettempdir()) / f"dvp-pycache-{os.getuid()}")
        sys.dont_write_bytecode = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvp worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML configuration (default: $DVP_CONFIG or the embedded default)")
    parser.add_argument("--ledger", action="append", help="run only this ledger's activities (repeatable)")
    parser.add_argument("--no-workflows", action="store_true", help="run ledger activities only")
    parser.add_argument(
        "--metrics-port", type=int, metavar="N", help="serve Prometheus metrics at http://HOST:N/metrics"
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST", help="address of the metrics endpoint"
    )
    parser.add_argument(
        "--reconcile-every",
        default="PT5M",
        metavar="DURATION",
        help="reconcile open holds with their trades this often, reporting only (ISO 8601; PT0S: never)",
    )
    args = parser.parse_args(argv)
    try:
        reconcile_every = TypeAdapter(timedelta).validate_python(args.reconcile_every)
    except ValidationError:
        print(
            f"dvp worker: --reconcile-every: {args.reconcile_every!r} is not an ISO 8601 duration",
            file=sys.stderr,
        )
        return 2
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        print(
            f"dvp worker: --metrics-port: {args.metrics_port} is not a TCP port (1 to 65535)", file=sys.stderr
        )
        return 2
    tune_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_tracing("dvp-worker")
    try:
        config = load_config(args.config)
        # before connecting: a worker without keys to check tokens with does not start
        verifier = None if args.no_workflows else Verifier.from_config(config.auth)
    except DvpError as exc:
        print(f"dvp worker: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        options = {}
        if args.metrics_port is not None:
            try:
                options["runtime"] = metrics_runtime(args.metrics_port, args.metrics_host)
            except Exception as exc:  # the SDK's runtime reports a port it cannot bind as a plain error
                raise DvpError(
                    f"--metrics-port: cannot serve metrics on {args.metrics_port}: {exc}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
        client = await connect_client(
            config.temporal.address, config.temporal.namespace, codec=config.codec, **options
        )
        await run_worker(
            config,
            client,
            ledgers=args.ledger,
            workflows=not args.no_workflows,
            stop=stop,
            verifier=verifier,
            reconcile_every=reconcile_every or None,
        )

    try:
        asyncio.run(serve())
    except DvpError as exc:
        print(f"dvp worker: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # connection failures from the SDK
        print(f"dvp worker: cannot reach Temporal at {config.temporal.address}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
