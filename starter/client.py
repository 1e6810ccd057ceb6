"""``SettlementClient``: submit, watch, approve, cancel and claim settlements from Python.

    async with await SettlementClient.connect() as dvp:
        view = await dvp.submit({"trade_id": "T-1", "legs": [...], "settle_within": "PT30S"})
        final = await dvp.wait("T-1")

Instructions are checked here first (shape, ledgers, precision, deadline) so a
malformed one is refused before anything starts; the workflow then checks the
accounts on each ledger, and ``submit`` waits for that by default, so an unknown
account is refused at once too. Both raise ``InvalidInstruction`` naming the field.

An instruction with ``"protocol": "htlc"`` runs the HTLC workflow instead of the
escrow saga, under the same workflow id, so ``status``, ``wait`` and ``list`` treat
both alike; ``claim`` hands it the secret.

Every acting call (submit, approve, cancel, affirm, claim) sends the client's signed
token (``token=``, from ``dvp auth token`` or your identity provider), or the one the
call is given; the engine acts for the token's subject. Without a token nothing is
sent (``AuthError``). Reading (status, wait, list) needs none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from connection import connect_client, party_tagger
from domain import (
    AffirmMessage,
    ApprovalMessage,
    AuthError,
    CancelMessage,
    ClaimMessage,
    Config,
    Decision,
    DuplicateTrade,
    Instruction,
    InvalidInstruction,
    RequestRejected,
    SettlementRequest,
    SubmitCheck,
    TradeNotFound,
    TradePage,
    TradeStatus,
    TradeSummary,
    TradeView,
    load_config,
    normalise_sha256,
)
from identity import unverified_claims
from workflows import (
    MEMO_REASON,
    MEMO_STARTED,
    HtlcWorkflow,
    SettlementWorkflow,
    initial_search_attributes,
    workflow_id_for,
)

from ._checks import check_ledger, check_precision, invalid_from

T = TypeVar("T")
LIST_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 1000  # the server's own cap on a visibility page


def parse_instruction(data: Mapping[str, Any] | Instruction, config: Config) -> Instruction:
    """Parse and check an instruction against the configuration.

    Raises ``InvalidInstruction`` naming the first bad field. Checks everything that
    needs no ledger: shape, amounts, ledgers, the assets' precision, the deadline (in the
    future, and after ``settle_on`` or ``settle_after``).
    """
    if isinstance(data, Instruction):
        instruction = data
    else:
        if not isinstance(data, Mapping):
            raise InvalidInstruction("(instruction)", f"expected a JSON object, got {type(data).__name__}")
        try:
            instruction = Instruction.model_validate(dict(data))
        except ValidationError as exc:
            raise invalid_from(exc, "(instruction)") from None
    for i, leg in enumerate(instruction.legs):
        check_ledger(config, f"legs[{i}].ledger", leg.ledger)
        check_precision(config, f"legs[{i}].amount", leg.asset, leg.amount)
    if instruction.partial is not None and instruction.partial.min_quantity is not None:
        delivery = instruction.legs[0]
        check_precision(config, "partial.min_quantity", delivery.asset, instruction.partial.min_quantity)
    if instruction.deadline is not None and instruction.deadline <= datetime.now(UTC):
        raise InvalidInstruction("deadline", f"{instruction.deadline.isoformat()} is in the past")
    # the workflow refuses it too, by the worker's calendar: this spares the trade id
    for problem in instruction.schedule_problems(instruction.settles_from(config.settlement.time_zone)):
        raise InvalidInstruction(problem.field, problem.message)
    return instruction


def _message(model: type[T], **fields: Any) -> T:
    """An acting message; ``InvalidInstruction`` naming the field that is out of bounds (nothing sent)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise invalid_from(exc, "(message)") from None


class SettlementClient:
    """Submit and manage settlements. Build it with ``connect``; ``token`` is who it acts for."""

    def __init__(self, client: Client, config: Config, token: str | None = None) -> None:
        self.client = client
        self.config = config
        self.token = token

    @classmethod
    async def connect(cls, config: Config | None = None, token: str | None = None) -> SettlementClient:
        config = config or load_config()
        client = await connect_client(config.temporal.address, config.temporal.namespace, codec=config.codec)
        return cls(client, config, token)

    def with_token(self, token: str) -> SettlementClient:
        """A client on the same connection that acts with ``token``."""
        return SettlementClient(self.client, self.config, token)

    async def __aenter__(self) -> SettlementClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _handle(self, trade_id: str) -> WorkflowHandle[Any, TradeView]:
        return self.client.get_workflow_handle_for(SettlementWorkflow.run, workflow_id_for(trade_id))

    def _token(self, token: str | None, party: str | None = None) -> str:
        """The token to act with; ``AuthError`` (nothing sent) if there is none or it is not ``party``'s."""
        token = token or self.token
        if not token:
            raise AuthError(
                "no token: acting on a trade needs a signed token (token=, --token, --token-file or "
                "$DVP_TOKEN; make one with `dvp auth token SUBJECT`); nothing was sent"
            )
        if party:
            subject = unverified_claims(token).get("sub")
            if subject != party:
                raise AuthError(f"party: {party!r} is not the token's subject {subject!r}; nothing was sent")
        return token

    def settlement_request(self, instruction: Instruction, token: str = "") -> SettlementRequest:
        """The settlement workflow's input for ``instruction``: the routing is left to the worker."""
        return SettlementRequest(
            instruction=instruction,
            fingerprint=instruction.fingerprint(),
            token=token,
            local_steps=True,
            outcome_memo=True,
            token_rules=True,
        )

    async def submit(
        self, data: Mapping[str, Any] | Instruction, *, wait_accepted: bool = True, token: str | None = None
    ) -> TradeView:
        """Start settling one instruction, as the token's subject; idempotent on the trade id.

        With ``wait_accepted`` (the default) this returns once the accounts are
        validated and the trade screened, and raises ``InvalidInstruction`` if an
        account is unknown (or the engine refused the token: field ``token``).
        Submitting the same content again returns the existing trade; different
        content under the same id raises ``DuplicateTrade``. A submitter that owns
        no account of the trade and is not an operator gets it back REJECTED.
        """
        instruction = parse_instruction(data, self.config)
        token = self._token(token)
        # A courtesy check of our own token: an expired one would burn the trade id.
        expires = unverified_claims(token).get("exp")
        if isinstance(expires, (int, float)) and expires <= datetime.now(UTC).timestamp():
            raise AuthError("token: expired; nothing was sent")
        request = self.settlement_request(instruction, token)
        # the protocol picks the workflow; both answer the same updates and queries
        workflow_class: Any = HtlcWorkflow if instruction.protocol == "htlc" else SettlementWorkflow
        # one workflow per trade id, ever: a running one is joined, a closed one refused
        start_options: dict[str, Any] = {
            "id": workflow_id_for(instruction.trade_id),
            "task_queue": self.config.settlement_queue(),
            "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
            "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
            "search_attributes": initial_search_attributes(instruction, party_tagger(self.client)),
        }
        try:
            if wait_accepted:
                view = await self.client.execute_update_with_start_workflow(
                    workflow_class.submit,
                    SubmitCheck(fingerprint=request.fingerprint),
                    start_workflow_operation=WithStartWorkflowOperation(
                        workflow_class.run, request, **start_options
                    ),
                )
            else:
                await self.client.start_workflow(workflow_class.run, request, **start_options)
                return await self._same_or_duplicate(instruction.trade_id, request.fingerprint)
        except WorkflowAlreadyStartedError:
            view = await self._same_or_duplicate(instruction.trade_id, request.fingerprint)
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type == "DuplicateTrade":
                raise DuplicateTrade(cause.message) from None
            raise
        if view.errors:
            raise InvalidInstruction(view.errors[0].field, view.errors[0].message)
        return view

    async def _same_or_duplicate(self, trade_id: str, fingerprint: str) -> TradeView:
        view = await self.status(trade_id)
        if view.fingerprint != fingerprint:
            raise DuplicateTrade(f"trade {trade_id} already exists with different content")
        return view

    async def submit_many(
        self,
        items: Iterable[Mapping[str, Any] | Instruction],
        *,
        wait_accepted: bool = True,
        concurrency: int = 32,
        token: str | None = None,
    ) -> list[TradeView | Exception]:
        """Submit several instructions; each result is a view or the error it raised."""
        token = self._token(token)  # none: nothing is sent
        semaphore = asyncio.Semaphore(concurrency)

        async def one(item: Mapping[str, Any] | Instruction) -> TradeView | Exception:
            async with semaphore:
                try:
                    return await self.submit(item, wait_accepted=wait_accepted, token=token)
                except (InvalidInstruction, DuplicateTrade) as exc:
                    return exc

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def status(self, trade_id: str) -> TradeView:
        """The trade as it stands: status, legs and timeline.

        An open trade answers its query; a trade that has ended is read from its result,
        so that needs no worker. One terminated through Temporal has no result: its
        query replays it, on a worker, to where it was stopped.
        """
        handle = self._handle(trade_id)
        try:
            described = await handle.describe()
            if described.status is WorkflowExecutionStatus.COMPLETED:
                return await handle.result()
            return await handle.query(SettlementWorkflow.status)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise TradeNotFound(f"no trade {trade_id!r}") from None
            raise

    async def wait(self, trade_id: str, timeout: float | None = None) -> TradeView:
        """Wait until the trade ends: SETTLED, SETTLED_PARTIAL, CANCELLED, REJECTED, EXPIRED or ONE_SIDED."""
        handle = self._handle(trade_id)
        try:
            return await asyncio.wait_for(handle.result(), timeout)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise TradeNotFound(f"no trade {trade_id!r}") from None
            raise

    async def approve(self, trade_id: str, party: str | None = None, *, token: str | None = None) -> Decision:
        """Approve as the token's subject (``party``, if given, must be it); ``RequestRejected`` if not."""
        message = _message(ApprovalMessage, party=party or "", token=self._token(token, party))
        return await self._decide(trade_id, SettlementWorkflow.approve_update, message)

    async def cancel(
        self, trade_id: str, party: str | None = None, reason: str = "", *, token: str | None = None
    ) -> Decision:
        """Cancel as the token's subject; ``RequestRejected`` with the reason if refused."""
        message = _message(CancelMessage, party=party or "", reason=reason, token=self._token(token, party))
        return await self._decide(trade_id, SettlementWorkflow.cancel_update, message)

    async def affirm(self, trade_id: str, party: str | None = None, *, token: str | None = None) -> Decision:
        """Consent, as the token's subject, to the trade's debits of its accounts.

        A trade submitted by someone else waits in AWAITING_AFFIRMATION until every
        owner of an account it debits has affirmed. ``RequestRejected`` if refused.
        """
        message = _message(AffirmMessage, party=party or "", token=self._token(token, party))
        return await self._decide(trade_id, SettlementWorkflow.affirm, message)

    async def claim(
        self, trade_id: str, preimage: str, leg: int | None = None, *, token: str | None = None
    ) -> TradeView:
        """Claim a leg of an HTLC trade with the secret whose SHA-256 is its hashlock.

        ``leg`` defaults to the payment leg (``legs[1]``) while it is open. Returns
        the view once the claim, and the claim of the other leg it lets the engine
        make (``auto_claim``), ended. A malformed preimage raises ``InvalidInstruction``;
        a wrong one, a leg that cannot be claimed now, or a sender that is not a
        party, ``RequestRejected``; in each case nothing changes and the preimage is
        not recorded.
        """
        try:
            normalise_sha256(preimage, "a 32-byte secret")
        except ValueError as exc:
            raise InvalidInstruction("preimage", str(exc)) from None
        message = _message(ClaimMessage, preimage=preimage, leg=leg, token=self._token(token))
        view: TradeView = await self._update(trade_id, HtlcWorkflow.claim, message)
        return view

    async def _update(self, trade_id: str, update: Any, message: Any) -> Any:
        """The trade's answer to ``update``; ``RequestRejected`` if it refused or has ended."""
        try:
            return await self._handle(trade_id).execute_update(update, message)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                # a closed workflow takes no updates: say what became of the trade
                view = await self.status(trade_id)
                raise RequestRejected(f"trade is already {view.status.value}") from None
            raise
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise RequestRejected(
                cause.message if isinstance(cause, ApplicationError) else str(cause or exc)
            ) from None

    async def _decide(self, trade_id: str, update: Any, message: Any) -> Decision:
        decision: Decision = await self._update(trade_id, update, message)
        if not decision.accepted:
            raise RequestRejected(decision.reason)
        return decision

    async def list(
        self,
        status: TradeStatus | str | None = None,
        limit: int | None = None,
        *,
        party: str | None = None,
        closed_since: datetime | None = None,
    ) -> list[TradeSummary]:
        """This deployment's trades, newest first, optionally only those in ``status``, of
        ``party``, or ended since ``closed_since``; every page up to ``limit``.

        From Temporal's visibility alone (``list_page``): no worker is asked.
        """
        trades: list[TradeSummary] = []
        token: str | None = None
        while limit is None or len(trades) < limit:
            size = LIST_PAGE_SIZE if limit is None else min(LIST_PAGE_SIZE, limit - len(trades))
            page = await self.list_page(
                status, party=party, closed_since=closed_since, page_size=size, page_token=token
            )
            trades += page.trades
            token = page.next_page_token
            if token is None:
                break
        return trades

    async def list_page(
        self,
        status: TradeStatus | str | None = None,
        *,
        party: str | None = None,
        closed_since: datetime | None = None,
        page_size: int = LIST_PAGE_SIZE,
        page_token: str | None = None,
    ) -> TradePage:
        """One page of this deployment's trades (its settlement queue), newest first, from
        Temporal's visibility alone (no worker asked).

        Each trade's status, parties, assets and deadline are its search attributes, its
        reason is in its memo once it has ended, its times are its workflow's. ``party``
        is an account or an owner; DvpParties holds its keyed hash (``[codec]
        hash_parties``), which this client computes, so the name never reaches the server.
        ``page_token`` is a previous page's ``next_page_token``; ``InvalidInstruction``
        names it if it is not one.
        """
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidInstruction("limit", f"must be from 1 to {MAX_PAGE_SIZE}, got {page_size}")
        # this deployment's trades (others may share the namespace under another queue
        # prefix), each once: a trade that continued as new has a closed ContinuedAsNew run
        # for each of its earlier runs, and only its latest run counts
        query = (
            f'WorkflowType IN ("Settlement", "Htlc") AND TaskQueue = "{self.config.settlement_queue()}"'
            ' AND ExecutionStatus != "ContinuedAsNew"'
        )
        if status is not None:
            query += f' AND DvpStatus = "{TradeStatus(status).value}"'
        if party is not None:
            tag = party_tagger(self.client)
            query += f" AND DvpParties = {json.dumps(tag(party) if tag else party)}"
        if closed_since is not None:
            query += f' AND CloseTime >= "{closed_since.astimezone(UTC).isoformat()}"'
        token = _decode_token(page_token) if page_token else None
        executions = self.client.list_workflows(query, page_size=page_size, next_page_token=token)
        try:
            await executions.fetch_next_page()
        except RPCError as exc:
            # The server answers a token it did not issue with INVALID_ARGUMENT, or with an
            # internal error when the token does not even decode.
            transient = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED)
            if page_token and exc.status not in transient:
                raise InvalidInstruction(
                    "page_token", f"not a page token of this listing: {exc.message}"
                ) from None
            raise
        trades = await asyncio.gather(*(_summary(e) for e in executions.current_page or []))
        next_token = executions.next_page_token
        return TradePage(
            trades=list(trades), next_page_token=_encode_token(next_token) if next_token else None
        )


_STATUS = SearchAttributeKey.for_keyword("DvpStatus")
_PARTIES = SearchAttributeKey.for_keyword_list("DvpParties")
_ASSETS = SearchAttributeKey.for_keyword_list("DvpAssets")
_DEADLINE = SearchAttributeKey.for_datetime("DvpDeadline")


async def _summary(execution: WorkflowExecution) -> TradeSummary:
    attributes = execution.typed_search_attributes
    status = attributes.get(_STATUS)
    reason = ""
    if execution.close_time is not None:
        reason = str(await execution.memo_value(MEMO_REASON, "", type_hint=str))
    started_at = execution.start_time  # the run's start: a continued run's memo has the trade's
    if MEMO_STARTED in execution.raw_info.memo.fields:
        started_at = datetime.fromisoformat(await execution.memo_value(MEMO_STARTED, type_hint=str))
    return TradeSummary(
        trade_id=execution.id.removeprefix("trade-"),
        workflow_id=execution.id,
        protocol="htlc" if execution.workflow_type == "Htlc" else "escrow",
        status=TradeStatus(status) if status is not None and status in TradeStatus.__members__ else None,
        reason=reason,
        workflow_status=execution.status.name if execution.status else "",
        started_at=started_at,
        closed_at=execution.close_time,
        deadline=attributes.get(_DEADLINE),
        parties=list(attributes.get(_PARTIES) or []),
        assets=list(attributes.get(_ASSETS) or []),
    )


def _encode_token(token: bytes) -> str:
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def _decode_token(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInstruction("page_token", f"{text[:40]!r} is not a page token of dvp list") from None
