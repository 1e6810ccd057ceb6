"""Checks of user input against the configuration, shared by instructions and seed files.

Each raises ``InvalidInstruction`` naming the field, e.g. ``legs[1].amount``.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import ValidationError

from domain import Config, InvalidInstruction


def _field_path(loc: tuple[int | str, ...], whole: str) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + ("from" if part == "from_" else str(part))
    return path or whole


def invalid_from(exc: ValidationError, whole: str) -> InvalidInstruction:
    """The first problem pydantic found, as an ``InvalidInstruction`` naming its field."""
    error = exc.errors()[0]
    message = "is required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
    return InvalidInstruction(_field_path(error["loc"], whole), message)


def check_ledger(config: Config, field: str, ledger: str) -> None:
    if ledger not in config.ledgers:
        configured = ", ".join(sorted(config.ledgers))
        raise InvalidInstruction(field, f"unknown ledger {ledger!r} (configured: {configured})")


def check_precision(config: Config, field: str, asset: str, amount: Decimal) -> None:
    """Refuse an amount with more decimal places than ``asset`` allows (judged by value)."""
    precision = config.precision(asset)
    decimals = max(0, -int(amount.normalize().as_tuple().exponent))
    if decimals > precision:
        message = f"{format(amount, 'f')} has {decimals} decimals; {asset} allows {precision}"
        raise InvalidInstruction(field, message)
