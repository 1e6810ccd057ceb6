"""Reference workflows for ``dvp bench``: what a trade would cost if its steps were free.

``CeilingWorkflow`` has exactly the activity structure of a settled trade: the steps
``check_accounts``, a local ``screen``, ``reserve``, ``pin`` and ``commit``, each step
one call per queued ledger and one call for all the local ledgers (in parallel), with
the same arguments, timeouts, retry policies and dispatch (it calls the settlement
workflow's own ``ledger_call``, ``local_call`` and ``commit_locally``).
Its activities do nothing, so its rate is the engine's ceiling for this shape on
this server and these workers.

``NaiveSagaWorkflow`` is the textbook saga a trade is compared with: six ordinary
activities one after another (check, reserve and commit for each of the two legs),
each doing nothing.

The activities (names ``bench.*``) live in ``bench/worker.py``; they are
referenced here by name so this module imports nothing of the worker.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain import (
        CheckAccountsBatch,
        CheckAccountsRequest,
        CheckAccountsResult,
        HoldOutcomes,
        HoldRefs,
        HoldRefsBatch,
        HoldRequest,
        ReserveBatch,
        ReserveRequest,
        ScreenRequest,
        ScreenResult,
        SettlementRequest,
    )

    # The settlement workflow's own ledger calls and checks, imported rather than copied so that
    # the reference cannot drift from the real thing; passed through, so that a
    # reference workflow does not import the trade's whole module afresh each time.
    from workflows import account_checks, leg_checks
    from workflows.calls import (
        CALL_TIMEOUT,
        HEARTBEAT_TIMEOUT,
        RETRY,
        STUCK_AFTER,
        commit_locally,
        ledger_call,
        local_call,
    )

_SCHEDULE_TO_CLOSE = timedelta(minutes=10)


def _call(queue: str, name: str, argument: Any, result_type: type) -> Any:
    return workflow.execute_activity(
        name,
        argument,
        task_queue=queue,
        result_type=result_type,
        start_to_close_timeout=CALL_TIMEOUT,
        schedule_to_close_timeout=_SCHEDULE_TO_CLOSE,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        retry_policy=RETRY,
    )


def _legs_by_ledger(request: SettlementRequest) -> dict[str, list[int]]:
    by_ledger: dict[str, list[int]] = {}
    for i, leg in enumerate(request.instruction.legs):
        by_ledger.setdefault(leg.ledger, []).append(i)
    return by_ledger


def _hold_ids(request: SettlementRequest, legs: list[int]) -> list[str]:
    return [f"{request.instruction.trade_id}#{i}" for i in legs]


@workflow.defn(name="BenchCeiling")
class CeilingWorkflow:
    """A trade's activities, same number, kind and parallelism, doing nothing."""

    @workflow.run
    async def run(self, request: SettlementRequest) -> str:
        legs = request.instruction.legs
        by_ledger = _legs_by_ledger(request)
        ledgers = sorted(by_ledger)

        by_ledger_checks = account_checks(request.instruction)

        def checks(ledger: str) -> CheckAccountsRequest:
            return CheckAccountsRequest(checks=by_ledger_checks[ledger], ledger=ledger)

        def reserve(ledger: str) -> ReserveRequest:
            expires_at = workflow.now() + timedelta(hours=1)
            return ReserveRequest(
                holds=[
                    HoldRequest(
                        hold_id=f"{request.instruction.trade_id}#{i}",
                        account=legs[i].from_,
                        to_account=legs[i].to,
                        asset=legs[i].asset,
                        amount=legs[i].amount,
                        expires_at=expires_at,
                        trade_id=request.instruction.trade_id,
                    )
                    for i in by_ledger[ledger]
                ],
                ledger=ledger,
            )

        def refs(ledger: str) -> HoldRefs:
            return HoldRefs(hold_ids=_hold_ids(request, by_ledger[ledger]), ledger=ledger)

        async def step(
            name: str, argument: Any, batch_type: type, result_type: type, commit: bool = False
        ) -> None:
            # As TradeSaga._step: the local ledgers' requests in one call, each other
            # ledger's on its queue.
            local = [lg for lg in ledgers if request.is_local(lg)]
            calls = []
            if local:
                batch = batch_type(items=[argument(lg) for lg in local])
                if commit:
                    calls.append(
                        commit_locally(
                            request,
                            batch,
                            f"{name}_local",
                            schedule_to_close=STUCK_AFTER,
                            result_type=result_type,
                        )
                    )
                else:
                    calls.append(
                        local_call(
                            f"{name}_local",
                            batch,
                            schedule_to_close=_SCHEDULE_TO_CLOSE,
                            result_type=result_type,
                        )
                    )
            limit = STUCK_AFTER if commit else _SCHEDULE_TO_CLOSE
            calls += [
                ledger_call(request, lg, name, argument(lg), schedule_to_close=limit, result_type=result_type)
                for lg in ledgers
                if lg not in local
            ]
            await asyncio.gather(*calls)

        await step("bench.check_accounts", checks, CheckAccountsBatch, CheckAccountsResult)
        parties = sorted({p for leg in legs for p in (leg.from_, leg.to)})
        await workflow.execute_local_activity(
            "bench.screen",
            ScreenRequest(parties=parties),
            result_type=ScreenResult,
            start_to_close_timeout=CALL_TIMEOUT,
        )
        await step("bench.reserve", reserve, ReserveBatch, HoldOutcomes)
        await step("bench.pin", refs, HoldRefsBatch, HoldOutcomes)
        await step("bench.commit", refs, HoldRefsBatch, HoldOutcomes, commit=True)
        return "done"


@workflow.defn(name="BenchNaiveSaga")
class NaiveSagaWorkflow:
    """Check, reserve and commit each leg, one ordinary activity after another."""

    @workflow.run
    async def run(self, request: SettlementRequest) -> str:
        legs = request.instruction.legs
        trade_id = request.instruction.trade_id
        expires_at = workflow.now() + timedelta(hours=1)
        for i, leg in enumerate(legs):
            check = CheckAccountsRequest(checks=leg_checks(i, leg))
            await _call(request.queue_of(leg.ledger), "bench.check_accounts", check, CheckAccountsResult)
        for i, leg in enumerate(legs):
            hold = HoldRequest(
                hold_id=f"{trade_id}#{i}",
                account=leg.from_,
                to_account=leg.to,
                asset=leg.asset,
                amount=leg.amount,
                expires_at=expires_at,
                trade_id=trade_id,
            )
            queue = request.queue_of(leg.ledger)
            await _call(queue, "bench.reserve", ReserveRequest(holds=[hold]), HoldOutcomes)
        for i, leg in enumerate(legs):
            refs = HoldRefs(hold_ids=[f"{trade_id}#{i}"])
            await _call(request.queue_of(leg.ledger), "bench.commit", refs, HoldOutcomes)
        return "done"
