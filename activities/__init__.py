"""Activities: the side effects of a settlement, one class per concern."""

from .ledger import LedgerActivities
from .settlement import SettlementActivities

__all__ = ["LedgerActivities", "SettlementActivities"]
