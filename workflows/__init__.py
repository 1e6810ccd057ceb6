"""Workflows: deterministic orchestration of settlements.

The names below are loaded on first use (PEP 562), not when the package is imported:
the workflow sandbox imports a workflow's module, and with it this package, afresh
for every new workflow it runs, and a trade should not pay for importing the netting
batch workflow (or a batch for the trade saga) each time. See
docs/decisions/0003-sagas-passed-through-the-sandbox.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._saga import (
        MEMO_REASON,
        MEMO_STARTED,
        SEARCH_ATTRIBUTES,
        account_checks,
        initial_search_attributes,
        leg_checks,
        workflow_id_for,
    )
    from .htlc import HtlcWorkflow
    from .netting import NettingBatchWorkflow, batch_workflow_id
    from .settlement import SettlementWorkflow

_HOMES = {
    "HtlcWorkflow": ".htlc",
    "MEMO_REASON": "._saga",
    "MEMO_STARTED": "._saga",
    "SEARCH_ATTRIBUTES": "._saga",
    "SettlementWorkflow": ".settlement",
    "account_checks": "._saga",
    "initial_search_attributes": "._saga",
    "leg_checks": "._saga",
    "workflow_id_for": "._saga",
    "NettingBatchWorkflow": ".netting",
    "batch_workflow_id": ".netting",
}

__all__ = [
    "MEMO_REASON",
    "MEMO_STARTED",
    "SEARCH_ATTRIBUTES",
    "HtlcWorkflow",
    "NettingBatchWorkflow",
    "SettlementWorkflow",
    "account_checks",
    "batch_workflow_id",
    "initial_search_attributes",
    "leg_checks",
    "workflow_id_for",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
