"""Netting batches from Python and from ``dvp batch``.

    async with await BatchClient.connect() as batches:
        view = await batches.submit(trades, wait=True)     # a list of instructions
        print(view.assets)                                 # gross vs net per asset

A batch file holds many trades in the instruction format of ``dvp submit``: a JSON
array, or JSON Lines (one instruction per line). Every trade is checked before
anything is stored; the first problem is refused naming the trade and the field
(``trades[17].legs[1].amount: ...``). A batch's trades are settled by their net
legs: ``settle_within``, ``deadline`` and ``approvers`` belong to single trades and
are refused here (the batch has its own time limit).

The client stores the trades in the batch store in one bulk insert and starts the
batch workflow with the batch id and the submitter's token: only an operator's
batch settles (any other ends REJECTED, nothing reserved). Without an explicit id, the batch id is
derived from the content, so submitting the same file twice settles it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from connection import connect_client
from domain import (
    MAX_AMOUNT,
    MAX_BATCH_ACCOUNTS,
    MAX_BATCH_TRADES,
    MAX_NAME,
    AuthError,
    BatchNotFound,
    BatchRequest,
    BatchStatus,
    BatchView,
    Config,
    Instruction,
    InvalidInstruction,
    load_config,
)
from stores import BatchStore
from workflows import NettingBatchWorkflow, batch_workflow_id

from ._checks import check_ledger, check_precision, invalid_from

__all__ = ["BatchClient", "ParsedBatch", "parse_batch", "parse_batch_text"]

_TRADE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
_LEG_KEYS = frozenset(("ledger", "asset", "from", "to", "amount"))
_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SINGLE_TRADE_ONLY = ("settle_within", "deadline", "approvers")
_RESERVED = "clearing:"  # the batch's clearing accounts (activities.netting.clearing_account)


class ParsedBatch:
    """A checked batch: each trade as ``(trade_id, legs_json)``, the accounts it touches."""

    def __init__(self, trades: list[tuple[str, str]], accounts: list[tuple[str, str, str]]) -> None:
        self.trades = trades
        self.accounts = accounts
        digest = hashlib.sha256()
        for trade_id, legs in trades:
            digest.update(trade_id.encode())
            digest.update(b"\0")
            digest.update(legs.encode())
            digest.update(b"\n")
        self.fingerprint = digest.hexdigest()

    def default_id(self) -> str:
        return f"B-{self.fingerprint[:16]}"


def parse_batch_text(text: str, config: Config) -> ParsedBatch:
    """Parse a batch file's text: a JSON array of instructions, or JSON Lines."""
    stripped = text.lstrip()
    if not stripped:
        raise InvalidInstruction("trades", "the batch is empty")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInstruction("(batch)", f"not valid JSON: {exc}") from None
        return parse_batch(data, config)
    items: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InvalidInstruction(f"line {number}", f"not valid JSON: {exc.msg}") from None
    return parse_batch(items, config)


def parse_batch(data: Sequence[Mapping[str, Any] | Instruction], config: Config) -> ParsedBatch:
    """Check every trade; ``InvalidInstruction`` names the first bad one (``trades[i].field``)."""
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        raise InvalidInstruction(
            "(batch)", f"expected a JSON array of instructions, got {type(data).__name__}"
        )
    if not data:
        raise InvalidInstruction("trades", "the batch is empty")
    if len(data) > MAX_BATCH_TRADES:
        raise InvalidInstruction(
            "trades", f"{len(data):,} trades; a batch holds at most {MAX_BATCH_TRADES:,}"
        )
    precision: dict[str, int] = {}
    ledgers = frozenset(config.ledgers)
    seen: dict[str, int] = {}
    accounts: dict[tuple[str, str, str], None] = {}
    trades: list[tuple[str, str]] = []
    for i, item in enumerate(data):
        parsed = _fast(item, ledgers, precision, config)
        if parsed is None:
            parsed = _slow(item, i, config)
        trade_id, legs = parsed
        if trade_id in seen:
            raise InvalidInstruction(
                f"trades[{i}].trade_id", f"{trade_id!r} is also trades[{seen[trade_id]}]"
            )
        seen[trade_id] = i
        for ledger, asset, payer, payee, _amount in legs:
            accounts[(ledger, payer, asset)] = None
            accounts[(ledger, payee, asset)] = None
        if len(accounts) > MAX_BATCH_ACCOUNTS:
            raise InvalidInstruction(
                f"trades[{i}]",
                f"brings the batch to {len(accounts):,} accounts; a batch touches at most "
                f"{MAX_BATCH_ACCOUNTS:,} (split it)",
            )
        trades.append((trade_id, json.dumps(legs, separators=(",", ":"))))
    return ParsedBatch(trades, list(accounts))


def _fast(
    item: Any, ledgers: frozenset[str], precision: dict[str, int], config: Config
) -> tuple[str, list[list[str]]] | None:
    """The common, well-formed trade, checked without pydantic; None sends it to the full check.

    Accepts only what the ``Instruction`` model accepts as well, so the full check
    decides every doubtful case (and words its message).
    """
    if type(item) is not dict or item.keys() != {"trade_id", "legs"}:
        return None
    trade_id, raw_legs = item["trade_id"], item["legs"]
    if type(trade_id) is not str or len(trade_id) > 128 or not _TRADE_ID.fullmatch(trade_id):
        return None
    if type(raw_legs) is not list or not 2 <= len(raw_legs) <= 64:
        return None
    legs: list[list[str]] = []
    for leg in raw_legs:
        if type(leg) is not dict or leg.keys() != _LEG_KEYS:
            return None
        ledger, asset, payer, payee, text = leg["ledger"], leg["asset"], leg["from"], leg["to"], leg["amount"]
        if not (
            type(ledger) is str
            and type(asset) is str
            and type(payer) is str
            and type(payee) is str
            and type(text) is str
            and ledger in ledgers
            and len(ledger) <= MAX_NAME
            and len(text) <= MAX_AMOUNT
            and 0 < len(asset) <= MAX_NAME
            and 0 < len(payer) <= MAX_NAME
            and 0 < len(payee) <= MAX_NAME
            and payer != payee
            and not payer.startswith(_RESERVED)
            and not payee.startswith(_RESERVED)
        ):
            return None
        try:
            amount = Decimal(text.strip())
        except InvalidOperation:
            return None
        if not amount.is_finite() or amount <= 0:
            return None
        places = precision.get(asset)
        if places is None:
            places = precision[asset] = config.precision(asset)
        exponent = amount.as_tuple().exponent
        if abs(int(exponent)) > MAX_AMOUNT:
            return None  # "1E+70": the full check refuses it written out in full
        if int(exponent) < -places and -int(amount.normalize().as_tuple().exponent) > places:
            return None  # too many decimals: the full check words the refusal
        written = format(amount, "f")
        if len(written) > MAX_AMOUNT:
            return None
        legs.append([ledger, asset, payer, payee, written])
    return trade_id, legs


def _slow(item: Any, i: int, config: Config) -> tuple[str, list[list[str]]]:
    where = f"trades[{i}]"
    if isinstance(item, Instruction):
        instruction = item
    else:
        if not isinstance(item, Mapping):
            raise InvalidInstruction(where, f"expected a JSON object, got {type(item).__name__}")
        try:
            instruction = Instruction.model_validate(dict(item))
        except ValidationError as exc:
            inner = invalid_from(exc, "(instruction)")
            raise InvalidInstruction(f"{where}.{inner.field}", inner.message) from None
    for name in _SINGLE_TRADE_ONLY:
        if name in instruction.model_fields_set and getattr(instruction, name):
            raise InvalidInstruction(
                f"{where}.{name}",
                "not accepted in a batch: the batch's own time limit applies and its trades settle together",
            )
    for j, leg in enumerate(instruction.legs):
        for side, account in (("from", leg.from_), ("to", leg.to)):
            if account.startswith(_RESERVED):
                raise InvalidInstruction(
                    f"{where}.legs[{j}].{side}", f"{account!r}: the clearing accounts are the batch's own"
                )
        try:
            check_ledger(config, f"legs[{j}].ledger", leg.ledger)
            check_precision(config, f"legs[{j}].amount", leg.asset, leg.amount)
        except InvalidInstruction as exc:
            raise InvalidInstruction(f"{where}.{exc.field}", exc.message) from None
    legs = [[leg.ledger, leg.asset, leg.from_, leg.to, format(leg.amount, "f")] for leg in instruction.legs]
    return instruction.trade_id, legs


def check_batch_id(batch_id: str) -> str:
    if not _BATCH_ID.fullmatch(batch_id):
        raise InvalidInstruction(
            "batch_id", f"{batch_id!r}: use letters, digits and . _ : - (at most 128, starting alphanumeric)"
        )
    return batch_id


class BatchClient:
    """Submit netting batches and follow them. Build it with ``connect``."""

    def __init__(
        self, client: Client, config: Config, store: BatchStore | None = None, token: str | None = None
    ) -> None:
        self.client = client
        self.config = config
        self.store = store or BatchStore(config.batches_url())
        self.token = token

    @classmethod
    async def connect(cls, config: Config | None = None, token: str | None = None) -> BatchClient:
        config = config or load_config()
        client = await connect_client(config.temporal.address, config.temporal.namespace, codec=config.codec)
        return cls(client, config, token=token)

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.store.close()

    def _handle(self, batch_id: str) -> WorkflowHandle[Any, BatchView]:
        return self.client.get_workflow_handle_for(NettingBatchWorkflow.run, batch_workflow_id(batch_id))

    async def submit(
        self,
        trades: ParsedBatch | Sequence[Mapping[str, Any] | Instruction],
        *,
        batch_id: str | None = None,
        settle_within: timedelta | None = None,
        wait: bool = False,
        timeout: float | None = None,
        token: str | None = None,
    ) -> BatchView:
        """Store the trades and start the batch, as the token's subject (an operator); idempotent on the id.

        Raises ``InvalidInstruction`` (nothing stored) for a malformed trade,
        ``AuthError`` (nothing stored) without a token, and ``DuplicateBatch`` when
        the id exists with different content. With ``wait`` returns the final view,
        else the view as the batch starts.
        """
        token = token or self.token
        if not token:
            raise AuthError(
                "no token: submitting a batch needs an operator's signed token (token=, --token, "
                "--token-file or $DVP_TOKEN); nothing was stored or sent"
            )
        batch = trades if isinstance(trades, ParsedBatch) else parse_batch(trades, self.config)
        batch_id = check_batch_id(batch_id) if batch_id else batch.default_id()
        within = settle_within or self.config.batches.default_settle_within
        await asyncio.to_thread(
            self.store.insert_batch, batch_id, batch.fingerprint, batch.trades, batch.accounts
        )
        # The routing is the settlement worker's: the request names none.
        request = BatchRequest(
            batch_id=batch_id,
            trade_count=len(batch.trades),
            fingerprint=batch.fingerprint,
            settle_within=within,
            token=token,
        )
        # Already started: the same content was submitted before (the store checked the fingerprint).
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await self.client.start_workflow(
                NettingBatchWorkflow.run,
                request,
                id=batch_workflow_id(batch_id),
                task_queue=self.config.settlement_queue(),
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
        if wait:
            return await self.wait(batch_id, timeout=timeout)
        return BatchView(
            batch_id=batch_id,
            workflow_id=batch_workflow_id(batch_id),
            status=BatchStatus.PENDING,
            trades=len(batch.trades),
            fingerprint=batch.fingerprint,
        )

    async def wait(self, batch_id: str, timeout: float | None = None) -> BatchView:
        """Wait until the batch ends; its view with every removed trade and its reason."""
        try:
            await asyncio.wait_for(self._handle(batch_id).result(), timeout)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise BatchNotFound(f"no batch {batch_id!r}") from None
            raise
        return await self.status(batch_id)

    async def status(self, batch_id: str) -> BatchView:
        """The batch as it stands; once ended, as recorded in the batch store."""
        _count, _status, result = await asyncio.to_thread(self.store.batch, batch_id)
        if result:
            view = BatchView.model_validate_json(result)
        else:
            try:
                view = await self._handle(batch_id).query(NettingBatchWorkflow.status)
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    raise BatchNotFound(
                        f"batch {batch_id!r} is stored but its workflow never started"
                    ) from None
                raise
        removed = await asyncio.to_thread(self.store.removed, batch_id)
        return view.model_copy(update={"removed_trades": removed})

    async def outcomes(self, batch_id: str) -> dict[str, tuple[str, str]]:
        """Each trade's ``(status, reason)`` in the batch store, by trade id."""
        return await asyncio.to_thread(self.store.outcomes, batch_id)
