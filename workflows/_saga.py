"""Pieces the saga workflows (trade, HTLC, netting batch) share.

Deterministic and free of side effects and of state at import, like the workflows
themselves. The worker passes this module through the sandbox
(``worker.TRADE_WORKFLOW_MODULES``); the trade sagas import it unpassed, so the replay
tests check it in the sandbox. See docs/decisions/0003-sagas-passed-through-the-sandbox.md.

Authority (docs/trust.md). A trade acts only on verified tokens: the submitter's is
judged by the worker when the trade starts (``SettlementActivities.admit``, a local
activity whose verdict and routing are recorded); an update's in its validator, a
signal's in its handler, at ``workflow.now()``, with the verifier the worker
installed for its task queue (``identity.install_verifier``). So a replay needs the
keys only for the signals it holds (they re-run), and finds the same verdicts as long
as those keys are still known. Trades started before this carry no patch marker
``TRUST_PATCH`` and replay under the rules they ran with.

Metrics (docs/operations.md, "Metrics") are recorded through ``workflow.metric_meter()``,
which records nothing while a workflow replays, so each is counted once however often
its trade is replayed; refusals are counted in one place, ``count_refusal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

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
        Admission,
        AdmitRequest,
        AffirmMessage,
        AuthError,
        Carried,
        CheckAccountsResult,
        Decision,
        FieldError,
        Instruction,
        Leg,
        LegState,
        LegView,
        Repeat,
        Routing,
        ScreenRequest,
        ScreenResult,
        SettlementConfig,
        SettlementRequest,
        SubmitCheck,
        TimelineEvent,
        TradeStatus,
        TradeView,
        clip,
    )
    from identity import Principal, installed_verifier, unverified_claims

from .calls import CALL_TIMEOUT

T = TypeVar("T")

TRUST_PATCH = "dvp-trust"
"""The patch marker of trades that act on verified tokens, consent and the worker's routing."""

STATUS = SearchAttributeKey.for_keyword("DvpStatus")
TRADE_ID = SearchAttributeKey.for_keyword("DvpTradeId")
PARTIES = SearchAttributeKey.for_keyword_list("DvpParties")
ASSETS = SearchAttributeKey.for_keyword_list("DvpAssets")
DEADLINE = SearchAttributeKey.for_datetime("DvpDeadline")

# The memo key of a trade's reason, set when it ends (``SettlementRequest.outcome_memo``).
MEMO_REASON = "reason"
# The memo key of a trade's start, set by each run it continued as new into (visibility
# gives a run's own start only).
MEMO_STARTED = "started"

# What a long timeline keeps in full: its first entries (the trade's start) and its
# last; the entries between are folded into one line per kind (``Repeat``: the entry
# with its numbers as "N", at most TIMELINE_KINDS lines, the oldest kinds merged). Folded
# when a run continues as new, and within a run once more than TIMELINE_FOLD_AT entries
# follow the first ones; so a view never shows more than 12 + 24 + 64 = 100 entries
# (docs/design.md, "Limits").
TIMELINE_HEAD = 12
TIMELINE_TAIL = 40
TIMELINE_FOLD_AT = 64
TIMELINE_KINDS = 24
OTHER_ENTRIES = "other entries"
HISTORY_HEADROOM = 500
"""How far past ``continue_as_new_after`` a run grows at most: the steps between two wait
points (a reservation attempt, a fill) add under 100 events, and the signals the server
records while the run's last workflow task is in flight come on top (a flood of 50 to 100
concurrent signals added up to about 150). docs/decisions/0011-continue-as-new.md."""
RECYCLED = "recycled"
"""The ``Repeat`` that counts a trade's reservation attempts that found a leg short."""

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


def count_refusal(request: str, reason: str) -> None:
    """Count one refused request to a trade: ``dvp_refusals`` by ``request`` and ``reason`` code.

    Every refusal a saga reports comes through here: a validator's (``refusal``), a
    handler's (``TradeSagaBase._rejected``) and a refused signal's
    (``TradeSagaBase._refused_signal``), so a new kind of refusal lands in the metric by
    going through one of them. ``reason`` is a short code (a ``Problem``'s, or the
    refusal's kind such as ``Unauthenticated``), never the message, which names parties.
    """
    workflow.metric_meter().create_counter(
        "dvp_refusals", "Requests to trades refused, by request and reason code"
    ).add(1, {"request": request, "reason": reason})


def count(name: str, description: str, value: int = 1, **labels: str) -> None:
    """Add ``value`` to the workflow counter ``name`` (nothing while replaying)."""
    workflow.metric_meter().create_counter(name, description).add(value, labels)


_KEYS: dict[str, SearchAttributeKey[Any]] = {
    key.name: key for key in (STATUS, TRADE_ID, PARTIES, ASSETS, DEADLINE)
}


def continued_run() -> bool:
    """Whether this run is one the server started by a continue-as-new of the trade's own.

    ``continued_run_id`` is set by the server, never by a client; a cron run or a retry
    (which a client could ask for, with any input) has it too, but not as attempt 1
    without a cron schedule. Only such a run accepts carried state.
    """
    info = workflow.info()
    return bool(info.continued_run_id) and not info.cron_schedule and info.attempt == 1


def history_due(settlement: SettlementConfig | None) -> bool:
    """Whether this run's history reached its bound (``continue_as_new_after``), or the
    server suggests continuing as new. No command: free for a trade that never reaches it."""
    if settlement is None:
        return False
    info = workflow.info()
    return (
        info.get_current_history_length() >= settlement.continue_as_new_after
        or info.is_continue_as_new_suggested()
    )


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


class Problem(str):
    """Why a request is refused: the message, and a short ``code`` the refusal metric counts it by."""

    code: str

    def __new__(cls, message: str, code: str) -> Problem:
        problem = super().__new__(cls, message)
        problem.code = code
        return problem


def code_of(reason: str, default: str) -> str:
    return reason.code if isinstance(reason, Problem) else default


def refusal(reason: str, kind: str = "Refused", *, request: str = "update") -> ApplicationError:
    """How an update's validator refuses: nothing of the update is recorded; it is counted."""
    count_refusal(request, code_of(reason, kind))
    return ApplicationError(reason, type=kind, non_retryable=True)


def verified(token: str, party: str = "") -> Principal:
    """Who ``token`` speaks for now, by the worker's verifier; ``AuthError`` on any doubt.

    ``party`` (a name the sender typed, ``--as``), when given, must be the token's subject.
    """
    verifier = installed_verifier(workflow.info().task_queue)
    if verifier is None:
        raise AuthError("this worker has no keys to verify tokens with")
    principal = verifier.verify(token, workflow.now())
    if party and party != principal.subject:
        raise AuthError(f"party: {party!r} is not the token's subject {principal.subject!r}")
    return principal


def accepted_subject(token: str) -> tuple[str, tuple[str, ...]]:
    """The subject and roles of the token of an update its validator accepted.

    Not verified again, on purpose: an update's handler runs only once its validator
    has verified the token and accepted the update, and the history records that
    acceptance; on replay validators do not run, so the history, not the keys of the
    day, is the proof, and a replay of a trade's updates needs no key at all.
    """
    claims = unverified_claims(token)
    roles = claims.get("roles")
    return str(claims.get("sub")), tuple(roles) if isinstance(roles, list) else ()


def routing_problems(request: SettlementRequest, routing: Routing) -> list[FieldError]:
    """Where ``request`` names routing other than the worker's: each field that differs."""
    problems: list[FieldError] = []
    for i, leg in enumerate(request.instruction.legs):
        if leg.ledger in routing.unknown_ledgers:
            message = f"{leg.ledger!r} is not a ledger of the settlement worker's configuration"
            problems.append(FieldError(field=f"legs[{i}].ledger", message=message))
    if request.settlement_queue is not None and request.settlement_queue != routing.settlement_queue:
        message = f"{request.settlement_queue!r} is not the worker's ({routing.settlement_queue!r})"
        problems.append(FieldError(field="settlement_queue", message=message))
    for ledger, queue in sorted((request.ledger_queues or {}).items()):
        expected = routing.ledger_queues.get(ledger)
        if queue != expected:
            message = f"{queue!r} is not the task queue the worker's configuration gives it ({expected!r})"
            problems.append(FieldError(field=f"ledger_queues.{ledger}", message=message))
    if request.local_ledgers is not None and sorted(request.local_ledgers) != routing.local_ledgers:
        message = (
            f"{sorted(request.local_ledgers)} are not the worker's local ledgers {routing.local_ledgers}"
        )
        problems.append(FieldError(field="local_ledgers", message=message))
    if request.settlement is not None and request.settlement != routing.settlement:
        message = "differs from the settlement worker's [settlement] configuration"
        problems.append(FieldError(field="settlement", message=message))
    chains = routing.chain_order(request.instruction)
    if request.chain_ledgers and request.chain_ledgers != chains:
        message = f"{request.chain_ledgers} are not the worker's chain ledgers in commit order {chains}"
        problems.append(FieldError(field="chain_ledgers", message=message))
    for asset, places in sorted((request.precisions or {}).items()):
        if routing.precisions.get(asset) != places:
            message = f"{places} is not the precision the worker's configuration gives {asset}"
            problems.append(FieldError(field=f"precisions.{asset}", message=message))
    return problems


def names_routing(request: SettlementRequest) -> bool:
    """Whether ``request`` names any routing of its own (the worker's must then be compared first)."""
    return any(
        value is not None
        for value in (
            request.settlement_queue,
            request.ledger_queues,
            request.local_ledgers,
            request.settlement,
            request.precisions,
        )
    ) or bool(request.chain_ledgers)


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
        self._started = workflow.now()
        # The intended settlement time (settle_after, or settle_on's start by the worker's
        # calendar, known once admitted): nothing is reserved before it (_await_settlement_time).
        self._settle_from: datetime | None = instruction.settle_after
        # Provisional until the worker's routing is known (_admit), for a trade that
        # gives no time limit of its own.
        self._deadline: datetime = self._deadline_under(request.settlement or SettlementConfig())
        # True for every trade started since verified tokens, consent and the worker's
        # routing: by its request (``token_rules``, no marker), or else by the patch,
        # which is true in any new run; a continued run, as its first run was. False only
        # when replaying one started before, which keeps the rules it ran with: routing
        # from its input, parties by name.
        carried = request.carried
        self._resume: Carried | None = carried if carried is not None and continued_run() else None
        # Why the request's carried state was refused (a start, not a continued run): it
        # ends REJECTED before anything else (_refuse_forged).
        self._forged = carried is not None and self._resume is None
        self._trusted = (
            self._resume.trusted if self._resume else request.token_rules or workflow.patched(TRUST_PATCH)
        )
        self._routing: Routing | None = None
        self._checked: Admission | None = None  # the admission, with the account checks it ran
        self._submitter = ""
        self._submitter_roles: list[str] = []
        self._consent_known = False  # whose consent the debits need (after the account checks)
        self._consent_from: list[str] = []
        self._consented: list[str] = []
        self._refused_signals = 0
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
        # Across runs (continue-as-new, docs/decisions/0011-continue-as-new.md): how many
        # runs came before, the timeline's first entries and its folded repeats, the
        # recycle pause in force and since when the current attempt recycles, and the
        # ending an unwind releases for.
        self._runs = 0
        self._timeline_head: list[TimelineEvent] = []
        self._repeats: dict[str, Repeat] = {}
        self._interval = timedelta(0)
        self._waiting_since = self._started
        self._stage: str | None = None  # where a retry's pause may continue as new
        self._abort: _Abort | None = None
        if self._resume is not None:
            self._restore(self._resume)

    def _restore(self, carried: Carried) -> None:
        """Take up what the last run knew (a continued run only)."""
        self._runs = carried.runs
        self._started, self._deadline = carried.started, carried.deadline
        self._settle_from = carried.settle_from
        self._routing = carried.routing
        self._submitter, self._submitter_roles = carried.submitter, list(carried.submitter_roles)
        self._consent_known = carried.consent_known
        self._consent_from, self._consented = list(carried.consent_from), list(carried.consented)
        self._refused_signals = carried.refused_signals
        self._status, self._reason = carried.status, carried.reason
        self._errors = list(carried.errors)
        self._timeline_head, self._timeline = list(carried.timeline_head), list(carried.timeline)
        self._repeats = {r.event: r for r in carried.repeats}
        self._owners, self._operators = dict(carried.owners), list(carried.operators)
        self._policy_known, self._party_tags = carried.policy_known, carried.party_tags
        self._interval = carried.interval or timedelta(0)
        self._waiting_since = carried.waiting_since or self._started
        if carried.abort_status is not None:
            self._abort = _Abort(carried.abort_status, carried.abort_reason)

    def _deadline_under(self, settlement: SettlementConfig) -> datetime:
        instruction = self._instruction
        if instruction.deadline is not None:
            return instruction.deadline
        start = self._started if self._settle_from is None else max(self._started, self._settle_from)
        return start + (instruction.settle_within or settlement.default_settle_within)

    # ------------------------------------------------------------ authority

    async def _admit(self) -> None:
        """The submitter's token and the worker's routing; REJECTED, with nothing reserved, if refused.

        One local activity: the worker verifies the token at the workflow's time and
        answers with its own routing for the trade's ledgers; both are recorded, so a
        replay needs neither the keys nor the same configuration.
        """
        instruction = self._instruction
        checks = self._checks_with_admission() if not names_routing(self._request) else {}
        admission: Admission = await workflow.execute_local_activity_method(
            SettlementActivities.admit_checked if checks else SettlementActivities.admit,
            AdmitRequest(
                token=self._request.token,
                now=workflow.now(),
                ledgers=sorted({leg.ledger for leg in instruction.legs}),
                assets=sorted({leg.asset for leg in instruction.legs}),
                settle_on=instruction.settle_on,
                checks=checks,
            ),
            start_to_close_timeout=CALL_TIMEOUT,
        )
        self._checked = admission
        routing = admission.routing
        self._routing = routing
        if admission.refused:
            self._errors = [FieldError(field="token", message=admission.refused.removeprefix("token: "))]
            raise _Abort(TradeStatus.REJECTED, f"submission refused: {admission.refused}")
        self._submitter, self._submitter_roles = admission.subject, admission.roles
        if instruction.settle_on is not None:
            self._settle_from = admission.settles_from
        self._reject_invalid(routing_problems(self._request, routing) + self._schedule_problems())
        self._request = self._request.model_copy(
            update={
                "settlement_queue": routing.settlement_queue,
                "ledger_queues": routing.ledger_queues,
                "local_ledgers": routing.local_ledgers,
                "settlement": routing.settlement,
                "precisions": routing.precisions,
                "chain_ledgers": routing.chain_order(self._request.instruction),
            }
        )
        self._deadline = self._deadline_under(routing.settlement)
        self._routed()

    def _schedule_problems(self) -> list[FieldError]:
        """A deadline not after the intended settlement time: refused, as the client refuses it."""
        instruction = self._instruction
        if instruction.settle_on is not None and self._settle_from is None:
            message = "the settlement worker did not say when this day starts in its calendar"
            return [FieldError(field="settle_on", message=message)]
        return instruction.schedule_problems(self._settle_from)

    async def _await_settlement_time(self, stop: Callable[[], bool]) -> None:
        """Wait in SCHEDULED until the intended settlement time, reserving nothing, or until ``stop``.

        No command at all for a trade without ``settle_on``/``settle_after`` (or one whose
        time has come): it runs as trades did before them.
        """
        settle_from = self._settle_from
        if settle_from is None or workflow.now() >= settle_from or stop():
            return
        if self._status is not TradeStatus.SCHEDULED:  # (a continued run resumes the wait)
            self._set_status(TradeStatus.SCHEDULED, f"nothing is reserved before {settle_from.isoformat()}")
        await self._wait_until(stop, settle_from, phase="scheduled")

    def _routed(self) -> None:
        """What a saga derives from its request's routing; again once the worker's replaces it."""

    def _checks_with_admission(self) -> dict[str, list[AccountCheck]]:
        """The account checks the admission may run on the worker's local ledgers ({}: none).

        Only for a request with ``token_rules``: the trades before it were admitted
        alone, and replay so.
        """
        return {}

    def _is_operator(self, subject: str, roles: Iterable[str] = ()) -> bool:
        """An operator by the worker's configuration: in [roles] operators, or holding an operator role."""
        routing = self._routing
        if routing is None:
            return False
        return subject in routing.operators or bool(set(roles) & set(routing.operator_roles))

    def _authorize_submission(self) -> None:
        """The submitter must be an operator or own an account of the trade; note whose consent is due.

        The owners are the ledgers' answers to the account checks, never the
        instruction's. An operator's submission consents for every account; a
        party's, for the accounts it owns; every other owner of a debited account
        must affirm.
        """
        owners = [self._owners[account] for account in self._instruction.parties() if account in self._owners]
        operator = self._is_operator(self._submitter, self._submitter_roles)
        if not operator and self._submitter not in owners:
            raise _Abort(
                TradeStatus.REJECTED,
                f"submitted by {self._submitter}, who owns no account of this trade and is not an operator",
            )
        debited = [self._owners[a] for a in self._instruction.debited() if a in self._owners]
        self._consent_from = list(dict.fromkeys(debited))
        self._consented = [o for o in self._consent_from if operator or o == self._submitter]
        self._consent_known = True
        by = "an operator" if operator else "a party"
        self._event(
            f"submitted by {self._submitter}", f"{by}; consents for {', '.join(self._consented) or 'none'}"
        )

    def _missing_consent(self) -> list[str]:
        return [o for o in self._consent_from if o not in self._consented]

    async def _await_consent(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait until every debited account's owner consented (AWAITING_AFFIRMATION); else EXPIRED."""
        if not self._missing_consent():
            return
        if self._status is not TradeStatus.AWAITING_AFFIRMATION:  # else resumed by a continued run
            self._set_status(
                TradeStatus.AWAITING_AFFIRMATION, f"waiting for {', '.join(self._missing_consent())}"
            )
        await self._wait_until(
            lambda: not self._missing_consent() or stop(), self._deadline, phase="affirmation"
        )
        if stop():
            return
        if missing := self._missing_consent():
            raise _Abort(TradeStatus.EXPIRED, f"no affirmation from {', '.join(missing)} before the deadline")

    def _affirm_problem(self, subject: str) -> str:
        """Why ``subject`` may not affirm now ("" if it may); consent must be known."""
        if self._status.terminal:
            return Problem(f"trade is already {self._status.value}", "ended")
        if subject not in self._consent_from:
            return Problem(f"{subject} owns no account this trade debits", "not_a_debtor")
        if subject in self._consented:
            return Problem(f"{subject} has already consented", "already_affirmed")
        return ""

    def check_affirm(self, message: AffirmMessage) -> None:
        """Refuse an affirmation (before it is recorded) whose token fails or that cannot count."""
        if not self._trusted:
            needs_none = Problem(
                "this trade started before affirmations existed: it needs none", "not_needed"
            )
            raise refusal(needs_none, request="affirmation")
        try:
            subject = verified(message.token, message.party).subject
        except AuthError as exc:
            raise refusal(str(exc), "Unauthenticated", request="affirmation") from None
        if self._status.terminal:
            raise refusal(Problem(f"trade is already {self._status.value}", "ended"), request="affirmation")
        if self._consent_known and (problem := self._affirm_problem(subject)):
            raise refusal(problem, request="affirmation")

    async def affirm(self, message: AffirmMessage) -> Decision:
        """Consent, as the token's subject, to the debits of its accounts (after ``check_affirm``)."""
        subject, _ = accepted_subject(message.token)
        await workflow.wait_condition(lambda: self._consent_known or self._status.terminal)
        if problem := self._affirm_problem(subject):
            return self._rejected(f"affirmation by {subject}", problem)
        self._consented.append(subject)
        self._event(f"affirmed by {subject}", "consents to the debits of its accounts")
        return Decision(accepted=True)

    def _refused_signal(self, request: str, reason: str) -> None:
        # Counted, not added to the timeline: a flood of refused signals must not grow it.
        self._refused_signals += 1
        count_refusal(f"{request}_signal", reason)

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
        self._party_tags = result.party_tags
        self._policy_known = True
        if result.hits:
            raise _Abort(TradeStatus.REJECTED, f"sanctioned party: {', '.join(result.hits)}")
        self._event("compliance screen passed")

    def _rejected(self, what: str, reason: str, code: str = "") -> Decision:
        """Refuse ``what`` ("approval by alice"): recorded in the timeline, counted by ``code``
        (by default the reason's, if it is a ``Problem``)."""
        self._event(f"{what} rejected", reason)
        count_refusal(what.partition(" by ")[0], code or code_of(reason, "refused"))
        return Decision(accepted=False, reason=reason)

    def _ended(self) -> None:
        """The trade has its final status: put its reason in its memo and count it.

        After the final ``_publish``, in the same workflow task; the memo only for a trade
        whose client asked for it (``outcome_memo``), so that trades started before replay
        as they ran. The memo is a payload (the data converter's, encrypted where payloads
        are), so a reason naming an account or an amount is no plainer there than in the
        trade's result. A trade ending with no reason (a settled escrow trade) has nothing
        to put there, and a request with ``token_rules`` writes nothing then: one history
        event and one visibility write less for the common ending (`dvp list` shows an
        absent reason as an empty one). Trades before that flag wrote it empty, and
        replay so.
        """
        if self._request.outcome_memo and (self._reason or not self._request.token_rules):
            workflow.upsert_memo({MEMO_REASON: self._reason})
        meter = workflow.metric_meter()
        labels = {"status": self._status.value}
        meter.create_counter("dvp_trades_ended", "Trades ended, by final status").add(1, labels)
        elapsed = (workflow.now() - self._started).total_seconds()
        meter.create_histogram_float(
            "dvp_settlement_latency", "Time from a trade's start to its end, by final status", "s"
        ).record(max(elapsed, 0.0), labels)

    async def _wait_until(
        self, condition: Callable[[], bool], until: datetime, phase: str | None = None
    ) -> None:
        """Wait until ``condition`` holds or ``until`` passes.

        With a ``phase`` this is a wait point: once the run's history reached its bound
        (``history_due``) the trade continues as new here, to resume at ``phase``, unless
        ``condition`` came true meanwhile. A run that never reaches the bound waits
        exactly as before: the check issues no command.
        """
        remaining = until - workflow.now()
        if remaining <= timedelta(0) or condition():
            return
        self._publish()

        def due() -> bool:
            return phase is not None and self._history_due()

        if not due():
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(lambda: condition() or due(), timeout=remaining)
        if phase is not None and due() and not condition() and workflow.now() < until:
            await self._continue_as_new(phase, interrupted=condition)

    def _history_due(self) -> bool:
        return history_due(self._request.settlement)

    async def _continue_as_new(self, phase: str, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Continue as new, carrying everything the trade knows, to resume at ``phase``.

        First every update and signal handler must have finished; returns (without
        continuing) if ``interrupted`` comes true meanwhile (the wait it came from is
        over: the next wait point continues). Never returns otherwise.
        """
        await workflow.wait_condition(lambda: workflow.all_handlers_finished() or interrupted())
        if interrupted():
            return
        self._runs += 1
        length = workflow.info().get_current_history_length()
        self._event("continued as new", f"run {self._runs + 1} begins; run {self._runs} had {length} events")
        carried = self._carry(phase)
        count("dvp_continued_as_new", "Runs of trades that continued as new, by phase", phase=phase)
        self._continue(self._request.model_copy(update={"carried": carried}))

    def _continue(self, request: SettlementRequest) -> NoReturn:
        values = dict(self._published)
        for update in search_attributes(
            self._instruction,
            status=self._status,
            parties=self._searchable_parties(),
            deadline=self._deadline,
        ):
            values[update.key.name] = update.value
        attributes = TypedSearchAttributes(
            [SearchAttributePair(_KEYS[name], value) for name, value in values.items() if name in _KEYS]
        )
        memo = {MEMO_STARTED: self._started.isoformat()}
        workflow.continue_as_new(request, search_attributes=attributes, memo=memo)

    def _carry(self, phase: str) -> Carried:
        """What the next run takes up (``_restore``): the base's, with the saga's own (``_carry_own``)."""
        self._fold_timeline()
        abort = self._abort
        return Carried(
            phase=phase,
            runs=self._runs,
            started=self._started,
            settle_from=self._settle_from,
            deadline=self._deadline,
            trusted=self._trusted,
            routing=self._routing,
            submitter=self._submitter,
            submitter_roles=self._submitter_roles,
            consent_known=self._consent_known,
            consent_from=self._consent_from,
            consented=self._consented,
            refused_signals=self._refused_signals,
            status=self._status,
            reason=self._reason,
            errors=self._errors,
            timeline_head=self._timeline_head,
            repeats=sorted(self._repeats.values(), key=lambda r: r.last_at),
            timeline=self._timeline,
            owners=self._owners,
            operators=self._operators,
            policy_known=self._policy_known,
            party_tags=self._party_tags,
            interval=self._interval,
            waiting_since=self._waiting_since,
            abort_status=abort.status if abort else None,
            abort_reason=abort.reason if abort else "",
            **self._carry_own(),
        )

    def _carry_own(self) -> dict[str, Any]:
        """The saga's own part of what it carries: ``{"escrow": ...}`` or ``{"htlc": ...}``."""
        return {}

    def _refuse_forged(self) -> None:
        """A start (not a continued run) whose request carries state: REJECTED, nothing reserved."""
        if self._forged:
            message = "only a trade's own continued run carries state; a start may not"
            self._errors = [FieldError(field="carried", message=message)]
            raise _Abort(TradeStatus.REJECTED, f"carried: {message}")

    def _recycled(self, detail: str) -> None:
        """Count one reservation attempt that found a leg short (shown once the timeline is folded)."""
        self._repeat(RECYCLED, workflow.now(), detail)

    def _timeline_view(self) -> list[TimelineEvent]:
        """The timeline as shown: in full, or, once folded by a continue-as-new, its first
        entries, a line per kind of entry folded, and its last entries."""
        if not self._timeline_head:
            return self._timeline
        folded = [
            TimelineEvent(
                at=r.last_at,
                event=f"{r.event}{'' if r.event == RECYCLED else ':'} {r.count:,} times",
                detail=f"last: {r.last_detail}" if r.last_detail else "",
            )
            for r in sorted(self._repeats.values(), key=lambda r: r.last_at)
        ]
        return [*self._timeline_head, *folded, *self._timeline]

    def _parties(self) -> list[str]:
        parties = dict.fromkeys(self._instruction.parties())
        parties.update(dict.fromkeys(self._owners.values()))
        return sorted(parties)

    def _event(self, event: str, detail: str = "") -> None:
        self._timeline.append(TimelineEvent(at=workflow.now(), event=event, detail=detail))
        if len(self._timeline) > TIMELINE_FOLD_AT + (0 if self._timeline_head else TIMELINE_HEAD):
            self._fold_timeline()

    def _fold_timeline(self) -> None:
        """Fold all but the first and the last entries into one line per kind (no command: state only)."""
        if not self._timeline_head:
            self._timeline_head = self._timeline[:TIMELINE_HEAD]
            self._timeline = self._timeline[TIMELINE_HEAD:]
        folded = self._timeline[: max(len(self._timeline) - TIMELINE_TAIL, 0)]
        self._timeline = self._timeline[len(folded) :]
        for entry in folded:
            kind = re.sub(r"\d+", "N", entry.event)
            detail = entry.detail if kind == entry.event else f"{entry.event}: {entry.detail}".rstrip(": ")
            self._repeat(kind, entry.at, detail)
        if len(self._repeats) > TIMELINE_KINDS:  # the kinds least recently seen become one line
            oldest = sorted(self._repeats.values(), key=lambda r: r.last_at)
            merged = oldest[: len(oldest) - TIMELINE_KINDS + 1]
            for repeat in merged:
                del self._repeats[repeat.event]
            last = merged[-1]
            self._repeats[OTHER_ENTRIES] = Repeat(
                event=OTHER_ENTRIES,
                count=sum(r.count for r in merged),
                last_at=last.last_at,
                last_detail=last.last_detail,
            )

    def _repeat(self, kind: str, at: datetime, detail: str) -> None:
        seen = self._repeats.get(kind)
        self._repeats[kind] = Repeat(
            event=kind, count=(seen.count if seen else 0) + 1, last_at=at, last_detail=clip(detail)
        )

    def _set_status(self, status: TradeStatus, reason: str = "") -> None:
        self._status = status
        self._reason = clip(reason)  # bounded, as the view and the memo show it (MAX_DETAIL)
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
            timeline=self._timeline_view(),
            errors=self._errors,
            fingerprint=self._request.fingerprint,
            submitted_by=self._submitter,
            consent_from=self._consent_from,
            consented=self._consented,
            refused_signals=self._refused_signals,
            **more,
        )
