"""Partial settlement (T2S-style): how much of a trade one fill may settle.

A partial trade is a simple two-leg DvP: ``legs[0]`` delivers the quantity (the
securities), ``legs[1]`` pays for it (the cash). A fill settles ``q`` of the quantity
and the payment for it; fills settle one after another until the whole trade has
settled or the deadline passes.

Rounding rule: the payment for everything delivered so far is the proportional
amount rounded *down* to the payment asset's minor unit,

    paid_through(Q) = floor(payment * Q / quantity)

and a fill pays ``paid_through(settled + q) - paid_through(settled)``. So at any time
the payer has paid at most the exact price of what it has received and less than one
minor unit below it (never in its favour by a whole minor unit), each fill differs
from its exact share by less than one minor unit, and because
``paid_through(quantity) == payment`` the last fill makes up the difference: the
fills sum exactly to the legs' amounts once everything has settled. Rounding down
also means the last fill always pays something.

A fill is acceptable if both its legs move something and it is at least the minimum
(``min_quantity``, or ``min_fill`` times the quantity, or one minor unit) or the whole
remainder: a remainder smaller than the minimum may always settle in full.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal, localcontext

# Enough digits for any quantity * amount product at up to 18 decimals each.
_PRECISION = 80


def minor_unit(precision: int) -> Decimal:
    """The smallest amount of an asset with ``precision`` decimals, e.g. 0.01."""
    return Decimal(1).scaleb(-precision)


class FillRule:
    """The arithmetic of fills for one partial trade; pure and deterministic."""

    def __init__(
        self,
        quantity: Decimal,
        payment: Decimal,
        quantity_precision: int,
        payment_precision: int,
        min_fill: Decimal | None = None,
        min_quantity: Decimal | None = None,
    ) -> None:
        self.quantity = quantity
        self.payment = payment
        self.quantity_unit = minor_unit(quantity_precision)
        self.payment_unit = minor_unit(payment_precision)
        if min_quantity is not None:
            self.minimum = min_quantity
        elif min_fill is not None:
            self.minimum = min_fill * quantity
        else:
            self.minimum = self.quantity_unit

    def paid_through(self, delivered: Decimal) -> Decimal:
        """The payment due once ``delivered`` of the quantity has settled (rounded down)."""
        with localcontext() as ctx:
            ctx.prec = _PRECISION
            return (self.payment * delivered / self.quantity).quantize(self.payment_unit, ROUND_FLOOR)

    def payment_for(self, settled: Decimal, fill: Decimal) -> Decimal:
        """The payment of a fill of ``fill`` after ``settled`` has settled."""
        return self.paid_through(settled + fill) - self.paid_through(settled)

    def acceptable(self, settled: Decimal, fill: Decimal) -> bool:
        """Whether a fill of this size may settle: at least the minimum, or the whole rest."""
        if fill <= 0 or self.payment_for(settled, fill) <= 0:
            return False
        return fill >= self.minimum or fill == self.quantity - settled

    def largest_fill(
        self,
        settled: Decimal,
        cap: Decimal,
        quantity_available: Decimal | None,
        payment_available: Decimal | None,
    ) -> Decimal:
        """The largest fill, at most ``cap``, that both legs' available balances cover.

        ``None`` for a leg means it does not limit the fill (its hold was placed).
        """
        fill = cap
        if quantity_available is not None:
            fill = min(fill, self._floor(max(quantity_available, Decimal(0))))
        if payment_available is not None:
            budget = max(payment_available, Decimal(0))
            with localcontext() as ctx:
                ctx.prec = _PRECISION
                # floor(payment * (settled + q) / quantity) <= paid_through(settled) + budget
                # holds while payment * (settled + q) / quantity < that + one unit
                ceiling = self.paid_through(settled) + budget + self.payment_unit
                bound = ceiling * self.quantity / self.payment - settled
            fill = min(fill, self._floor(bound))
            # the bound is strict and the division rounded: step down past any overshoot
            while fill > 0 and self.payment_for(settled, fill) > budget:
                fill -= self.quantity_unit
        return max(fill, Decimal(0))

    def _floor(self, amount: Decimal) -> Decimal:
        with localcontext() as ctx:
            ctx.prec = _PRECISION
            return amount.quantize(self.quantity_unit, ROUND_FLOOR)
