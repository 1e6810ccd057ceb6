"""Activities of multilateral netting batches, and the netting itself.

``BatchActivities`` runs on the settlement task queue, next to the batch store: it
reads a batch's trades by reference, nets them (``net_trades``) and records each
trade's outcome. ``NettingLedgerActivities`` runs on each ledger's task queue, where
that ledger's credentials are: it reads the participants' available amounts, opens
the ledger's clearing accounts and, after the commit decision, settles the net legs.

The removal rule, when a participant cannot cover its net debit (``net_trades``):

1. Net every trade still in the batch: each account's position is what it receives
   minus what it pays, per ledger (an account holds one asset).
2. An account is *short* when it pays more, net, than it has available. If none is
   short, stop.
3. Take the short account that can cover the smallest share of its net debit
   (shortfall / net debit, largest first; ties by ledger, then account id).
4. Remove that account's trades that add to its debit (those in which it pays, net,
   more than it receives), the largest net payment first, ties by trade id, until
   its net debit is covered. Each is reported with the account, its net debit and
   what it had available.
5. Go back to 1: removing a trade also takes away what its counterparties would
   have received, which can make another account short.

Each round only removes trades, so this ends; the result depends only on the trades
and the available amounts, never on timing.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters import Ledger
from domain import (
    AccountPosition,
    AccountRef,
    AssetTotals,
    BatchAccounts,
    Config,
    HoldNotOpen,
    HoldOutcome,
    HoldOutcomes,
    LedgerError,
    NetLeg,
    NetPlan,
    NetRequest,
    PositionsRequest,
    PositionsResult,
    RecordRequest,
    SettleRequest,
)
from stores import BatchStore

CLEARING_OWNER = "clearing"

Key = tuple[str, str]  # (ledger, account)
ParsedLeg = tuple[str, str, str, str, Decimal]  # ledger, asset, from, to, amount


def clearing_account(asset: str) -> str:
    """The account on each ledger through which a batch's net legs in ``asset`` pass."""
    return f"clearing:{asset}"


def _fmt(amount: Decimal) -> str:
    return format(amount, "f")


@dataclass
class Netting:
    """What ``net_trades`` decided."""

    positions: dict[Key, Decimal]  # non-zero net positions
    assets: dict[Key, tuple[Decimal, Decimal]]  # (ledger, asset) -> (gross, net)
    removed: dict[int, str] = field(default_factory=dict)  # seq -> reason
    accepted: int = 0
    asset_of: dict[Key, str] = field(default_factory=dict)


def net_trades(
    trades: Iterable[tuple[int, str, list[ParsedLeg]]],
    available: dict[Key, Decimal],
    exclusions: dict[tuple[str, str, str], str] | None = None,
) -> Netting:
    """Net ``trades`` (``(seq, trade_id, legs)``), removing what cannot settle.

    ``available`` is each paying account's available amount; ``exclusions`` maps
    ``(ledger, account, asset)`` to the reason its trades cannot settle at all (an
    unknown account, a sanctioned owner). See the module docstring for the rule.
    """
    exclusions = exclusions or {}
    removed: dict[int, str] = {}
    net: dict[Key, Decimal] = defaultdict(Decimal)
    gross: dict[Key, Decimal] = defaultdict(Decimal)
    asset_of: dict[Key, str] = {}
    payers: dict[Key, list[int]] = defaultdict(list)  # account -> trades in which it pays
    legs_of: dict[int, list[ParsedLeg]] = {}
    trade_ids: dict[int, str] = {}
    count = 0
    for seq, trade_id, legs in trades:
        count += 1
        reason = _excluded(legs, exclusions) if exclusions else None
        if reason is not None:
            removed[seq] = reason
            continue
        legs_of[seq] = legs
        trade_ids[seq] = trade_id
        seen: set[Key] = set()
        for ledger, asset, payer, payee, amount in legs:
            key_from, key_to = (ledger, payer), (ledger, payee)
            net[key_from] -= amount
            net[key_to] += amount
            gross[(ledger, asset)] += amount
            asset_of[key_from] = asset_of[key_to] = asset
            if key_from not in seen:
                seen.add(key_from)
                payers[key_from].append(seq)

    def remove(seq: int, reason: str) -> None:
        removed[seq] = reason
        for ledger, asset, payer, payee, amount in legs_of.pop(seq):
            net[(ledger, payer)] += amount
            net[(ledger, payee)] -= amount
            gross[(ledger, asset)] -= amount

    while True:
        short: list[tuple[Decimal, Key]] = []
        for key, position in net.items():
            if position < 0 and -position > available.get(key, Decimal(0)):
                short.append(((-position - available.get(key, Decimal(0))) / -position, key))
        if not short:
            break
        short.sort(key=lambda s: (-s[0], s[1]))
        key = short[0][1]
        ledger, account = key
        have = available.get(key, Decimal(0))
        due = -net[key]
        reason = (
            f"{account} on {ledger} cannot cover its net debit: {_fmt(due)} {asset_of[key]} due, "
            f"{_fmt(have)} available"
        )
        candidates: list[tuple[Decimal, str, int]] = []
        for seq in payers[key]:
            if seq in removed:
                continue
            delta = Decimal(0)
            for leg_ledger, _asset, payer, payee, amount in legs_of[seq]:
                if leg_ledger == ledger:
                    if payer == account:
                        delta -= amount
                    if payee == account:
                        delta += amount
            if delta < 0:
                candidates.append((delta, trade_ids[seq], seq))
        candidates.sort()
        for _delta, _trade_id, seq in candidates:
            if -net[key] <= have:
                break
            remove(seq, reason)

    totals: dict[Key, tuple[Decimal, Decimal]] = {}
    credits: dict[Key, Decimal] = defaultdict(Decimal)
    for key, position in net.items():
        if position > 0:
            credits[(key[0], asset_of[key])] += position
    for asset_key, moved in sorted(gross.items()):
        if moved > 0:
            totals[asset_key] = (moved, credits.get(asset_key, Decimal(0)))
    positions = {key: position for key, position in sorted(net.items()) if position != 0}
    return Netting(positions, totals, removed, count - len(removed), asset_of)


def _excluded(legs: list[ParsedLeg], exclusions: dict[tuple[str, str, str], str]) -> str | None:
    for i, (ledger, asset, payer, payee, _amount) in enumerate(legs):
        for side, account in (("from", payer), ("to", payee)):
            reason = exclusions.get((ledger, account, asset))
            if reason is not None:
                return f"legs[{i}].{side}: {reason}"
    return None


def parse_legs(legs_json: str) -> list[ParsedLeg]:
    return [(lg, a, f, t, Decimal(x)) for lg, a, f, t, x in json.loads(legs_json)]


class BatchActivities:
    """The batch store side of a netting batch, built once by the worker."""

    def __init__(self, store: BatchStore) -> None:
        self._store = store
        # The trades of the batch netted last, parsed: a second round (or a retry) on
        # this worker skips reading and parsing them again. Only a cache.
        self._cache: tuple[str, list[tuple[int, str, list[ParsedLeg]]]] | None = None
        self._lock = threading.Lock()

    @activity.defn(name="batch.accounts")
    def accounts(self, batch_id: str) -> BatchAccounts:
        """Every (ledger, account, asset) the batch's trades touch."""
        return BatchAccounts(
            accounts=[
                AccountRef(ledger=lg, account=a, asset=s) for lg, a, s in self._store.accounts(batch_id)
            ]
        )

    def _trades(self, batch_id: str) -> list[tuple[int, str, list[ParsedLeg]]]:
        with self._lock:
            if self._cache is not None and self._cache[0] == batch_id:
                return self._cache[1]
        rows = self._store.trades(batch_id)
        activity.heartbeat("read")
        parsed = []
        for seq, tid, legs in rows:
            parsed.append((seq, tid, parse_legs(legs)))
            if seq % 20_000 == 0:
                activity.heartbeat(f"parsed {seq}")
        with self._lock:
            self._cache = (batch_id, parsed)
        return parsed

    @activity.defn(name="batch.net")
    def net(self, request: NetRequest) -> NetPlan:
        """Net the batch against the available amounts; record which trades it removed."""
        available = {(a.ledger, a.account): a.amount for a in request.available}
        exclusions = {(e.ledger, e.account, e.asset): e.reason for e in request.exclusions}
        netting = net_trades(self._trades(request.batch_id), available, exclusions)
        activity.heartbeat("netted")
        self._store.mark_removed(request.batch_id, sorted(netting.removed.items()))
        assets = [
            AssetTotals(
                ledger=ledger,
                asset=asset,
                gross=gross,
                net=net,
                saved=gross - net,
                saved_percent=round(float((gross - net) / gross * 100), 2),
            )
            for (ledger, asset), (gross, net) in netting.assets.items()
        ]
        positions = [
            NetLeg(ledger=ledger, account=account, asset=netting.asset_of[(ledger, account)], amount=amount)
            for (ledger, account), amount in netting.positions.items()
        ]
        return NetPlan(
            accepted=netting.accepted, removed=len(netting.removed), positions=positions, assets=assets
        )

    @activity.defn(name="batch.finish")
    def finish(self, request: RecordRequest) -> int:
        """Mark the accepted trades settled (or released) and store the batch's result."""
        result = request.result.model_dump_json() if request.result is not None else ""
        status = request.result.status.value if request.result is not None else ""
        count = self._store.finish(request.batch_id, status, request.settled, request.reason, result)
        with self._lock:
            self._cache = None
        return count

    def all(self) -> list[Callable[..., object]]:
        return [self.accounts, self.net, self.finish]


class NettingLedgerActivities:
    """A batch's calls on one ledger, registered on that ledger's task queue."""

    def __init__(self, ledger: Ledger, config: Config) -> None:
        self._ledger = ledger
        self._config = config

    @activity.defn(name="netting.positions")
    def positions(self, request: PositionsRequest) -> PositionsResult:
        """Check each account and read what it has available; open the clearing accounts."""
        try:
            for asset in sorted({a.asset for a in request.accounts}):
                self._ledger.open_account(
                    clearing_account(asset), asset, CLEARING_OWNER, precision=self._config.precision(asset)
                )
            balances = {b.account: b for b in self._ledger.balances()}
        except LedgerError as exc:
            raise ApplicationError(exc.message, type=exc.code, non_retryable=not exc.retryable) from exc
        out: list[AccountPosition] = []
        for ref in request.accounts:
            b = balances.get(ref.account)
            if b is None:
                problem = f"unknown account {ref.account!r} on ledger {self._ledger.name!r}"
                out.append(AccountPosition(account=ref.account, asset=ref.asset, problem=problem))
            elif b.asset != ref.asset:
                problem = f"account {ref.account!r} holds {b.asset}, not {ref.asset}"
                out.append(
                    AccountPosition(account=ref.account, asset=ref.asset, owner=b.owner, problem=problem)
                )
            else:
                out.append(
                    AccountPosition(
                        account=ref.account, asset=ref.asset, owner=b.owner, available=b.available
                    )
                )
        return PositionsResult(positions=out)

    @activity.defn(name="netting.settle")
    def settle(self, request: SettleRequest) -> HoldOutcomes:
        """Commit every pay-in hold, then pay each net receiver out of the clearing account.

        Runs after the commit decision and is retried until it succeeds: every step
        is idempotent on its hold id, so a retry finishes what a lost attempt began.
        """
        outcomes: list[HoldOutcome] = []
        try:
            for hold_id in request.pay_ins:
                activity.heartbeat(hold_id)
                outcomes.append(HoldOutcome.of(self._ledger.commit_hold(hold_id)))
            for leg in request.pay_outs:
                hold_id = f"{request.prefix}:out:{leg.account}"
                activity.heartbeat(hold_id)
                self._ledger.place_hold(
                    hold_id,
                    clearing_account(leg.asset),
                    leg.account,
                    leg.asset,
                    leg.amount,
                    None,
                    request.trade_id,
                )
                outcomes.append(HoldOutcome.of(self._ledger.commit_hold(hold_id)))
        except HoldNotOpen as exc:
            # After the decision no hold of the batch may end any other way: a retry cannot help.
            raise ApplicationError(exc.message, type=exc.code, non_retryable=True) from exc
        except LedgerError as exc:
            raise ApplicationError(exc.message, type=exc.code, non_retryable=False) from exc
        return HoldOutcomes(outcomes=outcomes)

    def all(self) -> list[Callable[..., object]]:
        return [self.positions, self.settle]
