"""A double-entry ledger in SQL: SQLite (embedded) or PostgreSQL, through SQLAlchemy.

Invariants, each enforced by the database and not only by this module:

* Amounts are integers in the asset's minor units (``BIGINT``), never floats. Each
  asset's ``precision`` (decimal places) is fixed in the ``asset`` table by the first
  account opened for it; an amount with more decimals raises ``InvalidAmount``.
  On SQLite a ``CHECK (typeof(x) = 'integer')`` keeps floats out of every amount column.
* Every movement of value is one ``journal`` row that debits ``from_account`` and
  credits ``to_account`` by the same positive amount (``CHECK amount > 0``), so per
  asset the balances of all accounts sum to zero. ``accounts.balance`` is a cache of
  the journal, updated in the same transaction. Opening balances are ``issue`` rows
  from the asset's issuer account (``issuer:<ASSET>``), which alone goes negative;
  their ``ref`` ``open:<account>`` is UNIQUE, so an opening balance is issued once.
* ``available = balance - held`` is never negative except for an issuer:
  ``CHECK (held >= 0)`` and ``CHECK (is_issuer OR balance - held >= 0)``.
  ``place_hold`` reserves with one conditional ``UPDATE ... WHERE balance - held >= :amount``,
  so concurrent reservations cannot overdraw, whatever the number of processes.
* A hold is resolved at most once: ``holds.status`` moves from ``open`` only through a
  conditional ``UPDATE ... WHERE status = 'open'``, and ``journal.hold_id`` is UNIQUE,
  so a hold is committed into the journal at most once.
* ``hold_id`` is the idempotency key (PRIMARY KEY of ``holds``). Releasing an unknown
  key writes a tombstone: a ``released`` row with no account and amount 0 (a CHECK
  allows such rows only when released), so a late ``place_hold`` places nothing.
* A hold placed with a ``hashlock`` commits only with its preimage
  (``sha256(preimage) == hashlock``) and, like the chain escrow's ``claim``, only
  before its ``expires_at`` (its timelock); after that it can only be released.

``verify()`` re-derives the cached figures from the journal and the holds and lists
every invariant violation it finds (an empty list means the ledger is consistent).

Concurrency: one database transaction per operation. On SQLite the database runs in
WAL mode and every write transaction starts with ``BEGIN IMMEDIATE``, so writers from
several processes queue on the busy timeout instead of failing on a lock upgrade;
within one process, write transactions take turns on a lock of the ledger's own, on
one connection, so they wait for each other without the busy timeout's sleeps (which
start at 1 ms, several times a write transaction's length) and find its page cache
still valid. There the common case of placing, pinning, committing and releasing a
hold runs as hand-written SQL on that connection's driver, bypassing SQLAlchemy's
execution path (most of these operations' CPU); anything else is rolled back and left
to the general code, which stays the single source of truth (see ``_on_writer``). On
PostgreSQL (READ COMMITTED) the conditional updates take row locks; a transaction
that touches two accounts updates them in sorted order, and a deadlock or
serialization failure is retried. Every operation is idempotent, so a retry after a
dropped connection is safe. A database that cannot be reached raises
``LedgerUnavailable``. Naive datetimes are taken to be UTC.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

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
    bindparam,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import registry
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from domain import (
    AccountBalance,
    AssetMismatch,
    ConfigError,
    Hold,
    HoldNotOpen,
    HoldStatus,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    LedgerUnavailable,
    UnknownAccount,
    UnknownHold,
)

from ._base import AccountFacts, Ledger

__all__ = ["SqlLedger", "issuer_id"]

T = TypeVar("T")
AnyRow = Row[*tuple[Any, ...]]

MAX_MINOR = 2**63 - 1  # BIGINT
ISSUER_OWNER = "issuer"
SQLITE_BUSY_TIMEOUT_S = 30
PG_CONNECT_TIMEOUT_S = 10
ATTEMPTS = 5  # per operation, for deadlocks, serialization failures and dropped connections
RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
KNOWN_OPTIONS = ("pool_size", "max_overflow")


def issuer_id(asset: str) -> str:
    """The id of ``asset``'s issuer account, from which opening balances are issued."""
    return f"issuer:{asset}"


# --------------------------------------------------------------------------- schema


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class _UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime. SQLite stores it naive (sortable text), PostgreSQL as timestamptz."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        value = _utc(value)
        return value.replace(tzinfo=None) if value is not None and dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return _utc(value)


def _sqlite_integers(table: str, *columns: str) -> CheckConstraint:
    # SQLite silently turns an overflowing integer into a REAL; refuse that.
    expr = " AND ".join(f"typeof({c}) = 'integer'" for c in columns)
    return CheckConstraint(expr, name=f"ck_{table}_integer_amounts").ddl_if(dialect="sqlite")


class _Table(SQLModel, registry=registry()):
    """Base of this module's tables: a private registry, so no other module's tables mix in."""


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
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
    )

    hold_id: str = Field(sa_column=Column(String, primary_key=True))
    account: str | None = Field(sa_column=Column(String, ForeignKey("accounts.id"), nullable=True))
    to_account: str | None = Field(sa_column=Column(String, ForeignKey("accounts.id"), nullable=True))
    asset: str | None = Field(sa_column=Column(String, ForeignKey("asset.code"), nullable=True))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: str = Field(sa_column=Column(String, nullable=False))
    expires_at: datetime | None = Field(sa_column=Column(_UtcDateTime, nullable=True))
    trade_id: str = Field(sa_column=Column(String, nullable=False))
    hashlock: str | None = Field(sa_column=Column(String, nullable=True))
    created_at: datetime = Field(sa_column=Column(_UtcDateTime, nullable=False))
    resolved_at: datetime | None = Field(sa_column=Column(_UtcDateTime, nullable=True))


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
    created_at: datetime = Field(sa_column=Column(_UtcDateTime, nullable=False))


METADATA = _Table.metadata
A = AssetRow.__table__  # type: ignore[attr-defined]
AC = AccountRow.__table__  # type: ignore[attr-defined]
H = HoldRow.__table__  # type: ignore[attr-defined]
J = JournalRow.__table__  # type: ignore[attr-defined]

# SQLite's fast path (``SqlLedger._on_writer``): the common case of the hot operations, in
# the sqlite3 driver's own terms. Each statement keeps the condition its general
# counterpart above relies on (``status = 'open'``, the reservation's available check).
_FAST_HOLD_COLUMNS = "account, to_account, asset, amount, expires_at, trade_id, hashlock"
_FAST_INSERT_HOLD = (
    "INSERT INTO holds (hold_id, account, to_account, asset, amount, status, expires_at,"
    " trade_id, hashlock, created_at) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)"
    " ON CONFLICT (hold_id) DO NOTHING"
)
_FAST_RESERVE = "UPDATE accounts SET held = held + ?1 WHERE id = ?2 AND (is_issuer OR balance - held >= ?1)"
_FAST_UNRESERVE = "UPDATE accounts SET held = held - ?1 WHERE id = ?2"
_FAST_PIN = (
    f"UPDATE holds SET expires_at = NULL WHERE hold_id = ? AND status = 'open' RETURNING {_FAST_HOLD_COLUMNS}"
)
_FAST_RESOLVE = (
    "UPDATE holds SET status = ?1, resolved_at = ?2 WHERE hold_id = ?3 AND status = 'open'"
    f" RETURNING {_FAST_HOLD_COLUMNS}"
)
# A commit's two account updates in one statement: the payer ?1 pays ?3 out of its held
# amount, the payee ?2 receives it.
_FAST_SETTLE = (
    "UPDATE accounts SET balance = balance + CASE id WHEN ?1 THEN -?3 ELSE ?3 END,"
    " held = held - CASE id WHEN ?1 THEN ?3 ELSE 0 END WHERE id IN (?1, ?2)"
)
_FAST_JOURNAL = (
    "INSERT INTO journal (ref, hold_id, kind, from_account, to_account, asset, amount, created_at)"
    " VALUES (?, ?, 'settle', ?, ?, ?, ?, ?)"
)

# ---------------------------------------------------------------- amounts and rows


class _Account(NamedTuple):
    """What never changes about an account once it exists (safe to cache)."""

    asset: str
    owner: str
    is_issuer: bool
    precision: int


def _as_decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, (bool, float)):
        raise InvalidAmount(f"{what} must be a Decimal, not {type(value).__name__} {value!r}")
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise InvalidAmount(f"{what} {value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise InvalidAmount(f"{what} {value!r} is not a finite number")
    return amount


def _to_minor(amount: Decimal, asset: str, precision: int, what: str = "amount") -> int:
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
            f"(at most {format(_to_decimal(MAX_MINOR, precision), 'f')})"
        )
    return minor


def _to_decimal(minor: int, precision: int) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 100
        return Decimal(minor).scaleb(-precision)


def _positive(amount: Any, asset: str, precision: int) -> int:
    value = _as_decimal(amount, "amount")
    if value <= 0:
        raise InvalidAmount(f"amount must be positive, got {format(value, 'f')} {asset}")
    return _to_minor(value, asset, precision)


def _normalise_hashlock(hashlock: str | None) -> str | None:
    if hashlock is None:
        return None
    value = hashlock.lower().removeprefix("0x")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise LedgerError(f"hashlock must be a sha256 digest in 64 hex digits, got {hashlock!r}")
    return value


def _preimage_matches(preimage: str | None, hashlock: str) -> bool:
    if preimage is None:
        return False
    try:
        secret = bytes.fromhex(preimage.removeprefix("0x"))
    except ValueError:
        return False
    return hashlib.sha256(secret).hexdigest() == hashlock


def _sorted_pair(first: str, second: str) -> list[str]:
    return sorted((first, second))


# -------------------------------------------------------------------------- ledger


class SqlLedger(Ledger):
    """The ledger ``name`` kept in the SQL database at ``url`` (see the module docstring)."""

    def __init__(self, name: str, url: str, **options: Any) -> None:
        self.name = name
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise ConfigError(
                f"ledgers.{name}.{unknown[0]}: not an option of a sql ledger "
                f"(known: {', '.join(KNOWN_OPTIONS)})"
            )
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            raise ConfigError(f"ledgers.{name}.url: {url!r} is not a database URL: {exc}") from None
        self._dialect = parsed.get_backend_name()
        pool = {k: int(options[k]) for k in KNOWN_OPTIONS if k in options}
        if self._dialect == "sqlite":
            database = parsed.database or ""
            if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
                raise ConfigError(
                    f"ledgers.{name}.url: an in-memory SQLite database cannot be shared between "
                    f"threads and processes; give a file, e.g. sqlite:///.dvp/{name}.db"
                )
            if not parsed.query.get("uri"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                parsed,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
                **pool,
            )
            _configure_sqlite(engine)
            # Writers take turns on the ledger's lock, so one connection serves them all,
            # and its page cache stays valid from one write to the next (a pooled
            # connection found the pages another one had changed stale, and read them).
            writer = create_engine(
                parsed,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
                pool_size=1,
                max_overflow=0,
            )
            _configure_sqlite(writer)
            self._writer_driver = _PooledDriver(writer)
            # The fast path stores and reads datetimes exactly as SQLAlchemy does for the
            # holds' columns: through the type as the dialect adapts it, whose DATETIME
            # formats the text (the TypeDecorator's own processor would pass a datetime on).
            stamp = H.c.created_at.type.dialect_impl(writer.dialect)
            self._to_sqlite_time = stamp.bind_processor(writer.dialect)
            self._from_sqlite_time = stamp.result_processor(writer.dialect, None)
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif self._dialect == "postgresql":
            connect_args = (
                {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
            )
            engine = writer = create_engine(parsed, connect_args=connect_args, **pool)
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        else:
            raise ConfigError(
                f"ledgers.{name}.url: {self._dialect!r} is not supported; "
                "use sqlite:///path.db or postgresql+psycopg://..."
            )
        self._engine: Engine = engine
        self._writer: Engine = writer
        self._reader: Engine = engine.execution_options(dvp_read_only=True)
        self._write_lock = threading.Lock() if self._dialect == "sqlite" else None
        # Immutable facts, cached after the first sight: saves a round trip per hold.
        self._accounts: dict[str, _Account] = {}
        self._precisions: dict[str, int] = {}
        self._build_statements(dialect_insert)
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SqlLedger({self.name!r}, {self._engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------ plumbing

    def _build_statements(self, dialect_insert: Any) -> None:
        p = bindparam
        # RETURNING tells whether the row went in: INSERT rowcount is not reliable on every driver.
        self._ins_asset = dialect_insert(A).on_conflict_do_nothing(index_elements=[A.c.code])
        self._ins_account = (
            dialect_insert(AC).on_conflict_do_nothing(index_elements=[AC.c.id]).returning(AC.c.id)
        )
        self._ins_hold = (
            dialect_insert(H).on_conflict_do_nothing(index_elements=[H.c.hold_id]).returning(H.c.hold_id)
        )
        self._ins_journal = J.insert()
        self._sel_precision = select(A.c.precision).where(A.c.code == p("asset"))
        self._sel_meta = (
            select(AC.c.id, AC.c.asset, AC.c.owner, AC.c.is_issuer, A.c.precision)
            .join(A, A.c.code == AC.c.asset)
            .where(AC.c.id.in_(p("ids", expanding=True)))
        )
        balance_cols = (AC.c.id, AC.c.asset, AC.c.owner, AC.c.balance, AC.c.held, A.c.precision)
        self._sel_balances = select(*balance_cols).join(A, A.c.code == AC.c.asset)
        self._sel_account = self._sel_balances.where(AC.c.id == p("id"))
        self._sel_all_balances = self._sel_balances.order_by(AC.c.asset, AC.c.id)
        self._sel_available = select(AC.c.balance - AC.c.held).where(AC.c.id == p("id"))
        hold_cols = (
            H.c.hold_id,
            H.c.account,
            H.c.to_account,
            H.c.asset,
            H.c.amount,
            H.c.status,
            H.c.expires_at,
            H.c.trade_id,
            H.c.hashlock,
        )
        self._sel_hold = select(*hold_cols).where(H.c.hold_id == p("k"))
        self._sel_open = select(*hold_cols).where(H.c.status == "open").order_by(H.c.created_at, H.c.hold_id)
        self._sel_expired = (
            select(H.c.hold_id)
            .where(H.c.status == "open", H.c.expires_at.is_not(None), H.c.expires_at <= p("now"))
            .order_by(H.c.expires_at, H.c.hold_id)
        )
        self._reserve = (
            update(AC)
            .where(AC.c.id == p("acct"), AC.c.is_issuer | (AC.c.balance - AC.c.held >= p("amt")))
            .values(held=AC.c.held + p("amt"))
        )
        self._unreserve = update(AC).where(AC.c.id == p("acct")).values(held=AC.c.held - p("amt"))
        self._debit_held = (
            update(AC)
            .where(AC.c.id == p("acct"))
            .values(balance=AC.c.balance - p("amt"), held=AC.c.held - p("amt"))
        )
        self._debit = update(AC).where(AC.c.id == p("acct")).values(balance=AC.c.balance - p("amt"))
        self._credit = update(AC).where(AC.c.id == p("acct")).values(balance=AC.c.balance + p("amt"))
        resolve = update(H).where(H.c.hold_id == p("k"), H.c.status == "open")
        self._commit = resolve.values(status="committed", resolved_at=p("now")).returning(*hold_cols)
        self._release = resolve.values(status="released", resolved_at=p("now")).returning(*hold_cols)
        self._expire = (
            update(H)
            .where(
                H.c.hold_id == p("k"),
                H.c.status == "open",
                H.c.expires_at.is_not(None),
                H.c.expires_at <= p("cutoff"),
            )
            .values(status="released", resolved_at=p("now"))
            .returning(*hold_cols)
        )
        self._pin = resolve.values(expires_at=None).returning(*hold_cols)

    def _create_schema(self) -> None:
        def create(conn: Connection) -> None:
            if self._dialect == "postgresql":
                # Several workers may start at once; CREATE TABLE is not race-free on its own.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('dvp.adapters.sql schema'))")
            METADATA.create_all(conn)

        self._tx(create)

    def _tx(self, work: Callable[[Connection], T], *, read_only: bool = False) -> T:
        """Run ``work`` in one transaction, retrying the transient failures it is safe to retry."""
        engine = self._reader if read_only else self._writer
        lock = None if read_only else self._write_lock
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if lock is None:
                    with engine.begin() as conn:
                        return work(conn)
                with lock, engine.begin() as conn:
                    return work(conn)
            except DBAPIError as exc:
                if attempt < ATTEMPTS and self._retryable(exc):
                    time.sleep(random.uniform(0, 0.01 * 2**attempt))
                    continue
                raise self._translate(exc) from exc
            except PoolTimeout as exc:
                raise LedgerUnavailable(f"ledger {self.name!r}: no database connection free: {exc}") from exc
            except sqlite3.OperationalError as exc:
                # From the "begin" listener's BEGIN IMMEDIATE, which runs on the driver,
                # outside SQLAlchemy's wrapping: the busy timeout ran out.
                raise self._busy(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _busy(self, exc: sqlite3.OperationalError) -> LedgerUnavailable:
        return LedgerUnavailable(f"ledger {self.name!r}: the database is unavailable: {exc}")

    def _on_writer(self, work: Callable[[sqlite3.Cursor], T | None]) -> T | None:
        """SQLite's fast path: ``work`` in one write transaction on the writer's driver connection.

        Through SQLAlchemy (compiled statements, result rows, events, the pool) a hold's
        operation costs several times what SQLite does for it, on the worker's activity
        threads. So its common case runs here as hand-written SQL, in turn with every other
        writer on the ledger's lock and its one connection. ``work`` returns ``None`` for a
        case it leaves to the general path (a key that exists, a hold not open, a
        reservation refused, facts not cached, ...), and so does this method, after any
        sqlite3 error too: the transaction is then rolled back, so it had no effect, and the
        caller runs the general path, which decides every unusual case, retries and
        translates errors. Running an operation there again is safe even after a COMMIT that
        failed ambiguously: every operation is idempotent on its hold key.
        """
        assert self._write_lock is not None
        with self._write_lock:
            db = self._writer_driver.connection
            if db is None:
                return None  # the pool has no connection open: the general path opens one
            try:
                cursor = db.cursor()
                # Here, not in the "begin" listener, which only SQLAlchemy's Connection fires.
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # The busy timeout ran out (another process held the write lock that long);
                # the general path would only wait as long again.
                raise self._busy(exc) from exc
            except sqlite3.Error:
                return None  # e.g. a connection closed under us: the general path reopens one
            try:
                result = work(cursor)
                if result is not None:
                    cursor.execute("COMMIT")
                    return result
            except sqlite3.Error:
                pass  # the general path runs it again, and reports an error that persists
            finally:
                # What is not committed has no effect (a no-op after COMMIT). Should even this
                # fail, the general path meets the failure, and the pool replaces the connection.
                with suppress(sqlite3.Error):
                    db.rollback()
        return None

    def _fast_hold(self, hold_id: str, status: HoldStatus, row: tuple[Any, ...]) -> Hold | None:
        """The ``Hold`` of a ``_FAST_HOLD_COLUMNS`` row; ``None`` if its asset's precision is not cached."""
        account, to_account, asset, amount, expires_at, trade_id, hashlock = row
        precision = self._precisions.get(asset)
        if precision is None:
            return None
        return Hold(
            ledger=self.name,
            hold_id=hold_id,
            account=account,
            to_account=to_account,
            asset=asset,
            amount=_to_decimal(amount, precision),
            status=status,
            expires_at=self._from_sqlite_time(expires_at),
            trade_id=trade_id,
            hashlock=hashlock,
        )

    def _retryable(self, exc: DBAPIError) -> bool:
        if exc.connection_invalidated:
            return True  # every operation is idempotent, so running it again is safe
        return getattr(exc.orig, "sqlstate", None) in RETRY_SQLSTATES

    def _translate(self, exc: DBAPIError) -> LedgerError:
        cause = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        if isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated:
            return LedgerUnavailable(f"ledger {self.name!r}: the database is unavailable: {cause}")
        if isinstance(exc, IntegrityError):
            return LedgerError(f"ledger {self.name!r}: the database refused the change: {cause}")
        return LedgerError(f"ledger {self.name!r}: database error: {cause}")

    def _meta(self, conn: Connection, ids: Iterable[str]) -> dict[str, _Account]:
        """The immutable facts of the accounts among ``ids`` that exist."""
        wanted = set(ids)
        missing = [i for i in wanted if i not in self._accounts]
        if missing:
            for row in conn.execute(self._sel_meta, {"ids": missing}):
                self._accounts[row.id] = _Account(row.asset, row.owner, bool(row.is_issuer), row.precision)
                self._precisions[row.asset] = row.precision
        return {i: self._accounts[i] for i in wanted if i in self._accounts}

    def _hold(self, conn: Connection, row: AnyRow) -> Hold:
        if row.asset is None:  # tombstone
            amount = Decimal(0)
        else:
            amount = _to_decimal(row.amount, self._asset_precision(conn, row.asset))
        return Hold(
            ledger=self.name,
            hold_id=row.hold_id,
            account=row.account or "",
            to_account=row.to_account or "",
            asset=row.asset or "",
            amount=amount,
            status=HoldStatus(row.status),
            expires_at=row.expires_at,
            trade_id=row.trade_id,
            hashlock=row.hashlock,
        )

    def _asset_precision(self, conn: Connection, asset: str) -> int:
        if asset not in self._precisions:
            value = conn.execute(self._sel_precision, {"asset": asset}).scalar()
            if value is None:
                raise LedgerError(f"ledger {self.name!r} has no asset {asset!r}")
            self._precisions[asset] = value
        return self._precisions[asset]

    def _balance(self, row: AnyRow) -> AccountBalance:
        p = row.precision
        return AccountBalance(
            ledger=self.name,
            account=row.id,
            asset=row.asset,
            owner=row.owner,
            balance=_to_decimal(row.balance, p),
            held=_to_decimal(row.held, p),
            available=_to_decimal(row.balance - row.held, p),
        )

    def _unknown_account(self, account: str) -> UnknownAccount:
        return UnknownAccount(f"ledger {self.name!r} has no account {account!r}")

    # ------------------------------------------------------------------ accounts

    def open_account(
        self, account: str, asset: str, owner: str, balance: Decimal = Decimal(0), precision: int = 0
    ) -> AccountBalance:
        opening = _as_decimal(balance, "opening balance")
        if opening < 0:
            raise InvalidAmount(f"opening balance of {account!r} cannot be negative, got {opening} {asset}")
        if not 0 <= precision <= 18:
            raise InvalidAmount(f"precision of asset {asset} must be 0 to 18 decimal places, got {precision}")
        if not account or not asset or not owner:
            raise LedgerError("account, asset and owner must not be empty")
        issuer = issuer_id(asset)

        def work(conn: Connection) -> AccountBalance:
            conn.execute(self._ins_asset, {"code": asset, "precision": precision})
            scale = self._asset_precision(conn, asset)
            minor = _to_minor(opening, asset, scale, "opening balance")
            conn.execute(
                self._ins_account,
                {
                    "id": issuer,
                    "asset": asset,
                    "owner": ISSUER_OWNER,
                    "balance": 0,
                    "held": 0,
                    "is_issuer": True,
                },
            ).first()
            inserted = conn.execute(
                self._ins_account,
                {
                    "id": account,
                    "asset": asset,
                    "owner": owner,
                    "balance": minor,
                    "held": 0,
                    "is_issuer": False,
                },
            ).first()
            if inserted is None:
                row = conn.execute(self._sel_account, {"id": account}).one()
                if (row.asset, row.owner) != (asset, owner):
                    raise IdempotencyConflict(
                        f"account {account!r} exists for asset {row.asset} owned by {row.owner!r}; "
                        f"cannot open it for asset {asset} owned by {owner!r}"
                    )
                return self._balance(row)
            if minor:
                conn.execute(self._debit, {"acct": issuer, "amt": minor})
                conn.execute(
                    self._ins_journal,
                    {
                        "ref": f"open:{account}",
                        "hold_id": None,
                        "kind": "issue",
                        "from_account": issuer,
                        "to_account": account,
                        "asset": asset,
                        "amount": minor,
                        "created_at": datetime.now(UTC),
                    },
                )
            return AccountBalance(
                ledger=self.name,
                account=account,
                asset=asset,
                owner=owner,
                balance=_to_decimal(minor, scale),
                held=_to_decimal(0, scale),
                available=_to_decimal(minor, scale),
            )

        return self._tx(work)

    def account(self, account: str) -> AccountBalance:
        row = self._tx(lambda c: c.execute(self._sel_account, {"id": account}).first(), read_only=True)
        if row is None:
            raise self._unknown_account(account)
        return self._balance(row)

    def account_facts(self, accounts: Collection[str]) -> dict[str, AccountFacts]:
        # From the cache of immutable facts; one read for the accounts not seen before.
        wanted = set(accounts)
        if not wanted <= self._accounts.keys():
            self._tx(lambda c: self._meta(c, wanted), read_only=True)
        known = {i: self._accounts[i] for i in wanted if i in self._accounts}
        return {i: AccountFacts(a.asset, a.owner) for i, a in known.items()}

    def balances(self) -> list[AccountBalance]:
        rows = self._tx(lambda c: c.execute(self._sel_all_balances).all(), read_only=True)
        return [self._balance(r) for r in rows]

    # --------------------------------------------------------------------- holds

    def place_hold(
        self,
        hold_id: str,
        account: str,
        to_account: str,
        asset: str,
        amount: Decimal,
        expires_at: datetime | None,
        trade_id: str = "",
        hashlock: str | None = None,
    ) -> Hold:
        if not hold_id:
            raise LedgerError("hold_id must not be empty")

        def validate(known: Mapping[str, _Account]) -> tuple[int, str | None]:
            for acct in (account, to_account):
                if acct not in known:
                    raise self._unknown_account(acct)
            for acct in (account, to_account):
                if known[acct].asset != asset:
                    raise AssetMismatch(f"account {acct!r} holds asset {known[acct].asset}, not {asset}")
            if account == to_account:
                raise LedgerError(f"hold {hold_id!r} pays account {account!r} to itself")
            return _positive(amount, asset, known[account].precision), _normalise_hashlock(hashlock)

        def placed(minor: int, lock: str | None) -> Hold:
            return Hold(
                ledger=self.name,
                hold_id=hold_id,
                account=account,
                to_account=to_account,
                asset=asset,
                amount=_to_decimal(minor, self._accounts[account].precision),
                status=HoldStatus.OPEN,
                expires_at=_utc(expires_at),
                trade_id=trade_id,
                hashlock=lock,
            )

        def place(cursor: sqlite3.Cursor, minor: int, lock: str | None) -> Hold | None:
            to_time = self._to_sqlite_time
            cursor.execute(
                _FAST_INSERT_HOLD,
                (
                    hold_id,
                    account,
                    to_account,
                    asset,
                    minor,
                    to_time(expires_at),
                    trade_id,
                    lock,
                    to_time(datetime.now(UTC)),
                ),
            )
            if cursor.rowcount != 1:
                return None  # the key exists: a replay, a tombstone or a conflict
            if cursor.execute(_FAST_RESERVE, (minor, account)).rowcount != 1:
                return None  # insufficient funds: the general path says how much is available
            return placed(minor, lock)

        if self._dialect == "sqlite":
            try:
                # From the cache alone: an account not in it is not known to be missing.
                minor, lock = validate(self._accounts)
            except LedgerError:
                pass  # the general path looks, and answers a replay before refusing
            else:
                hold = self._on_writer(lambda cursor: place(cursor, minor, lock))
                if hold is not None:
                    return hold

        def work(conn: Connection) -> Hold:
            try:
                minor, lock = validate(self._meta(conn, (account, to_account)))
            except LedgerError:
                # A known key answers first: a replay must not fail on a check it passed before.
                existing = conn.execute(self._sel_hold, {"k": hold_id}).first()
                if existing is not None:
                    return self._same_terms(
                        conn, existing, account, to_account, asset, amount, trade_id, hashlock
                    )
                raise
            row = {
                "hold_id": hold_id,
                "account": account,
                "to_account": to_account,
                "asset": asset,
                "amount": minor,
                "status": "open",
                "expires_at": expires_at,
                "trade_id": trade_id,
                "hashlock": lock,
                "created_at": datetime.now(UTC),
                "resolved_at": None,
            }
            if conn.execute(self._ins_hold, row).first() is None:
                existing = conn.execute(self._sel_hold, {"k": hold_id}).one()
                return self._same_terms(
                    conn, existing, account, to_account, asset, amount, trade_id, hashlock
                )
            if not conn.execute(self._reserve, {"acct": account, "amt": minor}).rowcount:
                available = conn.execute(self._sel_available, {"id": account}).scalar_one()
                scale = self._accounts[account].precision
                raise InsufficientFunds(
                    f"account {account!r} has {format(_to_decimal(available, scale), 'f')} {asset} "
                    f"available; hold {hold_id!r} requested {format(_to_decimal(minor, scale), 'f')} {asset}"
                )
            return placed(minor, lock)

        return self._tx(work)

    def _same_terms(
        self,
        conn: Connection,
        row: AnyRow,
        account: str,
        to_account: str,
        asset: str,
        amount: Any,
        trade_id: str,
        hashlock: str | None,
    ) -> Hold:
        """The hold already stored under a key, if the new request matches its terms."""
        held = self._hold(conn, row)
        if row.account is None:
            return held  # tombstone: released before it was placed; place nothing
        try:
            lock = _normalise_hashlock(hashlock)
        except LedgerError:
            lock = hashlock
        try:
            same_amount = Decimal(str(amount)) == held.amount
        except (InvalidOperation, TypeError):
            same_amount = False
        asked = {
            "account": account,
            "to_account": to_account,
            "asset": asset,
            "trade_id": trade_id,
            "hashlock": lock,
        }
        differs = [
            f"{k} {getattr(held, k)!r} (asked {v!r})" for k, v in asked.items() if getattr(held, k) != v
        ]
        if not same_amount:
            differs.append(f"amount {format(held.amount, 'f')} (asked {amount})")
        if differs:
            raise IdempotencyConflict(
                f"hold {row.hold_id!r} exists with different terms: " + ", ".join(differs)
            )
        return held

    def _resolved(self, conn: Connection, hold_id: str, wanted: str) -> Hold | None:
        """After a conditional update missed: the hold as it stands, or ``None`` if it is open."""
        row = conn.execute(self._sel_hold, {"k": hold_id}).first()
        if row is None:
            raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r}")
        if row.status == "open":
            return None  # placed by a transaction that committed after our update looked
        if wanted == "pin" and row.status == "committed":
            return self._hold(conn, row)
        if row.status != wanted:
            verb = {"pin": "pinned", "committed": "committed", "released": "released"}[wanted]
            raise HoldNotOpen(f"hold {hold_id!r} is already {row.status}; it cannot be {verb}")
        return self._hold(conn, row)

    def pin_hold(self, hold_id: str) -> Hold:
        def pin(cursor: sqlite3.Cursor) -> Hold | None:
            row = cursor.execute(_FAST_PIN, (hold_id,)).fetchone()
            return None if row is None else self._fast_hold(hold_id, HoldStatus.OPEN, row)

        if self._dialect == "sqlite" and (hold := self._on_writer(pin)) is not None:
            return hold

        def work(conn: Connection) -> Hold:
            for _ in range(ATTEMPTS):
                row = conn.execute(self._pin, {"k": hold_id}).first()
                if row is not None:
                    return self._hold(conn, row)
                resolved = self._resolved(conn, hold_id, "pin")
                if resolved is not None:
                    return resolved
            raise LedgerUnavailable(f"hold {hold_id!r} keeps changing under contention; retry")

        return self._tx(work)

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        def commit(cursor: sqlite3.Cursor) -> Hold | None:
            now = self._to_sqlite_time(datetime.now(UTC))
            row = cursor.execute(_FAST_RESOLVE, ("committed", now, hold_id)).fetchone()
            if row is None or row[-1] is not None:
                return None  # not open, or hashlocked: the general path checks the preimage
            account, to_account, asset, amount = row[:4]
            if cursor.execute(_FAST_SETTLE, (account, to_account, amount)).rowcount != 2:
                return None  # not two accounts: the general path refuses it in its own words
            cursor.execute(
                _FAST_JOURNAL, (f"hold:{hold_id}", hold_id, account, to_account, asset, amount, now)
            )
            return self._fast_hold(hold_id, HoldStatus.COMMITTED, row)

        if self._dialect == "sqlite" and (hold := self._on_writer(commit)) is not None:
            return hold

        def work(conn: Connection) -> Hold:
            now = datetime.now(UTC)
            for _ in range(ATTEMPTS):
                row = conn.execute(self._commit, {"k": hold_id, "now": now}).first()
                if row is not None:
                    break
                resolved = self._resolved(conn, hold_id, "committed")
                if resolved is not None:
                    return resolved
            else:
                raise LedgerUnavailable(f"hold {hold_id!r} keeps changing under contention; retry")
            if row.hashlock is not None and not _preimage_matches(preimage, row.hashlock):
                raise LedgerError(f"hold {hold_id!r}: the preimage does not match the hashlock")
            if row.hashlock is not None and row.expires_at is not None and row.expires_at <= now:
                # a hashlock's timelock, as on the chain: once it passed the hold can only refund
                raise LedgerError(f"hold {hold_id!r}: its timelock passed at {row.expires_at.isoformat()}")
            for acct in _sorted_pair(row.account, row.to_account):
                stmt = self._debit_held if acct == row.account else self._credit
                conn.execute(stmt, {"acct": acct, "amt": row.amount})
            conn.execute(
                self._ins_journal,
                {
                    "ref": f"hold:{hold_id}",
                    "hold_id": hold_id,
                    "kind": "settle",
                    "from_account": row.account,
                    "to_account": row.to_account,
                    "asset": row.asset,
                    "amount": row.amount,
                    "created_at": datetime.now(UTC),
                },
            )
            return self._hold(conn, row)

        return self._tx(work)

    def release_hold(self, hold_id: str) -> Hold:
        def release(cursor: sqlite3.Cursor) -> Hold | None:
            now = self._to_sqlite_time(datetime.now(UTC))
            row = cursor.execute(_FAST_RESOLVE, ("released", now, hold_id)).fetchone()
            if row is None:
                return None  # not open, or an unknown key, which the general path tombstones
            cursor.execute(_FAST_UNRESERVE, (row[3], row[0]))
            return self._fast_hold(hold_id, HoldStatus.RELEASED, row)

        if self._dialect == "sqlite" and (hold := self._on_writer(release)) is not None:
            return hold

        def work(conn: Connection) -> Hold:
            now = datetime.now(UTC)
            for _ in range(ATTEMPTS):
                row = conn.execute(self._release, {"k": hold_id, "now": now}).first()
                if row is not None:
                    conn.execute(self._unreserve, {"acct": row.account, "amt": row.amount})
                    return self._hold(conn, row)
                try:
                    resolved = self._resolved(conn, hold_id, "released")
                except UnknownHold:
                    tombstone = {
                        "hold_id": hold_id,
                        "account": None,
                        "to_account": None,
                        "asset": None,
                        "amount": 0,
                        "status": "released",
                        "expires_at": None,
                        "trade_id": "",
                        "hashlock": None,
                        "created_at": now,
                        "resolved_at": now,
                    }
                    if conn.execute(self._ins_hold, tombstone).first() is not None:
                        return self._hold(conn, conn.execute(self._sel_hold, {"k": hold_id}).one())
                    continue  # placed concurrently: release that
                if resolved is not None:
                    return resolved
            raise LedgerUnavailable(f"hold {hold_id!r} keeps changing under contention; retry")

        return self._tx(work)

    def get_hold(self, hold_id: str) -> Hold:
        def work(conn: Connection) -> Hold:
            row = conn.execute(self._sel_hold, {"k": hold_id}).first()
            if row is None:
                raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r}")
            return self._hold(conn, row)

        return self._tx(work, read_only=True)

    def open_holds(self) -> list[Hold]:
        return self._tx(lambda c: [self._hold(c, r) for r in c.execute(self._sel_open).all()], read_only=True)

    def expire_holds(self, now: datetime) -> list[Hold]:
        due = self._tx(lambda c: c.execute(self._sel_expired, {"now": now}).scalars().all(), read_only=True)
        expired: list[Hold] = []
        for hold_id in due:
            # One transaction per hold: a concurrent sweep, pin or commit wins or loses it whole.
            def work(conn: Connection, hold_id: str = hold_id) -> Hold | None:
                row = conn.execute(
                    self._expire, {"k": hold_id, "cutoff": now, "now": datetime.now(UTC)}
                ).first()
                if row is None:
                    return None
                conn.execute(self._unreserve, {"acct": row.account, "amt": row.amount})
                return self._hold(conn, row)

            hold = self._tx(work)
            if hold is not None:
                expired.append(hold)
        return expired

    # ------------------------------------------------------------------- checks

    def verify(self) -> list[str]:
        """Every invariant violation found in the ledger; an empty list means consistent."""

        def work(conn: Connection) -> list[str]:
            problems: list[str] = []
            accounts = conn.execute(
                select(AC.c.id, AC.c.asset, AC.c.balance, AC.c.held, AC.c.is_issuer, A.c.precision)
                .join(A, A.c.code == AC.c.asset)
                .order_by(AC.c.asset, AC.c.id)
            ).all()
            credits: dict[str, int] = dict(
                conn.execute(select(J.c.to_account, func.sum(J.c.amount)).group_by(J.c.to_account)).all()
            )
            debits: dict[str, int] = dict(
                conn.execute(select(J.c.from_account, func.sum(J.c.amount)).group_by(J.c.from_account)).all()
            )
            open_held: dict[str, int] = dict(
                conn.execute(
                    select(H.c.account, func.sum(H.c.amount))
                    .where(H.c.status == "open")
                    .group_by(H.c.account)
                ).all()
            )
            totals: dict[str, int] = {}
            precision: dict[str, int] = {}
            for a in accounts:
                p = precision[a.asset] = a.precision
                totals[a.asset] = totals.get(a.asset, 0) + a.balance
                journal = int(credits.get(a.id, 0) or 0) - int(debits.get(a.id, 0) or 0)
                if a.balance != journal:
                    problems.append(
                        f"account {a.id!r}: balance {_to_decimal(a.balance, p)} but its journal "
                        f"sums to {_to_decimal(journal, p)}"
                    )
                holds = int(open_held.get(a.id, 0) or 0)
                if a.held != holds:
                    problems.append(
                        f"account {a.id!r}: held {_to_decimal(a.held, p)} but its open holds "
                        f"sum to {_to_decimal(holds, p)}"
                    )
                if a.held < 0:
                    problems.append(f"account {a.id!r}: held {_to_decimal(a.held, p)} is negative")
                if not a.is_issuer and a.balance - a.held < 0:
                    problems.append(
                        f"account {a.id!r}: available {_to_decimal(a.balance - a.held, p)} is negative"
                    )
            for asset, total in totals.items():
                if total != 0:
                    problems.append(
                        f"asset {asset}: balances sum to {_to_decimal(total, precision[asset])}, not 0"
                    )
            unjournaled = conn.execute(
                select(H.c.hold_id)
                .outerjoin(J, J.c.hold_id == H.c.hold_id)
                .where(H.c.status == "committed", J.c.id.is_(None))
            ).scalars()
            problems.extend(f"hold {k!r} is committed but not in the journal" for k in unjournaled)
            mismatched = conn.execute(
                select(J.c.hold_id)
                .join(H, H.c.hold_id == J.c.hold_id)
                .where(
                    (H.c.status != "committed")
                    | (H.c.amount != J.c.amount)
                    | (H.c.account != J.c.from_account)
                    | (H.c.to_account != J.c.to_account)
                    | (H.c.asset != J.c.asset)
                )
            ).scalars()
            problems.extend(f"journal entry of hold {k!r} does not match the hold" for k in mismatched)
            return problems

        engine = self._reader
        if self._dialect == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")  # one snapshot
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with engine.begin() as conn:
                    return work(conn)
            except DBAPIError as exc:
                if attempt < ATTEMPTS and self._retryable(exc):
                    continue
                raise self._translate(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()
        self._writer.dispose()


def _configure_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE for writes (the SQLAlchemy pysqlite recipe)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would begin
        # DEFERRED transactions and fail with "database is locked" on the lock upgrade.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get("dvp_read_only", False)
        # On the driver's connection directly: this runs before every transaction, and
        # through SQLAlchemy's execution path it cost as much as a ledger statement.
        driver = conn.connection.driver_connection
        assert driver is not None  # None only once the connection is closed, never in a transaction
        driver.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")


class _PooledDriver:
    """The driver connection that ``engine``'s pool of one holds open, for the fast path.

    Checking it out of the pool and in again cost about a quarter of a fast operation's
    CPU, and a connection of the fast path's own would be a second writer connection,
    which would find the pages the other one wrote stale; so the fast path uses the pool's
    one while the pool has it open, never while it is checked out (the ledger's lock sees
    to that: every writer takes it). The pool's events tell which connection that is.
    """

    def __init__(self, engine: Engine) -> None:
        self.connection: sqlite3.Connection | None = None
        event.listen(engine, "connect", self._opened)
        event.listen(engine, "close", self._gone)  # disposed, invalidated or recycled
        event.listen(engine, "detach", self._gone)

    def _opened(self, dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        self.connection = dbapi_connection

    def _gone(self, dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        if dbapi_connection is self.connection:
            self.connection = None
