"""Pieces the saga workflows (trade, HTLC, netting batch) share.

Deterministic and free of side effects and of state at import, like the workflows
themselves. The worker passes this module through the sandbox (``worker.WORKFLOW_RUNNER``);
the trade sagas import it unpassed, so the replay tests check it in the sandbox.
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
    parties: list[str] | None,
    deadline: datetime | None,
) -> list[SearchAttributeUpdate[Any]]:
    """The search attributes of a trade: what the Web UI and ``dvp list`` filter on.

    Temporal stores them in the clear (no codec sees them): ``docs/encryption.md``
    lists what each one reveals. ``parties`` None leaves DvpParties as it is.
    """
    updates: list[SearchAttributeUpdate[Any]] = [
        STATUS.value_set(status.value),
        TRADE_ID.value_set(instruction.trade_id),
    ]
    if parties is not None:
        updates.append(PARTIES.value_set(parties))
    updates.append(ASSETS.value_set(sorted({leg.asset for leg in instruction.legs})))
    if deadline is not None:
        updates.append(DEADLINE.value_set(deadline))
    return updates


def initial_search_attributes(
    instruction: Instruction, party_tag: Callable[[str], str] | None = None
) -> TypedSearchAttributes:
    """What a client sets when it starts a trade, so the workflow need not upsert them.

    ``party_tag`` (``connection.party_tagger``) puts keyed hashes in DvpParties, not names.
    """
    parties = instruction.parties()
    updates = search_attributes(
        instruction,
        status=TradeStatus.PENDING,
        parties=sorted(parties if party_tag is None else {party_tag(p) for p in parties}),
        deadline=instruction.deadline,
    )
    return TypedSearchAttributes([SearchAttributePair(u.key, u.value) for u in updates])


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
        self._party_tags: dict[str, str] | None = None
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
        self._party_tags = result.party_tags
        self._policy_known = True
        if result.hits:
            raise _Abort(TradeStatus.REJECTED, f"sanctioned party: {', '.join(result.hits)}")
        self._event("compliance screen passed")

    def _rejected(self, what: str, reason: str) -> Decision:
        self._event(f"{what} rejected", reason)
        return Decision(accepted=False, reason=reason)

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
            self._instruction,
            status=self._status,
            parties=self._searchable_parties(),
            deadline=self._deadline,
        )
        upsert_changed(self._published, wanted)

    def _searchable_parties(self) -> list[str] | None:
        """What DvpParties shows: the tags the screen gave for the parties, or their names.

        Until the screen answers, the worker's choice is not known, and DvpParties keeps
        what the client set (None): the names are never published in place of tags.
        """
        if not self._policy_known:
            return None
        if self._party_tags is None:
            return self._parties()
        # a party the screen gave no tag for stays out: unlisted rather than named
        return sorted({self._party_tags[p] for p in self._parties() if p in self._party_tags})

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
