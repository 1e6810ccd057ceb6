"""The HTLC protocol: a two-leg swap locked by a secret's hash and two timelocks.

    PENDING ── admit: the submitter's token, the worker's routing
            ── validate accounts (the legs must be a swap); the submitter is a party or an operator
            ── compliance screen
                                                        ▼      (REJECTED: nothing locked)
    AWAITING_AFFIRMATION ── the other party consents, unless an operator submitted
                                                        ▼      (EXPIRED: nothing locked)
    RESERVING ── lock legs[0] (hashlock H, refunds at T0 = deadline + claim window)
             ── lock legs[1] (hashlock H, refunds at T1 = deadline)
                                                        ▼      (EXPIRED: a lock failed, the other released)
    AWAITING_CLAIM ── `claim` with the preimage p, sha256(p) = H:
                      the claimed leg commits; the preimage is now public and
                      (auto_claim) the engine claims the other leg with it
                   ── a leg still open at its timelock refunds (released)
                                                        ▼
    SETTLED (both claimed)  ·  EXPIRED (both refunded)  ·  ONE_SIDED (one of each)

Roles. ``legs[0]`` is delivered by the party that holds the secret (the seller);
``legs[1]`` pays that party. The secret holder claims ``legs[1]`` first, which
reveals the preimage; the counterparty (or the engine for it, with ``auto_claim``)
then claims ``legs[0]``. So ``legs[0]`` needs the longer timelock: after the last
moment the secret holder may claim (T1), the counterparty still has the claim
window until T0 to use the revealed preimage. Were the order reversed, the secret
holder could claim at the last moment and leave the counterparty no time.

What enforces it. Each lock is a hold placed at its ledger with ``hashlock = H``
and ``expires_at`` = its timelock. The ledger commits it only with the preimage
and only before the timelock (the SQL ledger and the chain escrow both refuse a
late claim), and the ledger's expiry sweep (or, on chain, anyone) releases it once
the timelock passed, even with no workflow running: the timelocks are not the
engine's promise but the ledgers'. The workflow's timers release each leg at its
timelock as well, and a release that finds the hold committed records the leg as
claimed at the ledger.

After ``temporal workflow reset`` the trade re-runs and meets, under its idempotent
hold keys, what its earlier run did: a lock that answers committed is a leg claimed
(COMMITTED), one that answers released a leg refunded, and the trade ends as its legs
stand (SETTLED, ONE_SIDED or EXPIRED), or waits on the legs still locked. A re-run
does not know a preimage revealed before the reset: the other party claims with it.
See docs/operations.md, "Resetting a trade".

The preimage never enters a workflow payload before the claim: the instruction
carries only its hash; the preimage arrives in the ``claim`` update, whose
validator checks it (a wrong one is rejected without entering the history) before
it is accepted.

Unlike the escrow saga there is no commit decision that makes both legs commit:
each leg ends on its own, so a claim that never comes (or a ledger that does not
answer within the claim window) leaves one leg paid and the other refunded:
ONE_SIDED. Cancelling is refused; the timelocks are the way out.

This module is the protocol as plain deterministic Python (``HtlcSaga``); its
Temporal definition, ``HtlcWorkflow`` in ``workflows/htlc.py``, only hands it the run
and the handlers, and the worker passes this module through the sandbox
(docs/decisions/0003-sagas-passed-through-the-sandbox.md). The HTLC compared with the
orchestrated escrow: docs/design.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    import hashlib

    from activities.ledger import LedgerActivities
    from domain import (
        ApprovalMessage,
        AuthError,
        CancelMessage,
        CarriedHtlc,
        CheckAccountsRequest,
        ClaimMessage,
        ClaimRequest,
        Decision,
        FieldError,
        HoldOutcome,
        HoldOutcomes,
        HoldRefs,
        HoldRequest,
        LegState,
        ReserveRequest,
        SettlementRequest,
        TradeStatus,
        TradeView,
        normalise_sha256,
    )

# Not passed through here, so that the replay tests check them in the sandbox with this
# module; the worker passes them through (worker.WORKFLOW_RUNNER).
from ._saga import (
    Problem,
    TradeSagaBase,
    _Abort,
    abort_for,
    accepted_subject,
    account_checks,
    cause,
    code_of,
    count_refusal,
    refusal,
    shielded,
    verified,
)
from .calls import STUCK_AFTER, ledger_call

T = TypeVar("T")

SECRET_HOLDER_LEG = 0
"""The leg the secret holder delivers; it refunds last (deadline + claim window)."""
PAYMENT_LEG = 1
"""The leg that pays the secret holder; it refunds at the deadline and is claimed first."""


class HtlcSaga(TradeSagaBase):
    """One HTLC trade: its state, its steps and what its handlers do.

    ``HtlcWorkflow`` (``workflows/htlc.py``) makes one in its ``@workflow.init`` and
    hands it its run, its query and its signals and updates.
    """

    def __init__(self, request: SettlementRequest) -> None:
        super().__init__(request)
        instruction = request.instruction
        self._routed()
        self._auto_claim = instruction.auto_claim is not False
        self._hold_ids = [f"{instruction.trade_id}#{i}" for i in range(len(instruction.legs))]
        self._states = [LegState.PENDING] * len(instruction.legs)
        self._details = [""] * len(instruction.legs)
        self._locking: list[int] = []  # legs whose lock may have been placed: release on abort
        self._preimage: str | None = None
        self._requested: list[int] = []  # legs to claim with the preimage, in order
        self._lock_leg = SECRET_HOLDER_LEG  # the leg being locked
        if self._resume is not None and self._resume.htlc is not None:
            carried = self._resume.htlc
            self._states, self._details = list(carried.states), list(carried.details)
            self._locking, self._requested = list(carried.locking), list(carried.requested)
            self._preimage, self._lock_leg = carried.preimage, carried.lock_leg

    def _carry_own(self) -> dict[str, Any]:
        return {
            "htlc": CarriedHtlc(
                states=self._states,
                details=self._details,
                locking=self._locking,
                preimage=self._preimage,
                requested=self._requested,
                lock_leg=self._lock_leg,
            )
        }

    def _routed(self) -> None:
        self._remote = self._request.model_copy(update={"local_ledgers": []})
        window = self._instruction.claim_window or max(self._deadline - self._started, timedelta(seconds=1))
        self._timelocks = [self._deadline + window, self._deadline]

    # ----------------------------------------------------------------- run

    async def run(self) -> TradeView:
        # A continued run resumes at the phase its last run continued at (the wait points:
        # affirmation, lock, claim; unlock while releasing after an abort).
        phase = self._resume.phase if self._resume is not None else None
        try:
            if phase is None:
                self._refuse_forged()
                if self._trusted:
                    await self._admit()
                when = ", ".join(f"leg {i} at {t.isoformat()}" for i, t in enumerate(self._timelocks))
                self._event("submitted", f"protocol htlc; timelocks: {when}")
                await self._validate()
                if self._trusted:
                    self._authorize_submission()
                await self._screen()
            elif self._abort is not None:
                raise self._abort
            if phase in (None, "affirmation") and self._trusted:
                await self._await_consent()
            if phase != "claim":
                await self._lock_all(resumed=phase == "lock")
        except _Abort as abort:
            self._stage, self._abort = "unlock", abort
            await self._shielded(self._release_locked())
            if self._ended_by_earlier_run():
                self._finish()
            else:
                self._set_status(abort.status, abort.reason)
        except asyncio.CancelledError:
            # nothing can have been claimed yet: the locks go back at once
            self._event("cancel requested through Temporal")
            self._stage = "unlock"
            self._abort = _Abort(TradeStatus.CANCELLED, "workflow cancelled through Temporal")
            await self._shielded(self._release_locked())
            self._set_status(TradeStatus.CANCELLED, "workflow cancelled through Temporal")
        else:
            # From here the hashlock and the timelocks decide; a cancel request is ignored.
            await self._shielded(self._claim_or_refund(resumed=phase == "claim"))
            self._finish()
        self._publish()
        self._ended()
        await self._shielded(workflow.wait_condition(workflow.all_handlers_finished))
        return self.view()

    # --------------------------------------------------------------- steps

    async def _validate(self) -> None:
        checks = account_checks(self._instruction)
        ledgers = sorted(checks)
        try:
            results = await asyncio.gather(
                *(
                    self._call(
                        ledger,
                        LedgerActivities.check_accounts,
                        CheckAccountsRequest(checks=checks[ledger]),
                        until=self._deadline,
                    )
                    for ledger in ledgers
                )
            )
        except FailureError as err:
            raise abort_for(err) from err
        self._reject_invalid(self._record_checks(results) or self._swap_problems())
        self._event("accounts validated", "the legs are a swap between two parties")

    def _swap_problems(self) -> list[FieldError]:
        delivery, payment = self._instruction.legs
        seller, buyer = self._owners[delivery.from_], self._owners[delivery.to]
        if seller == buyer:
            return [FieldError(field="legs[0].to", message=f"both accounts of legs[0] belong to {seller}")]
        if self._owners[payment.from_] != buyer or self._owners[payment.to] != seller:
            message = (
                f"htlc needs a swap: legs[1] must pay {seller} (who delivers legs[0]) from {buyer}, "
                f"but it pays {self._owners[payment.to]} from {self._owners[payment.from_]}"
            )
            return [FieldError(field="legs[1]", message=message)]
        return []

    async def _lock_all(self, resumed: bool = False) -> None:
        """Lock the secret holder's delivery first, then the payment, as the parties would.

        ``resumed``: in a continued run, from the leg its last run was locking.
        """
        policy = self._request.policy()
        if not resumed:
            self._set_status(TradeStatus.RESERVING)
            self._interval, self._waiting_since = policy.recycle_interval, workflow.now()
        for i in (SECRET_HOLDER_LEG, PAYMENT_LEG):
            if i < self._lock_leg:
                continue  # locked in an earlier run
            self._lock_leg = i
            if i not in self._locking:
                self._locking.append(i)  # registered before the lock it undoes
            while True:
                try:
                    outcomes: HoldOutcomes = await self._call(
                        self._ledger(i),
                        LedgerActivities.reserve,
                        ReserveRequest(holds=[self._hold_request(i)]),
                        until=self._deadline,
                    )
                except FailureError as err:
                    raise abort_for(err) from err
                (outcome,) = outcomes.outcomes
                if outcome.open:
                    self._states[i] = LegState.HELD
                    self._details[i] = f"hashlocked; refunds at {self._timelocks[i].isoformat()}"
                    self._event(
                        f"leg {i} locked", f"{self._describe(i)}; refunds at {self._timelocks[i].isoformat()}"
                    )
                    break
                if outcome.committed:  # claimed in an earlier run of the trade (before a reset)
                    self._states[i] = LegState.COMMITTED
                    self._details[i] = "claimed at the ledger"
                    self._event(f"leg {i} found claimed at the ledger", self._describe(i))
                    break
                if outcome.ok:  # released at the ledger (refunded by an earlier run): it cannot lock again
                    self._states[i] = LegState.RELEASED
                    self._details[i] = "refunded at the ledger"
                    if i == SECRET_HOLDER_LEG:
                        # Never lock the payment now; releasing its key finds whether it was claimed.
                        self._locking.append(PAYMENT_LEG)
                    raise _Abort(TradeStatus.EXPIRED, f"the lock of leg {i} was released at the ledger")
                if self._details[i] != outcome.detail:
                    self._event(f"leg {i} short, recycling", outcome.detail)
                self._states[i] = LegState.SHORT
                self._details[i] = outcome.detail
                if workflow.now() >= self._deadline:
                    raise _Abort(TradeStatus.EXPIRED, f"short at the deadline: leg {i} ({outcome.detail})")
                self._publish()
                self._recycled(f"leg {i} ({outcome.detail})")
                if self._history_due():
                    await self._continue_as_new("lock")
                await workflow.sleep(min(self._interval, self._deadline - workflow.now()))
                self._interval = policy.recycle_after(self._interval, workflow.now() - self._waiting_since)

    async def _claim_or_refund(self, resumed: bool = False) -> None:
        if not resumed:
            self._set_status(TradeStatus.AWAITING_CLAIM)
        self._stage = "claim"
        while open_legs := self._open_legs():
            due = [i for i in open_legs if workflow.now() >= self._timelocks[i]]
            if due:
                for i in due:
                    await self._refund(i)
                continue
            pending = self._pending_claims()
            if pending:
                await self._claim(pending[0])
                continue
            next_timelock = min(self._timelocks[i] for i in open_legs)
            await self._wait_until(lambda: bool(self._pending_claims()), next_timelock, phase="claim")

    async def _claim(self, i: int) -> None:
        preimage = self._preimage
        assert preimage is not None
        try:
            outcomes: HoldOutcomes = await self._call(
                self._ledger(i),
                LedgerActivities.claim,
                ClaimRequest(hold_ids=[self._hold_ids[i]], preimage=preimage),
                until=self._timelocks[i],
            )
        except FailureError as err:
            # The ledger did not answer before the timelock; the refund finds out what it did.
            self._requested.remove(i)
            self._event(f"claim of leg {i} did not complete before its timelock", cause(err))
            return
        (outcome,) = outcomes.outcomes
        if outcome.ok:
            self._states[i] = LegState.COMMITTED
            self._details[i] = "claimed with the preimage"
            self._event(f"leg {i} claimed", self._describe(i))
            if self._auto_claim:
                for other in self._open_legs():
                    if other not in self._requested:
                        self._requested.append(other)
                        self._event(f"claiming leg {other} with the revealed preimage", "auto_claim")
            return
        self._requested.remove(i)
        self._event(f"claim of leg {i} refused by the ledger", outcome.detail)
        if outcome.code == "hold_not_open":  # already released at the ledger: its timelock passed
            self._states[i] = LegState.RELEASED
            self._details[i] = "refunded at the ledger"
            self._event(f"leg {i} refunded", "released by the ledger at its timelock")

    async def _refund(self, i: int) -> None:
        outcome = await self._release(i)
        if outcome.ok:
            self._states[i] = LegState.RELEASED
            self._details[i] = f"refunded: timelock passed at {self._timelocks[i].isoformat()}"
            self._event(f"leg {i} refunded", f"timelock passed; {self._describe(i, back=True)}")
        else:  # the hold was committed: someone claimed it at the ledger with the preimage
            self._states[i] = LegState.COMMITTED
            self._details[i] = "claimed at the ledger"
            self._event(f"leg {i} claimed at the ledger", outcome.detail)
        if i in self._requested:
            self._requested.remove(i)

    async def _release(self, i: int) -> HoldOutcome:
        while True:
            try:
                outcomes: HoldOutcomes = await self._call(
                    self._ledger(i),
                    LedgerActivities.release,
                    HoldRefs(hold_ids=[self._hold_ids[i]]),
                    until=workflow.now() + STUCK_AFTER,
                )
                return outcomes.outcomes[0]
            except FailureError as err:
                self._event(f"release of leg {i} failed, retrying", cause(err))
                self._publish()
                if self._stage is not None and self._history_due():
                    await self._continue_as_new(self._stage)
                await workflow.sleep(timedelta(seconds=60))

    async def _release_locked(self) -> None:
        for i in reversed(self._locking):
            outcome = await self._release(i)
            if outcome.ok:
                placed = outcome.placed
                self._states[i] = LegState.RELEASED
                self._event(f"leg {i} released", "lock returned" if placed else "nothing was locked")
            elif outcome.committed and self._states[i] is not LegState.COMMITTED:
                self._states[i] = LegState.COMMITTED
                self._details[i] = "claimed at the ledger"
                self._event(f"leg {i} claimed at the ledger", outcome.detail)
        self._locking.clear()

    def _ended_by_earlier_run(self) -> bool:
        """After an abort: a leg is claimed and none is open, as an earlier run (before a reset) left them."""
        ended = (LegState.COMMITTED, LegState.RELEASED)
        return LegState.COMMITTED in self._states and all(state in ended for state in self._states)

    def _finish(self) -> None:
        claimed = [i for i, s in enumerate(self._states) if s is LegState.COMMITTED]
        refunded = [i for i, s in enumerate(self._states) if s is LegState.RELEASED]
        if not refunded:
            self._set_status(TradeStatus.SETTLED, "both legs claimed with the preimage")
        elif not claimed:
            self._set_status(TradeStatus.EXPIRED, "no claim before the timelocks: both legs refunded")
        else:
            (c,), (r,) = claimed, refunded
            legs = self._instruction.legs
            winner, loser = self._owners.get(legs[c].to, "?"), self._owners.get(legs[c].from_, "?")
            self._set_status(
                TradeStatus.ONE_SIDED,
                f"leg {c} claimed, leg {r} refunded at its timelock: {winner} received leg {c} "
                f"and kept leg {r}; {loser} delivered leg {c} for nothing",
            )

    # ------------------------------------------------------------ handlers

    async def claim(self, message: ClaimMessage) -> None:
        """Claim a leg with the preimage; return once that claim (and any it unlocks) ended."""
        by = f" by {accepted_subject(message.token)[0]}" if self._trusted else ""
        leg = self._claim_target(message)
        self._preimage = normalise_sha256(message.preimage, "a 32-byte secret")
        self._requested.append(leg)
        self._event(f"claim of leg {leg} with the preimage{by}", f"preimage {self._preimage} is now public")
        await workflow.wait_condition(lambda: not self._pending_claims() or self._status.terminal)

    def check_claim(self, message: ClaimMessage) -> None:
        """Refuse a claim (before it enters the history): wrong, impossible now, or not a party's."""
        try:
            self._check_claim(message)
        except ApplicationError as exc:
            count_refusal("claim", exc.type or "refused")
            raise

    def _check_claim(self, message: ClaimMessage) -> None:
        if self._trusted:
            try:
                subject = verified(message.token).subject
            except AuthError as exc:
                raise ApplicationError(str(exc), type="Unauthenticated", non_retryable=True) from None
            if subject not in set(self._owners.values()):
                raise _rejection(f"{subject} is not a party to this trade: only its parties may claim")
        try:
            preimage = normalise_sha256(message.preimage, "a 32-byte secret")
        except ValueError as exc:
            raise ApplicationError(f"preimage: {exc}", type="InvalidPreimage", non_retryable=True) from None
        if hashlib.sha256(bytes.fromhex(preimage)).hexdigest() != self._instruction.hashlock:
            raise ApplicationError(
                "preimage: its SHA-256 does not match the trade's hashlock",
                type="WrongPreimage",
                non_retryable=True,
            )
        self._claim_target(message)

    def _claim_target(self, message: ClaimMessage) -> int:
        """The leg a claim is for; raises (rejecting the update) if it cannot be claimed now."""
        if self._status.terminal:
            raise _rejection(f"trade is already {self._status.value}")
        if self._status is not TradeStatus.AWAITING_CLAIM:
            raise _rejection(f"the legs are not locked yet (status {self._status.value})")
        if message.leg is None:
            open_legs = self._open_legs()
            leg = PAYMENT_LEG if PAYMENT_LEG in open_legs else open_legs[0]
        else:
            leg = message.leg
            if leg not in range(len(self._states)):
                raise _rejection(f"leg: there is no leg {leg}")
            if self._states[leg] is not LegState.HELD:
                raise _rejection(f"leg: leg {leg} is already {self._states[leg].value}")
        if leg in self._requested:
            raise _rejection(f"leg: a claim of leg {leg} is already in progress")
        if workflow.now() >= self._timelocks[leg]:
            raise _rejection(f"leg: the timelock of leg {leg} passed at {self._timelocks[leg].isoformat()}")
        return leg

    def check_approve(self, message: ApprovalMessage) -> None:
        if self._trusted:
            raise refusal(_NO_APPROVAL, request="approval")

    def approve(self, message: ApprovalMessage) -> Decision:
        return self._rejected(f"approval by {message.party}", _NO_APPROVAL)

    def approve_signal(self, message: ApprovalMessage) -> None:
        if self._trusted:
            self._refused_signal("approval", _NO_APPROVAL.code)
        else:
            self.approve(message)

    def _cancel_refusal(self) -> str:
        if self._status.terminal:
            return Problem(f"trade is already {self._status.value}", "ended")
        return Problem(
            "an htlc trade cannot be cancelled: each leg refunds at its timelock", "not_cancellable"
        )

    def check_cancel(self, message: CancelMessage) -> None:
        if self._trusted:
            raise refusal(self._cancel_refusal(), request="cancel")

    def cancel(self, message: CancelMessage, signal: bool = False) -> Decision:
        if self._trusted and signal:
            problem = self._cancel_refusal()
            self._refused_signal("cancel", code_of(problem, "refused"))
            return Decision(accepted=False, reason=problem)
        return self._rejected(f"cancel by {message.party}", self._cancel_refusal())

    # ------------------------------------------------------------- helpers

    def _open_legs(self) -> list[int]:
        return [i for i, state in enumerate(self._states) if state is LegState.HELD]

    def _pending_claims(self) -> list[int]:
        if self._preimage is None:
            return []
        return [i for i in self._requested if self._states[i] is LegState.HELD]

    def _ledger(self, i: int) -> str:
        return self._instruction.legs[i].ledger

    def _call(self, ledger: str, activity: Callable[[Any, Any], Any], argument: Any, until: datetime) -> Any:
        """One ledger call on the ledger's queue, retried until ``until`` (at least 1 s from now)."""
        limit = max(until - workflow.now(), timedelta(seconds=1))
        # Always on the ledger's queue: a claim must be able to run out its time limit
        # (up to the timelock) without holding the workflow task open. Scheduling a
        # remote activity ends the workflow task: publish what changed first.
        self._publish()
        return ledger_call(self._remote, ledger, activity, argument, schedule_to_close=limit)

    def _hold_request(self, i: int) -> HoldRequest:
        leg = self._instruction.legs[i]
        return HoldRequest(
            hold_id=self._hold_ids[i],
            account=leg.from_,
            to_account=leg.to,
            asset=leg.asset,
            amount=leg.amount,
            expires_at=self._timelocks[i],
            trade_id=self._instruction.trade_id,
            hashlock=self._instruction.hashlock,
        )

    async def _shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run to completion even if the workflow is cancelled meanwhile."""
        return await shielded(
            coroutine,
            lambda: self._event("cancel request ignored", "the hashlock and the timelocks decide now"),
        )

    def _describe(self, i: int, back: bool = False) -> str:
        leg = self._instruction.legs[i]
        route = f"back to {leg.from_}" if back else f"{leg.from_} -> {leg.to}"
        return f"{format(leg.amount, 'f')} {leg.asset} {route} on {leg.ledger}"

    def view(self) -> TradeView:
        return self._view(self._hold_ids, self._states, self._details)


_NO_APPROVAL = Problem("an htlc trade needs no approval", "no_approval_needed")


def _rejection(reason: str) -> ApplicationError:
    return ApplicationError(reason, type="ClaimRejected", non_retryable=True)
