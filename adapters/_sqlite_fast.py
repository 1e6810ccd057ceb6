"""SQLite's fast path: the common case of a hold's operations, as hand-written SQL.

``SqlLedger`` (``adapters/sql.py``) asks this first on SQLite, and runs its general
path whenever the answer is ``None``. Why it exists, and what keeps the two paths
equal: docs/decisions/0004-sqlite-fast-path.md.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.engine import Engine

from domain import Hold, HoldStatus, LedgerError, LedgerUnavailable

from ._sql_model import CachedAccount, PlaceRequest, UtcDateTime, to_decimal

__all__ = ["SqliteFastPath"]

T = TypeVar("T")

# Each statement keeps the condition its counterpart in the general path relies on
# (``status = 'open'``, the reservation's available check).
_HOLD_COLUMNS = "account, to_account, asset, amount, expires_at, trade_id, hashlock"
_INSERT_HOLD = (
    "INSERT INTO holds (hold_id, account, to_account, asset, amount, status, expires_at,"
    " trade_id, hashlock, created_at) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)"
    " ON CONFLICT (hold_id) DO NOTHING"
)
_RESERVE = "UPDATE accounts SET held = held + ?1 WHERE id = ?2 AND (is_issuer OR balance - held >= ?1)"
_UNRESERVE = "UPDATE accounts SET held = held - ?1 WHERE id = ?2"
_PIN = f"UPDATE holds SET expires_at = NULL WHERE hold_id = ? AND status = 'open' RETURNING {_HOLD_COLUMNS}"
_RESOLVE = (
    "UPDATE holds SET status = ?1, resolved_at = ?2 WHERE hold_id = ?3 AND status = 'open'"
    f" RETURNING {_HOLD_COLUMNS}"
)
# A commit's two account updates in one statement: the payer ?1 pays ?3 out of its held
# amount, the payee ?2 receives it.
_SETTLE = (
    "UPDATE accounts SET balance = balance + CASE id WHEN ?1 THEN -?3 ELSE ?3 END,"
    " held = held - CASE id WHEN ?1 THEN ?3 ELSE 0 END WHERE id IN (?1, ?2)"
)
_JOURNAL = (
    "INSERT INTO journal (ref, hold_id, kind, from_account, to_account, asset, amount, created_at)"
    " VALUES (?, ?, 'settle', ?, ?, ?, ?, ?)"
)


class SqliteFastPath:
    """Place, pin, commit and release a hold in their common case, on the writer's driver connection.

    Each method runs one write transaction, in turn with every other writer of the ledger
    (on ``lock``, which the general path's writers take too), and returns the hold. For a
    case it leaves to the general path (a key that exists, a hold not open or hashlocked,
    a reservation refused, facts not in the caches, any sqlite3 error) it rolls back and
    returns ``None``: it has changed nothing, and the general path decides, retries and
    words the error. Running an operation there after a COMMIT that failed ambiguously is
    safe too: every operation is idempotent on its hold key. A write lock held by another
    process past the busy timeout raises ``LedgerUnavailable`` at once, since the general
    path would only wait as long again.
    """

    def __init__(
        self,
        ledger: str,
        writer: Engine,
        lock: threading.Lock,
        accounts: Mapping[str, CachedAccount],
        precisions: Mapping[str, int],
    ) -> None:
        """``accounts`` and ``precisions`` are the ledger's caches of immutable facts, read here."""
        self._ledger = ledger
        self._lock = lock
        self._driver = _PooledDriver(writer)
        self._accounts = accounts
        self._precisions = precisions
        # Times are stored and read exactly as the general path's holds columns do:
        # through the column type as the dialect adapts it.
        stamp = UtcDateTime().dialect_impl(writer.dialect)
        self._to_time = cast(Callable[[datetime | None], Any], stamp.bind_processor(writer.dialect))
        self._from_time = cast(Callable[[Any], datetime | None], stamp.result_processor(writer.dialect, None))

    def place_hold(self, request: PlaceRequest) -> Hold | None:
        try:
            # From the caches alone: an account not in them is not known to be missing.
            minor, lock = request.terms(self._ledger, self._accounts)
        except LedgerError:
            return None  # the general path looks, and answers a replay before refusing
        precision = self._accounts[request.account].precision

        def place(cursor: sqlite3.Cursor) -> Hold | None:
            row = (
                request.hold_id,
                request.account,
                request.to_account,
                request.asset,
                minor,
                self._to_time(request.expires_at),
                request.trade_id,
                lock,
                self._to_time(datetime.now(UTC)),
            )
            if cursor.execute(_INSERT_HOLD, row).rowcount != 1:
                return None  # the key exists: a replay, a tombstone or a conflict
            if cursor.execute(_RESERVE, (minor, request.account)).rowcount != 1:
                return None  # insufficient funds: the general path says how much is available
            return request.placed(self._ledger, minor, lock, precision)

        return self._run(place)

    def pin_hold(self, hold_id: str) -> Hold | None:
        def pin(cursor: sqlite3.Cursor) -> Hold | None:
            row = cursor.execute(_PIN, (hold_id,)).fetchone()
            return None if row is None else self._hold(hold_id, HoldStatus.OPEN, row)

        return self._run(pin)

    def commit_hold(self, hold_id: str) -> Hold | None:
        def commit(cursor: sqlite3.Cursor) -> Hold | None:
            now = self._to_time(datetime.now(UTC))
            row = cursor.execute(_RESOLVE, ("committed", now, hold_id)).fetchone()
            if row is None or row[-1] is not None:
                return None  # not open, or hashlocked: the general path checks the preimage
            account, to_account, asset, amount = row[:4]
            if cursor.execute(_SETTLE, (account, to_account, amount)).rowcount != 2:
                return None  # not two accounts: the general path refuses it in its own words
            cursor.execute(_JOURNAL, (f"hold:{hold_id}", hold_id, account, to_account, asset, amount, now))
            return self._hold(hold_id, HoldStatus.COMMITTED, row)

        return self._run(commit)

    def release_hold(self, hold_id: str) -> Hold | None:
        def release(cursor: sqlite3.Cursor) -> Hold | None:
            now = self._to_time(datetime.now(UTC))
            row = cursor.execute(_RESOLVE, ("released", now, hold_id)).fetchone()
            if row is None:
                return None  # not open, or an unknown key, which the general path tombstones
            cursor.execute(_UNRESERVE, (row[3], row[0]))
            return self._hold(hold_id, HoldStatus.RELEASED, row)

        return self._run(release)

    def _run(self, work: Callable[[sqlite3.Cursor], T | None]) -> T | None:
        """``work`` in one write transaction, committed if it returns a result, else rolled back."""
        with self._lock:
            db = self._driver.connection
            if db is None:
                return None  # the pool has no connection open: the general path opens one
            try:
                cursor = db.cursor()
                # Here, not in the engine's "begin" listener, which only SQLAlchemy's Connection fires.
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise LedgerUnavailable(
                    f"ledger {self._ledger!r}: the database is unavailable: {exc}"
                ) from exc
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

    def _hold(self, hold_id: str, status: HoldStatus, row: tuple[Any, ...]) -> Hold | None:
        """The ``Hold`` of a row of ``_HOLD_COLUMNS``; ``None`` if its asset's precision is not cached."""
        account, to_account, asset, amount, expires_at, trade_id, hashlock = row
        precision = self._precisions.get(asset)
        if precision is None:
            return None
        return Hold(
            ledger=self._ledger,
            hold_id=hold_id,
            account=account,
            to_account=to_account,
            asset=asset,
            amount=to_decimal(amount, precision),
            status=status,
            expires_at=self._from_time(expires_at),
            trade_id=trade_id,
            hashlock=hashlock,
        )


class _PooledDriver:
    """The driver connection that ``engine``'s pool of one holds open, for the fast path.

    Checking a connection out of the pool and in again would cost a large part of a fast
    operation, and a connection of the fast path's own would be a second writer, which
    would find the pages the other one wrote stale. So the fast path uses the pool's one
    while the pool has it checked in, never while it is checked out (the ledger's lock sees
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
