"""Multilateral netting batches: the batch's messages, views and errors.

A batch's trades never travel in a workflow payload: the client stores them in the
batch store and the workflow, its activities and the client exchange only the batch
id, counts and the net positions (one per account, however many trades).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from ._config import SettlementConfig
from ._errors import DvpError
from ._models import (
    MAX_FINGERPRINT,
    MAX_LEGS,
    MAX_NAME,
    MAX_QUEUE,
    MAX_TOKEN,
    Amount,
    Detail,
    FieldError,
    Name,
    TimelineEvent,
    _Model,
)

MAX_BATCH_TRADES = 1_000_000
"""Trades in one netting batch (they stay in the batch store: no payload carries them)."""
MAX_BATCH_ACCOUNTS = 500
"""Accounts one netting batch may touch: each ledger's accounts and their net positions travel
in payloads of the batch's history (docs/design.md, "Limits")."""


class DuplicateBatch(DvpError):
    """A batch with this id exists and its content differs from the one submitted."""


class BatchNotFound(DvpError):
    """No batch with this id in the batch store."""


class BatchStatus(StrEnum):
    PENDING = "PENDING"  # stored, the workflow has not netted it yet
    NETTING = "NETTING"
    RESERVING = "RESERVING"
    COMMITTING = "COMMITTING"
    SETTLED = "SETTLED"  # every trade not removed settled
    EXPIRED = "EXPIRED"  # nothing settled: every hold released
    CANCELLED = "CANCELLED"  # cancelled through Temporal before the commit decision: nothing settled
    REJECTED = "REJECTED"  # refused before anything was read or reserved (its submitter, its routing)

    @property
    def terminal(self) -> bool:
        return self in (BatchStatus.SETTLED, BatchStatus.EXPIRED, BatchStatus.CANCELLED, BatchStatus.REJECTED)


class TradeOutcome(StrEnum):
    """A trade's state in the batch store."""

    ACCEPTED = "accepted"  # stored; settles with the batch unless removed
    REMOVED = "removed"  # taken out of the batch, with the reason
    SETTLED = "settled"
    RELEASED = "released"  # the batch ended without settling


class BatchRequest(_Model):
    """The batch workflow's input: a reference to the stored trades, never the trades."""

    batch_id: str = Field(min_length=1, max_length=MAX_NAME)
    trade_count: int = Field(ge=1, le=MAX_BATCH_TRADES)
    fingerprint: str = Field(max_length=MAX_FINGERPRINT)
    settle_within: timedelta
    token: str = Field(default="", max_length=MAX_TOKEN)  # the submitter's: an operator's
    # The routing is the settlement worker's (see SettlementRequest): absent, or the same.
    settlement_queue: str | None = Field(default=None, max_length=MAX_QUEUE)
    ledger_queues: dict[Name, Annotated[str, Field(max_length=MAX_QUEUE)]] | None = Field(
        default=None, max_length=MAX_LEGS
    )
    settlement: SettlementConfig | None = None
    # What the batch knew when its last run continued as new (workflows/netting.py): set
    # only by the workflow itself, accepted only by a continued run; a start carrying it
    # is REJECTED before anything is read or reserved.
    carried: CarriedBatch | None = None


class AccountRef(_Model):
    ledger: str
    account: str
    asset: str


class BatchAccounts(_Model):
    """Every (ledger, account, asset) the batch's trades touch."""

    accounts: list[AccountRef]


class PositionsRequest(_Model):
    """For one ledger: check accounts, open the clearing accounts, read what is available."""

    accounts: list[AccountRef]


class AccountPosition(_Model):
    account: str
    asset: str
    owner: str = ""
    available: Amount | None = None  # None: the account is unknown or holds another asset
    problem: Detail = ""


class PositionsResult(_Model):
    positions: list[AccountPosition]


class Exclusion(_Model):
    """Trades touching this account (on this ledger, in this asset) cannot settle."""

    ledger: str
    account: str
    asset: str
    reason: Detail


class NetLeg(_Model):
    """An amount on one account: a net position (> 0 receives, < 0 pays) or what is available."""

    ledger: str
    account: str
    asset: str
    amount: Amount


class NetRequest(_Model):
    batch_id: str
    round: int
    available: list[NetLeg]  # each account's available amount, read this round
    exclusions: list[Exclusion] = Field(default_factory=list)


class AssetTotals(_Model):
    """Value moved in one asset: gross (trade by trade) against net (what settled)."""

    ledger: str
    asset: str
    gross: Amount
    net: Amount
    saved: Amount
    saved_percent: float


class NetPlan(_Model):
    """The batch netted: which accounts pay and receive, and the totals."""

    accepted: int
    removed: int
    positions: list[NetLeg]
    assets: list[AssetTotals]


class SettleRequest(_Model):
    """After the commit decision, on one ledger: commit the pay-ins, then pay out."""

    pay_ins: list[str]  # hold ids into the clearing accounts
    pay_outs: list[NetLeg]
    prefix: str  # the pay-out holds' key prefix
    trade_id: str


class RecordRequest(_Model):
    batch_id: str
    settled: bool
    reason: str = ""
    result: BatchView | None = None


class RemovedTrade(_Model):
    index: int  # position in the submitted file
    trade_id: str
    reason: str


class BatchView(_Model):
    """A batch as it stands (``dvp batch status``)."""

    batch_id: str
    workflow_id: str
    status: BatchStatus
    reason: str = ""
    deadline: datetime | None = None
    trades: int
    settled: int = 0
    removed: int = 0
    rounds: int = 0
    assets: list[AssetTotals] = Field(default_factory=list)
    positions: list[NetLeg] = Field(default_factory=list)
    removed_trades: list[RemovedTrade] = Field(default_factory=list)
    timeline: list[TimelineEvent] = Field(default_factory=list)
    errors: list[FieldError] = Field(default_factory=list)
    fingerprint: str = ""


class CarriedBatch(_Model):
    """Everything a batch knew when its run continued as new, and where it resumes.

    ``phase``: ``commit`` (after the decision), ``compensate`` (releasing, to end with
    ``abort_status``) or ``end`` (recording ``abort_status`` in the batch store).
    """

    phase: str
    runs: int
    deadline: datetime
    trusted: bool
    status: BatchStatus
    reason: str = ""
    timeline: list[TimelineEvent] = Field(default_factory=list)
    folded: int = 0  # timeline entries left out (the first ones are kept, then the last)
    plan: NetPlan | None = None
    rounds: int = 0
    settled: int = 0
    decided: bool = False
    holds: dict[str, list[str]] = Field(default_factory=dict)
    compensations: list[tuple[str, list[str]]] = Field(default_factory=list)
    abort_status: BatchStatus | None = None
    abort_reason: str = ""


RecordRequest.model_rebuild()
BatchRequest.model_rebuild()
