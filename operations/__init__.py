"""Operating dvp: what an operator runs beside the engine, against Temporal and the ledgers.

``reconcile`` compares every open hold with the trade that placed it (``dvp ledger
reconcile``, and the worker on a schedule). It sits beside ``connection``, below the
worker and the client, so that both can run it.
"""

from .reconcile import (
    DEFAULT_GRACE,
    DEFAULT_STUCK_AFTER,
    LedgerProblem,
    OrphanHold,
    Reconciliation,
    StuckTrade,
    reconcile,
)

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_STUCK_AFTER",
    "LedgerProblem",
    "OrphanHold",
    "Reconciliation",
    "StuckTrade",
    "reconcile",
]
