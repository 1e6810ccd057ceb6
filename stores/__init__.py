"""Stores the engine keeps for itself (not ledgers): the netting batches' trades and outcomes."""

from .batches import BatchStore

__all__ = ["BatchStore"]
