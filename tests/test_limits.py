"""The largest input, state and result a trade can have stay far under Temporal's 2 MB payload limit.

docs/design.md, "Limits", adds up each maximum; here the same maximal instruction, request
and view are built through the models (so every cut and bound they apply is applied) and
encoded as every client and worker encodes them (``connection.data_converter``: pydantic
JSON, then AES-GCM), and the bytes Temporal would store are measured against that sum.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.common.v1 import Payload

from connection import data_converter
from connection.codec import EncryptionCodec, KeyRing
from domain import (
    MAX_AMOUNT,
    MAX_APPROVERS,
    MAX_BATCH_ACCOUNTS,
    MAX_DETAIL,
    MAX_FIELD,
    MAX_FILLS_SHOWN,
    MAX_LEGS,
    MAX_NAME,
    MAX_QUEUE,
    MAX_TOKEN,
    AccountPosition,
    FieldError,
    FillView,
    Instruction,
    LegState,
    NetLeg,
    NetRequest,
    PositionsResult,
    SettlementRequest,
    TimelineEvent,
    TradeStatus,
    TradeView,
)
from workflows._saga import TIMELINE_FOLD_AT, TIMELINE_HEAD, TIMELINE_KINDS, leg_views

from .record_histories import FIXTURE_KEYS

TEMPORAL_PAYLOAD_LIMIT = 2 * 1024 * 1024
# The documented bounds (docs/design.md, "Limits"): the encoded request and view stay under them.
REQUEST_BOUND = 160 * 1024
VIEW_BOUND = 560 * 1024
BATCH_PAYLOAD_BOUND = 560 * 1024
# Entries a trade's view shows at most (its first ones, a line per kind folded, its
# latest; workflows/_saga.py); the arithmetic in docs/design.md counts 100.
TIMELINE_ENTRIES = TIMELINE_HEAD + TIMELINE_KINDS + TIMELINE_FOLD_AT
# Errors a view can name at most: two account checks per leg, an unknown ledger and a
# precision per leg, and the few routing, partial and schedule fields.
MAX_ERRORS = 4 * MAX_LEGS + 8

HUGE = "y" * 100_000  # more than any text the engine keeps: the models cut it


def name(i: int, what: str) -> str:
    return f"{what}{i}".ljust(MAX_NAME, "n")


def amount() -> str:
    return "9" * (MAX_AMOUNT - 19) + "." + "9" * 18  # 64 characters


async def encoded_size(value: Any) -> int:
    ring = KeyRing.parse(FIXTURE_KEYS.read_text(), str(FIXTURE_KEYS))
    converter = data_converter(EncryptionCodec(ring))
    (payload,) = await converter.encode([value])
    assert isinstance(payload, Payload) and payload.metadata["encoding"] == b"binary/encrypted"
    return len(payload.SerializeToString())


def maximal_instruction() -> Instruction:
    return Instruction.model_validate(
        {
            "trade_id": "T".ljust(MAX_NAME, "1"),
            "legs": [
                {
                    "ledger": name(i, "ledger"),
                    "asset": name(i, "asset"),
                    "from": name(i, "from"),
                    "to": name(i, "to"),
                    "amount": amount(),
                }
                for i in range(MAX_LEGS)
            ],
            "deadline": (datetime.now(UTC) + timedelta(days=60)).isoformat(),
            "settle_after": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
            "approvers": [name(i, "approver") for i in range(MAX_APPROVERS)],
        }
    )


async def test_the_largest_request_a_caller_can_send_encodes_under_its_documented_bound() -> None:
    instruction = maximal_instruction()
    ledgers = [leg.ledger for leg in instruction.legs]
    request = SettlementRequest(
        instruction=instruction,
        fingerprint=instruction.fingerprint(),
        token="t" * MAX_TOKEN,
        settlement_queue="q" * MAX_QUEUE,
        ledger_queues={ledger: "q" * MAX_QUEUE for ledger in ledgers},
        local_ledgers=ledgers,
        precisions={leg.asset: 18 for leg in instruction.legs},
        chain_ledgers=ledgers,
    )

    size = await encoded_size(request)

    assert size <= REQUEST_BOUND, size
    assert size * 10 < TEMPORAL_PAYLOAD_LIMIT


async def test_the_largest_view_a_trade_can_show_encodes_under_its_documented_bound() -> None:
    instruction = maximal_instruction()
    now = datetime.now(UTC)
    hold_id = instruction.trade_id + "#63.1000000"  # a partial trade's key: leg and attempt
    view = TradeView(
        trade_id=instruction.trade_id,
        workflow_id="trade-" + instruction.trade_id,
        status=TradeStatus.SETTLED_PARTIAL,
        reason=HUGE,
        deadline=now,
        approvers=instruction.approvers,
        approved_by=instruction.approvers,
        legs=leg_views(instruction, [hold_id] * MAX_LEGS, [LegState.RELEASED] * MAX_LEGS, [HUGE] * MAX_LEGS),
        timeline=[TimelineEvent(at=now, event=HUGE, detail=HUGE) for _ in range(TIMELINE_ENTRIES)],
        errors=[FieldError(field=HUGE, message=HUGE) for _ in range(MAX_ERRORS)],
        fingerprint=instruction.fingerprint(),
        fills=[
            FillView(number=n, quantity=amount(), amount=amount(), hold_ids=[hold_id] * 2, settled_at=now)
            for n in range(MAX_FILLS_SHOWN)
        ],
        fill_count=10**9,
        submitted_by=name(0, "submitter"),
        consent_from=[name(i, "owner") for i in range(MAX_LEGS)],
        consented=[name(i, "owner") for i in range(MAX_LEGS)],
        refused_signals=10**9,
    )

    size = await encoded_size(view)

    assert len(view.reason) == len(view.legs[0].detail) == len(view.timeline[0].detail) == MAX_DETAIL
    assert len(view.errors[0].field) == MAX_FIELD
    assert size <= VIEW_BOUND, size
    assert size * 3 < TEMPORAL_PAYLOAD_LIMIT


async def test_the_largest_payloads_of_a_netting_batch_encode_under_their_documented_bound() -> None:
    """Every account of a batch in one ledger's answer, and in the netting's input."""
    positions = PositionsResult(
        positions=[
            AccountPosition(
                account=name(i, "account"),
                asset=name(i, "asset"),
                owner=name(i, "owner"),
                available=amount(),
                problem=HUGE,
            )
            for i in range(MAX_BATCH_ACCOUNTS)
        ]
    )
    netting = NetRequest(
        batch_id="B".ljust(MAX_NAME, "1"),
        round=10**6,
        available=[
            NetLeg(
                ledger=name(i, "ledger"), account=name(i, "account"), asset=name(i, "asset"), amount=amount()
            )
            for i in range(MAX_BATCH_ACCOUNTS)
        ],
    )

    sizes = [await encoded_size(positions), await encoded_size(netting)]

    assert len(positions.positions[0].problem) == MAX_DETAIL
    assert max(sizes) <= BATCH_PAYLOAD_BOUND, sizes
    assert max(sizes) * 3 < TEMPORAL_PAYLOAD_LIMIT
