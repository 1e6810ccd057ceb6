"""Workflows: deterministic orchestration of settlements."""

from .settlement import SEARCH_ATTRIBUTES, SettlementWorkflow, workflow_id_for

__all__ = ["SEARCH_ATTRIBUTES", "SettlementWorkflow", "workflow_id_for"]
