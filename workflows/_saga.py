"""Pieces the saga workflows (trade, HTLC, netting batch) share.

Deterministic and free of side effects and of state at import, like the workflows
themselves. The worker passes this module through the sandbox
(``worker.TRADE_WORKFLOW_MODULES``); the trade sagas import it unpassed, so the replay
tests check it in the sandbox. See docs/decisions/0003-sagas-passed-through-the-sandbox.md.

Metrics (docs/operations.md, "Metrics") are recorded through ``workflow.metric_meter()``,
which records nothing while a workflow replays, so each is counted once however often
its trade is replayed; refusals are counted in one place, ``count_refusal``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.settlement import SettlementActivities
    from domain import (
        AccountCheck,
        CheckAccountsResult,
        Decision,
        FieldError,
        Instruction,
        Leg,
        LegState,
        LegView,
        ScreenRequest,
        ScreenResult,
        SettlementRequest,
        SubmitCheck,
        TimelineEvent,
        TradeStatus,
        TradeView,
    )

from .calls import CALL_TIMEOUT

T = TypeVar("T")

STATUS = SearchAttributeKey.for_keyword("DvpStatus")
TRADE_ID = SearchAttributeKey.for_keyword("DvpTradeId")
PARTIES = SearchAttributeKey.for_keyword_list("DvpParties")
ASSETS = SearchAttributeKey.for_keyword_list("DvpAssets")
DEADLINE = SearchAttributeKey.for_datetime("DvpDeadline")

# The memo key of a trade's reason, set when it ends (``SettlementRequest.outcome_memo``).
MEMO_REASON = "reason"

SEARCH_ATTRIBUTES = {
    "DvpStatus": "Keyword",
    "DvpTradeId": "Keyword",
    "DvpParties": "KeywordList",
    "DvpAssets": "KeywordList",
    "DvpDeadline": "Datetime",
}
"""The search attributes the server must have registered, name -> type."""


def search_attributes(
    instruction: Instruction,
    *,
    status: TradeStatus,
    parties: list[str],
    deadline: datetime | None,
) -> list[SearchAttributeUpdate[Any]]:
    """The search attributes of a trade: what the Web UI and ``dvp list`` filter on."""
    updates: list[SearchAttributeUpdate[Any]] = [
        STATUS.value_set(status.value),
        TRADE_ID.value_set(instruction.trade_id),
        PARTIES.value_set(parties),
        ASSETS.value_set(sorted({leg.asset for leg in instruction.legs})),
    ]
    if deadline is not None:
        updates.append(DEADLINE.value_set(deadline))
    return updates


def initial_search_attributes(instruction: Instruction) -> TypedSearchAttributes:
    """What a client sets when it starts a trade, so the workflow need not upsert them."""
    updates = search_attributes(
        instruction,
        status=TradeStatus.PENDING,
        parties=sorted(instruction.parties()),
        deadline=instruction.deadline,
    )
    return TypedSearchAttributes([SearchAttributePair(u.key, u.value) for u in updates])


def count_refusal(request: str, reason: str) -> None:
    """Count one refused request to a trade: ``dvp_refusals`` by ``request`` and ``reason`` code.

    Every refusal a saga reports comes through here (``TradeSagaBase._rejected``, the
    validators), so a new kind of refusal lands in the metric by calling it. ``reason``
    is a short code, never the message (which names parties).
    """
    workflow.metric_meter().create_counter(
        "dvp_refusals", "Requests to trades refused, by request and reason code"
    ).add(1, {"request": request, "reason": reason})


def count(name: str, description: str, value: int = 1, **labels: str) -> None:
    """Add ``value`` to the workflow counter ``name`` (nothing while replaying)."""
    workflow.metric_meter().create_counter(name, description).add(value, labels)


def workflow_id_for(trade_id: str) -> str:
    """The workflow id of a trade: one trade id, one workflow, ever."""
    return f"trade-{trade_id}"


async def shielded(coroutine: Coroutine[Any, Any, T], on_cancel_ignored: Callable[[], None]) -> T:
    """Run ``coroutine`` to completion even if the workflow is cancelled meanwhile.

    Each cancellation that arrives while it runs calls ``on_cancel_ignored`` (which
    records it in the timeline) and is otherwise ignored.
    """
    task = asyncio.ensure_future(coroutine)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
            on_cancel_ignored()


def upsert_changed(published: dict[str, Any], wanted: Iterable[SearchAttributeUpdate[Any]]) -> None:
    """Upsert, in one command, those of ``wanted`` that differ from ``published``; note them there."""
    changed = [update for update in wanted if published.get(update.key.name) != update.value]
    if changed:
        workflow.upsert_search_attributes(changed)
        published.update({update.key.name: update.value for update in changed})


def cause(err: BaseException) -> str:
    """The message of the innermost cause of ``err``."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__


class _Abort(Exception):
    """Ends the saga before the commit decision; compensations run."""

    def __init__(self, status: TradeStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def abort_for(err: FailureError) -> _Abort:
    """How a ledger call that failed before the decision ends a trade."""
    # A remote activity's failure wraps the ledger's error; a local one's may be it.
    failure = err.cause if isinstance(err, ActivityError) else err
    if isinstance(failure, ApplicationError) and failure.non_retryable:
        return _Abort(TradeStatus.REJECTED, f"ledger refused: {failure.message}")
    return _Abort(TradeStatus.EXPIRED, f"a ledger did not answer before the deadline ({cause(err)})")


def leg_checks(i: int, leg: Leg) -> list[AccountCheck]:
    """Leg ``i``'s accounts must exist and hold its asset: the payer's and the payee's."""
    return [
        AccountCheck(field=f"legs[{i}].from", account=leg.from_, asset=leg.asset),
        AccountCheck(field=f"legs[{i}].to", account=leg.to, asset=leg.asset),
    ]


def account_checks(instruction: Instruction) -> dict[str, list[AccountCheck]]:
    """Every leg's account checks, by ledger."""
    checks: dict[str, list[AccountCheck]] = {}
    for i, leg in enumerate(instruction.legs):
        checks.setdefault(leg.ledger, []).extend(leg_checks(i, leg))
    return checks


def leg_views(
    instruction: Instruction, hold_ids: list[str], states: list[LegState], details: list[str]
) -> list[LegView]:
    """Each leg of a trade as its view shows it."""
    return [
        LegView(
            index=i,
            ledger=leg.ledger,
            asset=leg.asset,
            from_=leg.from_,
            to=leg.to,
            amount=leg.amount,
            hold_id=hold_ids[i],
            state=states[i],
            detail=details[i],
        )
        for i, leg in enumerate(instruction.legs)
    ]


class TradeSagaBase:
    """What every trade's saga (the escrow saga, the HTLC) keeps, publishes and answers alike.

    Its status and reason, field errors, timeline, the accounts' owners, the
    search attributes as last published, and whether the compliance policy is known
    yet (a submission waits for that); and the first steps of both, checking the
    accounts' answers and the compliance screen.
    """

    def __init__(self, request: SettlementRequest) -> None:
        instruction = request.instruction
        self._request = request
        self._instruction = instruction
        self._deadline: datetime = instruction.deadline or workflow.now() + (
            instruction.settle_within or request.settlement.default_settle_within
        )
        self._status = TradeStatus.PENDING
        self._reason = ""
        self._errors: list[FieldError] = []
        self._timeline: list[TimelineEvent] = []
        self._owners: dict[str, str] = {}
        self._operators: list[str] = []
        self._policy_known = False
        # search attribute name -> value as last set (at start by the client, then by us)
        self._published: dict[str, Any] = {
            pair.key.name: pair.value for pair in workflow.info().typed_search_attributes
        }

    async def screened(self) -> None:
        """Wait until the trade is validated and screened (its parties known), or ended."""
        await workflow.wait_condition(lambda: self._policy_known or self._status.terminal)

    def check_submit(self, check: SubmitCheck) -> None:
        """Refuse a submission of the same trade id with different content."""
        if check.fingerprint != self._request.fingerprint:
            count_refusal("submit", "DuplicateTrade")
            raise ApplicationError(
                f"trade {self._instruction.trade_id} already exists with different content",
                type="DuplicateTrade",
                non_retryable=True,
            )

    def _record_checks(self, results: Iterable[CheckAccountsResult]) -> list[FieldError]:
        """Note the owners the ledgers' account checks found; return the problems they found."""
        problems: list[FieldError] = []
        for result in results:
            self._owners.update(result.owners)
            problems.extend(result.problems)
        return problems

    def _reject_invalid(self, problems: list[FieldError]) -> None:
        """End the trade REJECTED, naming every problem, if there is any."""
        if problems:
            self._errors = sorted(problems, key=lambda p: p.field)
            raise _Abort(TradeStatus.REJECTED, "; ".join(f"{p.field}: {p.message}" for p in self._errors))

    async def _screen(self) -> None:
        """Screen the trade's parties; a sanctioned one ends it REJECTED, before anything is reserved."""
        result: ScreenResult = await workflow.execute_local_activity_method(
            SettlementActivities.screen,
            ScreenRequest(parties=self._parties()),
            start_to_close_timeout=CALL_TIMEOUT,
        )
        self._operators = result.operators
        self._policy_known = True
        if result.hits:
            raise _Abort(TradeStatus.REJECTED, f"sanctioned party: {', '.join(result.hits)}")
        self._event("compliance screen passed")

    def _rejected(self, what: str, reason: str, code: str = "refused") -> Decision:
        """Refuse ``what`` ("approval by alice"): recorded in the timeline, counted by ``code``."""
        self._event(f"{what} rejected", reason)
        count_refusal(what.partition(" by ")[0], code)
        return Decision(accepted=False, reason=reason)

    def _ended(self) -> None:
        """The trade has its final status: put its reason in its memo and count it.

        After the final ``_publish``, in the same workflow task; the memo only for a trade
        whose client asked for it (``outcome_memo``), so that trades started before replay
        as they ran. The memo is a payload (the data converter's, encrypted where payloads
        are), so a reason naming an account or an amount is no plainer there than in the
        trade's result.
        """
        if self._request.outcome_memo:
            workflow.upsert_memo({MEMO_REASON: self._reason})
        meter = workflow.metric_meter()
        labels = {"status": self._status.value}
        meter.create_counter("dvp_trades_ended", "Trades ended, by final status").add(1, labels)
        elapsed = (workflow.now() - workflow.info().start_time).total_seconds()
        meter.create_histogram_float(
            "dvp_settlement_latency", "Time from a trade's start to its end, by final status", "s"
        ).record(max(elapsed, 0.0), labels)

    async def _wait_until(self, condition: Callable[[], bool], until: datetime) -> None:
        remaining = until - workflow.now()
        if remaining <= timedelta(0) or condition():
            return
        self._publish()
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(condition, timeout=remaining)

    def _parties(self) -> list[str]:
        parties = dict.fromkeys(self._instruction.parties())
        parties.update(dict.fromkeys(self._owners.values()))
        return sorted(parties)

    def _event(self, event: str, detail: str = "") -> None:
        self._timeline.append(TimelineEvent(at=workflow.now(), event=event, detail=detail))

    def _set_status(self, status: TradeStatus, reason: str = "") -> None:
        self._status = status
        self._reason = reason
        self._event(f"status {status.value}", reason)

    def _publish(self) -> None:
        """Bring the search attributes up to date, in one upsert of what changed.

        Called where the workflow task may end (a wait, a timer, a remote activity)
        and at the end: the statuses a trade passes through within one task would be
        visible to no one, and each upsert is a history event and a visibility write.
        """
        wanted = search_attributes(
            self._instruction, status=self._status, parties=self._parties(), deadline=self._deadline
        )
        upsert_changed(self._published, wanted)

    def _view(
        self, hold_ids: list[str], states: list[LegState], details: list[str], **more: Any
    ) -> TradeView:
        """The trade's view: what every saga shows, its legs, and ``more`` of its own."""
        return TradeView(
            trade_id=self._instruction.trade_id,
            workflow_id=workflow.info().workflow_id,
            status=self._status,
            reason=self._reason,
            deadline=self._deadline,
            legs=leg_views(self._instruction, hold_ids, states, details),
            timeline=self._timeline,
            errors=self._errors,
            fingerprint=self._request.fingerprint,
            **more,
        )
