"""The batch store: netting batches' trades, kept in SQL (SQLite or PostgreSQL).

Trades are passed by reference: the client writes a batch's trades here in one bulk
insert and starts the batch workflow with the batch id alone; the workflow's
activities read the trades from here and write back each trade's outcome. A batch
of 100,000 trades therefore never comes near Temporal's payload or history limits.

Tables:

* ``batches``: one row per batch id (PRIMARY KEY, so an id names one batch forever),
  with the fingerprint of its content, its trade count, status and final result.
* ``batch_trades``: one row per trade, keyed ``(batch_id, seq)`` where ``seq`` is the
  trade's position in the submitted file; ``trade_id`` is UNIQUE within a batch. The
  legs are a compact JSON array of ``[ledger, asset, from, to, amount]``. ``status``
  is ``accepted`` until the batch ends it ``settled``, ``removed`` (with ``reason``)
  or ``released``.

The batch row and its trades are written in one transaction: a batch is stored
whole or not at all. Bulk paths: ``executemany`` on SQLite, ``COPY`` on PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, event
from sqlalchemy.engine import Engine, create_engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from domain import (
    BatchNotFound,
    ConfigError,
    DuplicateBatch,
    LedgerUnavailable,
    RemovedTrade,
    TradeOutcome,
)

__all__ = ["BatchStore", "StoredTrade"]

T = TypeVar("T")

StoredTrade = tuple[int, str, str]
"""``(seq, trade_id, legs_json)``: one trade as stored."""

METADATA = MetaData()
BATCHES = Table(
    "batches",
    METADATA,
    Column("batch_id", String, primary_key=True),
    Column("fingerprint", String, nullable=False),
    Column("trade_count", Integer, nullable=False),
    Column("status", String, nullable=False),
    Column("result", Text, nullable=True),
    Column("accounts", Text, nullable=False),  # JSON [[ledger, account, asset], ...]
    Column("created_at", DateTime(timezone=True), nullable=False),
)
TRADES = Table(
    "batch_trades",
    METADATA,
    Column("batch_id", String, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("trade_id", String, nullable=False),
    Column("legs", Text, nullable=False),
    Column("status", String, nullable=False),
    Column("reason", Text, nullable=False, default=""),
)
# One trade id per batch; declared as an index so both dialects create it the same way.
_UNIQUE_TRADE = "CREATE UNIQUE INDEX IF NOT EXISTS ux_batch_trades_trade ON batch_trades (batch_id, trade_id)"
_SQLITE_BUSY_TIMEOUT_S = 30


class BatchStore:
    """The batch store at ``url``. Opens no connection until first used."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            raise ConfigError(f"batches.url: {url!r} is not a database URL: {exc}") from None
        self._dialect = parsed.get_backend_name()
        if self._dialect == "sqlite":
            database = parsed.database or ""
            if database in ("", ":memory:"):
                raise ConfigError("batches.url: give a SQLite file, e.g. sqlite:///.dvp/batches.db")
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._engine = create_engine(
                parsed, connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_S}
            )
            _configure_sqlite(self._engine)
        elif self._dialect == "postgresql":
            self._engine = create_engine(parsed, connect_args={"connect_timeout": 10})
        else:
            raise ConfigError(f"batches.url: {self._dialect!r} is not supported; use sqlite or postgresql")
        self._ready = False
        self._lock = threading.Lock()

    def close(self) -> None:
        self._engine.dispose()

    # ------------------------------------------------------------- plumbing

    def _ensure_schema(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            with self._engine.begin() as conn:
                if self._dialect == "postgresql":
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('dvp batch store schema'))")
                METADATA.create_all(conn)
                conn.exec_driver_sql(_UNIQUE_TRADE)
            self._ready = True

    def _raw(self, work: Callable[[Any], T]) -> T:
        """Run ``work(dbapi_connection)`` in one transaction (committed if it returns)."""
        self._ensure_schema()
        try:
            conn = self._engine.raw_connection()
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"batch store unavailable: {exc}") from exc
        try:
            if self._dialect == "sqlite":
                driver = conn.driver_connection
                assert driver is not None  # None only once the connection is closed
                driver.execute("BEGIN IMMEDIATE")
            result = work(conn)
            conn.commit()
            return result
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()

    def _param(self) -> str:
        return "?" if self._dialect == "sqlite" else "%s"

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self._param())

    # ---------------------------------------------------------------- write

    def insert_batch(
        self,
        batch_id: str,
        fingerprint: str,
        trades: Sequence[tuple[str, str]],
        accounts: Sequence[tuple[str, str, str]],
    ) -> bool:
        """Store a batch's trades (``(trade_id, legs_json)`` in file order), whole or not at all.

        ``accounts`` lists every ``(ledger, account, asset)`` the trades touch.

        Returns True if stored now, False if the same content was stored before;
        raises ``DuplicateBatch`` if the id exists with different content.
        """

        def work(conn: Any) -> bool:
            cur = conn.cursor()
            cur.execute(self._sql("SELECT fingerprint FROM batches WHERE batch_id = ?"), (batch_id,))
            row = cur.fetchone()
            if row is not None:
                if row[0] != fingerprint:
                    raise DuplicateBatch(f"batch {batch_id} already exists with different content")
                return False
            cur.execute(
                self._sql(
                    "INSERT INTO batches (batch_id, fingerprint, trade_count, status, accounts, created_at)"
                    " VALUES (?, ?, ?, 'PENDING', ?, ?)"
                ),
                (batch_id, fingerprint, len(trades), json.dumps(accounts), _now(self._dialect)),
            )
            accepted = TradeOutcome.ACCEPTED.value
            if self._dialect == "postgresql":
                with cur.copy(
                    "COPY batch_trades (batch_id, seq, trade_id, legs, status, reason) FROM STDIN"
                ) as copy:
                    for seq, (trade_id, legs) in enumerate(trades):
                        copy.write_row((batch_id, seq, trade_id, legs, accepted, ""))
            else:
                cur.executemany(
                    "INSERT INTO batch_trades (batch_id, seq, trade_id, legs, status, reason)"
                    " VALUES (?, ?, ?, ?, ?, '')",
                    [(batch_id, seq, tid, legs, accepted) for seq, (tid, legs) in enumerate(trades)],
                )
            return True

        try:
            return self._raw(work)
        except Exception as exc:
            # PostgreSQL: a concurrent insert of the same id won the race (SQLite's
            # BEGIN IMMEDIATE serialises the check and the insert).
            if type(exc).__name__ not in ("IntegrityError", "UniqueViolation"):
                raise
            try:
                stored = self.fingerprint(batch_id)
            except BatchNotFound:
                raise exc from None  # not the batch id: a trade id twice in the batch
            if stored != fingerprint:
                raise DuplicateBatch(f"batch {batch_id} already exists with different content") from None
            return False

    def mark_removed(self, batch_id: str, removed: Sequence[tuple[int, str]]) -> None:
        """Record this netting's removals (``(seq, reason)``), replacing any earlier round's."""

        def work(conn: Any) -> None:
            cur = conn.cursor()
            cur.execute(
                self._sql(
                    "UPDATE batch_trades SET status = ?, reason = '' WHERE batch_id = ? AND status = ?"
                ),
                (TradeOutcome.ACCEPTED.value, batch_id, TradeOutcome.REMOVED.value),
            )
            if removed:
                cur.executemany(
                    self._sql(
                        "UPDATE batch_trades SET status = ?, reason = ? WHERE batch_id = ? AND seq = ?"
                    ),
                    [(TradeOutcome.REMOVED.value, reason, batch_id, seq) for seq, reason in removed],
                )
            cur.execute(
                self._sql("UPDATE batches SET status = 'NETTING' WHERE batch_id = ? AND result IS NULL"),
                (batch_id,),
            )

        self._raw(work)

    def finish(self, batch_id: str, status: str, settled: bool, reason: str, result_json: str) -> int:
        """End the batch: accepted trades become settled (or released); store the result.

        Returns the number of trades settled. Idempotent.
        """
        outcome = TradeOutcome.SETTLED if settled else TradeOutcome.RELEASED

        def work(conn: Any) -> int:
            cur = conn.cursor()
            cur.execute(
                self._sql("UPDATE batch_trades SET status = ?, reason = ? WHERE batch_id = ? AND status = ?"),
                (outcome.value, reason, batch_id, TradeOutcome.ACCEPTED.value),
            )
            cur.execute(
                self._sql("SELECT count(*) FROM batch_trades WHERE batch_id = ? AND status = ?"),
                (batch_id, TradeOutcome.SETTLED.value),
            )
            count = int(cur.fetchone()[0])
            cur.execute(
                self._sql("UPDATE batches SET status = ?, result = ? WHERE batch_id = ?"),
                (status, result_json, batch_id),
            )
            return count

        return self._raw(work)

    # ----------------------------------------------------------------- read

    def _read(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        def work(conn: Any) -> list[Any]:
            cur = conn.cursor()
            cur.execute(self._sql(statement), params)
            return list(cur.fetchall())

        self._ensure_schema()
        try:
            conn = self._engine.raw_connection()
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"batch store unavailable: {exc}") from exc
        try:
            return work(conn)
        finally:
            conn.rollback()
            conn.close()

    def fingerprint(self, batch_id: str) -> str:
        rows = self._read("SELECT fingerprint FROM batches WHERE batch_id = ?", (batch_id,))
        if not rows:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return str(rows[0][0])

    def batch(self, batch_id: str) -> tuple[int, str, str | None]:
        """``(trade_count, status, result_json)`` of a stored batch."""
        rows = self._read("SELECT trade_count, status, result FROM batches WHERE batch_id = ?", (batch_id,))
        if not rows:
            raise BatchNotFound(f"no batch {batch_id!r}")
        count, status, result = rows[0]
        return int(count), str(status), result

    def accounts(self, batch_id: str) -> list[tuple[str, str, str]]:
        """Every ``(ledger, account, asset)`` the batch's trades touch."""
        rows = self._read("SELECT accounts FROM batches WHERE batch_id = ?", (batch_id,))
        if not rows:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return [(str(a), str(b), str(c)) for a, b, c in json.loads(rows[0][0])]

    def trades(self, batch_id: str) -> list[StoredTrade]:
        """Every trade of the batch in file order."""
        return [
            (int(seq), str(tid), str(legs))
            for seq, tid, legs in self._read(
                "SELECT seq, trade_id, legs FROM batch_trades WHERE batch_id = ? ORDER BY seq", (batch_id,)
            )
        ]

    def iter_legs(self, batch_id: str) -> Iterator[tuple[int, str, list[list[str]]]]:
        for seq, tid, legs in self.trades(batch_id):
            yield seq, tid, json.loads(legs)

    def removed(self, batch_id: str) -> list[RemovedTrade]:
        return [
            RemovedTrade(index=int(seq), trade_id=str(tid), reason=str(reason))
            for seq, tid, reason in self._read(
                "SELECT seq, trade_id, reason FROM batch_trades WHERE batch_id = ? AND status = ?"
                " ORDER BY seq",
                (batch_id, TradeOutcome.REMOVED.value),
            )
        ]

    def outcomes(self, batch_id: str) -> dict[str, tuple[str, str]]:
        """trade id -> (status, reason), for every trade of the batch."""
        return {
            str(tid): (str(status), str(reason))
            for tid, status, reason in self._read(
                "SELECT trade_id, status, reason FROM batch_trades WHERE batch_id = ?", (batch_id,)
            )
        }


def _now(dialect: str) -> Any:
    now = datetime.now(UTC)
    return now.replace(tzinfo=None).isoformat(sep=" ") if dialect == "sqlite" else now


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
