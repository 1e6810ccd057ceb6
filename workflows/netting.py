"""The netting batch: one durable workflow per batch settles many trades by their net legs.

    NETTING ── read the batch's accounts (by reference: the trades stay in the batch store)
            ── each ledger: check the accounts, read what they have available,
               open its clearing accounts                      (unknown account: trades removed)
            ── compliance screen of every owner                (sanctioned: trades removed)
            ── net: each account's position per ledger; remove what cannot be covered
    RESERVING ── hold every net debit, payable to the ledger's clearing account,
                 one batched call per ledger     (a debit short after all: release, re-read, re-net)
              ── pin every hold
              ── record the commit decision  ───────────────── point of no return
    COMMITTING ── each ledger: commit the pay-ins into the clearing account, then pay
                  every net receiver out of it (retried until done)
    SETTLED   ── every trade still in the batch is marked settled in the store

Only an operator submits a batch: the submitter's token is verified by the worker
when the batch starts (``SettlementActivities.admit``), and the routing (queues,
settlement settings) is the worker's; a batch whose token fails, whose submitter
is not an operator, or whose request names other routing ends REJECTED before
anything is read or reserved. Batches started before that rule (no ``TRUST_PATCH``
marker in their history) replay as they ran.

A batch ends SETTLED (every trade not removed settled) or EXPIRED / CANCELLED
(nothing settled, every hold released). Each ledger's clearing account receives
exactly what it pays out, so it ends every batch where it started and every ledger
still sums to zero. Compensations (releases of the pay-in holds) are registered
before the reservations they undo, run last-in first-out, shielded from
cancellation; every ledger call is idempotent on its hold id. The workflow never
sees a trade: its inputs and activity results are the batch id, counts and one net
position per account, so its history stays small whatever the batch's size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from activities.netting import BatchActivities, NettingLedgerActivities, clearing_account
    from activities.settlement import SettlementActivities
    from domain import (
        AccountPosition,
        AccountRef,
        Admission,
        AdmitRequest,
        AssetTotals,
        BatchAccounts,
        BatchRequest,
        BatchStatus,
        BatchView,
        CarriedBatch,
        Exclusion,
        HoldOutcomes,
        HoldRefs,
        HoldRequest,
        NetLeg,
        NetPlan,
        NetRequest,
        PositionsRequest,
        PositionsResult,
        RecordRequest,
        ReserveRequest,
        ScreenRequest,
        ScreenResult,
        SettleRequest,
        TimelineEvent,
    )

    # deterministic helpers: loaded once, not afresh for every workflow
    from ._saga import TRUST_PATCH, cause, continued_run, history_due, shielded
    from .calls import CALL_TIMEOUT, HEARTBEAT_TIMEOUT, RETRY

T = TypeVar("T")

_RETRY_FOREVER = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
_STORE_TIMEOUT = timedelta(minutes=5)  # netting 100,000 trades on a loaded machine
# The netting heartbeats per phase (a ledger call per hold: calls.HEARTBEAT_TIMEOUT).
_STORE_HEARTBEAT_TIMEOUT = timedelta(seconds=30)
_STUCK_RETRY = timedelta(seconds=30)
_MAX_ROUNDS = 5
# What a continued run's timeline keeps: its first entries and its last, with a line
# saying how many were left out between.
_TIMELINE_HEAD = 12
_TIMELINE_TAIL = 60


def batch_workflow_id(batch_id: str) -> str:
    """The workflow id of a batch: one batch id, one workflow, ever."""
    return f"batch-{batch_id}"


class _Abort(Exception):
    def __init__(self, status: BatchStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@workflow.defn(name="NettingBatch")
class NettingBatchWorkflow:
    @workflow.init
    def __init__(self, request: BatchRequest) -> None:
        self._request = request
        self._deadline: datetime = workflow.now() + request.settle_within
        self._status = BatchStatus.PENDING
        self._reason = ""
        self._timeline: list[TimelineEvent] = []
        self._plan: NetPlan | None = None
        self._rounds = 0
        self._settled = 0
        self._decided = False
        self._holds: dict[str, list[str]] = {}  # ledger -> pay-in hold ids of the current round
        self._compensations: list[tuple[str, list[str]]] = []  # (ledger, hold ids), LIFO
        # Across runs (continue-as-new, docs/decisions/0011-continue-as-new.md): where a
        # retry's pause may continue as new, and the ending it releases or records for.
        self._runs = 0
        self._folded = 0
        self._stage: str | None = None
        self._abort: _Abort | None = None
        carried = request.carried
        self._resume = carried if carried is not None and continued_run() else None
        self._forged = carried is not None and self._resume is None
        if self._resume is not None:
            self._restore(self._resume)
        else:
            self._trusted = workflow.patched(TRUST_PATCH)

    def _restore(self, carried: CarriedBatch) -> None:
        self._runs, self._deadline, self._trusted = carried.runs, carried.deadline, carried.trusted
        self._status, self._reason = carried.status, carried.reason
        self._timeline, self._folded = list(carried.timeline), carried.folded
        self._plan, self._rounds, self._settled = carried.plan, carried.rounds, carried.settled
        self._decided = carried.decided
        self._holds = {ledger: list(ids) for ledger, ids in carried.holds.items()}
        self._compensations = [(ledger, list(ids)) for ledger, ids in carried.compensations]
        if carried.abort_status is not None:
            self._abort = _Abort(carried.abort_status, carried.abort_reason)

    # ----------------------------------------------------------------- run

    @workflow.run
    async def run(self, request: BatchRequest) -> BatchView:
        if self._resume is not None:
            await self._resumed(self._resume.phase)
            return self._view()
        self._event("submitted", f"{request.trade_count} trades; deadline {self._deadline.isoformat()}")
        if self._forged:  # nothing read, reserved or recorded: the request is not the batch's
            self._set_status(BatchStatus.REJECTED, "carried: only a batch's own continued run carries state")
            return self._view()
        try:
            await self._settle()
        except _Abort as abort:
            await self._release_and_end(abort)
        except asyncio.CancelledError:
            self._event("cancel requested through Temporal")
            await self._release_and_end(_Abort(BatchStatus.CANCELLED, "workflow cancelled through Temporal"))
        return self._view()

    async def _release_and_end(self, abort: _Abort) -> None:
        self._stage, self._abort = "compensate", abort
        await self._shielded(self._compensate())
        self._stage = "end"
        await self._shielded(self._end(abort.status, abort.reason))

    async def _resumed(self, phase: str) -> None:
        """A continued run: go on from ``phase`` (the batch is past its decision, or ending)."""
        if phase == "commit":
            assert self._plan is not None
            await self._shielded(self._committed(self._plan))
            return
        assert self._abort is not None
        if phase == "compensate":
            await self._release_and_end(self._abort)
            return
        self._stage = "end"
        await self._shielded(self._end(self._abort.status, self._abort.reason))

    async def _committed(self, plan: NetPlan) -> None:
        self._stage = "commit"
        await self._commit(plan)
        self._stage, self._abort = "end", _Abort(BatchStatus.SETTLED, "")
        await self._end(BatchStatus.SETTLED)

    async def _pause(self) -> None:
        """A retry's pause after the decision or while ending: a wait point (``_stage``)."""
        if self._stage is not None and history_due(self._request.settlement):
            await self._continue_as_new(self._stage)
        await workflow.sleep(_STUCK_RETRY)

    async def _continue_as_new(self, phase: str) -> None:
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._runs += 1
        length = workflow.info().get_current_history_length()
        self._event("continued as new", f"run {self._runs + 1} begins; run {self._runs} had {length} events")
        timeline, folded = self._timeline, self._folded
        if len(timeline) > _TIMELINE_HEAD + _TIMELINE_TAIL:
            folded += len(timeline) - _TIMELINE_HEAD - _TIMELINE_TAIL
            timeline = [*timeline[:_TIMELINE_HEAD], *timeline[-_TIMELINE_TAIL:]]
        abort = self._abort
        carried = CarriedBatch(
            phase=phase,
            runs=self._runs,
            deadline=self._deadline,
            trusted=self._trusted,
            status=self._status,
            reason=self._reason,
            timeline=timeline,
            folded=folded,
            plan=self._plan,
            rounds=self._rounds,
            settled=self._settled,
            decided=self._decided,
            holds=self._holds,
            compensations=self._compensations,
            abort_status=abort.status if abort else None,
            abort_reason=abort.reason if abort else "",
        )
        workflow.continue_as_new(self._request.model_copy(update={"carried": carried}))

    async def _admit(self) -> None:
        """The submitter must be an operator (a verified token) and the routing the worker's."""
        request = self._request
        admission: Admission = await workflow.execute_local_activity_method(
            SettlementActivities.admit,
            AdmitRequest(token=request.token, now=workflow.now(), ledgers=[]),
            start_to_close_timeout=CALL_TIMEOUT,
        )
        routing = admission.routing
        # The outcome is recorded through the worker's own settlement queue, whatever the request says.
        self._request = request.model_copy(update={"settlement_queue": routing.settlement_queue})
        if admission.refused:
            raise _Abort(BatchStatus.REJECTED, f"submission refused: {admission.refused}")
        operator = admission.subject in routing.operators or bool(
            set(admission.roles) & set(routing.operator_roles)
        )
        if not operator:
            raise _Abort(
                BatchStatus.REJECTED, f"submitted by {admission.subject}: only an operator submits batches"
            )
        problems = []
        if request.settlement_queue is not None and request.settlement_queue != routing.settlement_queue:
            problems.append(f"settlement_queue: {request.settlement_queue!r} is not the worker's")
        for ledger, queue in sorted((request.ledger_queues or {}).items()):
            if queue != routing.ledger_queues.get(ledger):
                problems.append(f"ledger_queues.{ledger}: {queue!r} is not the queue the worker gives it")
        if request.settlement is not None and request.settlement != routing.settlement:
            problems.append("settlement: differs from the worker's [settlement] configuration")
        if problems:
            raise _Abort(BatchStatus.REJECTED, "; ".join(problems))
        self._request = self._request.model_copy(
            update={"ledger_queues": routing.ledger_queues, "settlement": routing.settlement}
        )
        self._event("admitted", f"submitted by {admission.subject}, an operator")

    async def _settle(self) -> None:
        if self._trusted:
            await self._admit()
        self._set_status(BatchStatus.NETTING)
        accounts: BatchAccounts = await self._store_call(BatchActivities.accounts, self._request.batch_id)
        positions = await self._positions(accounts.accounts)
        exclusions = await self._screen(positions)
        while True:
            self._rounds += 1
            plan: NetPlan = await self._store_call(
                BatchActivities.net,
                NetRequest(
                    batch_id=self._request.batch_id,
                    round=self._rounds,
                    available=self._available(positions),
                    exclusions=exclusions,
                ),
            )
            self._plan = plan
            self._event(
                f"netted (round {self._rounds})",
                f"{plan.accepted} trades in, {plan.removed} removed; {len(plan.positions)} net positions",
            )
            if await self._reserve(plan):
                break
            # An account's available amount fell since it was read: release, re-read, re-net.
            await self._compensate()
            if self._rounds >= _MAX_ROUNDS or workflow.now() >= self._deadline:
                raise _Abort(BatchStatus.EXPIRED, "net debits still short after re-netting")
            positions = await self._positions(accounts.accounts)
        await self._prepare()
        self._decided = True
        self._event("commit decision recorded", "every net debit held and pinned")
        self._set_status(BatchStatus.COMMITTING)
        await self._shielded(self._committed(plan))

    # --------------------------------------------------------------- steps

    async def _positions(self, accounts: list[AccountRef]) -> dict[str, list[AccountPosition]]:
        by_ledger: dict[str, list[AccountRef]] = {}
        for ref in accounts:
            by_ledger.setdefault(ref.ledger, []).append(ref)
        results: dict[str, PositionsResult] = await self._per_ledger(
            by_ledger,
            lambda ledger, refs: self._ledger_call(
                ledger, NettingLedgerActivities.positions, PositionsRequest(accounts=refs)
            ),
        )
        return {ledger: result.positions for ledger, result in results.items()}

    async def _screen(self, positions: dict[str, list[AccountPosition]]) -> list[Exclusion]:
        exclusions: list[Exclusion] = []
        parties: set[str] = set()
        for ledger, items in sorted(positions.items()):
            for p in items:
                if p.problem:
                    exclusions.append(
                        Exclusion(ledger=ledger, account=p.account, asset=p.asset, reason=p.problem)
                    )
                else:
                    parties.update((p.account, p.owner))
        result: ScreenResult = await workflow.execute_local_activity_method(
            SettlementActivities.screen,
            ScreenRequest(parties=sorted(parties)),
            start_to_close_timeout=CALL_TIMEOUT,
        )
        hits = set(result.hits)
        for ledger, items in sorted(positions.items()):
            for p in items:
                hit = p.owner if p.owner in hits else p.account if p.account in hits else None
                if hit is not None and not p.problem:
                    exclusions.append(
                        Exclusion(
                            ledger=ledger, account=p.account, asset=p.asset, reason=f"sanctioned party: {hit}"
                        )
                    )
        self._event(
            "accounts checked and screened",
            f"{sum(len(v) for v in positions.values())} accounts, {len(exclusions)} excluded",
        )
        return exclusions

    def _available(self, positions: dict[str, list[AccountPosition]]) -> list[NetLeg]:
        return [
            NetLeg(ledger=ledger, account=p.account, asset=p.asset, amount=p.available)
            for ledger, items in sorted(positions.items())
            for p in items
            if p.available is not None
        ]

    async def _reserve(self, plan: NetPlan) -> bool:
        """Hold every net debit; False if one was short (this round's holds are then released)."""
        self._set_status(BatchStatus.RESERVING)
        assert self._request.settlement is not None
        expires_at = self._deadline + self._request.settlement.hold_backstop
        requests: dict[str, list[HoldRequest]] = {}
        for leg in plan.positions:
            if leg.amount < 0:
                requests.setdefault(leg.ledger, []).append(
                    HoldRequest(
                        hold_id=f"{self._prefix()}:r{self._rounds}:in:{leg.account}",
                        account=leg.account,
                        to_account=clearing_account(leg.asset),
                        asset=leg.asset,
                        amount=-leg.amount,
                        expires_at=expires_at,
                        trade_id=self._trade_ref(),
                    )
                )
        self._holds = {ledger: [h.hold_id for h in items] for ledger, items in requests.items()}
        for ledger, ids in sorted(self._holds.items()):
            self._compensations.append((ledger, ids))  # registered before the step it undoes
        results: dict[str, HoldOutcomes] = await self._per_ledger(
            requests,
            lambda ledger, items: self._ledger_call(
                ledger, LedgerActivities.reserve, ReserveRequest(holds=items)
            ),
        )
        short = []
        for result in results.values():
            for outcome in result.outcomes:
                if not outcome.ok:
                    short.append(outcome.detail)
                elif not outcome.open:
                    raise _Abort(BatchStatus.EXPIRED, f"hold {outcome.hold_id} was released at the ledger")
        if short:
            self._event("a net debit was short, re-netting", short[0])
            return False
        self._event("net debits held", f"{sum(len(v) for v in requests.values())} holds")
        return True

    async def _prepare(self) -> None:
        results: dict[str, HoldOutcomes] = await self._per_ledger(
            self._holds,
            lambda ledger, ids: self._ledger_call(ledger, LedgerActivities.pin, HoldRefs(hold_ids=ids)),
        )
        lost = [o for r in results.values() for o in r.outcomes if not o.ok]
        if lost:
            raise _Abort(BatchStatus.EXPIRED, f"hold {lost[0].hold_id} ended at the ledger before the commit")
        if workflow.now() >= self._deadline:
            raise _Abort(BatchStatus.EXPIRED, "every net debit was held, but only after the deadline")

    async def _commit(self, plan: NetPlan) -> None:
        pay_outs: dict[str, list[NetLeg]] = {}
        for leg in plan.positions:
            if leg.amount > 0:
                pay_outs.setdefault(leg.ledger, []).append(leg)
        ledgers = sorted(set(self._holds) | set(pay_outs))

        async def one(ledger: str) -> None:
            request = SettleRequest(
                pay_ins=self._holds.get(ledger, []),
                pay_outs=pay_outs.get(ledger, []),
                prefix=self._prefix(),
                trade_id=self._trade_ref(),
            )
            while True:
                try:
                    await self._ledger_call(ledger, NettingLedgerActivities.settle, request, forever=True)
                    break
                except ActivityError as err:
                    self._event(f"settling on {ledger} failed, retrying", cause(err))
                    await self._pause()
            self._event(
                f"settled on {ledger}", f"{len(request.pay_ins)} pay-ins, {len(request.pay_outs)} pay-outs"
            )

        await asyncio.gather(*(one(ledger) for ledger in ledgers))
        self._compensations.clear()

    async def _compensate(self) -> None:
        while self._compensations:
            ledger, ids = self._compensations.pop()
            while True:
                try:
                    await self._ledger_call(
                        ledger, LedgerActivities.release, HoldRefs(hold_ids=list(reversed(ids))), forever=True
                    )
                    break
                except ActivityError as err:
                    self._event(f"release on {ledger} failed, retrying", cause(err))
                    await self._pause()
            self._event(f"holds released on {ledger}", f"{len(ids)} holds")
        self._holds = {}

    async def _end(self, status: BatchStatus, reason: str = "") -> None:
        settled = status is BatchStatus.SETTLED
        self._settled = self._plan.accepted if settled and self._plan is not None else 0
        self._set_status(status, reason)
        view = self._view()
        while True:
            try:
                count: int = await workflow.execute_activity_method(
                    BatchActivities.finish,
                    RecordRequest(
                        batch_id=self._request.batch_id, settled=settled, reason=reason, result=view
                    ),
                    task_queue=self._request.settlement_queue or workflow.info().task_queue,
                    start_to_close_timeout=CALL_TIMEOUT,
                    retry_policy=_RETRY_FOREVER,
                )
                break
            except ActivityError as err:
                self._event("recording the outcome failed, retrying", cause(err))
                await self._pause()
        self._settled = count

    # ------------------------------------------------------------ handlers

    @workflow.query(name="status")
    def status(self) -> BatchView:
        return self._view()

    # ------------------------------------------------------------- helpers

    def _prefix(self) -> str:
        return f"netting:{self._request.batch_id}"

    def _trade_ref(self) -> str:
        return f"batch:{self._request.batch_id}"

    def _store_call(self, activity: Callable[[Any, Any], Any], argument: Any) -> Awaitable[Any]:
        return workflow.execute_activity_method(
            activity,
            argument,
            task_queue=self._request.settlement_queue or workflow.info().task_queue,
            start_to_close_timeout=_STORE_TIMEOUT,
            heartbeat_timeout=_STORE_HEARTBEAT_TIMEOUT,
            schedule_to_close_timeout=self._remaining(),
            retry_policy=RETRY,
        )

    def _ledger_call(
        self, ledger: str, activity: Callable[[Any, Any], Any], argument: Any, forever: bool = False
    ) -> Awaitable[Any]:
        assert self._request.ledger_queues is not None
        options: dict[str, Any] = {
            "task_queue": self._request.ledger_queues[ledger],
            "heartbeat_timeout": HEARTBEAT_TIMEOUT,
            "start_to_close_timeout": CALL_TIMEOUT,
        }
        if forever:
            options["retry_policy"] = _RETRY_FOREVER
        else:
            options |= {"schedule_to_close_timeout": self._remaining(), "retry_policy": RETRY}
        return workflow.execute_activity_method(activity, argument, **options)

    async def _per_ledger(
        self, items: dict[str, list[Any]], call: Callable[[str, list[Any]], Awaitable[T]]
    ) -> dict[str, T]:
        """One call per ledger, in parallel. Before the decision a failure aborts the batch."""
        ledgers = sorted(items)
        try:
            results = await asyncio.gather(*(call(ledger, items[ledger]) for ledger in ledgers))
        except ActivityError as err:
            failure = err.cause
            if isinstance(failure, ApplicationError) and failure.non_retryable:
                raise _Abort(BatchStatus.EXPIRED, f"refused: {failure.message}") from err
            raise _Abort(BatchStatus.EXPIRED, f"no answer before the deadline ({cause(err)})") from err
        return dict(zip(ledgers, results, strict=True))

    async def _shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run to completion even if the workflow is cancelled meanwhile."""
        return await shielded(
            coroutine, lambda: self._event("cancel request ignored", "compensation or commit in progress")
        )

    def _remaining(self) -> timedelta:
        return max(self._deadline - workflow.now(), timedelta(seconds=1))

    def _event(self, event: str, detail: str = "") -> None:
        self._timeline.append(TimelineEvent(at=workflow.now(), event=event, detail=detail))

    def _set_status(self, status: BatchStatus, reason: str = "") -> None:
        self._status = status
        self._reason = reason
        self._event(f"status {status.value}", reason)

    def _shown_timeline(self) -> list[TimelineEvent]:
        if not self._folded:
            return self._timeline
        head, tail = self._timeline[:_TIMELINE_HEAD], self._timeline[_TIMELINE_HEAD:]
        gap = TimelineEvent(at=tail[0].at if tail else head[-1].at, event=f"{self._folded:,} entries folded")
        return [*head, gap, *tail]

    def _view(self) -> BatchView:
        plan = self._plan
        assets: list[AssetTotals] = plan.assets if plan is not None else []
        return BatchView(
            batch_id=self._request.batch_id,
            workflow_id=workflow.info().workflow_id,
            status=self._status,
            reason=self._reason,
            deadline=self._deadline,
            trades=self._request.trade_count,
            settled=self._settled,
            removed=plan.removed if plan is not None else 0,
            rounds=self._rounds,
            assets=assets,
            positions=plan.positions if plan is not None else [],
            timeline=self._shown_timeline(),
            fingerprint=self._request.fingerprint,
        )
