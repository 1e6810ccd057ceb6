"""Workflows: deterministic orchestration of settlements."""

from .netting import NettingBatchWorkflow, batch_workflow_id
from .settlement import SEARCH_ATTRIBUTES, SettlementWorkflow, initial_search_attributes, workflow_id_for

__all__ = [
    "SEARCH_ATTRIBUTES",
    "NettingBatchWorkflow",
    "SettlementWorkflow",
    "batch_workflow_id",
    "initial_search_attributes",
    "workflow_id_for",
]
