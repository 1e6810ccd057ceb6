"""Partial settlement on the real dev server, read as worked examples.

Given the standard accounts plus frank (a seller short of bonds), these partial
trades, these fills and these balances after. The fill arithmetic alone is checked
first, without a server.
"""

from __future__ import annotations

import asyncio
import functools
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from domain import FillRule, InvalidInstruction, TradeStatus, TradeView
from starter.instructions import dvp_instruction

from ._fixtures_settlement import Engine
from ._fixtures_settlement import wait_for_status as _wait_for_status
from .test_cli import config_file, dvp


def partial_dvp(
    trade_id: str,
    seller: str = "frank",
    buyer: str = "alice",
    bonds: str = "100",
    cash: str = "9950.00",
    partial: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """``seller`` delivers ``bonds`` BOND-2030 to ``buyer`` against ``cash`` EUR, in parts if need be."""
    partial = {"min_fill": "0.25"} if partial is None else partial
    return dvp_instruction(trade_id, seller, buyer, bonds, cash, partial=partial, **extra)


def open_frank(engine: Engine, bonds: str) -> None:
    """frank, a seller who holds ``bonds`` BOND-2030 and no cash."""
    engine.ledgers["securities"].open_account("frank-sec", "BOND-2030", "frank", Decimal(bonds))
    engine.ledgers["cash"].open_account("frank-cash", "EUR", "frank", Decimal("0.00"), precision=2)


async def deliver(engine: Engine, trade_id: str, seller: str, buyer: str, bonds: str, cash: str) -> None:
    """An ordinary trade that moves bonds to ``buyer`` (to fund a short party)."""
    instruction = partial_dvp(trade_id, seller, buyer, bonds, cash)
    del instruction["partial"]
    await engine.client.submit(instruction)
    assert (await engine.client.wait(trade_id)).status is TradeStatus.SETTLED


wait_for_status = functools.partial(_wait_for_status, timeout=30)


def fills(view: TradeView) -> list[tuple[str, str]]:
    return [(format(f.quantity, "f"), format(f.amount, "f")) for f in view.fills]


# ------------------------------------------------------------- the fill rule alone


@pytest.mark.parametrize(
    ("quantity", "payment", "steps"),
    [
        ("100", "9950.00", ["60", "40"]),
        ("3", "10.00", ["1", "1", "1"]),
        ("7", "0.05", ["2", "3", "2"]),
        ("100", "9999.99", ["33", "33", "34"]),
    ],
)
def test_fills_sum_exactly_and_never_favour_the_payer_by_a_minor_unit(
    quantity: str, payment: str, steps: list[str]
) -> None:
    rule = FillRule(Decimal(quantity), Decimal(payment), 0, 2)
    settled, paid, unit = Decimal(0), Decimal(0), Decimal("0.01")
    for step in steps:
        fill = Decimal(step)
        pay = rule.payment_for(settled, fill)
        exact = Decimal(payment) * fill / Decimal(quantity)
        assert abs(pay - exact) < unit
        settled, paid = settled + fill, paid + pay
        exact_so_far = Decimal(payment) * settled / Decimal(quantity)
        assert exact_so_far - unit < paid <= exact_so_far
    assert (settled, paid) == (Decimal(quantity), Decimal(payment))


def test_largest_fill_is_bounded_by_the_short_leg_and_the_minimum() -> None:
    rule = FillRule(Decimal(100), Decimal("9999.99"), 0, 2, min_fill=Decimal("0.25"))
    # the buyer has 5000.00: 50 bonds cost 4999.99 (4999.995 rounded down), 51 cost 5099.99
    assert rule.largest_fill(Decimal(0), Decimal(100), None, Decimal("5000.00")) == 50
    assert rule.largest_fill(Decimal(0), Decimal(100), Decimal(60), Decimal("5000.00")) == 50
    assert rule.largest_fill(Decimal(0), Decimal(100), Decimal(20), None) == 20
    assert not rule.acceptable(Decimal(0), Decimal(20))  # below 25
    assert rule.acceptable(Decimal(90), Decimal(10))  # the whole rest, though below 25
    # a fill whose payment rounds to nothing waits until it pays something
    cheap = FillRule(Decimal(1000), Decimal("1.00"), 0, 2)
    assert not cheap.acceptable(Decimal(0), Decimal(5))
    assert cheap.acceptable(Decimal(0), Decimal(10))


# ------------------------------------------------------------ on the dev server


async def test_short_seller_settles_sixty_then_the_rest_once_funded(settlement: Engine) -> None:
    open_frank(settlement, "60")
    await settlement.client.submit(partial_dvp("P-sixty"))

    view = await wait_for_status(settlement, "P-sixty", TradeStatus.PARTIALLY_SETTLED)
    assert fills(view) == [("60", "5970.00")]  # 60% of the cash for 60% of the bonds
    assert settlement.balance("securities", "frank-sec") == 0
    assert settlement.balance("securities", "alice-sec") == 60
    assert settlement.balance("cash", "frank-cash") == Decimal("5970.00")

    # carol delivers 40 bonds to frank, so frank can deliver the rest
    await deliver(settlement, "P-sixty-fund", "carol", "frank", "40", "1.00")
    final = await settlement.client.wait("P-sixty")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert fills(final) == [("60", "5970.00"), ("40", "3980.00")]
    assert len({h for f in final.fills for h in f.hold_ids}) == 4  # each fill its own keys
    assert [e.event for e in final.timeline if e.event.startswith(("fill", "status"))] == [
        "status RESERVING",
        "fill of 60 BOND-2030 possible",
        "status COMMITTING",
        "fill 1 settled",
        "status PARTIALLY_SETTLED",
        "status COMMITTING",
        "fill 2 settled",
        "status SETTLED",
    ]
    assert settlement.balance("securities", "frank-sec") == 0
    assert settlement.balance("securities", "alice-sec") == 100
    assert settlement.balance("cash", "alice-cash") == Decimal("100000.00") - Decimal("9950.00")
    assert settlement.balance("cash", "frank-cash") == Decimal("9950.00") - Decimal("1.00")
    assert settlement.open_holds() == []
    settlement.assert_invariants()


async def test_a_trade_keeps_only_its_latest_fills_in_full_and_counts_them_all(
    settlement: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state and view stay bounded however many fills a trade makes (``MAX_FILLS_SHOWN``,
    100; here 1, so that two fills show it)."""
    import workflows._trade

    monkeypatch.setattr(workflows._trade, "MAX_FILLS_SHOWN", 1)
    open_frank(settlement, "60")
    await settlement.client.submit(partial_dvp("P-kept"))
    await wait_for_status(settlement, "P-kept", TradeStatus.PARTIALLY_SETTLED)
    await deliver(settlement, "P-kept-fund", "carol", "frank", "40", "1.00")

    final = await settlement.client.wait("P-kept")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert (final.fill_count, fills(final), final.fills[0].number) == (2, [("40", "3980.00")], 2)
    assert settlement.balance("securities", "alice-sec") == 100  # both fills settled
    assert settlement.open_holds() == []


async def test_unfilled_rest_is_released_at_the_deadline(
    settlement: Engine, temporal_server: Any, tmp_path: Path
) -> None:
    open_frank(settlement, "60")
    before = settlement.balances()

    await settlement.client.submit(partial_dvp("P-deadline", settle_within="PT10S"))
    final = await settlement.client.wait("P-deadline")

    assert final.status is TradeStatus.SETTLED_PARTIAL
    assert final.status.terminal
    assert "60 of 100 BOND-2030 settled, the rest released: short at the deadline" in final.reason
    assert fills(final) == [("60", "5970.00")]
    assert [leg.state.value for leg in final.legs] == ["RELEASED", "RELEASED"]
    moved = {
        ("securities", "frank-sec"): Decimal(-60),
        ("securities", "alice-sec"): Decimal(60),
        ("cash", "alice-cash"): Decimal("-5970.00"),
        ("cash", "frank-cash"): Decimal("5970.00"),
    }
    assert settlement.balances() == {k: v + moved.get(k, Decimal(0)) for k, v in before.items()}
    assert settlement.open_holds() == []
    settlement.assert_invariants()

    # what `dvp status` and a search on the DvpStatus attribute (the Web UI's) show
    config = config_file(settlement, temporal_server.address, tmp_path)
    as_json = await dvp(config, "status", "P-deadline", "--json")
    as_text = await dvp(config, "status", "P-deadline")
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown["status"] == "SETTLED_PARTIAL"
    assert [(f["number"], f["quantity"], f["amount"]) for f in shown["fills"]] == [(1, "60", "5970.00")]
    assert "SETTLED_PARTIAL" in as_text.stdout
    assert "P-deadline#0.2, P-deadline#1.2" in as_text.stdout  # the fill's row names its holds
    for _ in range(50):  # visibility is eventually consistent
        listed = [v.trade_id for v in await settlement.client.list(status=TradeStatus.SETTLED_PARTIAL)]
        if "P-deadline" in listed:
            break
        await asyncio.sleep(0.2)
    assert "P-deadline" in listed


async def test_seller_below_the_minimum_fill_settles_nothing(settlement: Engine) -> None:
    open_frank(settlement, "20")
    before = settlement.balances()

    await settlement.client.submit(
        partial_dvp("P-minimum", partial={"min_quantity": "30"}, settle_within="PT3S")
    )
    final = await settlement.client.wait("P-minimum")

    assert final.status is TradeStatus.EXPIRED
    assert final.fills == []
    assert "short at the deadline" in final.reason
    assert settlement.balances() == before
    assert settlement.open_holds() == []
    settlement.assert_invariants()


async def test_buyer_short_of_cash_pays_a_rounded_share_and_the_fills_sum_exactly(
    settlement: Engine,
) -> None:
    # carol has 5000.00 EUR for 100 bonds at 9999.99: 50 bonds cost 4999.995, paid 4999.99
    await settlement.client.submit(
        partial_dvp("P-odd", seller="bob", buyer="carol", cash="9999.99", partial={})
    )
    view = await wait_for_status(settlement, "P-odd", TradeStatus.PARTIALLY_SETTLED)
    assert fills(view) == [("50", "4999.99")]

    await deliver(settlement, "P-odd-fund", "carol", "alice", "1", "5000.00")
    final = await settlement.client.wait("P-odd")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert fills(final) == [("50", "4999.99"), ("50", "5000.00")]
    assert settlement.balance("cash", "carol-cash") == Decimal("0.01")
    assert settlement.balance("cash", "bob-cash") == Decimal("9999.99")
    assert settlement.balance("securities", "carol-sec") == Decimal(500 - 1 + 100)
    assert settlement.open_holds() == []
    settlement.assert_invariants()


BAD_PARTIAL = [
    ({"min_fill": "0"}, "partial.min_fill", "above 0 and at most 1"),
    ({"min_fill": "1.5"}, "partial.min_fill", "above 0 and at most 1"),
    ({"min_fill": 0.5}, "partial.min_fill", "not a float"),
    ({"min_quantity": "-5"}, "partial.min_quantity", "must be positive"),
    ({"min_quantity": "150"}, "partial", "exceeds the quantity of legs[0]"),
    ({"min_quantity": "10.5"}, "partial.min_quantity", "BOND-2030 allows 0"),
    ({"min_fill": "0.5", "min_quantity": "10"}, "partial", "not both"),
    ({"minimum": "10"}, "partial.minimum", "Extra inputs"),
]


@pytest.mark.parametrize(("spec", "field", "message"), BAD_PARTIAL)
async def test_bad_partial_spec_is_refused_naming_the_field(
    settlement: Engine, spec: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidInstruction) as refused:
        await settlement.client.submit(partial_dvp("P-bad", seller="bob", partial=spec))
    assert refused.value.field == field
    assert message in refused.value.message


async def test_partial_is_refused_for_anything_but_a_simple_dvp(settlement: Engine) -> None:
    before = settlement.balances()
    three_legs = partial_dvp("P-three", seller="bob")
    three_legs["legs"].append(
        {"ledger": "fx", "asset": "USD", "from": "carol-usd", "to": "alice-usd", "amount": "10.00"}
    )
    with pytest.raises(InvalidInstruction, match="simple two-leg DvP") as refused:
        await settlement.client.submit(three_legs)
    assert refused.value.field == "partial"

    # two legs, but carol pays for bonds delivered to alice: not one pair of counterparties
    crossed = partial_dvp("P-crossed", seller="bob")
    crossed["legs"][1]["from"] = "carol-cash"
    with pytest.raises(InvalidInstruction, match="simple DvP") as refused:
        await settlement.client.submit(crossed)
    assert refused.value.field == "partial"
    assert settlement.balances() == before
    assert settlement.open_holds() == []


async def test_cancel_after_a_fill_releases_the_rest_and_keeps_the_fill(settlement: Engine) -> None:
    open_frank(settlement, "60")
    await settlement.client.submit(partial_dvp("P-cancel"))
    await wait_for_status(settlement, "P-cancel", TradeStatus.PARTIALLY_SETTLED)

    await settlement.acting("alice").cancel("P-cancel", reason="enough")
    final = await settlement.client.wait("P-cancel")

    assert final.status is TradeStatus.SETTLED_PARTIAL
    assert "the rest released: cancelled by alice: enough" in final.reason
    assert fills(final) == [("60", "5970.00")]
    assert settlement.balance("cash", "alice-cash") == Decimal("100000.00") - Decimal("5970.00")
    assert settlement.open_holds() == []
    settlement.assert_invariants()
