"""Activities: the side effects of a settlement, one class per concern."""

from .ledger import LedgerActivities
from .netting import BatchActivities, NettingLedgerActivities
from .settlement import SettlementActivities

__all__ = ["BatchActivities", "LedgerActivities", "NettingLedgerActivities", "SettlementActivities"]
