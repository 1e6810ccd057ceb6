"""Ledger adapters: one module per ledger technology, behind one interface."""

from __future__ import annotations

from domain import ConfigError, LedgerConfig

from ._base import AccountFacts, Ledger

__all__ = ["AccountFacts", "Ledger", "open_ledger"]


def open_ledger(name: str, config: LedgerConfig) -> Ledger:
    """Build the adapter for ledger ``name`` from its configuration section."""
    if config.kind == "sql":
        from .sql import SqlLedger

        if not config.url:
            raise ConfigError(f"ledgers.{name}.url: a sql ledger needs a database URL")
        return SqlLedger(name, config.url, **config.options())
    if config.kind == "http":
        from .http import HttpLedger

        return HttpLedger.from_config(name, config)
    if config.kind == "evm":
        from .evm import EvmLedger

        return EvmLedger.from_config(name, config)
    raise ConfigError(f"ledgers.{name}.kind: unknown ledger kind {config.kind!r}")
