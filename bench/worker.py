"""The worker process ``dvp bench`` starts: the real worker plus the bench's reference workflows.

    python -m bench.worker --config FILE

Runs ``worker.run_worker`` (settlement workflows and every configured ledger's
activities, exactly as ``dvp worker``) and, beside it in the same process, the
workflows of ``bench/workflows.py`` with activities that do nothing, laid out like
the real ones: the workflows (with the local ``screen`` and the no-op ledger
activities, for the ceiling's ledger calls of local ledgers) on ``<prefix>-bench``, each
ledger's no-op activities on ``<prefix>-bench-ledger-<name>`` (for the naive saga,
and the ceiling's queued ledger calls), sync activities on a thread pool of the
same size.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from bench.workflows import CeilingWorkflow, NaiveSagaWorkflow
from connection import connect_client, exit_without_teardown
from domain import (
    CheckAccountsBatch,
    CheckAccountsRequest,
    CheckAccountsResult,
    Config,
    HoldOutcome,
    HoldOutcomes,
    HoldRefs,
    HoldRefsBatch,
    ReserveBatch,
    ReserveRequest,
    ScreenRequest,
    ScreenResult,
    load_config,
)
from worker import ACTIVITY_THREADS, TRADE_WORKFLOW_MODULES, run_worker, tune_process

# As worker.run_worker configures the settlement workflows' worker.
STICKY_TIMEOUT = timedelta(seconds=3)
# As worker.WORKFLOW_RUNNER: the reference workflows' module is loaded once, as the trade's is.
BENCH_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(
        *TRADE_WORKFLOW_MODULES, "bench.workflows"
    )
)


def bench_queue(config: Config) -> str:
    """The task queue of the bench workflows."""
    return f"{config.temporal.task_queue_prefix}-bench"


def bench_ledger_queue(config: Config, ledger: str) -> str:
    """The task queue of one ledger's no-op activities."""
    return f"{config.temporal.task_queue_prefix}-bench-ledger-{ledger}"


def _outcomes(hold_ids: list[str]) -> HoldOutcomes:
    outcomes = []
    heartbeat = not activity.info().is_local  # as the ledger activities do, once per hold
    for hold_id in hold_ids:
        if heartbeat:
            activity.heartbeat(hold_id)
        outcomes.append(HoldOutcome(hold_id=hold_id, ok=True))
    return HoldOutcomes(outcomes=outcomes)


class NoopActivities:
    """The ledger activities' signatures and heartbeats, doing nothing else."""

    @activity.defn(name="bench.check_accounts")
    def check_accounts(self, request: CheckAccountsRequest) -> CheckAccountsResult:
        return CheckAccountsResult(owners={}, problems=[])

    @activity.defn(name="bench.reserve")
    def reserve(self, request: ReserveRequest) -> HoldOutcomes:
        return _outcomes([h.hold_id for h in request.holds])

    @activity.defn(name="bench.pin")
    def pin(self, request: HoldRefs) -> HoldOutcomes:
        return _outcomes(request.hold_ids)

    @activity.defn(name="bench.commit")
    def commit(self, request: HoldRefs) -> HoldOutcomes:
        return _outcomes(request.hold_ids)

    # The batch forms the trade uses for its local ledgers (one call per step).

    @activity.defn(name="bench.check_accounts_local")
    def check_accounts_local(self, request: CheckAccountsBatch) -> CheckAccountsResult:
        return CheckAccountsResult(owners={}, problems=[])

    @activity.defn(name="bench.reserve_local")
    def reserve_local(self, request: ReserveBatch) -> HoldOutcomes:
        return _outcomes([h.hold_id for item in request.items for h in item.holds])

    @activity.defn(name="bench.pin_local")
    def pin_local(self, request: HoldRefsBatch) -> HoldOutcomes:
        return _outcomes([hold_id for refs in request.items for hold_id in refs.hold_ids])

    @activity.defn(name="bench.commit_local")
    def commit_local(self, request: HoldRefsBatch) -> HoldOutcomes:
        return _outcomes([hold_id for refs in request.items for hold_id in refs.hold_ids])

    def all(self) -> list[Callable[..., object]]:
        return [
            self.check_accounts,
            self.reserve,
            self.pin,
            self.commit,
            self.check_accounts_local,
            self.reserve_local,
            self.pin_local,
            self.commit_local,
        ]


@activity.defn(name="bench.screen")
async def screen(request: ScreenRequest) -> ScreenResult:
    return ScreenResult(hits=[], operators=[])


async def run_bench_workers(config: Config, client: Client, stop: asyncio.Event) -> None:
    """The bench workflows and no-op activities, until ``stop`` is set."""
    executor = ThreadPoolExecutor(max_workers=ACTIVITY_THREADS, thread_name_prefix="dvp-bench-activity")
    noop = NoopActivities()
    workers = [
        Worker(
            client,
            task_queue=bench_queue(config),
            workflows=[CeilingWorkflow, NaiveSagaWorkflow],
            workflow_runner=BENCH_RUNNER,
            activities=[screen, *noop.all()],
            activity_executor=executor,
            max_concurrent_local_activities=ACTIVITY_THREADS,
            max_concurrent_activities=ACTIVITY_THREADS,
            sticky_queue_schedule_to_start_timeout=STICKY_TIMEOUT,
        )
    ]
    # The naive saga's ordinary activities, and the ceiling's for ledgers called through
    # their queue, run on the bench ledger queues.
    workers += [
        Worker(
            client,
            task_queue=bench_ledger_queue(config, name),
            activities=noop.all(),
            activity_executor=executor,
            max_concurrent_activities=ACTIVITY_THREADS,
        )
        for name in config.ledgers
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await stop.wait()
    finally:
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        executor.shutdown(wait=True)


async def serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = await connect_client(config.temporal.address, config.temporal.namespace, codec=config.codec)
    await asyncio.gather(run_worker(config, client, stop=stop), run_bench_workers(config, client, stop))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML configuration written by dvp bench")
    args = parser.parse_args(argv)
    tune_process()  # as worker.py does
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(load_config(args.config)))
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
