"""How a saga calls a ledger: the activity options every trade's ledger call shares.

The trade saga, the HTLC saga, the netting batch and the bench's reference workflows
all call ledgers through these, so their timeouts and retries cannot drift apart. A
ledger is called in the settlement worker itself when the worker's configuration
says so (a local activity), else through its own task queue; see
``docs/decisions/0001-local-activities-and-eager-commits.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from domain import HoldRefsBatch, SettlementRequest

__all__ = [
    "CALL_TIMEOUT",
    "HEARTBEAT_TIMEOUT",
    "RETRY",
    "STUCK_AFTER",
    "commit_locally",
    "ledger_call",
    "local_call",
]

# Before the decision every ledger call is bounded by the deadline (schedule-to-close);
# after it, commits and releases are called again and again (STUCK_AFTER, below).
CALL_TIMEOUT = timedelta(seconds=60)  # one attempt of one ledger call
RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10))
# Ledger activities heartbeat between holds (at most every 0.5 s: activities/ledger.py,
# _Heartbeat), so a worker that died mid-call is noticed after this, not after the whole
# start-to-close timeout.
HEARTBEAT_TIMEOUT = timedelta(seconds=10)
# After the decision a commit (or, after an abort, a release) is retried without end:
# each call retries for STUCK_AFTER, then the workflow records the failure, makes its
# status visible and calls again after a pause that doubles up to _STUCK_RETRY_MAX.
STUCK_AFTER = timedelta(seconds=30)


def ledger_call(
    request: SettlementRequest,
    ledger: str,
    activity: Callable[..., Any] | str,
    argument: Any,
    *,
    schedule_to_close: timedelta,
    result_type: type | None = None,
) -> Awaitable[Any]:
    """One call to one ledger before the commit decision, retried until ``schedule_to_close``.

    A ledger with ``local_activities`` is called in the settlement worker itself, as
    a local activity: no task goes through the server. That is safe because every
    ledger call is idempotent on its hold keys, so re-running one (a retry, a worker
    that died) has the effect of once; the commits are the exception (see
    ``commit_locally``). Any other ledger is called through an activity on its own
    task queue.
    """
    if argument.ledger != ledger:
        argument = argument.model_copy(update={"ledger": ledger})
    options: dict[str, Any] = {
        "start_to_close_timeout": CALL_TIMEOUT,
        "schedule_to_close_timeout": schedule_to_close,
        "retry_policy": RETRY,
        "result_type": result_type,
    }
    if request.is_local(ledger):
        return workflow.execute_local_activity(activity, argument, **options)
    return workflow.execute_activity(
        activity,
        argument,
        task_queue=request.queue_of(ledger),
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        **options,
    )


def local_call(
    activity: Callable[..., Any] | str,
    batch: Any,
    *,
    schedule_to_close: timedelta,
    result_type: type | None = None,
) -> Awaitable[Any]:
    """One step on every local ledger of a trade before the commit decision: one local activity.

    ``batch`` holds one request per ledger, each naming its ledger. Safe as a local
    activity for the reason ``ledger_call`` gives; and one call rather than one per
    ledger, so the workflow wakes once for the step's results, not once per ledger.
    """
    # A dict, as in ledger_call: the SDK's overloads take ``result_type`` only with an
    # activity's name (the bench's reference workflows pass names), and this takes both.
    options: dict[str, Any] = {
        "start_to_close_timeout": CALL_TIMEOUT,
        "schedule_to_close_timeout": schedule_to_close,
        "retry_policy": RETRY,
        "result_type": result_type,
    }
    return workflow.execute_local_activity(activity, batch, **options)


def commit_locally(
    request: SettlementRequest,
    batch: HoldRefsBatch,
    activity: Callable[..., Any] | str,
    *,
    schedule_to_close: timedelta,
    result_type: type | None = None,
) -> Awaitable[Any]:
    """The commits on every local ledger of a trade: one ordinary activity.

    Not a local activity: a local activity's result reaches the history only with
    the workflow task that ran it, and the SDK keeps that task open while local
    activities run, so a commit run as one could move money before the decision is
    recorded, and a worker that died then would be replaced by one that replays from
    before the decision and might decide otherwise. Scheduling an ordinary activity
    completes the workflow task, which records the reservations, the pins and the
    decision first. It runs on the settlement task queue, where the server hands it
    straight back to the worker that scheduled it (eager dispatch), and it is one
    activity for all the local ledgers, so one task and one result to record.
    """
    options: dict[str, Any] = {  # a dict: see local_call
        "task_queue": request.settlement_queue,
        "start_to_close_timeout": CALL_TIMEOUT,
        "schedule_to_close_timeout": schedule_to_close,
        "heartbeat_timeout": HEARTBEAT_TIMEOUT,
        "retry_policy": RETRY,
        "result_type": result_type,
    }
    return workflow.execute_activity(activity, batch, **options)
