"""Direct ledger administration: open the configured ledgers, seed accounts, read them.

These run where the ledgers' credentials are (like a ledger worker), not through
Temporal; ``reconcile_ledgers`` also asks Temporal about each open hold's trade.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from adapters import Ledger, open_ledger
from connection import connect_client
from domain import AccountBalance, Config, Hold, SeedFile
from operations import DEFAULT_GRACE, DEFAULT_STUCK_AFTER, Reconciliation, reconcile

from ._checks import check_ledger, check_precision, invalid_from


@contextmanager
def opened(config: Config, names: list[str] | None = None) -> Iterator[dict[str, Ledger]]:
    """Every configured ledger (or those named), closed on exit."""
    ledgers: dict[str, Ledger] = {}
    try:
        for name in names or list(config.ledgers):
            ledgers[name] = open_ledger(name, config.ledgers[name])
        yield ledgers
    finally:
        for ledger in ledgers.values():
            ledger.close()


def parse_seed(data: Mapping[str, Any], config: Config) -> SeedFile:
    """Parse a seed document; ``InvalidInstruction`` names the bad field."""
    try:
        seed = SeedFile.model_validate(dict(data))
    except ValidationError as exc:
        raise invalid_from(exc, "(seed)") from None
    for i, spec in enumerate(seed.accounts):
        check_ledger(config, f"accounts[{i}].ledger", spec.ledger)
        check_precision(config, f"accounts[{i}].balance", spec.asset, spec.balance)
    return seed


def seed(config: Config, seed_file: SeedFile, ledgers: Mapping[str, Ledger]) -> list[AccountBalance]:
    """Open every account of ``seed_file`` with its opening balance; safe to re-run."""
    return [
        ledgers[spec.ledger].open_account(
            spec.id, spec.asset, spec.owner, spec.balance, precision=config.precision(spec.asset)
        )
        for spec in seed_file.accounts
    ]


def all_balances(ledgers: Mapping[str, Ledger]) -> list[AccountBalance]:
    return [b for name in sorted(ledgers) for b in ledgers[name].balances()]


def all_open_holds(ledgers: Mapping[str, Ledger]) -> list[Hold]:
    return [h for name in sorted(ledgers) for h in ledgers[name].open_holds()]


async def reconcile_ledgers(
    config: Config,
    *,
    release: bool = False,
    stuck_after: timedelta = DEFAULT_STUCK_AFTER,
    grace: timedelta = DEFAULT_GRACE,
) -> Reconciliation:
    """Every configured ledger's open holds against their trades (``operations.reconcile``)."""
    client = await connect_client(config.temporal.address, config.temporal.namespace, codec=config.codec)
    with opened(config) as ledgers:
        return await reconcile(
            client,
            ledgers,
            stuck_after=stuck_after,
            release=release,
            grace=grace,
            settlement_queue=config.settlement_queue(),
        )
