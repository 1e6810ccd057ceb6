"""The settlement domain: instructions, legs, statuses, holds and balances.

Everything that crosses a boundary (client -> workflow -> activity -> ledger) is one
of these pydantic models. Amounts are ``Decimal`` in Python and strings on the wire,
never floats.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _parse_amount(value: Any) -> Decimal:
    if isinstance(value, (bool, float)):
        raise ValueError('must be a decimal string such as "100.50", not a float')
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, (int, str)):
        if isinstance(value, int) and abs(value) >= 10**MAX_AMOUNT:
            raise ValueError(f"has more than {MAX_AMOUNT} digits")
        text = str(value).strip()
        if len(text) > MAX_AMOUNT:
            raise ValueError(f"has more than {MAX_AMOUNT} characters")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    else:
        raise ValueError(f"must be a decimal string, got {type(value).__name__}")
    if not amount.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    # "1E+999999" is short, but its plain form (how it is serialised) is not
    exponent = int(amount.as_tuple().exponent)
    if abs(exponent) > MAX_AMOUNT or len(format(amount, "f")) > MAX_AMOUNT:
        raise ValueError(f"has more than {MAX_AMOUNT} characters written out in full")
    return amount


Amount = Annotated[
    Decimal,
    BeforeValidator(_parse_amount),
    PlainSerializer(lambda d: format(d, "f"), return_type=str),
]
"""A decimal quantity: parsed from a string or int, serialised as a plain string."""


def _positive(amount: Decimal) -> Decimal:
    if amount <= 0:
        raise ValueError(f"must be positive, got {format(amount, 'f')}")
    return amount


Protocol = Literal["escrow", "htlc"]
"""How a trade settles: ``escrow`` (the orchestrated saga) or ``htlc`` (hashed timelocks)."""


# What a caller may send, at most (docs/design.md, "Limits", with the arithmetic that
# keeps every trade's input, state and result far under Temporal's 2 MB payload limit):
# beyond it a request is refused naming the field, before anything starts.
MAX_NAME = 128
"""Characters in a name a caller sends: a trade id, ledger, asset, account, party or approver."""
MAX_LEGS = 64
MAX_APPROVERS = 16
MAX_REASON = 500
"""Characters in a cancel's reason."""
MAX_TOKEN = 4096
"""Characters in a signed token."""
MAX_AMOUNT = 64
"""Characters in an amount (a decimal string), also when written out in full ("1E+70" is not)."""
MAX_HASH = 130
"""Characters in a hashlock or a preimage: 32 bytes in hex, ``0x`` and surrounding blanks allowed."""
MAX_FINGERPRINT = 64
"""Characters in an instruction's or a batch's fingerprint (a SHA-256 in hex)."""
MAX_QUEUE = 512
"""Characters in a task queue name a request carries (a prefix, ``-ledger-`` and a ledger name)."""
MAX_TIME_ZONE = 64
"""Characters in a time zone name (IANA, such as ``Europe/Frankfurt``)."""

# What a trade's own state and result may grow to (docs/design.md, "Limits").
MAX_DETAIL = 500
"""Characters of a detail, reason or error message the engine keeps (a ledger's own message is cut there)."""
MAX_FIELD = 256
"""Characters of the field an error names (``legs[63].from``, ``ledger_queues.<ledger>``)."""
MAX_FILLS_SHOWN = 100
"""Fills of a partial trade its state and view keep in full: the most recent; ``fill_count`` counts all."""

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    """``text``, cut to ``limit`` characters (the last one then "…")."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clipped(limit: int) -> BeforeValidator:
    return BeforeValidator(lambda value: clip(value, limit) if isinstance(value, str) else value)


Detail = Annotated[str, _clipped(MAX_DETAIL)]
"""Text the engine keeps and shows (a detail, a reason, a message): cut at ``MAX_DETAIL`` characters."""
FieldName = Annotated[str, _clipped(MAX_FIELD)]


def start_of_day(day: date, time_zone: str) -> datetime:
    """The first instant of ``day`` in ``time_zone`` (IANA), in UTC.

    Midnight there; on a day whose clocks skip midnight, the instant they skip to.
    """
    return datetime.combine(day, time(0), ZoneInfo(time_zone)).astimezone(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        serialize_by_alias=True,
    )


class Leg(_Model):
    """Move ``amount`` of ``asset`` on ``ledger`` from account ``from`` to account ``to``."""

    ledger: str = Field(min_length=1, max_length=MAX_NAME)
    asset: str = Field(min_length=1, max_length=MAX_NAME)
    from_: str = Field(alias="from", min_length=1, max_length=MAX_NAME)
    to: str = Field(min_length=1, max_length=MAX_NAME)
    amount: Amount

    @field_validator("amount")
    @classmethod
    def _amount_positive(cls, amount: Decimal) -> Decimal:
        return _positive(amount)

    @model_validator(mode="after")
    def _distinct_accounts(self) -> Leg:
        if self.from_ == self.to:
            raise ValueError(f"'from' and 'to' are the same account {self.to!r}")
        return self


class Partial(_Model):
    """Allows a trade to settle in parts (T2S-style partial settlement).

    ``legs[0]`` delivers the quantity and ``legs[1]`` pays for it. A fill must be at
    least ``min_fill`` (a fraction of ``legs[0].amount``, e.g. ``"0.25"``) or
    ``min_quantity`` (in ``legs[0]``'s asset), unless it is the whole remainder; give
    at most one of them (neither: any fill).
    """

    min_fill: Amount | None = None
    min_quantity: Amount | None = None

    @field_validator("min_fill")
    @classmethod
    def _fraction(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and not 0 < value <= 1:
            got = format(value, "f")
            raise ValueError(f'must be a fraction above 0 and at most 1 such as "0.25", got {got}')
        return value

    @field_validator("min_quantity")
    @classmethod
    def _quantity_positive(cls, value: Decimal | None) -> Decimal | None:
        return None if value is None else _positive(value)

    @model_validator(mode="after")
    def _one_minimum(self) -> Partial:
        if self.min_fill is not None and self.min_quantity is not None:
            raise ValueError("give 'min_fill' or 'min_quantity', not both")
        return self


class Instruction(_Model):
    """A settlement instruction: every leg settles or none does.

    ``settle_within`` (ISO 8601 duration, counted from submission) or ``deadline``
    (ISO 8601 instant) bounds the time the trade may take; with neither, the
    configured default applies. ``approvers`` must all approve before anything is
    reserved. ``partial`` lets a simple two-leg DvP settle in parts (see ``Partial``).

    ``protocol`` is ``escrow`` (the default: the orchestrated saga) or ``htlc``: a
    two-leg swap locked by ``hashlock`` (SHA-256 of a 32-byte secret, hex) where
    ``legs[0]`` (the delivery by the party holding the secret) refunds at
    ``deadline + claim_window`` and ``legs[1]`` (the payment to that party) at the
    deadline. ``claim_window`` defaults to the time from submission to the
    deadline; ``auto_claim`` (default true) lets the engine claim the other leg
    with the preimage revealed by the first claim. See ``workflows/htlc.py``.

    ``settle_on`` (a date, in the settlement calendar's time zone, ``[settlement]
    time_zone``) or ``settle_after`` (an instant) is the intended settlement time: the
    trade is validated, screened, consented and approved at once, then waits in
    SCHEDULED, reserving nothing, until then (``settles_from``); ``settle_within``
    then counts from that time. At most one of them; ``deadline`` must be after it.
    """

    trade_id: str = Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    legs: list[Leg] = Field(min_length=2, max_length=MAX_LEGS)
    settle_within: timedelta | None = None
    deadline: AwareDatetime | None = None
    approvers: list[Name] = Field(default_factory=list, max_length=MAX_APPROVERS)
    partial: Partial | None = None
    # Settlement protocol (see workflows/htlc.py for "htlc"); the HTLC terms apply to it only.
    protocol: Protocol = Field(default="escrow", validate_default=True)
    hashlock: str | None = Field(default=None, max_length=MAX_HASH, validate_default=True)
    claim_window: timedelta | None = None
    auto_claim: bool | None = None
    # The intended settlement time (see settles_from): nothing is reserved before it.
    settle_on: date | None = None
    settle_after: AwareDatetime | None = None

    @field_validator("settle_within")
    @classmethod
    def _positive_duration(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("must be a positive ISO 8601 duration such as PT30S")
        return value

    @field_validator("approvers")
    @classmethod
    def _approvers_distinct(cls, value: list[str]) -> list[str]:
        if any(not a.strip() for a in value):
            raise ValueError("an approver name is empty")
        if len(set(value)) != len(value):
            raise ValueError("an approver is listed twice")
        return value

    @field_validator("partial")
    @classmethod
    def _partial_is_simple_dvp(cls, value: Partial | None, info: ValidationInfo) -> Partial | None:
        legs: list[Leg] | None = info.data.get("legs")
        if value is None or legs is None:
            return value
        if len(legs) != 2 or legs[0].asset == legs[1].asset:
            raise ValueError(
                "partial settlement needs a simple two-leg DvP (legs[0] delivers one asset, "
                f"legs[1] pays in another); this trade has {len(legs)} legs in "
                f"{len({leg.asset for leg in legs})} asset(s)"
            )
        if value.min_quantity is not None and value.min_quantity > legs[0].amount:
            raise ValueError(
                f"min_quantity {format(value.min_quantity, 'f')} exceeds the quantity of legs[0] "
                f"({format(legs[0].amount, 'f')})"
            )
        return value

    @field_validator("protocol")
    @classmethod
    def _protocol_fits(cls, value: Protocol, info: ValidationInfo) -> Protocol:
        if value == "htlc":
            legs = info.data.get("legs")
            if legs is not None and len(legs) != 2:
                raise ValueError(f"htlc needs a two-leg DvP (a delivery and a payment), not {len(legs)} legs")
            if info.data.get("approvers"):
                raise ValueError(
                    "htlc takes no approvers: the hashlock and the timelocks are the only conditions"
                )
            if info.data.get("partial") is not None:
                raise ValueError("htlc settles both legs whole: partial applies to protocol escrow only")
        return value

    @field_validator("hashlock")
    @classmethod
    def _hashlock_fits(cls, value: str | None, info: ValidationInfo) -> str | None:
        htlc = info.data.get("protocol") == "htlc"
        if value is None:
            if htlc:
                raise ValueError("is required with protocol htlc: the SHA-256 of the secret, 64 hex digits")
            return None
        if not htlc and "protocol" in info.data:
            raise ValueError("applies only to protocol htlc")
        return normalise_sha256(value, "a SHA-256 digest")

    @field_validator("claim_window", "auto_claim")
    @classmethod
    def _htlc_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("protocol", "htlc") != "htlc":
            raise ValueError("applies only to protocol htlc")
        if isinstance(value, timedelta) and value <= timedelta(0):
            raise ValueError("must be a positive ISO 8601 duration such as PT30S")
        return value

    @field_validator("settle_on", "settle_after")
    @classmethod
    def _settlement_time_fits(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if info.data.get("protocol") == "htlc":
            raise ValueError(
                "applies only to protocol escrow: an htlc trade locks its legs at once and its "
                "timelocks count from its deadline"
            )
        if info.field_name == "settle_after" and info.data.get("settle_on") is not None:
            raise ValueError("give 'settle_on' or 'settle_after', not both")
        return value

    @model_validator(mode="after")
    def _one_time_limit(self) -> Instruction:
        if self.settle_within is not None and self.deadline is not None:
            raise ValueError("give 'settle_within' or 'deadline', not both")
        return self

    def settles_from(self, time_zone: str) -> datetime | None:
        """The intended settlement time: ``settle_after``, or the start of ``settle_on`` in
        ``time_zone`` (the settlement calendar's); None if the trade settles at once."""
        if self.settle_after is not None:
            return self.settle_after
        if self.settle_on is not None:
            return start_of_day(self.settle_on, time_zone)
        return None

    def schedule_problems(self, settles_from: datetime | None) -> list[FieldError]:
        """Why the deadline cannot be met as scheduled: it is not after ``settles_from``."""
        if self.deadline is None or settles_from is None or self.deadline > settles_from:
            return []
        given = "settle_after" if self.settle_after is not None else "settle_on"
        when = (
            settles_from.isoformat()
            if self.settle_after is not None
            else f"{self.settle_on} (from {settles_from.isoformat()})"
        )
        message = f"{self.deadline.isoformat()} is not after {given} {when}: the trade could never settle"
        return [FieldError(field="deadline", message=message)]

    def fingerprint(self) -> str:
        """A digest of the content, to tell a resubmission from a different trade.

        Fields added after the first version are left out while they hold their
        default, so an instruction that does not use them keeps its digest.
        """
        unused = {
            name for name in _LATER_FIELDS if getattr(self, name) == Instruction.model_fields[name].default
        }
        data = self.model_dump(mode="json", exclude=unused)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def debited(self) -> list[str]:
        """Every account a leg debits, in first-seen order."""
        return list(dict.fromkeys(leg.from_ for leg in self.legs))

    def parties(self) -> list[str]:
        """Every account the trade touches, in first-seen order."""
        seen: dict[str, None] = {}
        for leg in self.legs:
            seen.setdefault(leg.from_, None)
            seen.setdefault(leg.to, None)
        return list(seen)


_LATER_FIELDS = ("partial", "protocol", "hashlock", "claim_window", "auto_claim", "settle_on", "settle_after")


def normalise_sha256(value: str, what: str) -> str:
    """32 bytes in hex (``0x`` optional), as 64 lowercase hex digits; ``ValueError`` otherwise."""
    digits = value.strip().lower().removeprefix("0x")
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"must be {what} in 64 hex digits, got {value!r}")
    return digits


class TradeStatus(StrEnum):
    """Where a trade stands; the ``DvpStatus`` search attribute carries it.

    ``SCHEDULED``: admitted, validated, screened, consented and approved, waiting for the
    instruction's ``settle_on``/``settle_after``; nothing is reserved until then.
    ``REJECTED``: refused before anything was reserved (an invalid account, a sanctioned
    party, or a ledger that refused the trade before any hold of it was placed).
    ``RELEASED``: a ledger refused a step after holds were placed (a reservation or a
    pin); every hold the trade placed was released, nothing moved.
    ``AWAITING_OPERATOR``: after the commit decision a leg's hold vanished at its ledger
    (a chain reorganisation deeper than its confirmations) and cannot be placed again,
    because the payer's funds are gone; the legs not yet committed stay held, and the
    trade keeps trying to place the hold again (an operator restores the funds, see
    docs/finality.md). Not terminal.
    """

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"  # consented and approved; nothing reserved until the intended settlement time
    AWAITING_AFFIRMATION = "AWAITING_AFFIRMATION"  # a debited account's owner has not consented yet
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    RESERVING = "RESERVING"
    AWAITING_CLAIM = "AWAITING_CLAIM"  # htlc: both legs locked, waiting for the preimage
    COMMITTING = "COMMITTING"
    AWAITING_OPERATOR = "AWAITING_OPERATOR"  # decided, but a vanished hold cannot be placed again
    PARTIALLY_SETTLED = "PARTIALLY_SETTLED"  # some fills settled; the rest is open and recycling
    SETTLED = "SETTLED"
    SETTLED_PARTIAL = "SETTLED_PARTIAL"  # ended with some fills settled and the rest released
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"  # refused before anything was reserved
    RELEASED = "RELEASED"  # a ledger refused after holds were placed; every hold released
    EXPIRED = "EXPIRED"
    ONE_SIDED = "ONE_SIDED"  # htlc only: one leg claimed, the other refunded at its timelock

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {
    TradeStatus.SETTLED,
    TradeStatus.SETTLED_PARTIAL,
    TradeStatus.CANCELLED,
    TradeStatus.REJECTED,
    TradeStatus.RELEASED,
    TradeStatus.EXPIRED,
    TradeStatus.ONE_SIDED,
}


class LegState(StrEnum):
    PENDING = "PENDING"
    SHORT = "SHORT"  # could not be reserved for lack of funds; recycling
    HELD = "HELD"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"


class LegView(_Model):
    index: int
    ledger: str
    asset: str
    from_: str = Field(alias="from")
    to: str
    amount: Amount
    hold_id: str
    state: LegState
    detail: Detail = ""


class FillView(_Model):
    """One settled fill of a partial trade: ``quantity`` of legs[0] against ``amount`` of legs[1]."""

    number: int
    quantity: Amount
    amount: Amount
    hold_ids: list[str]
    settled_at: datetime


class TimelineEvent(_Model):
    at: datetime
    event: Detail
    detail: Detail = ""


class FieldError(_Model):
    """A problem with one field of an instruction, e.g. ``legs[0].from``."""

    field: FieldName
    message: Detail


class TradeView(_Model):
    """What a query or ``dvp status`` returns for one trade."""

    trade_id: str
    workflow_id: str
    status: TradeStatus
    reason: Detail = ""
    deadline: datetime | None = None
    approvers: list[str] = Field(default_factory=list)
    approved_by: list[str] = Field(default_factory=list)
    legs: list[LegView]
    timeline: list[TimelineEvent] = Field(default_factory=list)
    errors: list[FieldError] = Field(default_factory=list)
    fingerprint: str = ""
    # Partial trades only: the most recent fills (at most MAX_FILLS_SHOWN), and how many settled in all.
    fills: list[FillView] = Field(default_factory=list)
    fill_count: int = 0
    submitted_by: str = ""  # the verified subject of the submission's token
    # Owners of debited accounts whose consent the trade needs, and those who gave it.
    consent_from: list[str] = Field(default_factory=list)
    consented: list[str] = Field(default_factory=list)
    # Signals refused (no valid token, or not allowed): counted, never added to the timeline.
    refused_signals: int = 0


class TradeSummary(_Model):
    """One trade as Temporal's visibility has it: what ``dvp list`` shows, with no worker asked.

    ``status`` is the trade's (``DvpStatus``) as last published; ``workflow_status`` its
    workflow's (``RUNNING``, ``COMPLETED``, ``TERMINATED``...), which alone says that a
    trade was terminated through Temporal. ``reason`` is known once the trade has ended.
    """

    trade_id: str
    workflow_id: str
    protocol: str = "escrow"
    status: TradeStatus | None = None
    reason: str = ""
    workflow_status: str = ""
    started_at: datetime | None = None
    closed_at: datetime | None = None
    deadline: datetime | None = None
    parties: list[str] = Field(default_factory=list)
    assets: list[str] = Field(default_factory=list)


class TradePage(_Model):
    """One page of ``dvp list``: its trades, newest first, and the next page's token (None at the end)."""

    trades: list[TradeSummary]
    next_page_token: str | None = None


class HoldStatus(StrEnum):
    OPEN = "open"
    COMMITTED = "committed"
    RELEASED = "released"


class Hold(_Model):
    """A reservation of ``amount`` on ``account``, payable to ``to_account`` on commit.

    ``expires_at`` is the ledger-side backstop; ``None`` means the hold is pinned
    (prepared for commit) and no expiry can release it.
    """

    ledger: str
    hold_id: str
    account: str
    to_account: str
    asset: str
    amount: Amount
    status: HoldStatus
    expires_at: datetime | None = None
    trade_id: str = ""
    hashlock: str | None = None


class AccountBalance(_Model):
    ledger: str
    account: str
    asset: str
    owner: str
    balance: Amount
    held: Amount
    available: Amount


class AccountSpec(_Model):
    """An account to open, with its opening balance (issued from the asset's issuer)."""

    ledger: str = Field(min_length=1, max_length=MAX_NAME)
    id: str = Field(min_length=1, max_length=MAX_NAME)
    asset: str = Field(min_length=1, max_length=MAX_NAME)
    owner: str = Field(min_length=1, max_length=MAX_NAME)
    balance: Amount = Decimal(0)

    @field_validator("balance")
    @classmethod
    def _not_negative(cls, balance: Decimal) -> Decimal:
        if balance < 0:
            raise ValueError("an opening balance cannot be negative")
        return balance


class SeedFile(_Model):
    accounts: list[AccountSpec]
