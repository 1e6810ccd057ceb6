"""Ledger activities: the side effects of a settlement, one ledger at a time.

A ``LedgerActivities`` instance serves the ledgers it is given, picking one by the
request's ``ledger`` field. The worker registers one per remote ledger on that
ledger's task queue (so its activities run only where its credentials are), and one
for every local ledger on the settlement worker, where the workflow runs them as
local activities. Every call takes a batch of holds (the legs of one trade on this
ledger) to save round trips, and every hold carries its idempotency key: a retried
activity, local or not, has the effect of one.

A ``LedgerError`` that retrying cannot cure becomes a non-retryable
``ApplicationError`` whose ``type`` is the error's stable code. A short reservation
(``InsufficientFunds``) is not an error at all: it is an outcome, and the workflow
decides whether to recycle. Asked to (``report_available``), ``reserve`` also says
what a short hold's account has available, in the same call, so a partial trade can
size its next fill without another round trip.

Every outcome says how the hold stands at the ledger. That is what lets a trade re-run
after ``temporal workflow reset`` find what its earlier run did: a reservation or a pin
of a key already committed answers COMMITTED (the hold keys are idempotent), a release
refused because the hold is committed says so, and ``look_up`` reads holds without
changing them.

Each call is a span of the trade's trace (``<step> <ledger>``, e.g. ``reserve cash``) with
its outcome code (``dvp.outcome``: ``ok``, or the codes of the holds refused, or the
error's), and counted in the ``dvp_ledger_calls`` metric by step, ledger and outcome.
Neither names an account, an owner or an amount.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextvars import ContextVar
from decimal import Decimal
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters import Ledger
from domain import (
    CheckAccountsBatch,
    CheckAccountsRequest,
    CheckAccountsResult,
    ClaimRequest,
    FieldError,
    Hold,
    HoldNotOpen,
    HoldOutcome,
    HoldOutcomes,
    HoldRefs,
    HoldRefsBatch,
    InsufficientFunds,
    LedgerError,
    ReserveBatch,
    ReserveRequest,
    UnknownHold,
)

_tracer = trace.get_tracer("dvp.ledger")
_Call = TypeVar("_Call", bound=Callable[..., Any])


def _outcome(result: object) -> str:
    """A call's outcome code: ``ok``, or the sorted codes of the holds or checks refused."""
    if isinstance(result, HoldOutcomes):
        codes = sorted({o.code or "refused" for o in result.outcomes if not o.ok})
        return ",".join(codes) or "ok"
    if isinstance(result, CheckAccountsResult):
        return "problems" if result.problems else "ok"
    return "ok"


def _record(step: str, ledger: str, outcome: str) -> None:
    try:
        meter = activity.metric_meter()
    except RuntimeError:  # called outside an activity (a test, a tool): nothing to count in
        return
    meter.create_counter("dvp_ledger_calls", "Ledger calls by step, ledger and outcome code").add(
        1, {"step": step, "ledger": ledger, "outcome": outcome}
    )


def _traced(step: str) -> Callable[[_Call], _Call]:
    """Run a one-ledger call in a span ``<step> <ledger>`` that ends with its outcome code."""

    def wrap(method: _Call) -> _Call:
        @functools.wraps(method)
        def traced(self: LedgerActivities, request: Any) -> Any:
            ledger = self._ledger(request.ledger).name
            span: Span
            with _tracer.start_as_current_span(
                f"{step} {ledger}",
                attributes={"dvp.step": step, "dvp.ledger": ledger},
                # An error's message may name an account or an amount: only its code is kept.
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    result = method(self, request)
                except ApplicationError as exc:
                    code = exc.type or "error"
                    span.set_attribute("dvp.outcome", code)
                    span.set_status(Status(StatusCode.ERROR, code))
                    _record(step, ledger, code)
                    raise
                outcome = _outcome(result)
                span.set_attribute("dvp.outcome", outcome)
                _record(step, ledger, outcome)
                return result

        return traced  # type: ignore[return-value]

    return wrap


def _application_error(exc: LedgerError) -> ApplicationError:
    return ApplicationError(exc.message, type=exc.code, non_retryable=not exc.retryable)


def _each(
    hold_ids: list[str],
    call: Callable[[str], Hold],
    reported: Callable[[LedgerError], bool] = lambda exc: False,
) -> HoldOutcomes:
    """``call`` for each hold in turn: a ``LedgerError`` that ``reported`` accepts is that
    hold's outcome; any other fails the activity."""
    outcomes = []
    # A local activity has no heartbeat: the workflow task it runs in is its lease.
    beat = None if activity.info().is_local else _Heartbeat.of_this_activity()
    for hold_id in hold_ids:
        if beat is not None:
            beat.between_holds(hold_id)
        try:
            outcomes.append(HoldOutcome.of(call(hold_id)))
        except LedgerError as exc:
            if not reported(exc):
                raise _application_error(exc) from exc
            outcomes.append(HoldOutcome(hold_id=hold_id, ok=False, code=exc.code, detail=exc.message))
    return HoldOutcomes(outcomes=outcomes)


class _Heartbeat:
    """One activity's heartbeats: between two holds, once ``EVERY`` has passed since the last.

    The server's heartbeat timeout (``workflows.calls.HEARTBEAT_TIMEOUT``, 10 s) runs
    from the attempt's start, so an activity whose holds take less than ``EVERY`` in all
    sends none and a worker that died is still noticed; a longer one beats before each
    hold once ``EVERY`` is past, so no gap exceeds ``EVERY`` plus one ledger call (the
    HTTP ledger's ``deadline`` is 8 s). Each heartbeat from a thread's activity is a hop
    to the worker's event loop and, at first, a call to the server: a trade's commit
    paid two of them for holds committed in a millisecond.
    """

    EVERY = 0.5  # seconds
    _current: ContextVar[_Heartbeat | None] = ContextVar("dvp_ledger_heartbeat", default=None)

    def __init__(self) -> None:
        self._last = time.monotonic()

    @classmethod
    def of_this_activity(cls) -> _Heartbeat:
        """The running activity's (each activity runs in a context of its own)."""
        beat = cls._current.get()
        if beat is None:
            beat = cls()
            cls._current.set(beat)
        return beat

    def between_holds(self, hold_id: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.EVERY:
            activity.heartbeat(hold_id)
            self._last = now


def _not_open(exc: LedgerError) -> bool:
    return isinstance(exc, HoldNotOpen)


def _unknown(exc: LedgerError) -> bool:
    return isinstance(exc, UnknownHold)


def _standing(ledger: Ledger, outcomes: HoldOutcomes) -> HoldOutcomes:
    """``outcomes``, each hold that was not open saying how it stands (committed, for a release)."""

    def standing(outcome: HoldOutcome) -> HoldOutcome:
        if outcome.code != HoldNotOpen.code:
            return outcome
        try:
            hold = ledger.get_hold(outcome.hold_id)
        except LedgerError:
            return outcome  # reported as refused, as before; the caller retries or records it
        return outcome.model_copy(update={"status": hold.status, "amount": hold.amount})

    return HoldOutcomes(outcomes=[standing(o) for o in outcomes.outcomes])


def _available(ledger: Ledger, account: str) -> Decimal:
    try:
        return ledger.account(account).available
    except LedgerError as exc:
        raise _application_error(exc) from exc


class LedgerActivities:
    """Activities over some ledger adapters, built once by the worker."""

    def __init__(self, *ledgers: Ledger) -> None:
        self._ledgers = {ledger.name: ledger for ledger in ledgers}

    def _ledger(self, name: str) -> Ledger:
        # A request without a name predates multi-ledger workers: it was sent to a
        # queue that serves exactly one ledger.
        if not name and len(self._ledgers) == 1:
            return next(iter(self._ledgers.values()))
        try:
            return self._ledgers[name]
        except KeyError:
            served = ", ".join(sorted(self._ledgers)) or "none"
            raise ApplicationError(
                f"this worker does not serve ledger {name!r} (it serves: {served}); "
                "its configuration must list the ledger",
                type="LedgerNotServed",
            ) from None

    @activity.defn(name="ledger.check_accounts")
    @_traced("check_accounts")
    def check_accounts(self, request: CheckAccountsRequest) -> CheckAccountsResult:
        """Check every account exists and holds the leg's asset; return their owners."""
        ledger = self._ledger(request.ledger)
        try:
            facts = ledger.account_facts({check.account for check in request.checks})
        except LedgerError as exc:
            raise _application_error(exc) from exc
        owners: dict[str, str] = {}
        problems: list[FieldError] = []
        for check in request.checks:
            account = facts.get(check.account)
            if account is None:
                problems.append(
                    FieldError(
                        field=check.field,
                        message=f"unknown account {check.account!r} on ledger {ledger.name!r}",
                    )
                )
                continue
            if account.asset != check.asset:
                problems.append(
                    FieldError(
                        field=check.field,
                        message=f"account {check.account!r} holds {account.asset}, not {check.asset}",
                    )
                )
            owners[check.account] = account.owner
        return CheckAccountsResult(owners=owners, problems=problems)

    @activity.defn(name="ledger.reserve")
    @_traced("reserve")
    def reserve(self, request: ReserveRequest) -> HoldOutcomes:
        """Place each hold; a hold that lacks funds is reported short, not raised."""
        ledger = self._ledger(request.ledger)
        by_id = {h.hold_id: h for h in request.holds}

        def place(hold_id: str) -> Hold:
            h = by_id[hold_id]
            return ledger.place_hold(
                h.hold_id, h.account, h.to_account, h.asset, h.amount, h.expires_at, h.trade_id, h.hashlock
            )

        result = _each(list(by_id), place, lambda exc: isinstance(exc, InsufficientFunds))
        if not request.report_available:
            return result
        short = {o.hold_id: _available(ledger, by_id[o.hold_id].account) for o in result.outcomes if not o.ok}
        return HoldOutcomes(
            outcomes=[
                o.model_copy(update={"available": short[o.hold_id]}) if o.hold_id in short else o
                for o in result.outcomes
            ]
        )

    @activity.defn(name="ledger.pin")
    @_traced("pin")
    def pin(self, request: HoldRefs) -> HoldOutcomes:
        """Prepare each hold for commit: clear its expiry. A hold no longer open is reported."""
        return _each(request.hold_ids, self._ledger(request.ledger).pin_hold, _not_open)

    @activity.defn(name="ledger.commit")
    @_traced("commit")
    def commit(self, request: HoldRefs) -> HoldOutcomes:
        """Commit each hold (transfer to its beneficiary). A hold the ledger no longer has (a
        chain reorganisation dropped its lock) is reported, not raised: the workflow places it again."""
        return _each(request.hold_ids, self._ledger(request.ledger).commit_hold, _unknown)

    @activity.defn(name="ledger.claim")
    @_traced("claim")
    def claim(self, request: ClaimRequest) -> HoldOutcomes:
        """Commit each hashlocked hold with the preimage; a refusal (timelock passed, already
        released, wrong preimage) is reported, not raised."""
        ledger = self._ledger(request.ledger)
        return _each(
            request.hold_ids,
            lambda hold_id: ledger.commit_hold(hold_id, request.preimage),
            lambda exc: not exc.retryable,
        )

    @activity.defn(name="ledger.release")
    @_traced("release")
    def release(self, request: HoldRefs) -> HoldOutcomes:
        """Release each hold; an unknown key is recorded released so a late hold is refused.

        A hold that cannot be released (it is committed) is reported with its status."""
        ledger = self._ledger(request.ledger)
        return _standing(ledger, _each(request.hold_ids, ledger.release_hold, _not_open))

    @activity.defn(name="ledger.look_up")
    @_traced("look_up")
    def look_up(self, request: HoldRefs) -> HoldOutcomes:
        """Each hold as the ledger has it, changing nothing; a key never used is reported unknown."""
        return _each(request.hold_ids, self._ledger(request.ledger).get_hold, _unknown)

    # One step of a trade on several ledgers this worker serves, in one activity: the
    # workflow runs these for its local ledgers (see workflows/_trade.py, TradeSaga._step).
    # Each item is the one-ledger call above; a failure fails the whole step, and its
    # retry repeats the items already done, which their hold keys make harmless.
    # Commits and releases, which must end up done, go on past a ledger that fails, so
    # that one ledger down holds up only its own legs.

    @activity.defn(name="ledger.check_accounts_local")
    def check_accounts_local(self, request: CheckAccountsBatch) -> CheckAccountsResult:
        results = [self.check_accounts(item) for item in request.items]
        return CheckAccountsResult(
            owners={account: owner for r in results for account, owner in r.owners.items()},
            problems=[problem for r in results for problem in r.problems],
        )

    @activity.defn(name="ledger.reserve_local")
    def reserve_local(self, request: ReserveBatch) -> HoldOutcomes:
        return _joined([self.reserve(item) for item in request.items])

    @activity.defn(name="ledger.pin_local")
    def pin_local(self, request: HoldRefsBatch) -> HoldOutcomes:
        return _joined([self.pin(item) for item in request.items])

    @activity.defn(name="ledger.commit_local")
    def commit_local(self, request: HoldRefsBatch) -> HoldOutcomes:
        return _every(request.items, self.commit)

    @activity.defn(name="ledger.release_local")
    def release_local(self, request: HoldRefsBatch) -> HoldOutcomes:
        return _every(request.items, self.release)

    @activity.defn(name="ledger.look_up_local")
    def look_up_local(self, request: HoldRefsBatch) -> HoldOutcomes:
        return _joined([self.look_up(item) for item in request.items])

    def all(self) -> list[Callable[..., object]]:
        """Every activity of this instance, for registering on a worker."""
        return [
            self.check_accounts,
            self.reserve,
            self.pin,
            self.commit,
            self.claim,
            self.release,
            self.look_up,
            self.check_accounts_local,
            self.reserve_local,
            self.pin_local,
            self.commit_local,
            self.release_local,
            self.look_up_local,
        ]


def _joined(results: list[HoldOutcomes]) -> HoldOutcomes:
    return HoldOutcomes(outcomes=[outcome for result in results for outcome in result.outcomes])


def _every(items: list[HoldRefs], call: Callable[[HoldRefs], HoldOutcomes]) -> HoldOutcomes:
    """``call`` on every item, even after one has failed; then the first failure, if any.

    A ledger's refusal carries the outcomes of the items that succeeded (its details), so
    the workflow records each of those legs as done although the activity failed.
    """
    results: list[HoldOutcomes] = []
    failure: Exception | None = None
    for item in items:
        try:
            results.append(call(item))
        except Exception as exc:  # raised below, once every item was tried
            failure = failure or exc
    if failure is None:
        return _joined(results)
    if not isinstance(failure, ApplicationError):
        raise failure  # a cancellation, or no ledger's refusal: as it came
    done = _joined(results).model_dump(mode="json")
    raise ApplicationError(
        failure.message, done, type=failure.type, non_retryable=failure.non_retryable
    ) from failure
