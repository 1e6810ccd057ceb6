"""The settlement saga: one durable workflow per trade.

    admit ── validate ── screen ── affirmations ── approvals ── (SCHEDULED: until the intended
          settlement time) ── reserve (a short leg recycles) ── pin ── decide ── commit

Every ending but SETTLED releases what was reserved. The guarantees (why a hold cannot
expire between the commit decision and the commits, cancellation, compensation,
partial fills) and the full state diagram are in docs/design.md.

After the decision the legs on chains commit first, one chain at a time, each until
final (``SettlementRequest.chain_ledgers``); a chain lock that a reorganisation removed
is placed again, and the trade waits in AWAITING_OPERATOR while it cannot be. A ledger
that refuses a step after holds were placed ends the trade RELEASED, not REJECTED
(nothing reserved). See docs/finality.md.

After ``temporal workflow reset`` (the Web UI's Reset) a trade re-runs from an earlier
point of its history and meets, under its idempotent hold keys, what its earlier run
did at the ledgers. A hold found committed, by a reservation, a pin or a refused
release, means that run took the commit decision: it stands, the leg is COMMITTED and
the rest of the trade is committed, never released; a trade whose holds are all
committed ends SETTLED without moving anything again. A partial trade follows its
earlier run's fill attempts at the ledgers (``look_up``), so a committed fill counts
with its amounts. See docs/operations.md, "Resetting a trade".

This module is the saga as plain deterministic Python (``TradeSaga``); its Temporal
definition, ``SettlementWorkflow`` in ``workflows/settlement.py``, only hands it the
run and the handlers. The worker passes this module through the sandbox
(``worker.TRADE_WORKFLOW_MODULES``), so it keeps to the workflow rules on its own:
``workflow.now()`` and ``workflow.*`` waits only, no I/O, no state at module level.
Why: docs/decisions/0003-sagas-passed-through-the-sandbox.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.ledger import LedgerActivities
    from domain import (
        MAX_FILLS_SHOWN,
        AccountCheck,
        ApprovalMessage,
        AuthError,
        CancelMessage,
        CarriedEscrow,
        CheckAccountsBatch,
        CheckAccountsRequest,
        Decision,
        FieldError,
        FillRule,
        FillView,
        HoldOutcome,
        HoldOutcomes,
        HoldRefs,
        HoldRefsBatch,
        HoldRequest,
        HoldStatus,
        LegState,
        ReserveBatch,
        ReserveRequest,
        SettlementRequest,
        TradeStatus,
        TradeView,
        UnknownHold,
    )

# Not passed through here, so that the replay tests check it in the sandbox with this
# module; the worker passes both through (worker.WORKFLOW_RUNNER).
from ._saga import (
    Problem,
    TradeSagaBase,
    _Abort,
    abort_for,
    accepted_subject,
    account_checks,
    cause,
    code_of,
    count,
    refusal,
    shielded,
    verified,
)
from .calls import STUCK_AFTER, commit_locally, ledger_call, local_call

T = TypeVar("T")

_LOCAL = "*local"  # (trades without local_steps) the key of the commits on all local ledgers
_STUCK_RETRY = timedelta(seconds=5)
_STUCK_RETRY_MAX = timedelta(minutes=10)
_OPERATOR_RETRY_MAX = timedelta(minutes=1)  # an operator who restored the funds waits at most this
# workflow.patched id: an abort after every pin looks the holds up before releasing them
# (TradeSaga._unwind); trades that aborted there before it replay without. See
# docs/decisions/0010-reset-reads-the-ledgers.md.
_LOOK_BEFORE_RELEASE = "look-up-before-release"


# Each one-ledger activity's form for several ledgers at once, and its request type.
_BATCHES: dict[Callable[..., Any], tuple[Callable[..., Any], type]] = {
    LedgerActivities.check_accounts: (LedgerActivities.check_accounts_local, CheckAccountsBatch),
    LedgerActivities.reserve: (LedgerActivities.reserve_local, ReserveBatch),
    LedgerActivities.pin: (LedgerActivities.pin_local, HoldRefsBatch),
    LedgerActivities.commit: (LedgerActivities.commit_local, HoldRefsBatch),
    LedgerActivities.release: (LedgerActivities.release_local, HoldRefsBatch),
    LedgerActivities.look_up: (LedgerActivities.look_up_local, HoldRefsBatch),
}


class TradeSaga(TradeSagaBase):
    """One trade's saga: its state, its steps and what its handlers do.

    ``SettlementWorkflow`` (``workflows/settlement.py``) makes one in its
    ``@workflow.init`` and hands it its run, its query and its signals and updates.
    """

    def __init__(self, request: SettlementRequest) -> None:
        super().__init__(request)
        instruction = request.instruction
        # What the current reservation attempt holds: the whole trade, or one fill of a
        # partial trade (``_rule`` is None for a trade that settles only whole).
        self._rule = _fill_rule(request)
        self._attempt = 1
        self._amounts = [leg.amount for leg in instruction.legs]
        self._settled = [Decimal(0)] * len(instruction.legs)
        # The most recent fills (MAX_FILLS_SHOWN at most: the state stays bounded however
        # many a trade makes), and how many settled in all.
        self._fills: list[FillView] = []
        self._fill_count = 0
        self._hold_ids = [self._hold_id(i) for i in range(len(instruction.legs))]
        self._leg_states = [LegState.PENDING] * len(instruction.legs)
        self._leg_details = [""] * len(instruction.legs)
        self._approved: list[str] = []
        self._cancel: CancelMessage | None = None
        self._cancelled_by = ""
        self._decided = False
        self._pinned = False  # every hold of this attempt pinned, no decision yet (see _unwind)
        self._compensations: list[int] = []  # leg indexes to release, LIFO
        self._released_held = False  # a compensation released a hold that was placed
        # One call per step for all the local ledgers (_step), or, for a trade whose
        # client predates that, one per local ledger (_per_ledger).
        self._batched = request.local_steps
        if self._resume is not None and self._resume.escrow is not None:
            self._restore_escrow(self._resume.escrow)

    def _restore_escrow(self, carried: CarriedEscrow) -> None:
        """Take up what the trade's last run knew (a continued run only)."""
        self._attempt = carried.attempt
        self._amounts, self._settled = list(carried.amounts), list(carried.settled)
        self._fills, self._fill_count = list(carried.fills), carried.fill_count
        self._hold_ids = list(carried.hold_ids)
        self._leg_states, self._leg_details = list(carried.leg_states), list(carried.leg_details)
        self._approved = list(carried.approved)
        self._cancel, self._cancelled_by = carried.cancel, carried.cancelled_by
        self._decided, self._pinned = carried.decided, carried.pinned
        self._compensations = list(carried.compensations)
        self._released_held = carried.released_held

    def _carry_own(self) -> dict[str, Any]:
        return {
            "escrow": CarriedEscrow(
                attempt=self._attempt,
                amounts=self._amounts,
                settled=self._settled,
                fills=self._fills,
                fill_count=self._fill_count,
                hold_ids=self._hold_ids,
                leg_states=self._leg_states,
                leg_details=self._leg_details,
                approved=self._approved,
                cancel=self._cancel,
                cancelled_by=self._cancelled_by,
                decided=self._decided,
                pinned=self._pinned,
                compensations=self._compensations,
                released_held=self._released_held,
            )
        }

    # ----------------------------------------------------------------- run

    async def run(self) -> TradeView:
        try:
            if self._resume is None:
                self._refuse_forged()
                if self._trusted:
                    await self._admit()
                self._event("submitted", f"deadline {self._deadline.isoformat()}")
            elif self._abort is not None:  # continued while releasing: release on
                raise self._abort
            await self._settle()
        except _Abort as abort:
            await self._shielded(self._unwind(abort.status, abort.reason))
        except asyncio.CancelledError:
            self._event("cancel requested through Temporal")
            await self._shielded(self._unwind(TradeStatus.CANCELLED, "workflow cancelled through Temporal"))
        self._publish()
        self._ended()
        # The outcome is final: a cancel request arriving now must not replace it.
        await self._shielded(workflow.wait_condition(workflow.all_handlers_finished))
        return self.view()

    def _routed(self) -> None:
        self._rule = _fill_rule(self._request)

    async def _settle(self) -> None:
        # A continued run resumes at the phase its last run continued at (the wait points:
        # affirmation, approval, reserve, between fills, commit; docs/design.md).
        phase = self._resume.phase if self._resume is not None else None
        if phase is None:
            await self._validate()
            if self._trusted:
                self._authorize_submission()
            await self._screen()
        if phase in (None, "affirmation") and self._trusted:
            await self._await_consent(lambda: self._cancel is not None)
            self._raise_if_cancelled()
        if phase in (None, "affirmation", "approval"):
            await self._await_approvals()
        if phase in (None, "affirmation", "approval", "scheduled"):
            await self._await_settlement_time(lambda: self._cancel is not None)
            self._raise_if_cancelled()
        while True:
            if phase != "commit":
                await self._reserve_all(resumed=phase == "reserve")
                # Either may find the decision taken by an earlier run (see _resume_decided).
                if not self._decided:
                    await self._prepare()
                if not self._decided:
                    self._decide()
            phase = None
            self._stage = "commit"
            await self._shielded(self._commit_all())
            self._stage = None
            if not self._rest_open():
                break
            if self._history_due():  # between two fills
                await self._continue_as_new("fill")
        self._set_status(TradeStatus.SETTLED)

    async def _unwind(self, status: TradeStatus, reason: str) -> None:
        """Release what the trade holds and end it unsettled, unless a hold is found committed."""
        self._stage, self._abort = "unwind", _Abort(status, reason)
        if self._pinned and workflow.patched(_LOOK_BEFORE_RELEASE):
            # Every hold is pinned, the point where a run takes its decision: an earlier run
            # of this trade (before a reset to here) may have taken it and committed some
            # legs. Releasing the others, one call per ledger, would break the trade: look
            # first. Patched, so that a trade that aborted here before replays as it ran.
            await self._look_up_committed()
        if not self._committed_legs():
            await self._compensate()
        if not self._committed_legs():
            self._end_unsettled(status, reason)
            return
        # Committed by an earlier run of this trade (before a reset): its decision stands.
        self._resume_decided()
        await self._commit_all()
        if self._rest_open():  # a partial trade: this fill counts, the rest is not tried
            self._end_unsettled(status, reason)
        else:
            self._set_status(TradeStatus.SETTLED)

    # --------------------------------------------------------------- steps

    def _checks_with_admission(self) -> dict[str, list[AccountCheck]]:
        if not (self._request.token_rules and self._batched):
            return {}
        return account_checks(self._instruction)

    async def _validate(self) -> None:
        checks = account_checks(self._instruction)
        requests = {
            ledger: CheckAccountsRequest(checks=items, ledger=ledger) for ledger, items in checks.items()
        }
        checked = self._checked
        if checked is not None and checked.checked is not None:
            # The admission checked the local ledgers (SettlementActivities.admit_checked).
            rest = {ledger: r for ledger, r in requests.items() if ledger not in checked.checked_ledgers}
            results = [checked.checked]
            if rest:
                results += await self._step(LedgerActivities.check_accounts, rest)
        elif self._batched:
            results = await self._step(LedgerActivities.check_accounts, requests)
        else:
            results = list(
                (
                    await self._per_ledger(
                        checks,
                        lambda ledger, items: self._ledger_call(
                            ledger, LedgerActivities.check_accounts, requests[ledger]
                        ),
                    )
                ).values()
            )
        problems = self._record_checks(results)
        if not problems and self._rule is not None:
            problems = self._partial_problems()
        self._reject_invalid(problems)
        self._event("accounts validated")

    async def _await_approvals(self) -> None:
        if not self._instruction.approvers:
            return
        if self._status is not TradeStatus.AWAITING_APPROVAL:  # else resumed by a continued run
            self._set_status(TradeStatus.AWAITING_APPROVAL)
        await self._wait_until(
            lambda: not self._missing_approvals() or self._cancel is not None,
            self._deadline,
            phase="approval",
        )
        self._raise_if_cancelled()
        if missing := self._missing_approvals():
            raise _Abort(TradeStatus.EXPIRED, f"no approval from {', '.join(missing)} before the deadline")

    async def _reserve_all(self, resumed: bool = False) -> None:
        """Reserve every leg of this attempt; a short leg recycles (``resumed``: in a continued run)."""
        policy = self._request.policy()
        if not resumed:
            if not self._fill_count:
                self._set_status(TradeStatus.RESERVING)
            self._interval, self._waiting_since = policy.recycle_interval, workflow.now()
        expires_at = self._deadline + policy.hold_backstop
        while True:
            self._raise_if_cancelled()
            pending = [i for i, state in enumerate(self._leg_states) if state is not LegState.HELD]
            for i in pending:
                if i not in self._compensations:
                    self._compensations.append(i)  # registered before the step it undoes
            outcomes = await self._holds_call(
                pending,
                LedgerActivities.reserve,
                lambda ledger, items: ReserveRequest(
                    holds=[self._hold_request(i, expires_at) for i in items],
                    ledger=ledger,
                    report_available=self._rule is not None,
                ),
            )
            for i, outcome in outcomes.items():
                self._record_reservation(i, outcome)
            if self._committed_legs():
                self._resume_decided()
                return
            if released := [i for i in pending if self._leg_states[i] is LegState.RELEASED]:
                # The key was released at the ledger (by an earlier run, before a reset): it
                # can never be held again.
                if self._rule is None:
                    raise _Abort(TradeStatus.EXPIRED, f"hold of leg {released[0]} was released at the ledger")
                await self._follow_earlier_run()
                if self._decided or all(state is LegState.HELD for state in self._leg_states):
                    return
                if workflow.now() >= self._deadline:
                    raise _Abort(TradeStatus.EXPIRED, "the deadline passed before the rest was reserved")
                continue
            if all(state is LegState.HELD for state in self._leg_states):
                return
            if (fill := self._smaller_fill(outcomes)) is not None:
                await self._resize(fill)
                continue
            if workflow.now() >= self._deadline:
                raise _Abort(TradeStatus.EXPIRED, f"short at the deadline: {self._shortfall()}")
            count("dvp_recycles", "Reservation attempts that found a leg short and recycle")
            self._recycled(self._shortfall())
            await self._wait_until(
                lambda: self._cancel is not None,
                min(workflow.now() + self._interval, self._deadline),
                phase="reserve",
            )
            self._interval = policy.recycle_after(self._interval, workflow.now() - self._waiting_since)

    async def _prepare(self) -> None:
        outcomes = await self._holds_call(list(range(len(self._hold_ids))), LedgerActivities.pin, self._refs)
        for i, outcome in outcomes.items():
            if outcome.committed:
                self._record_committed(i)
        if self._committed_legs():
            self._resume_decided()
            return
        lost = [i for i, outcome in outcomes.items() if not outcome.ok]
        if lost:
            for i in lost:
                self._leg_states[i] = LegState.RELEASED
                self._leg_details[i] = outcomes[i].detail
            raise _Abort(TradeStatus.EXPIRED, f"hold of leg {lost[0]} ended at the ledger before the commit")
        self._pinned = True
        self._raise_if_cancelled()
        if workflow.now() >= self._deadline:
            raise _Abort(TradeStatus.EXPIRED, "every leg was held, but only after the deadline")

    def _decide(self) -> None:
        # The point of no return: from here on, only commits.
        self._decided = True
        detail = "every leg held and pinned"
        if self._rule is not None:
            detail = f"fill {self._fill_count + 1}: {detail}"
        self._event("commit decision recorded", detail)
        self._set_status(TradeStatus.COMMITTING)
        # Not published here: a trade whose commits succeed at once goes from its last
        # published status to SETTLED in one upsert; one whose commits keep failing
        # publishes COMMITTING in _stuck. The decision itself is recorded when the
        # commits are scheduled (see ledger_call).

    def _resume_decided(self) -> None:
        """A leg was found committed at its ledger: an earlier run of this trade (before a
        reset) took the commit decision. It stands: from here on, only commits."""
        self._decided = True
        committed = self._committed_legs()
        legs = f"leg{'s' if len(committed) > 1 else ''} {', '.join(map(str, committed))}"
        detail = f"{legs} committed at the ledger"
        if len(committed) < len(self._leg_states):
            detail += "; committing the rest"
        if self._rule is not None:
            detail = f"fill {self._fill_count + 1}: {detail}"
        self._event("commit decision found taken by an earlier run", detail)
        self._set_status(TradeStatus.COMMITTING)

    async def _commit_all(self) -> None:
        await self._commit_chains()
        remaining = [i for i, state in enumerate(self._leg_states) if state is not LegState.COMMITTED]
        pause = _STUCK_RETRY
        while remaining:
            try:
                outcomes = await self._holds_call(
                    remaining, LedgerActivities.commit, self._refs, forever=True
                )
            except FailureError as err:
                self._record_commits(self._done_before(err))
                pause = await self._stuck("commit failed, retrying", err, pause)
                continue
            self._record_commits(outcomes)
            remaining = [i for i in remaining if self._leg_states[i] is not LegState.COMMITTED]
            if refused := [outcomes[i] for i in remaining if i in outcomes]:
                pause = await self._stuck("commit refused, retrying", refused[0].detail, pause)

    async def _commit_chains(self) -> None:
        """Commit the legs on the trade's chain ledgers, one ledger at a time, each until final.

        A lock that vanished (a reorganisation deeper than its ledger's confirmations) is
        placed again before anything else is committed (``_place_again``).
        """
        if not self._batched:
            return
        for ledger in self._request.chain_ledgers:
            legs = [i for i, leg in enumerate(self._instruction.legs) if leg.ledger == ledger]
            pause = _STUCK_RETRY
            while legs:
                try:
                    outcomes = await self._holds_call(legs, LedgerActivities.commit, self._refs, forever=True)
                except FailureError as err:
                    self._record_commits(self._done_before(err))
                    pause = await self._stuck("commit failed, retrying", err, pause)
                    continue
                self._record_commits(outcomes)
                legs = [i for i in legs if self._leg_states[i] is not LegState.COMMITTED]
                vanished = [i for i in legs if outcomes[i].code == UnknownHold.code]
                if vanished:
                    await self._place_again(vanished)
                elif legs:
                    pause = await self._stuck("commit refused, retrying", outcomes[legs[0]].detail, pause)

    async def _place_again(self, legs: list[int]) -> None:
        """Place the vanished holds of ``legs`` again under their ids, without expiry; wait until it can."""
        for i in legs:
            self._leg_states[i] = LegState.PENDING
            self._leg_details[i] = "its hold vanished at the ledger after the commit decision"
            self._event(
                f"leg {i} hold vanished",
                f"{self._instruction.legs[i].ledger} no longer has hold {self._hold_ids[i]} "
                "(a reorganisation deeper than its confirmations?); placing it again under the same id",
            )
        pause = _STUCK_RETRY
        while legs:
            try:
                outcomes = await self._holds_call(
                    legs,
                    LedgerActivities.reserve,
                    lambda ledger, items: ReserveRequest(
                        holds=[self._hold_request(i, None) for i in items], ledger=ledger
                    ),
                    forever=True,
                )
            except FailureError as err:
                pause = await self._stuck("placing a vanished hold again failed, retrying", err, pause)
                continue
            for i, outcome in outcomes.items():
                if outcome.ok and outcome.status is not HoldStatus.RELEASED:
                    self._leg_states[i] = LegState.HELD
                    self._leg_details[i] = ""
                    self._event(f"leg {i} held again", self._describe_leg(i))
                else:
                    self._leg_details[i] = outcome.detail or "the hold's key was released at the ledger"
            legs = [i for i in legs if self._leg_states[i] is not LegState.HELD]
            if not legs:
                if self._status is TradeStatus.AWAITING_OPERATOR:
                    self._set_status(TradeStatus.COMMITTING, "every vanished hold was placed again")
                return
            reason = self._operator_reason(legs)
            if self._status is not TradeStatus.AWAITING_OPERATOR or self._reason != reason:
                self._set_status(TradeStatus.AWAITING_OPERATOR, reason)
            self._publish()  # an operator looking for trades that need one finds this one
            await self._sleep(pause)
            pause = min(pause * 2, _OPERATOR_RETRY_MAX)

    def _operator_reason(self, missing: list[int]) -> str:
        lost = "; ".join(f"leg {i} ({self._leg_details[i]})" for i in missing)
        committed = [str(i) for i, state in enumerate(self._leg_states) if state is LegState.COMMITTED]
        held = [str(i) for i, state in enumerate(self._leg_states) if state is LegState.HELD]
        return (
            f"after the commit decision the hold of {lost} vanished and cannot be placed again; "
            f"held: {', '.join(held) or 'none'}; committed: {', '.join(committed) or 'none'}; "
            "retrying until the payer's funds are back (see docs/finality.md)"
        )

    def _done_before(self, err: FailureError) -> dict[int, HoldOutcome]:
        """The holds a failed batch call did complete, from the failure's details (see ``_every``)."""
        failure = err.cause if isinstance(err, ActivityError) else err
        details = failure.details if isinstance(failure, ApplicationError) else ()
        try:
            done = HoldOutcomes.model_validate(details[0]) if details else HoldOutcomes(outcomes=[])
        except ValueError:  # not ours: a failure without the batch's outcomes
            return {}
        index = {hold_id: i for i, hold_id in enumerate(self._hold_ids)}
        return {index[o.hold_id]: o for o in done.outcomes if o.hold_id in index}

    def _record_commits(self, outcomes: dict[int, HoldOutcome]) -> None:
        """Each leg whose commit succeeded is COMMITTED, whatever happened to the others."""
        for i, outcome in outcomes.items():
            if outcome.ok and self._leg_states[i] is not LegState.COMMITTED:
                self._leg_states[i] = LegState.COMMITTED
                self._leg_details[i] = ""
                self._event(f"leg {i} committed", self._describe_leg(i))

    async def _look_up_committed(self) -> None:
        """Record each leg whose hold its ledger reports committed; retried until every ledger answers."""
        legs = list(range(len(self._hold_ids)))
        pause = _STUCK_RETRY
        while True:
            try:
                outcomes = await self._holds_call(legs, LedgerActivities.look_up, self._refs, forever=True)
            except FailureError as err:
                pause = await self._stuck("look-up failed, retrying", err, pause)
                continue
            for i, outcome in outcomes.items():
                if outcome.committed:
                    self._record_committed(i)
            return

    async def _compensate(self) -> None:
        to_release = list(reversed(self._compensations))
        pause = _STUCK_RETRY
        while to_release:
            try:
                outcomes = await self._holds_call(
                    to_release, LedgerActivities.release, self._refs, forever=True
                )
            except FailureError as err:
                pause = await self._stuck("release failed, retrying", err, pause)
                continue
            for i, outcome in outcomes.items():
                if outcome.ok:
                    self._leg_states[i] = LegState.RELEASED
                    placed = outcome.placed
                    self._released_held = self._released_held or placed
                    count(
                        "dvp_compensations",
                        "Legs released by a compensation, by ledger and whether a hold was there",
                        ledger=self._instruction.legs[i].ledger,
                        held=str(bool(placed)).lower(),
                    )
                    self._event(f"leg {i} released", "hold returned" if placed else "nothing was held")
                elif outcome.committed:
                    self._record_committed(i)
                else:
                    self._event(f"leg {i} could not be released", outcome.detail)
            to_release = []
        self._compensations.clear()

    # ----------------------------------------------------- partial fills

    def _partial_problems(self) -> list[FieldError]:
        delivery, payment = self._instruction.legs
        owner = self._owners.get
        if owner(delivery.from_) == owner(payment.to) and owner(delivery.to) == owner(payment.from_):
            return []
        message = (
            "partial settlement needs a simple DvP: the owner of legs[0].from must be paid by "
            "legs[1] and the owner of legs[0].to must pay it"
        )
        return [FieldError(field="partial", message=message)]

    def _smaller_fill(self, outcomes: dict[int, HoldOutcome]) -> Decimal | None:
        """A fill smaller than the one tried that every leg can cover now, if acceptable."""
        if self._rule is None:
            return None

        def available(i: int) -> Decimal | None:  # None: the leg is held, it does not limit
            if self._leg_states[i] is LegState.HELD:
                return None
            outcome = outcomes.get(i)
            return outcome.available if outcome and outcome.available is not None else Decimal(0)

        settled, tried = self._settled[0], self._amounts[0]
        fill = self._rule.largest_fill(settled, tried, available(0), available(1))
        if fill >= tried or not self._rule.acceptable(settled, fill):
            return None
        return fill

    async def _resize(self, fill: Decimal) -> None:
        # A hold cannot shrink: release this attempt's holds, then reserve the fill
        # under new keys. Not shielded: a cancel meanwhile releases everything anyway.
        leg = self._instruction.legs[0]
        self._event(
            f"fill of {format(fill, 'f')} {leg.asset} possible",
            f"short: {self._shortfall()}; releasing the larger holds",
        )
        await self._compensate()
        self._next_attempt(fill)

    async def _follow_earlier_run(self) -> None:
        """This attempt's keys were released at the ledger: an earlier run of the trade
        (before a reset) resized the fill or ended the attempt, and the amounts of its next
        attempt, sized by what was available then, are known only to the ledgers.

        Release what is left of the attempt, then look up the next attempt's keys and take
        their amounts: a committed hold makes it a fill (decided, see _resume_decided), one
        held on every leg is taken over, and one released or held on some legs only is
        released in turn and passed. Returns at the first attempt the earlier run did not
        reach, whose legs are then reserved afresh.
        """
        legs = list(range(len(self._hold_ids)))
        passed = "released by an earlier run"
        while True:
            self._event(f"fill attempt {self._attempt} {passed}", ", ".join(self._hold_ids))
            self._compensations = [
                i for i in self._compensations if self._leg_states[i] is not LegState.RELEASED
            ]
            await self._compensate()
            self._next_attempt(self._instruction.legs[0].amount - self._settled[0])
            self._compensations = list(legs)  # whatever the earlier run placed under these keys
            outcomes = await self._holds_call(legs, LedgerActivities.look_up, self._refs)
            found = {i: outcome for i, outcome in outcomes.items() if outcome.ok}
            if not found:
                return
            for i, outcome in found.items():
                if outcome.status is not HoldStatus.RELEASED and outcome.amount:
                    self._amounts[i] = outcome.amount
                self._record_reservation(i, outcome)
            if self._committed_legs():
                self._resume_decided()
                return
            if all(state is LegState.HELD for state in self._leg_states):
                return
            if not any(state is LegState.RELEASED for state in self._leg_states):
                passed = "held in part by an earlier run; releasing it"
            else:
                passed = "released by an earlier run"

    def _rest_open(self) -> bool:
        """After a commit: record a partial trade's fill; True while a rest remains to settle."""
        if self._rule is None:
            return False
        self._settled = [s + a for s, a in zip(self._settled, self._amounts, strict=True)]
        self._fill_count = number = self._fill_count + 1
        if len(self._fills) >= MAX_FILLS_SHOWN:
            del self._fills[0]  # the totals stay in self._settled and the reason
        self._fills.append(
            FillView(
                number=number,
                quantity=self._amounts[0],
                amount=self._amounts[1],
                hold_ids=list(self._hold_ids),
                settled_at=workflow.now(),
            )
        )
        legs = self._instruction.legs
        count("dvp_fills", "Fills of partial trades settled")
        self._event(
            f"fill {number} settled",
            f"{format(self._amounts[0], 'f')} {legs[0].asset} against "
            f"{format(self._amounts[1], 'f')} {legs[1].asset}; {self._filled()}",
        )
        rest = legs[0].amount - self._settled[0]
        if rest == 0:
            return False
        self._set_status(TradeStatus.PARTIALLY_SETTLED, f"{self._filled()}; the rest recycles")
        self._next_attempt(rest)
        return True

    def _next_attempt(self, quantity: Decimal) -> None:
        assert self._rule is not None
        self._attempt += 1
        self._amounts = [quantity, self._rule.payment_for(self._settled[0], quantity)]
        self._hold_ids = [self._hold_id(i) for i in range(len(self._hold_ids))]
        self._leg_states = [LegState.PENDING] * len(self._hold_ids)
        self._leg_details = [""] * len(self._hold_ids)
        self._compensations.clear()
        self._decided = False
        self._pinned = False

    def _filled(self) -> str:
        leg = self._instruction.legs[0]
        return f"{format(self._settled[0], 'f')} of {format(leg.amount, 'f')} {leg.asset} settled"

    def _end_unsettled(self, status: TradeStatus, reason: str) -> None:
        """End without settling (the rest of) the trade; one that filled some ends SETTLED_PARTIAL."""
        if status is TradeStatus.REJECTED and self._released_held:
            # REJECTED says nothing was reserved; this trade's holds were placed, then released.
            status, reason = TradeStatus.RELEASED, f"{reason}; every hold placed was released"
        if self._fill_count:
            status, reason = TradeStatus.SETTLED_PARTIAL, f"{self._filled()}, the rest released: {reason}"
        self._set_status(status, reason)

    def _hold_id(self, i: int) -> str:
        key = f"{self._instruction.trade_id}#{i}"
        return key if self._rule is None else f"{key}.{self._attempt}"

    # ------------------------------------------------------------ handlers

    def _approve_problem(self, party: str) -> str:
        """Why ``party`` may not approve now ("" if it may)."""
        if self._status.terminal:
            return Problem(f"trade is already {self._status.value}", "ended")
        if not self._instruction.approvers:
            return Problem("trade needs no approval", "no_approval_needed")
        if party not in self._instruction.approvers:
            approvers = ", ".join(self._instruction.approvers)
            return Problem(
                f"{party} is not an approver of this trade (approvers: {approvers})", "not_an_approver"
            )
        if party in self._approved:
            return Problem(f"{party} has already approved", "already_approved")
        return ""

    def check_approve(self, message: ApprovalMessage) -> None:
        """Refuse an approval (before it is recorded) without a valid token of a named approver."""
        if not self._trusted:
            return  # a trade from before tokens answers as it did: in the handler
        try:
            party = verified(message.token, message.party).subject
        except AuthError as exc:
            raise refusal(str(exc), "Unauthenticated", request="approval") from None
        if problem := self._approve_problem(party):
            raise refusal(problem, request="approval")

    def approve(self, message: ApprovalMessage) -> Decision:
        """The approve update (after ``check_approve``)."""
        party = accepted_subject(message.token)[0] if self._trusted else message.party
        if problem := self._approve_problem(party):
            return self._rejected(f"approval by {party}", problem)
        self._approved.append(party)
        self._event(f"approved by {party}")
        return Decision(accepted=True)

    def approve_signal(self, message: ApprovalMessage) -> None:
        """The approve signal: a refused one changes nothing and is only counted."""
        if not self._trusted:
            self.approve(message)
            return
        try:
            party = verified(message.token, message.party).subject
        except AuthError:
            self._refused_signal("approval", "Unauthenticated")
            return
        if problem := self._approve_problem(party):
            self._refused_signal("approval", code_of(problem, "refused"))
            return
        self._approved.append(party)
        self._event(f"approved by {party}", "signal")

    def _cancel_problem(self, party: str, roles: tuple[str, ...], owners_known: bool) -> str:
        """Why ``party`` may not cancel now ("" if it may, or if that waits on the owners)."""
        if self._status.terminal:
            return Problem(f"trade is already {self._status.value}", "ended")
        if self._decided:
            return Problem("the commit decision is recorded; the trade can no longer be cancelled", "decided")
        if self._cancel is not None:
            return Problem(f"cancel already accepted from {self._cancelled_by}", "already_cancelled")
        if self._is_operator(party, roles) or not owners_known:
            return ""
        if party not in set(self._owners.values()):
            return Problem(f"{party} is neither a party to this trade nor an operator", "not_a_party")
        return ""

    def check_cancel(self, message: CancelMessage) -> None:
        """Refuse a cancel (before it is recorded) without a valid token of a party or an operator."""
        if not self._trusted:
            return
        try:
            principal = verified(message.token, message.party)
        except AuthError as exc:
            raise refusal(str(exc), "Unauthenticated", request="cancel") from None
        if problem := self._cancel_problem(principal.subject, principal.roles, self._policy_known):
            raise refusal(problem, request="cancel")

    async def cancel(self, message: CancelMessage, signal: bool = False) -> Decision:
        """The cancel update (after ``check_cancel``) or signal."""
        if not self._trusted:
            return await self._cancel_by_name(message)
        if signal:
            try:
                principal = verified(message.token, message.party)
            except AuthError as exc:
                self._refused_signal("cancel", "Unauthenticated")
                return Decision(accepted=False, reason=str(exc))
            party, roles = principal.subject, principal.roles
        else:
            party, roles = accepted_subject(message.token)
        what = f"cancel by {party}"
        # Whether a party may cancel depends on the accounts' owners, known once the
        # trade is validated and screened; an operator may at once.
        if not self._is_operator(party, roles):
            await self.screened()
        if problem := self._cancel_problem(party, roles, owners_known=True):
            if signal:
                self._refused_signal("cancel", code_of(problem, "refused"))
                return Decision(accepted=False, reason=problem)
            return self._rejected(what, problem)
        self._cancel = message
        self._cancelled_by = party
        self._event(f"cancel accepted from {party}", message.reason)
        return Decision(accepted=True)

    async def _cancel_by_name(self, message: CancelMessage) -> Decision:
        # Trades started before tokens: the party is the name the message gives.
        await self.screened()
        party, what = message.party, f"cancel by {message.party}"
        if self._status.terminal:
            return self._rejected(what, f"trade is already {self._status.value}", "ended")
        if self._decided:
            return self._rejected(
                what, "the commit decision is recorded; the trade can no longer be cancelled", "decided"
            )
        if self._cancel is not None:
            return self._rejected(
                what, f"cancel already accepted from {self._cancel.party}", "already_cancelled"
            )
        owners = set(self._owners.values())
        if party not in owners and party not in self._operators:
            return self._rejected(
                what, f"{party} is neither a party to this trade nor an operator", "not_a_party"
            )
        self._cancel = message
        self._cancelled_by = party
        self._event(f"cancel accepted from {party}", message.reason)
        return Decision(accepted=True)

    # ------------------------------------------------------------- helpers

    async def _stuck(self, what: str, err: FailureError | str, pause: timedelta) -> timedelta:
        """A call that must succeed has failed for a while: say so, wait, return the next pause."""
        self._event(what, err if isinstance(err, str) else cause(err))
        self._publish()  # an operator looking for stuck trades sees this one's status
        await self._sleep(pause)
        return min(pause * 2, _STUCK_RETRY_MAX)

    async def _sleep(self, pause: timedelta) -> None:
        """A retry's pause; a wait point after the decision or while releasing (``_stage``)."""
        if self._stage is not None and self._history_due():
            await self._continue_as_new(self._stage)
        await workflow.sleep(pause)

    def _raise_if_cancelled(self) -> None:
        if self._cancel is not None:
            reason = f"cancelled by {self._cancelled_by}"
            if self._cancel.reason:
                reason += f": {self._cancel.reason}"
            raise _Abort(TradeStatus.CANCELLED, reason)

    def _missing_approvals(self) -> list[str]:
        return [a for a in self._instruction.approvers if a not in self._approved]

    async def _shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run to completion even if the workflow is cancelled meanwhile."""
        return await shielded(
            coroutine, lambda: self._event("cancel request ignored", "compensation or commit in progress")
        )

    def _remaining(self) -> timedelta:
        return max(self._deadline - workflow.now(), timedelta(seconds=1))

    def _ledger_call(
        self, ledger: str, activity: Callable[[Any, Any], Any], argument: Any, forever: bool = False
    ) -> Awaitable[Any]:
        if not self._request.is_local(ledger):
            self._publish()  # the call goes through the server: show where the trade stands
        return ledger_call(self._request, ledger, activity, argument, schedule_to_close=self._limit(forever))

    def _limit(self, forever: bool) -> timedelta:
        # Before the decision a call is bounded by the deadline; after it, by STUCK_AFTER
        # and then called again (see _stuck) for as long as it takes.
        return STUCK_AFTER if forever else self._remaining()

    async def _step(
        self, activity: Callable[[Any, Any], Any], requests: dict[str, Any], forever: bool = False
    ) -> list[Any]:
        """One step of the saga, ``requests`` holding each ledger's; its results, in no set order.

        Every local ledger's request goes in one activity, ``activity``'s batch form (see
        ``_BATCHES``): a local activity before the decision (``local_call``), an ordinary
        one for the commits (``commit_locally``). Each other ledger is called on its own
        queue, all in parallel. Before the decision a failure aborts the trade.
        """
        ledgers = sorted(requests)
        local = [lg for lg in ledgers if self._request.is_local(lg)]
        calls: list[Awaitable[Any]] = []
        if local:
            batch_activity, batch_type = _BATCHES[activity]
            batch = batch_type(items=[requests[lg] for lg in local])
            if self._decided:
                calls.append(
                    commit_locally(self._request, batch, batch_activity, schedule_to_close=STUCK_AFTER)
                )
            else:
                calls.append(local_call(batch_activity, batch, schedule_to_close=self._limit(forever)))
        calls += [self._ledger_call(lg, activity, requests[lg], forever) for lg in ledgers if lg not in local]
        try:
            return list(await asyncio.gather(*calls))
        except FailureError as err:  # an ActivityError, or a local activity's own failure
            if forever:
                raise
            raise abort_for(err) from err

    async def _per_ledger(
        self,
        items: dict[str, list[Any]],
        call: Callable[[str, list[Any]], Awaitable[T]],
        abort_on_error: bool = True,
    ) -> dict[str, T]:
        """For trades without ``local_steps`` (their client predates it): one call per ledger, in parallel.

        Before the decision a failure aborts the trade. Kept exactly as those trades made
        their calls, so that they replay; when it may go:
        docs/decisions/0002-local-steps-in-the-request.md.
        """
        ledgers = sorted(items)
        try:
            results = await asyncio.gather(*(call(ledger, items[ledger]) for ledger in ledgers))
        except FailureError as err:  # an ActivityError, or a local activity's own failure
            if not abort_on_error:
                raise
            raise abort_for(err) from err
        return dict(zip(ledgers, results, strict=True))

    async def _holds_call(
        self,
        legs: list[int],
        activity: Callable[[Any, Any], Any],
        argument: Callable[[str, list[int]], Any],
        forever: bool = False,
    ) -> dict[int, HoldOutcome]:
        """One call per ledger of ``activity`` with ``argument(ledger, legs)``; each leg's outcome."""
        by_ledger: dict[str, list[int]] = {}
        for i in legs:
            by_ledger.setdefault(self._instruction.legs[i].ledger, []).append(i)
        index = {hold_id: i for i, hold_id in enumerate(self._hold_ids)}
        if self._batched:
            results = await self._step(
                activity, {lg: argument(lg, items) for lg, items in by_ledger.items()}, forever
            )
            return {index[o.hold_id]: o for result in results for o in result.outcomes}

        # Trades without local_steps: after the decision (only commits then)
        # the local ledgers' commits go together.
        local = [lg for lg in by_ledger if self._request.is_local(lg)] if self._decided else []
        batch: dict[str, list[Any]] = {}
        if local:
            batch = {_LOCAL: [argument(lg, by_ledger.pop(lg)) for lg in local]}

        async def one(ledger: str, items: list[Any]) -> HoldOutcomes:
            if ledger == _LOCAL:
                return await commit_locally(
                    self._request,
                    HoldRefsBatch(items=items),
                    LedgerActivities.commit_local,
                    schedule_to_close=STUCK_AFTER,
                )
            return await self._ledger_call(ledger, activity, argument(ledger, items), forever=forever)

        per_ledger = await self._per_ledger({**by_ledger, **batch}, one, abort_on_error=not forever)
        return {index[o.hold_id]: o for result in per_ledger.values() for o in result.outcomes}

    def _hold_request(self, i: int, expires_at: datetime | None) -> HoldRequest:
        leg = self._instruction.legs[i]
        return HoldRequest(
            hold_id=self._hold_ids[i],
            account=leg.from_,
            to_account=leg.to,
            asset=leg.asset,
            amount=self._amounts[i],
            expires_at=expires_at,
            trade_id=self._instruction.trade_id,
        )

    def _refs(self, ledger: str, legs: list[int]) -> HoldRefs:
        return HoldRefs(hold_ids=[self._hold_ids[i] for i in legs], ledger=ledger)

    def _record_reservation(self, i: int, outcome: HoldOutcome) -> None:
        if outcome.open:
            self._leg_states[i] = LegState.HELD
            self._leg_details[i] = ""
            self._event(f"leg {i} held", self._describe_leg(i))
            return
        if outcome.committed:
            self._record_committed(i)
            return
        if outcome.ok:  # released at the ledger: the caller decides what that means
            self._leg_states[i] = LegState.RELEASED
            self._leg_details[i] = "released at the ledger"
            return
        if self._leg_details[i] != outcome.detail:
            self._event(f"leg {i} short, recycling", outcome.detail)
        self._leg_states[i] = LegState.SHORT
        self._leg_details[i] = outcome.detail

    def _record_committed(self, i: int) -> None:
        """Leg ``i``'s hold is committed at its ledger (by an earlier run of this trade)."""
        if self._leg_states[i] is LegState.COMMITTED:
            return
        self._leg_states[i] = LegState.COMMITTED
        self._leg_details[i] = "committed at the ledger by an earlier run"
        self._event(f"leg {i} found committed", self._describe_leg(i))

    def _committed_legs(self) -> list[int]:
        return [i for i, state in enumerate(self._leg_states) if state is LegState.COMMITTED]

    def _shortfall(self) -> str:
        short = [i for i, state in enumerate(self._leg_states) if state is not LegState.HELD]
        return "; ".join(f"leg {i} ({self._leg_details[i]})" for i in short)

    def _describe_leg(self, i: int) -> str:
        leg = self._instruction.legs[i]
        return f"{format(self._amounts[i], 'f')} {leg.asset} {leg.from_} -> {leg.to} on {leg.ledger}"

    def view(self) -> TradeView:
        return self._view(
            self._hold_ids,
            self._leg_states,
            self._leg_details,
            approvers=self._instruction.approvers,
            approved_by=self._approved,
            fills=self._fills,
            fill_count=self._fill_count,
        )


def _fill_rule(request: SettlementRequest) -> FillRule | None:
    partial = request.instruction.partial
    if partial is None:
        return None
    delivery, payment = request.instruction.legs

    def precision(asset: str, amount: Decimal) -> int:  # the worker's configured one
        return (request.precisions or {}).get(asset, max(0, -int(amount.as_tuple().exponent)))

    return FillRule(
        delivery.amount,
        payment.amount,
        precision(delivery.asset, delivery.amount),
        precision(payment.asset, payment.amount),
        min_fill=partial.min_fill,
        min_quantity=partial.min_quantity,
    )
