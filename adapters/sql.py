"""A double-entry ledger in SQL: SQLite (embedded) or PostgreSQL, through SQLAlchemy and sqlmodel.

Invariants, each enforced by the database and not only by this module (the tables and
their constraints are in ``adapters/_sql_model.py``):

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
one connection, so they do not wait on the busy timeout's sleeps and find its page
cache still valid. On PostgreSQL (READ COMMITTED) the conditional updates take row
locks; a transaction that touches two accounts updates them in sorted order, and a
deadlock or serialization failure is retried. Every operation is idempotent, so a retry
after a dropped connection is safe. A database that cannot be reached, or whose write
lock another process holds past the busy timeout, raises ``LedgerUnavailable``. Naive
datetimes are taken to be UTC.

On SQLite the common case of placing, pinning, committing and releasing a hold runs on
a fast path of its own (``adapters/_sqlite_fast.py``), which leaves everything else to
the general path here; see docs/decisions/0004-sqlite-fast-path.md.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import bindparam, event, func
from sqlalchemy.engine import Connection, Engine, Row, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import Session, col, insert, select, update

from domain import (
    AccountBalance,
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

from ._base import AccountFacts, Ledger, as_decimal
from ._sql_model import (
    METADATA,
    AccountRow,
    AssetRow,
    CachedAccount,
    HoldRow,
    JournalRow,
    PlaceRequest,
    normalise_hashlock,
    to_decimal,
    to_minor,
)
from ._sqlite_fast import SqliteFastPath

__all__ = ["SqlLedger", "issuer_id"]

T = TypeVar("T")
Tx = TypeVar("Tx")
AnyRow = Row[*tuple[Any, ...]]

ISSUER_OWNER = "issuer"
SQLITE_BUSY_TIMEOUT_S = 30
PG_CONNECT_TIMEOUT_S = 10
ATTEMPTS = 5  # per operation, for deadlocks, serialization failures and dropped connections
RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
KNOWN_OPTIONS = ("pool_size", "max_overflow")
NO_SYNC = {"synchronize_session": False}  # an ORM update here returns what it changed; nothing to refresh


def issuer_id(asset: str) -> str:
    """The id of ``asset``'s issuer account, from which opening balances are issued."""
    return f"issuer:{asset}"


def _preimage_matches(preimage: str | None, hashlock: str) -> bool:
    if preimage is None:
        return False
    try:
        secret = bytes.fromhex(preimage.removeprefix("0x"))
    except ValueError:
        return False
    return hashlib.sha256(secret).hexdigest() == hashlock


@contextmanager
def _session_tx(engine: Engine) -> Iterator[Session]:
    """A sqlmodel ``Session`` in one transaction on ``engine``, committed unless it raises."""
    with Session(engine) as session, session.begin():
        yield session


class SqlLedger(Ledger):
    """The ledger ``name`` kept in the SQL database at ``url`` (see the module docstring).

    What a trade calls (``account_facts``, ``account``, and placing, pinning,
    committing and releasing a hold) runs statements on the table models on a
    SQLAlchemy ``Connection``, since a ``Session`` costs more than these statements do;
    the rest (opening accounts, listings, a hold's lookup, expiry, ``verify``) runs in a
    sqlmodel ``Session`` with model instances. On SQLite each hold operation first asks
    the fast path (one delegation at its top) and runs the general path below it when
    the fast path leaves the case to it. See docs/decisions/0004-sqlite-fast-path.md.
    """

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
        # Immutable facts, cached after the first sight: saves a round trip per hold.
        self._accounts: dict[str, CachedAccount] = {}
        self._precisions: dict[str, int] = {}
        self._fast: SqliteFastPath | None = None
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
            self._write_lock: threading.Lock | None = threading.Lock()
            self._fast = SqliteFastPath(name, writer, self._write_lock, self._accounts, self._precisions)
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        elif self._dialect == "postgresql":
            connect_args = (
                {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
            )
            engine = writer = create_engine(parsed, connect_args=connect_args, **pool)
            self._write_lock = None
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        else:
            raise ConfigError(
                f"ledgers.{name}.url: {self._dialect!r} is not supported; "
                "use sqlite:///path.db or postgresql+psycopg://..."
            )
        self._engine: Engine = engine
        self._writer: Engine = writer
        self._reader: Engine = engine.execution_options(dvp_read_only=True)
        self._build_statements(dialect_insert)
        try:
            self._tx(self._create_schema)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SqlLedger({self.name!r}, {self._engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------------ plumbing

    def _build_statements(self, dialect_insert: Any) -> None:
        """The statements of the hold operations and their fallbacks, built once.

        They run on a ``Connection``, where a statement on a model returns rows of its
        columns, not instances. Balances and statuses change only through relative and
        conditional updates, never read-modify-write of an instance: that is what keeps
        concurrent transactions from overdrawing or resolving a hold twice.
        """
        p = bindparam
        hold_id, status = col(HoldRow.hold_id), col(HoldRow.status)
        held, balance, account_id = col(AccountRow.held), col(AccountRow.balance), col(AccountRow.id)
        self._ins_asset = dialect_insert(AssetRow).on_conflict_do_nothing()
        self._ins_account = dialect_insert(AccountRow).on_conflict_do_nothing().returning(col(AccountRow.id))
        # An upsert makes the key idempotent and race-free across processes; RETURNING
        # tells whether the row went in (INSERT rowcount is not reliable on every driver).
        self._ins_hold = (
            dialect_insert(HoldRow).on_conflict_do_nothing(index_elements=["hold_id"]).returning(hold_id)
        )
        self._ins_journal = insert(JournalRow)
        self._sel_hold = select(HoldRow).where(hold_id == p("k"))
        self._sel_precision = select(AssetRow.precision).where(col(AssetRow.code) == p("asset"))
        self._sel_meta = (
            select(AccountRow.id, AccountRow.asset, AccountRow.owner, AssetRow.precision)
            .join(AssetRow)
            .where(account_id.in_(p("ids", expanding=True)))
        )
        self._sel_available = select(balance - held).where(account_id == p("id"))
        self._sel_account = select(AccountRow, AssetRow.precision).join(AssetRow).where(account_id == p("id"))
        self._reserve = (
            update(AccountRow)
            .where(account_id == p("acct"), col(AccountRow.is_issuer) | (balance - held >= p("amt")))
            .values(held=held + p("amt"))
        )
        self._unreserve = update(AccountRow).where(account_id == p("acct")).values(held=held - p("amt"))
        self._debit_held = (
            update(AccountRow)
            .where(account_id == p("acct"))
            .values(balance=balance - p("amt"), held=held - p("amt"))
        )
        self._credit = update(AccountRow).where(account_id == p("acct")).values(balance=balance + p("amt"))
        resolve = update(HoldRow).where(hold_id == p("k"), status == "open")
        self._pin = resolve.values(expires_at=None).returning(HoldRow)
        self._commit = resolve.values(status="committed", resolved_at=p("now")).returning(HoldRow)
        self._release = resolve.values(status="released", resolved_at=p("now")).returning(HoldRow)

    def _create_schema(self, conn: Connection) -> None:
        if self._dialect == "postgresql":
            # Several workers may start at once; CREATE TABLE is not race-free on its own.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('dvp.adapters.sql schema'))")
        METADATA.create_all(conn)

    def _tx(self, work: Callable[[Connection], T], *, read_only: bool = False) -> T:
        """Run ``work`` in one transaction on a ``Connection`` (the hold operations' own)."""
        engine = self._reader if read_only else self._writer
        return self._retrying(engine.begin, work, read_only)

    def _session(
        self, work: Callable[[Session], T], *, read_only: bool = False, engine: Engine | None = None
    ) -> T:
        """Run ``work`` in one transaction in a sqlmodel ``Session``."""
        engine = engine or (self._reader if read_only else self._writer)
        return self._retrying(lambda: _session_tx(engine), work, read_only)

    def _retrying(
        self, begin: Callable[[], AbstractContextManager[Tx]], work: Callable[[Tx], T], read_only: bool
    ) -> T:
        """``work`` in the transaction ``begin`` opens, retrying the transient failures safe to retry."""
        lock = None if read_only else self._write_lock
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if lock is None:
                    with begin() as tx:
                        return work(tx)
                with lock, begin() as tx:
                    return work(tx)
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
                raise LedgerUnavailable(f"ledger {self.name!r}: the database is unavailable: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

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

    def _meta(self, conn: Connection, ids: Iterable[str]) -> dict[str, CachedAccount]:
        """The immutable facts of the accounts among ``ids`` that exist."""
        wanted = set(ids)
        missing = [i for i in wanted if i not in self._accounts]
        if missing:
            for row in conn.execute(self._sel_meta, {"ids": missing}):
                self._accounts[row.id] = CachedAccount(row.asset, row.owner, row.precision)
                self._precisions[row.asset] = row.precision
        return {i: self._accounts[i] for i in wanted if i in self._accounts}

    def _asset_precision(self, conn: Connection, asset: str) -> int:
        if asset not in self._precisions:
            value = conn.execute(self._sel_precision, {"asset": asset}).scalar()
            if value is None:
                raise LedgerError(f"ledger {self.name!r} has no asset {asset!r}")
            self._precisions[asset] = value
        return self._precisions[asset]

    def _hold(self, conn: Connection, row: HoldRow | AnyRow) -> Hold:
        """The ``Hold`` of a ``holds`` row: a ``HoldRow``, or a row of its columns."""
        if row.asset is None:  # tombstone
            amount = Decimal(0)
        else:
            amount = to_decimal(row.amount, self._asset_precision(conn, row.asset))
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

    def _balance(self, row: AccountRow | AnyRow, precision: int) -> AccountBalance:
        return AccountBalance(
            ledger=self.name,
            account=row.id,
            asset=row.asset,
            owner=row.owner,
            balance=to_decimal(row.balance, precision),
            held=to_decimal(row.held, precision),
            available=to_decimal(row.balance - row.held, precision),
        )

    def _unknown_account(self, account: str) -> UnknownAccount:
        return UnknownAccount(f"ledger {self.name!r} has no account {account!r}")

    # ------------------------------------------------------------------ accounts

    def open_account(
        self, account: str, asset: str, owner: str, balance: Decimal = Decimal(0), precision: int = 0
    ) -> AccountBalance:
        opening = as_decimal(balance, "opening balance")
        if opening < 0:
            raise InvalidAmount(f"opening balance of {account!r} cannot be negative, got {opening} {asset}")
        if not 0 <= precision <= 18:
            raise InvalidAmount(f"precision of asset {asset} must be 0 to 18 decimal places, got {precision}")
        if not account or not asset or not owner:
            raise LedgerError("account, asset and owner must not be empty")
        issuer = issuer_id(asset)

        def work(session: Session) -> AccountBalance:
            def reopened(existing: AccountRow) -> AccountBalance:
                if (existing.asset, existing.owner) != (asset, owner):
                    raise IdempotencyConflict(
                        f"account {account!r} exists for asset {existing.asset} owned by {existing.owner!r}; "
                        f"cannot open it for asset {asset} owned by {owner!r}"
                    )
                return self._balance(existing, session.get_one(AssetRow, existing.asset).precision)

            existing = session.get(AccountRow, account)
            if existing is not None:
                return reopened(existing)
            # Upserts: another process may be opening the same account or asset right now.
            session.exec(self._ins_asset, params=AssetRow(code=asset, precision=precision).model_dump())
            scale = session.get_one(AssetRow, asset).precision  # the first account's, if not this one's
            minor = to_minor(opening, asset, scale, "opening balance")
            issuer_row = AccountRow(
                id=issuer, asset=asset, owner=ISSUER_OWNER, balance=0, held=0, is_issuer=True
            )
            session.exec(self._ins_account, params=issuer_row.model_dump())
            new = AccountRow(id=account, asset=asset, owner=owner, balance=minor, held=0, is_issuer=False)
            if session.exec(self._ins_account, params=new.model_dump()).first() is None:
                return reopened(session.get_one(AccountRow, account))  # the other process's
            if minor:
                debit = update(AccountRow).where(col(AccountRow.id) == issuer)
                session.exec(debit.values(balance=col(AccountRow.balance) - minor), execution_options=NO_SYNC)
                session.add(
                    JournalRow(
                        ref=f"open:{account}",
                        hold_id=None,
                        kind="issue",
                        from_account=issuer,
                        to_account=account,
                        asset=asset,
                        amount=minor,
                        created_at=datetime.now(UTC),
                    )
                )
            return self._balance(new, scale)

        return self._session(work)

    def account(self, account: str) -> AccountBalance:
        row = self._tx(lambda c: c.execute(self._sel_account, {"id": account}).first(), read_only=True)
        if row is None:
            raise self._unknown_account(account)
        return self._balance(row, row.precision)

    def account_facts(self, accounts: Collection[str]) -> dict[str, AccountFacts]:
        # From the cache of immutable facts; one read for the accounts not seen before.
        wanted = set(accounts)
        if not wanted <= self._accounts.keys():
            self._tx(lambda c: self._meta(c, wanted), read_only=True)
        known = {i: self._accounts[i] for i in wanted if i in self._accounts}
        return {i: AccountFacts(a.asset, a.owner) for i, a in known.items()}

    def balances(self) -> list[AccountBalance]:
        def read(session: Session) -> list[AccountBalance]:
            rows = session.exec(
                select(AccountRow, AssetRow.precision)
                .join(AssetRow)
                .order_by(AccountRow.asset, AccountRow.id)
            )
            return [self._balance(row, precision) for row, precision in rows]

        return self._session(read, read_only=True)

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
        request = PlaceRequest(hold_id, account, to_account, asset, amount, expires_at, trade_id, hashlock)
        if self._fast is not None and (hold := self._fast.place_hold(request)) is not None:
            return hold

        def work(conn: Connection) -> Hold:
            try:
                minor, lock = request.terms(self.name, self._meta(conn, (account, to_account)))
            except LedgerError:
                # A known key answers first: a replay must not fail on a check it passed before.
                existing = conn.execute(self._sel_hold, {"k": hold_id}).first()
                if existing is not None:
                    return self._same_terms(conn, existing, request)
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
                return self._same_terms(conn, conn.execute(self._sel_hold, {"k": hold_id}).one(), request)
            scale = self._accounts[account].precision
            if not conn.execute(self._reserve, {"acct": account, "amt": minor}).rowcount:
                available = conn.execute(self._sel_available, {"id": account}).scalar_one()
                raise InsufficientFunds(
                    f"account {account!r} has {format(to_decimal(available, scale), 'f')} {asset} "
                    f"available; hold {hold_id!r} requested {format(to_decimal(minor, scale), 'f')} {asset}"
                )
            return request.placed(self.name, minor, lock, scale)

        return self._tx(work)

    def _same_terms(self, conn: Connection, row: AnyRow, request: PlaceRequest) -> Hold:
        """The hold already stored under a key, if ``request`` matches its terms."""
        held = self._hold(conn, row)
        if row.account is None:
            return held  # tombstone: released before it was placed; place nothing
        try:
            lock = normalise_hashlock(request.hashlock)
        except LedgerError:
            lock = request.hashlock
        try:
            same_amount = Decimal(str(request.amount)) == held.amount
        except (InvalidOperation, TypeError):
            same_amount = False
        asked = {
            "account": request.account,
            "to_account": request.to_account,
            "asset": request.asset,
            "trade_id": request.trade_id,
            "hashlock": lock,
        }
        differs = [
            f"{k} {getattr(held, k)!r} (asked {v!r})" for k, v in asked.items() if getattr(held, k) != v
        ]
        if not same_amount:
            differs.append(f"amount {format(held.amount, 'f')} (asked {request.amount})")
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
        if self._fast is not None and (hold := self._fast.pin_hold(hold_id)) is not None:
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
        if self._fast is not None and (hold := self._fast.commit_hold(hold_id)) is not None:
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
            for acct in sorted((row.account, row.to_account)):  # the same order in every transaction
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
        if self._fast is not None and (hold := self._fast.release_hold(hold_id)) is not None:
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
        def read(session: Session) -> Hold:
            row = session.get(HoldRow, hold_id)
            if row is None:
                raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r}")
            return self._hold(session.connection(), row)

        return self._session(read, read_only=True)

    def open_holds(self) -> list[Hold]:
        def read(session: Session) -> list[Hold]:
            rows = session.exec(
                select(HoldRow)
                .where(HoldRow.status == "open")
                .order_by(col(HoldRow.created_at), col(HoldRow.hold_id))
            )
            return [self._hold(session.connection(), row) for row in rows]

        return self._session(read, read_only=True)

    def expire_holds(self, now: datetime) -> list[Hold]:
        def due(session: Session) -> list[str]:
            expires_at = col(HoldRow.expires_at)
            return list(
                session.exec(
                    select(HoldRow.hold_id)
                    .where(HoldRow.status == "open", expires_at.is_not(None), expires_at <= now)
                    .order_by(expires_at, HoldRow.hold_id)
                )
            )

        def expire(session: Session, hold_id: str) -> Hold | None:
            expires_at = col(HoldRow.expires_at)
            released = session.exec(
                update(HoldRow)
                .where(
                    col(HoldRow.hold_id) == hold_id,
                    col(HoldRow.status) == "open",
                    expires_at.is_not(None),
                    expires_at <= now,
                )
                .values(status="released", resolved_at=datetime.now(UTC))
                .returning(HoldRow),
                execution_options=NO_SYNC,
            ).scalar_one_or_none()
            if released is None:
                return None
            unreserve = update(AccountRow).where(col(AccountRow.id) == released.account)
            session.exec(
                unreserve.values(held=col(AccountRow.held) - released.amount), execution_options=NO_SYNC
            )
            return self._hold(session.connection(), released)

        expired: list[Hold] = []
        for hold_id in self._session(due, read_only=True):
            # One transaction per hold: a concurrent sweep, pin or commit wins or loses it whole.
            hold = self._session(partial(expire, hold_id=hold_id))
            if hold is not None:
                expired.append(hold)
        return expired

    # ------------------------------------------------------------------- checks

    def verify(self) -> list[str]:
        """Every invariant violation found in the ledger; an empty list means consistent."""

        def work(session: Session) -> list[str]:
            problems: list[str] = []
            accounts = session.exec(
                select(AccountRow, AssetRow.precision)
                .join(AssetRow)
                .order_by(AccountRow.asset, AccountRow.id)
            ).all()
            j_amount = func.sum(JournalRow.amount)
            credits = dict(
                session.exec(select(JournalRow.to_account, j_amount).group_by(JournalRow.to_account)).all()
            )
            debits = dict(
                session.exec(
                    select(JournalRow.from_account, j_amount).group_by(JournalRow.from_account)
                ).all()
            )
            open_held = dict(
                session.exec(
                    select(HoldRow.account, func.sum(HoldRow.amount))
                    .where(HoldRow.status == "open")
                    .group_by(HoldRow.account)
                ).all()
            )
            totals: dict[str, int] = {}
            precisions: dict[str, int] = {}
            for a, p in accounts:
                precisions[a.asset] = p
                totals[a.asset] = totals.get(a.asset, 0) + a.balance
                journal = int(credits.get(a.id, 0) or 0) - int(debits.get(a.id, 0) or 0)
                if a.balance != journal:
                    problems.append(
                        f"account {a.id!r}: balance {to_decimal(a.balance, p)} but its journal "
                        f"sums to {to_decimal(journal, p)}"
                    )
                holds = int(open_held.get(a.id, 0) or 0)
                if a.held != holds:
                    problems.append(
                        f"account {a.id!r}: held {to_decimal(a.held, p)} but its open holds "
                        f"sum to {to_decimal(holds, p)}"
                    )
                if a.held < 0:
                    problems.append(f"account {a.id!r}: held {to_decimal(a.held, p)} is negative")
                if not a.is_issuer and a.balance - a.held < 0:
                    problems.append(
                        f"account {a.id!r}: available {to_decimal(a.balance - a.held, p)} is negative"
                    )
            for asset, total in totals.items():
                if total != 0:
                    problems.append(
                        f"asset {asset}: balances sum to {to_decimal(total, precisions[asset])}, not 0"
                    )
            h_id, j_hold = col(HoldRow.hold_id), col(JournalRow.hold_id)
            unjournaled = session.exec(
                select(HoldRow.hold_id)
                .outerjoin(JournalRow, j_hold == h_id)
                .where(HoldRow.status == "committed", col(JournalRow.id).is_(None))
            )
            problems.extend(f"hold {k!r} is committed but not in the journal" for k in unjournaled)
            mismatched = session.exec(
                select(JournalRow.hold_id)
                .join(HoldRow, h_id == j_hold)
                .where(
                    (col(HoldRow.status) != "committed")
                    | (col(HoldRow.amount) != col(JournalRow.amount))
                    | (col(HoldRow.account) != col(JournalRow.from_account))
                    | (col(HoldRow.to_account) != col(JournalRow.to_account))
                    | (col(HoldRow.asset) != col(JournalRow.asset))
                )
            )
            problems.extend(f"journal entry of hold {k!r} does not match the hold" for k in mismatched)
            return problems

        engine = self._reader
        if self._dialect == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ")  # one snapshot
        return self._session(work, read_only=True, engine=engine)

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
        assert driver is not None  # a checked-out connection has one
        driver.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
