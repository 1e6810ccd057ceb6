"""The SQL ledger's model, shared by its general path (``sql.py``) and SQLite's fast path.

The tables as sqlmodel models, with the constraints that enforce the ledger's invariants
(see ``adapters/sql.py``); how amounts and times are stored; and the checks a request to
place a hold passes before anything is written, so that both paths refuse alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import registry
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from domain import AssetMismatch, Hold, HoldStatus, InvalidAmount, LedgerError, UnknownAccount

from ._base import as_decimal

MAX_MINOR = 2**63 - 1  # BIGINT

# ------------------------------------------------------------------------- tables


def utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC; a naive datetime is taken to be UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime. SQLite stores it naive (sortable text), PostgreSQL as timestamptz."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        value = utc(value)
        return value.replace(tzinfo=None) if value is not None and dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return utc(value)


def _sqlite_integers(table: str, *columns: str) -> CheckConstraint:
    # SQLite silently turns an overflowing integer into a REAL; refuse that.
    expr = " AND ".join(f"typeof({c}) = 'integer'" for c in columns)
    return CheckConstraint(expr, name=f"ck_{table}_integer_amounts").ddl_if(dialect="sqlite")


class _Table(SQLModel, registry=registry()):
    """Base of the ledger's tables: a private registry, so no other module's tables mix in."""


class AssetRow(_Table, table=True):
    __tablename__ = "asset"
    __table_args__ = (CheckConstraint("precision >= 0 AND precision <= 18", name="ck_asset_precision"),)

    code: str = Field(sa_column=Column(String, primary_key=True))
    precision: int = Field(sa_column=Column(Integer, nullable=False))


class AccountRow(_Table, table=True):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("held >= 0", name="ck_accounts_held_not_negative"),
        CheckConstraint("is_issuer OR balance - held >= 0", name="ck_accounts_available_not_negative"),
        _sqlite_integers("accounts", "balance", "held"),
    )

    id: str = Field(sa_column=Column(String, primary_key=True))
    asset: str = Field(sa_column=Column(String, ForeignKey("asset.code"), nullable=False))
    owner: str = Field(sa_column=Column(String, nullable=False))
    balance: int = Field(sa_column=Column(BigInteger, nullable=False))
    held: int = Field(sa_column=Column(BigInteger, nullable=False))
    is_issuer: bool = Field(sa_column=Column(Boolean, nullable=False))


class HoldRow(_Table, table=True):
    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("status IN ('open', 'committed', 'released')", name="ck_holds_status"),
        # A tombstone (no account, amount 0) is a released key that was never placed.
        CheckConstraint(
            "(account IS NOT NULL AND to_account IS NOT NULL AND asset IS NOT NULL AND amount > 0)"
            " OR (status = 'released' AND account IS NULL AND to_account IS NULL"
            " AND asset IS NULL AND amount = 0)",
            name="ck_holds_placed_or_tombstone",
        ),
        CheckConstraint("(status = 'open') = (resolved_at IS NULL)", name="ck_holds_resolved_when_not_open"),
        CheckConstraint("hashlock IS NULL OR length(hashlock) = 64", name="ck_holds_hashlock_sha256"),
        _sqlite_integers("holds", "amount"),
        Index(
            "ix_holds_open_expiry",
            "expires_at",
            sqlite_where=sql_text("status = 'open'"),
            postgresql_where=sql_text("status = 'open'"),
        ),
    )

    hold_id: str = Field(sa_column=Column(String, primary_key=True))
    account: str | None = Field(sa_column=Column(String, ForeignKey("accounts.id"), nullable=True))
    to_account: str | None = Field(sa_column=Column(String, ForeignKey("accounts.id"), nullable=True))
    asset: str | None = Field(sa_column=Column(String, ForeignKey("asset.code"), nullable=True))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: str = Field(sa_column=Column(String, nullable=False))
    expires_at: datetime | None = Field(sa_column=Column(UtcDateTime, nullable=True))
    trade_id: str = Field(sa_column=Column(String, nullable=False))
    hashlock: str | None = Field(sa_column=Column(String, nullable=True))
    created_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    resolved_at: datetime | None = Field(sa_column=Column(UtcDateTime, nullable=True))


class JournalRow(_Table, table=True):
    __tablename__ = "journal"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_journal_amount_positive"),
        CheckConstraint("from_account <> to_account", name="ck_journal_two_accounts"),
        CheckConstraint(
            "(kind = 'settle' AND hold_id IS NOT NULL) OR (kind = 'issue' AND hold_id IS NULL)",
            name="ck_journal_kind",
        ),
        _sqlite_integers("journal", "amount"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    ref: str = Field(sa_column=Column(String, nullable=False, unique=True))
    hold_id: str | None = Field(
        sa_column=Column(String, ForeignKey("holds.hold_id"), nullable=True, unique=True)
    )
    kind: str = Field(sa_column=Column(String, nullable=False))
    from_account: str = Field(sa_column=Column(String, ForeignKey("accounts.id"), nullable=False))
    to_account: str = Field(sa_column=Column(String, ForeignKey("accounts.id"), nullable=False))
    asset: str = Field(sa_column=Column(String, ForeignKey("asset.code"), nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


METADATA = _Table.metadata

# ------------------------------------------------------------------------ amounts


def to_minor(amount: Decimal, asset: str, precision: int, what: str = "amount") -> int:
    """``amount`` in minor units of ``asset``; ``InvalidAmount`` if it needs more decimals."""
    with localcontext() as ctx:
        ctx.prec = 100
        scaled = amount.scaleb(precision)
        if scaled != scaled.to_integral_value():
            raise InvalidAmount(
                f"{what} {format(amount, 'f')} has more decimal places than asset {asset} "
                f"allows (precision {precision})"
            )
        minor = int(scaled)
    if abs(minor) > MAX_MINOR:
        raise InvalidAmount(
            f"{what} {format(amount, 'f')} is too large for asset {asset} "
            f"(at most {format(to_decimal(MAX_MINOR, precision), 'f')})"
        )
    return minor


def to_decimal(minor: int, precision: int) -> Decimal:
    """``minor`` units as a ``Decimal`` with ``precision`` decimal places."""
    with localcontext() as ctx:
        ctx.prec = 100
        return Decimal(minor).scaleb(-precision)


def normalise_hashlock(hashlock: str | None) -> str | None:
    """``hashlock`` as stored: 64 lower-case hex digits, no ``0x``."""
    if hashlock is None:
        return None
    value = hashlock.lower().removeprefix("0x")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise LedgerError(f"hashlock must be a sha256 digest in 64 hex digits, got {hashlock!r}")
    return value


# -------------------------------------------------------------------------- holds


class CachedAccount(NamedTuple):
    """What never changes about an account once it exists (safe to cache)."""

    asset: str
    owner: str
    precision: int


class PlaceRequest(NamedTuple):
    """The arguments of one ``place_hold``."""

    hold_id: str
    account: str
    to_account: str
    asset: str
    amount: Any
    expires_at: datetime | None
    trade_id: str
    hashlock: str | None

    def terms(self, ledger: str, known: Mapping[str, CachedAccount]) -> tuple[int, str | None]:
        """The amount in minor units and the hashlock as stored, if the accounts in ``known`` allow the hold.

        Raises the ``LedgerError`` that refuses it: an account not in ``known``, of another
        asset, the same account twice, an amount that is not positive in the asset's precision.
        """
        for acct in (self.account, self.to_account):
            if acct not in known:
                raise UnknownAccount(f"ledger {ledger!r} has no account {acct!r}")
        for acct in (self.account, self.to_account):
            if known[acct].asset != self.asset:
                raise AssetMismatch(f"account {acct!r} holds asset {known[acct].asset}, not {self.asset}")
        if self.account == self.to_account:
            raise LedgerError(f"hold {self.hold_id!r} pays account {self.account!r} to itself")
        value = as_decimal(self.amount, "amount")
        if value <= 0:
            raise InvalidAmount(f"amount must be positive, got {format(value, 'f')} {self.asset}")
        minor = to_minor(value, self.asset, known[self.account].precision)
        return minor, normalise_hashlock(self.hashlock)

    def placed(self, ledger: str, minor: int, hashlock: str | None, precision: int) -> Hold:
        """The open hold this request placed."""
        return Hold(
            ledger=ledger,
            hold_id=self.hold_id,
            account=self.account,
            to_account=self.to_account,
            asset=self.asset,
            amount=to_decimal(minor, precision),
            status=HoldStatus.OPEN,
            expires_at=utc(self.expires_at),
            trade_id=self.trade_id,
            hashlock=hashlock,
        )
