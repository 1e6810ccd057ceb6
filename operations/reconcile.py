"""Reconciliation: every open hold on every ledger against the trade (or batch) that placed it.

A hold is the ledger's half of a promise whose other half is a workflow. When the
workflow is gone (terminated through Temporal, or never known to this Temporal) nothing
will end the hold but the ledger's backstop expiry, hours later. ``reconcile`` finds

* **orphans**: open holds whose trade's workflow is closed (completed, terminated,
  timed out...) or unknown;
* **stuck** trades: listed ``COMMITTING`` and started longer ago than ``stuck_after``
  (a trade publishes COMMITTING only once its commits have failed for a while), and
  every trade in ``AWAITING_OPERATOR`` (a chain lost a lock after the decision);
* each ledger's **problems**: what its own ``verify()`` reports (balances per asset
  sum to zero, no negative available, held equals the open holds...).

With ``release``, it releases the orphans that are safe to release, and only those:
the open holds of an escrow trade whose workflow is closed and none of whose legs is
committed on any ledger (a trade commits all its legs or none, so a committed one means
the rest must be committed, not released). A leg that is pinned may belong to a trade
that took its commit decision just before it closed, with a commit still in flight on a
worker; such holds wait until the trade has been closed for ``grace``. HTLC holds refund
at their own timelocks and netting batches settle from their own store: both are reported,
never released here. Every release is idempotent on the hold's key, so running this twice
releases nothing more.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from pydantic import BaseModel, ConfigDict
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from adapters import Ledger
from domain import Hold, HoldStatus, LedgerError, SettlementRequest, UnknownHold
from workflows import batch_workflow_id, workflow_id_for

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_STUCK_AFTER",
    "LedgerProblem",
    "OrphanHold",
    "Reconciliation",
    "StuckTrade",
    "reconcile",
]

DEFAULT_STUCK_AFTER = timedelta(minutes=5)
# Longer than one attempt of a ledger call (workflows.calls.CALL_TIMEOUT): a commit
# started before its trade closed has ended, one way or the other, by then.
DEFAULT_GRACE = timedelta(minutes=2)
_DVP_STATUS = SearchAttributeKey.for_keyword("DvpStatus")
_HOLD_KEY = re.compile(r"^(?P<trade>.+)#(?P<leg>\d+)(?P<attempt>\.\d+)?$")


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrphanHold(_Report):
    """An open hold whose trade will not end it."""

    ledger: str
    hold_id: str
    trade_id: str
    account: str
    asset: str
    amount: Decimal
    pinned: bool
    workflow_id: str
    workflow_status: str  # COMPLETED, TERMINATED, ... or UNKNOWN (no such workflow)
    trade_status: str  # the trade's DvpStatus as last published ("" if unknown)
    releasable: bool
    why: str  # why it may be released, or why not
    released: bool = False


class StuckTrade(_Report):
    trade_id: str
    workflow_id: str
    status: str
    started_at: datetime


class LedgerProblem(_Report):
    ledger: str
    problem: str


class Reconciliation(_Report):
    """What ``reconcile`` found (and released)."""

    orphans: list[OrphanHold]
    stuck: list[StuckTrade]
    problems: list[LedgerProblem]

    @property
    def found(self) -> bool:
        return bool(self.orphans or self.stuck or self.problems)

    @property
    def released(self) -> list[OrphanHold]:
        return [o for o in self.orphans if o.released]


@dataclass
class _Owner:
    """The workflow a hold's ``trade_id`` names, as Temporal has it."""

    workflow_id: str
    kind: str  # "trade" or "batch"
    status: WorkflowExecutionStatus | None  # None: no such workflow
    trade_status: str
    closed_at: datetime | None
    request: SettlementRequest | None  # an escrow or HTLC trade's input, for its legs

    @property
    def open(self) -> bool:
        return self.status in (WorkflowExecutionStatus.RUNNING, WorkflowExecutionStatus.CONTINUED_AS_NEW)


async def _owner(client: Client, trade_id: str) -> _Owner:
    if trade_id.startswith("batch:"):
        kind, workflow_id = "batch", batch_workflow_id(trade_id.removeprefix("batch:"))
    else:
        kind, workflow_id = "trade", workflow_id_for(trade_id)
    handle: WorkflowHandle[object, object] = client.get_workflow_handle(workflow_id)
    try:
        described = await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return _Owner(workflow_id, kind, None, "", None, None)
        raise
    status = described.typed_search_attributes.get(_DVP_STATUS) or ""
    request = None
    if kind == "trade" and described.workflow_type in ("Settlement", "Htlc"):
        request = await _input(client, handle)
    return _Owner(workflow_id, kind, described.status, status, described.close_time, request)


async def _input(client: Client, handle: WorkflowHandle[object, object]) -> SettlementRequest | None:
    """A trade's input: its first history event's payload, decoded by the client's converter."""
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        if not payloads:
            return None
        decoded = await client.data_converter.decode(list(payloads), [SettlementRequest])
        request = decoded[0]
        return request if isinstance(request, SettlementRequest) else None
    return None


def _siblings(hold: Hold, request: SettlementRequest) -> list[tuple[str, str]]:
    """(ledger, hold id) of every leg of the reservation attempt ``hold`` belongs to."""
    match = _HOLD_KEY.match(hold.hold_id)
    if match is None:
        return [(hold.ledger, hold.hold_id)]
    attempt = match.group("attempt") or ""
    return [
        (leg.ledger, f"{match.group('trade')}#{i}{attempt}") for i, leg in enumerate(request.instruction.legs)
    ]


def _verdict(
    hold: Hold, owner: _Owner, ledgers: Mapping[str, Ledger], now: datetime, grace: timedelta
) -> str:
    """ "" if ``hold`` (of a closed trade) may be released now, else why not."""
    if owner.status is None:
        return "no such workflow: its trade is unknown to this Temporal; not released"
    if owner.kind == "batch":
        return "a netting batch's hold: the batch's store decides it; not released"
    request = owner.request
    if request is None:
        return "the trade's input could not be read; not released"
    if request.instruction.protocol == "htlc" or hold.hashlock:
        return "an htlc lock: it refunds at its timelock; not released"
    pinned = False
    for ledger_name, hold_id in _siblings(hold, request):
        ledger = ledgers.get(ledger_name)
        if ledger is None:
            return f"ledger {ledger_name!r} of another leg is not configured here; not released"
        try:
            sibling = ledger.get_hold(hold_id)
        except UnknownHold:
            continue
        if sibling.status is HoldStatus.COMMITTED:
            return f"hold {hold_id} of the same trade is committed: the rest must be committed; not released"
        pinned = pinned or (sibling.status is HoldStatus.OPEN and sibling.expires_at is None)
    closed = owner.closed_at or now
    if pinned and now < closed + grace:
        return (
            f"pinned: a commit may still be in flight until {(closed + grace).isoformat()}; not released yet"
        )
    return ""


async def reconcile(
    client: Client,
    ledgers: Mapping[str, Ledger],
    *,
    stuck_after: timedelta = DEFAULT_STUCK_AFTER,
    release: bool = False,
    grace: timedelta = DEFAULT_GRACE,
    now: datetime | None = None,
    settlement_queue: str | None = None,
) -> Reconciliation:
    """Compare every open hold of ``ledgers`` with its trade; release the safe orphans if asked.

    Stuck trades are looked for among those of ``settlement_queue`` (this deployment's),
    or every trade of the namespace. The ledgers' calls run on threads: the worker runs
    this beside its workflows.
    """
    now = now or datetime.now(UTC)
    problems = [
        LedgerProblem(ledger=name, problem=p)
        for name in sorted(ledgers)
        for p in await asyncio.to_thread(ledgers[name].verify)
    ]
    holds = [h for name in sorted(ledgers) for h in await asyncio.to_thread(ledgers[name].open_holds)]
    owners: dict[str, _Owner] = {}
    for trade_id in sorted({h.trade_id for h in holds if h.trade_id}):
        owners[trade_id] = await _owner(client, trade_id)
    orphans: list[OrphanHold] = []
    for hold in holds:
        owner = owners.get(hold.trade_id)
        if owner is not None and owner.open:
            continue
        if owner is None:  # a hold placed without a trade id: nothing can claim it
            owner = _Owner("", "trade", None, "", None, None)
        why = await asyncio.to_thread(_verdict, hold, owner, ledgers, now, grace)
        released = False
        if release and not why:
            try:
                ended = await asyncio.to_thread(ledgers[hold.ledger].release_hold, hold.hold_id)
                released = ended.status is HoldStatus.RELEASED
            except LedgerError as exc:  # committed meanwhile, or the ledger is down: say so
                why = f"release failed: {exc}"
        orphans.append(
            OrphanHold(
                ledger=hold.ledger,
                hold_id=hold.hold_id,
                trade_id=hold.trade_id,
                account=hold.account,
                asset=hold.asset,
                amount=hold.amount,
                pinned=hold.expires_at is None,
                workflow_id=owner.workflow_id,
                workflow_status=owner.status.name if owner.status else "UNKNOWN",
                trade_status=owner.trade_status,
                releasable=not why or released,
                why=why or "its trade is closed and committed none of its legs",
                released=released,
            )
        )
    stuck = await _stuck(client, now - stuck_after, settlement_queue)
    return Reconciliation(orphans=orphans, stuck=stuck, problems=problems)


async def _stuck(client: Client, started_before: datetime, queue: str | None) -> list[StuckTrade]:
    before = started_before.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    query = (
        'WorkflowType IN ("Settlement", "Htlc") AND ExecutionStatus = "Running" AND '
        f'((DvpStatus = "COMMITTING" AND StartTime < "{before}") OR DvpStatus = "AWAITING_OPERATOR")'
    )
    if queue is not None:
        query += f' AND TaskQueue = "{queue}"'

    stuck = []
    async for execution in client.list_workflows(query):
        stuck.append(
            StuckTrade(
                trade_id=execution.id.removeprefix("trade-"),
                workflow_id=execution.id,
                status=str(execution.typed_search_attributes.get(_DVP_STATUS) or ""),
                started_at=execution.start_time,
            )
        )
    return stuck
