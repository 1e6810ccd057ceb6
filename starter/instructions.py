"""Instruction builders: the common shapes of a trade, as the dict ``SettlementClient.submit`` takes."""

from __future__ import annotations

from typing import Any

__all__ = ["dvp_instruction"]


def dvp_instruction(
    trade_id: str, seller: str, buyer: str, bonds: str, cash: str, **extra: Any
) -> dict[str, Any]:
    """``seller`` delivers ``bonds`` BOND-2030 to ``buyer`` against ``cash`` EUR.

    The accounts follow the convention of ``examples/seed.json`` and the demo: a
    party's bonds are ``<party>-sec`` on the ``securities`` ledger, its euros
    ``<party>-cash`` on ``cash``. ``extra`` adds or replaces top-level fields of the
    instruction (``approvers``, ``deadline``, ``partial``, ...).
    """
    return {
        "trade_id": trade_id,
        "legs": [
            {
                "ledger": "securities",
                "asset": "BOND-2030",
                "from": f"{seller}-sec",
                "to": f"{buyer}-sec",
                "amount": bonds,
            },
            {
                "ledger": "cash",
                "asset": "EUR",
                "from": f"{buyer}-cash",
                "to": f"{seller}-cash",
                "amount": cash,
            },
        ],
        "settle_within": "PT30S",
        **extra,
    }
