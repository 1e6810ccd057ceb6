"""Messages between the client, the settlement workflow and its activities.

One argument model in and one result model out for every workflow, activity,
signal, update and query.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Any

from pydantic import Field, model_validator

from ._config import SettlementConfig
from ._models import (
    MAX_FINGERPRINT,
    MAX_HASH,
    MAX_LEGS,
    MAX_NAME,
    MAX_QUEUE,
    MAX_REASON,
    MAX_TOKEN,
    Amount,
    Detail,
    FieldError,
    FillView,
    Hold,
    HoldStatus,
    Instruction,
    LegState,
    Name,
    TimelineEvent,
    TradeStatus,
    _Model,
)

Queue = Annotated[str, Field(min_length=1, max_length=MAX_QUEUE)]


class SettlementRequest(_Model):
    """The workflow's input: the instruction, the submitter's token, and how the trade is routed.

    The routing (queues, local ledgers, settlement settings, precisions) is the
    settlement worker's: a request that leaves it out gets the worker's, and one that
    names any of it otherwise is REJECTED before anything is reserved. Trades started
    before that rule carried their routing here and still replay on it.
    """

    instruction: Instruction
    fingerprint: str = Field(max_length=MAX_FINGERPRINT)
    token: str = Field(default="", max_length=MAX_TOKEN)  # the submitter's signed token
    settlement_queue: Queue | None = None
    ledger_queues: dict[Name, Queue] | None = Field(default=None, max_length=MAX_LEGS)
    # Ledgers called through local activities of the settlement worker (see
    # LedgerConfig.local_activities); the others through their task queues.
    local_ledgers: list[Name] | None = Field(default=None, max_length=MAX_LEGS)
    settlement: SettlementConfig | None = None
    # asset -> decimals, for partial fills
    precisions: dict[Name, int] | None = Field(default=None, max_length=MAX_LEGS)
    # True: every step calls all the local ledgers in one activity (workflows/_trade.py,
    # TradeSaga._step), as the client has asked since that change; false (absent), one
    # call per local ledger, as trades started before it did. In the input, and so in
    # the history, so that a replay takes the path its trade took. Why not workflow.patched:
    # docs/decisions/0002-local-steps-in-the-request.md.
    local_steps: bool = False
    # The trade's ledgers whose writes a chain reorganisation can undo (kind evm), the
    # slowest to final first: after the decision their legs commit first, one ledger at a
    # time and each until final, then the others (workflows/_trade.py, _commit_chains).
    # Empty (absent) in trades started before, which commit every leg at once.
    chain_ledgers: list[Name] = Field(default_factory=list, max_length=MAX_LEGS)
    # True: the trade puts its reason in its memo when it ends (workflows/_saga.py,
    # TradeSagaBase._ended), so that `dvp list` reads it from visibility; the client asks
    # for it since that change. A flag in the input rather than workflow.patched for the
    # reason local_steps gives: no marker and no TemporalChangeVersion upsert per trade.
    outcome_memo: bool = False
    # True: the trade acts on verified tokens, consent and the worker's routing
    # (workflows/_saga.py, TradeSagaBase) without asking ``workflow.patched`` first, as the
    # client asks since that change: the patch's marker and its TemporalChangeVersion
    # upsert cost every trade two history events and a visibility write. Fail closed: a
    # request without it gets the same rules in any new run (the patch answers true
    # there); only the replay of a trade started before those rules, whose history has
    # no marker, takes the old path. See docs/decisions/0012-trust-rules-in-the-request.md.
    token_rules: bool = False
    # What a trade knew when its last run continued as new (workflows/_saga.py): set only
    # by the workflow itself. A run accepts it only as a continued run (the server says
    # so, no client can); a start that carries it is REJECTED with nothing reserved.
    carried: Carried | None = None

    # The routing a saga calls with: the worker's, once the trade is admitted (or, for a
    # trade started before admission existed, the request's own). Absent is a bug.

    def policy(self) -> SettlementConfig:
        """The settlement settings the trade runs under."""
        if self.settlement is None:
            raise ValueError("the trade's request has no settlement settings: it was not admitted")
        return self.settlement

    def is_local(self, ledger: str) -> bool:
        """Whether ``ledger`` is called through local activities of the settlement worker."""
        return ledger in (self.local_ledgers or ())

    def queue_of(self, ledger: str) -> str:
        """The task queue that serves ``ledger``."""
        if self.ledger_queues is None or ledger not in self.ledger_queues:
            raise ValueError(f"the trade's request has no task queue for ledger {ledger!r}")
        return self.ledger_queues[ledger]


class AccountCheck(_Model):
    field: str  # e.g. "legs[0].from"
    account: str
    asset: str


class CheckAccountsRequest(_Model):
    checks: list[AccountCheck]
    ledger: str = ""  # which ledger, for a worker that serves several


class CheckAccountsResult(_Model):
    owners: dict[str, str]  # account -> owner
    problems: list[FieldError] = Field(default_factory=list)


class HoldRequest(_Model):
    hold_id: str
    account: str
    to_account: str
    asset: str
    amount: Amount
    expires_at: datetime | None
    trade_id: str = ""
    hashlock: str | None = None


class ReserveRequest(_Model):
    holds: list[HoldRequest]
    ledger: str = ""
    report_available: bool = False  # a short hold's outcome then says what is available


class HoldOutcome(_Model):
    """What happened to one hold: ``ok`` false with ``code`` says why not.

    When ``ok``, ``status`` and ``amount`` are the hold's after the call (amount 0 for
    a key released before anything was placed under it): all a workflow needs of the
    hold, so its history does not carry the whole hold once per call. A release that
    is refused because the hold is committed says so in ``status`` too.
    """

    hold_id: str
    ok: bool
    code: str = ""  # a LedgerError code when not ok
    detail: Detail = ""
    status: HoldStatus | None = None
    amount: Amount | None = None
    available: Amount | None = None  # of a short hold's account, if the request asked

    @classmethod
    def of(cls, hold: Hold) -> HoldOutcome:
        return cls(hold_id=hold.hold_id, ok=True, status=hold.status, amount=hold.amount)

    @property
    def open(self) -> bool:
        """The call succeeded and the hold is open (placed, not yet committed or released)."""
        return self.ok and self.status is HoldStatus.OPEN

    @property
    def committed(self) -> bool:
        """The ledger reports the hold committed, whatever the call was."""
        return self.status is HoldStatus.COMMITTED

    @property
    def placed(self) -> bool:
        """Something was held under the key (not a key released before it was placed)."""
        return self.amount is not None and self.amount > 0

    @model_validator(mode="before")
    @classmethod
    def _recorded_with_hold(cls, data: Any) -> Any:
        # Results recorded by earlier versions carried the whole hold: histories of
        # trades in flight across an upgrade still replay.
        if isinstance(data, dict) and "hold" in data:
            data = dict(data)
            hold = data.pop("hold") or {}
            data.setdefault("status", hold.get("status"))
            data.setdefault("amount", hold.get("amount"))
        return data


class HoldOutcomes(_Model):
    outcomes: list[HoldOutcome]


class HoldRefs(_Model):
    hold_ids: list[str]
    ledger: str = ""


# One step of a trade on every ledger the settlement worker serves itself, in one call
# (each item names its ledger): see ``workflows/_trade.py``, ``TradeSaga._step``.


class CheckAccountsBatch(_Model):
    items: list[CheckAccountsRequest]


class ReserveBatch(_Model):
    items: list[ReserveRequest]


class HoldRefsBatch(_Model):
    items: list[HoldRefs]


class ScreenRequest(_Model):
    parties: list[str]


class ScreenResult(_Model):
    hits: list[str]
    operators: list[str]
    # party -> what DvpParties shows of it (a keyed hash, [codec] hash_parties); None: the
    # names themselves (a worker configured so, or one from before the setting).
    party_tags: dict[str, str] | None = None


class AdmitRequest(_Model):
    """What the settlement worker is asked when a trade or batch starts (an activity's input)."""

    token: str = Field(default="", max_length=MAX_TOKEN)
    now: datetime  # the workflow's time: the token is judged at it
    ledgers: list[str]
    assets: list[str] = Field(default_factory=list)
    # A trade's settle_on: the answer says when that day starts in the worker's calendar.
    settle_on: date | None = None
    # Ledger -> the account checks to run there if the worker calls that ledger locally
    # and accepts the token (``SettlementActivities.admit_checked``): the admission and
    # the trade's first step in one local activity. Empty: admission only.
    checks: dict[str, list[AccountCheck]] = Field(default_factory=dict)


class Routing(_Model):
    """The settlement worker's routing and policy for one trade's ledgers and assets."""

    settlement_queue: str
    ledger_queues: dict[str, str]  # of the requested ledgers the worker knows
    local_ledgers: list[str]
    unknown_ledgers: list[str] = Field(default_factory=list)
    settlement: SettlementConfig
    precisions: dict[str, int] = Field(default_factory=dict)
    operators: list[str] = Field(default_factory=list)
    operator_roles: list[str] = Field(default_factory=list)
    # The trade's ledgers on chains -> how many blocks each takes to call a write final:
    # they commit first, the slowest first, one at a time (workflows/_trade.py).
    chain_blocks: dict[str, int] = Field(default_factory=dict)

    def chain_order(self, instruction: Instruction) -> list[str]:
        """The trade's chain ledgers in commit order: most blocks first, ties in the order of the legs."""
        first: dict[str, int] = {}
        for i, leg in enumerate(instruction.legs):
            first.setdefault(leg.ledger, i)
        chains = [name for name in first if name in self.chain_blocks]
        return sorted(chains, key=lambda name: (-self.chain_blocks[name], first[name]))


class Admission(_Model):
    """The worker's verdict on a submission's token, and its routing; recorded, so a replay needs no key."""

    subject: str = ""  # the verified subject; empty if the token was refused
    roles: list[str] = Field(default_factory=list)
    refused: str = ""  # why the token was refused
    routing: Routing
    # The start of the request's settle_on in the worker's settlement calendar (its
    # time zone), recorded so that a replay needs neither that setting nor the same zone data.
    settles_from: datetime | None = None
    # The answers of the local ledgers (``checked_ledgers``) to the request's ``checks``;
    # None if none was run (none asked, the token refused, or a ledger failed: the trade
    # then checks those ledgers itself, with its usual retries and deadline).
    checked: CheckAccountsResult | None = None
    checked_ledgers: list[str] = Field(default_factory=list)


# Acting messages. ``token`` is the sender's signed token: the acting party is its
# subject. ``party``, if given (``--as``), must be that subject. Messages recorded before
# tokens carried only ``party``; they replay as they ran.


class ApprovalMessage(_Model):
    party: str = Field(default="", max_length=MAX_NAME)
    token: str = Field(default="", max_length=MAX_TOKEN)


class CancelMessage(_Model):
    party: str = Field(default="", max_length=MAX_NAME)
    reason: str = Field(default="", max_length=MAX_REASON)
    token: str = Field(default="", max_length=MAX_TOKEN)


class AffirmMessage(_Model):
    """An owner's consent to the debits of its accounts in a trade submitted by someone else."""

    party: str = Field(default="", max_length=MAX_NAME)
    token: str = Field(default="", max_length=MAX_TOKEN)


class ClaimMessage(_Model):
    """Claim an HTLC trade's leg with the secret: 32 bytes in hex whose SHA-256 is the hashlock.

    ``leg`` is the leg to claim; by default the payment leg (``legs[1]``) if it is
    still open, else the other. Sent by a party of the trade (``token``).
    """

    preimage: str = Field(min_length=1, max_length=MAX_HASH)
    leg: int | None = Field(default=None, ge=0, lt=MAX_LEGS)
    token: str = Field(default="", max_length=MAX_TOKEN)


class ClaimRequest(_Model):
    """Commit hashlocked holds with the preimage (an activity's input)."""

    hold_ids: list[str]
    preimage: str
    ledger: str = ""  # which ledger, for a worker that serves several


class Decision(_Model):
    accepted: bool
    reason: str = ""


class SubmitCheck(_Model):
    fingerprint: str = Field(max_length=MAX_FINGERPRINT)


# --------------------------------------------------- carried across continue-as-new


class Repeat(_Model):
    """Timeline entries folded when a trade continued as new: how many, and the last one."""

    event: str
    count: int
    last_at: datetime
    last_detail: str = ""


class CarriedEscrow(_Model):
    """The escrow saga's own state (workflows/_trade.py, ``TradeSaga``)."""

    attempt: int
    amounts: list[Amount]
    settled: list[Amount]
    fills: list[FillView]  # the latest MAX_FILLS_SHOWN
    fill_count: int = 0  # every fill settled so far
    hold_ids: list[str]
    leg_states: list[LegState]
    leg_details: list[str]
    approved: list[str]
    cancel: CancelMessage | None = None
    cancelled_by: str = ""
    decided: bool = False
    pinned: bool = False
    compensations: list[int] = Field(default_factory=list)
    released_held: bool = False


class CarriedHtlc(_Model):
    """The HTLC saga's own state (workflows/_htlc.py, ``HtlcSaga``)."""

    states: list[LegState]
    details: list[str]
    locking: list[int]
    preimage: str | None = None
    requested: list[int] = Field(default_factory=list)
    lock_leg: int = 0  # the leg being locked (phase "lock")


class Carried(_Model):
    """Everything a trade knew when its run continued as new, and where it resumes (``phase``).

    The new run skips admission, validation and screening and resumes at ``phase``:
    ``affirmation``, ``approval``, ``scheduled``, ``reserve``, ``fill``, ``commit`` or
    ``unwind`` (escrow);
    ``affirmation``, ``lock``, ``claim`` or ``unlock`` (HTLC). ``unwind``/``unlock`` carry
    the ending they release for (``abort_status``, ``abort_reason``).
    """

    phase: str
    runs: int  # runs before this one
    started: datetime  # the trade's start: its deadline is counted from it
    settle_from: datetime | None = None  # the intended settlement time, if any
    deadline: datetime
    trusted: bool
    routing: Routing | None = None
    submitter: str = ""
    submitter_roles: list[str] = Field(default_factory=list)
    consent_known: bool = False
    consent_from: list[str] = Field(default_factory=list)
    consented: list[str] = Field(default_factory=list)
    refused_signals: int = 0
    status: TradeStatus
    reason: str = ""
    errors: list[FieldError] = Field(default_factory=list)
    timeline_head: list[TimelineEvent] = Field(default_factory=list)
    repeats: list[Repeat] = Field(default_factory=list)
    timeline: list[TimelineEvent] = Field(default_factory=list)
    owners: dict[str, str] = Field(default_factory=dict)
    operators: list[str] = Field(default_factory=list)
    policy_known: bool = False
    party_tags: dict[str, str] | None = None
    interval: timedelta | None = None  # the recycle pause in force
    waiting_since: datetime | None = None  # since when the current attempt recycles
    recycles: int = 0
    abort_status: TradeStatus | None = None
    abort_reason: str = ""
    escrow: CarriedEscrow | None = None
    htlc: CarriedHtlc | None = None


SettlementRequest.model_rebuild()
