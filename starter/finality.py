"""Deep reorganisations: is every settled trade's chain commit still final on its chain?

A chain ledger reports a commit only once its transaction is final by the ledger's
``confirmations``; a reorganisation deeper than that can still undo it afterwards, and
then the trade says SETTLED while the chain says the tokens never moved (each chain's
own ``verify()`` is clean: the lock is simply open again, or gone). ``verify_trades``
reads, for every SETTLED or SETTLED_PARTIAL trade, the hold of each of its legs on a
chain ledger at that ledger's finality depth (``Ledger.final_hold``), and reports each
that is not committed there. See docs/finality.md for what to do about one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from adapters import Ledger
from domain import Config, HoldStatus, LedgerError, TradeStatus, TradeView, UnknownHold

from .client import SettlementClient

__all__ = ["ChainCommit", "Verified", "chain_ledgers", "verify_trades"]

SETTLED = (TradeStatus.SETTLED, TradeStatus.SETTLED_PARTIAL)


@dataclass(frozen=True)
class ChainCommit:
    """One committed leg (or fill of a leg) on a chain, and what the chain holds of it at finality."""

    trade_id: str
    leg: int
    ledger: str
    hold_id: str
    found: str  # "committed", "open", "released", "absent", or the ledger's error

    @property
    def final(self) -> bool:
        return self.found == HoldStatus.COMMITTED.value


@dataclass(frozen=True)
class Verified:
    trades: int  # settled trades with a leg on a chain
    commits: list[ChainCommit]

    @property
    def problems(self) -> list[ChainCommit]:
        return [c for c in self.commits if not c.final]


def chain_ledgers(config: Config) -> list[str]:
    """The configured ledgers whose writes a reorganisation can undo."""
    return sorted(name for name, ledger in config.ledgers.items() if ledger.kind == "evm")


def _commits(view: TradeView, chains: set[str]) -> list[tuple[int, str, str]]:
    """(leg, ledger, hold id) of each commit of ``view`` on a chain: one per fill of a partial trade."""
    found = []
    for leg in view.legs:
        if leg.ledger not in chains:
            continue
        hold_ids = [fill.hold_ids[leg.index] for fill in view.fills] if view.fills else [leg.hold_id]
        found += [(leg.index, leg.ledger, hold_id) for hold_id in hold_ids]
    return found


def _found(ledger: Ledger, hold_id: str) -> str:
    try:
        return ledger.final_hold(hold_id).status.value
    except UnknownHold:
        return "absent"
    except LedgerError as exc:
        return f"unreadable: {exc}"


async def verify_trades(
    client: SettlementClient, ledgers: Mapping[str, Ledger], since: datetime | None = None
) -> Verified:
    """Every settled trade's commits (of those ended ``since``) on the chain ledgers in ``ledgers``,
    read at finality."""
    settled = [
        summary.trade_id
        for status in SETTLED
        for summary in await client.list(status=status, closed_since=since)
    ]
    semaphore = asyncio.Semaphore(16)

    async def view_of(trade_id: str) -> TradeView:
        async with semaphore:  # an ended trade's view is its result: no worker is asked
            return await client.status(trade_id)

    views = list(await asyncio.gather(*(view_of(t) for t in settled)))
    chains = set(ledgers)
    wanted = [(view.trade_id, commit) for view in views for commit in _commits(view, chains)]

    def read() -> list[ChainCommit]:
        return [
            ChainCommit(trade_id, leg, name, hold_id, _found(ledgers[name], hold_id))
            for trade_id, (leg, name, hold_id) in wanted
        ]

    commits = await asyncio.to_thread(read)
    return Verified(trades=len({trade_id for trade_id, _ in wanted}), commits=commits)
