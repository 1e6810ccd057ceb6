"""The one ledger interface every adapter implements.

A ledger keeps accounts (one asset each) and holds. A settlement leg is:

    place_hold  -> reserve ``amount`` on the paying account (open, with a backstop expiry)
    pin_hold    -> prepare: clear the expiry, so nothing but the orchestrator ends it
    commit_hold -> transfer the held amount to ``to_account`` (the hold ends committed)
 or release_hold -> give the amount back to the paying account (the hold ends released)

Contract, for every implementation:

* ``hold_id`` is the idempotency key. Calling ``place_hold``, ``pin_hold``,
  ``commit_hold`` or ``release_hold`` twice with the same key has the effect of
  calling it once and returns the same hold. ``place_hold`` with a known key and
  different terms raises ``IdempotencyConflict``.
* A hold is committed or released at most once: committing a released hold (or
  releasing a committed one) raises ``HoldNotOpen``.
* ``release_hold`` of a key the ledger has never seen records the key as released
  (a tombstone), so a ``place_hold`` that arrives late with that key places nothing
  and returns the released hold. That is what makes a compensation safe to run
  while the reservation it undoes may still be in flight.
* ``available = balance - held`` never goes below zero, except for an asset's
  issuer account, which alone may go negative (opening balances are issued from it).
  ``place_hold`` beyond the available amount raises ``InsufficientFunds``.
* Per asset, the balances of all accounts (issuer included) sum to zero.
* ``expire_holds`` releases open holds whose ``expires_at`` has passed; a pinned
  hold (``expires_at is None``) never expires.
* ``verify`` checks these invariants against what the ledger stores and reports each
  violation; it changes nothing.

Methods are synchronous; activities run them on a thread pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from domain import AccountBalance, Hold, InvalidAmount, UnknownAccount


class AccountFacts(NamedTuple):
    """What never changes about an account once it is open."""

    asset: str
    owner: str


class Ledger(ABC):
    """A ledger of accounts and holds. See the module docstring for the contract."""

    name: str

    @abstractmethod
    def open_account(
        self, account: str, asset: str, owner: str, balance: Decimal = Decimal(0), precision: int = 0
    ) -> AccountBalance:
        """Open ``account`` for ``asset`` (idempotent) and issue ``balance`` once.

        Re-opening an existing account with the same asset and owner changes
        nothing (the opening balance is issued only the first time); a different
        asset or owner raises ``IdempotencyConflict``. ``precision`` is the number of
        decimal places the asset allows, fixed by its first account.
        """

    @abstractmethod
    def account(self, account: str) -> AccountBalance:
        """The balance of one account; ``UnknownAccount`` if it does not exist."""

    def account_facts(self, accounts: Collection[str]) -> dict[str, AccountFacts]:
        """The asset and owner of each of ``accounts`` that exists; an unknown one is left out.

        An account's asset and owner never change once it is open, so an adapter may
        answer from what it has seen before.
        """
        facts: dict[str, AccountFacts] = {}
        for account in accounts:
            try:
                balance = self.account(account)
            except UnknownAccount:
                continue
            facts[account] = AccountFacts(balance.asset, balance.owner)
        return facts

    @abstractmethod
    def balances(self) -> list[AccountBalance]:
        """Every account, issuers included, ordered by asset then account."""

    @abstractmethod
    def place_hold(
        self,
        hold_id: str,
        account: str,
        to_account: str,
        asset: str,
        amount: Decimal,
        expires_at: datetime | None,
        trade_id: str = "",
        hashlock: str | None = None,
    ) -> Hold:
        """Reserve ``amount`` of ``asset`` on ``account`` for ``to_account``."""

    @abstractmethod
    def pin_hold(self, hold_id: str) -> Hold:
        """Clear an open hold's expiry. ``HoldNotOpen`` if it was released meanwhile."""

    @abstractmethod
    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        """Transfer the held amount to its ``to_account``."""

    @abstractmethod
    def release_hold(self, hold_id: str) -> Hold:
        """Return the held amount to the account (records a tombstone for unknown keys)."""

    @abstractmethod
    def get_hold(self, hold_id: str) -> Hold:
        """One hold by key; ``UnknownHold`` if the key was never used."""

    def final_hold(self, hold_id: str) -> Hold:
        """The hold as it stands for good: on a chain, at the ledger's finality depth (a
        reorganisation can still replace newer blocks); elsewhere ``get_hold``."""
        return self.get_hold(hold_id)

    @abstractmethod
    def open_holds(self) -> list[Hold]:
        """Every hold that is still open."""

    @abstractmethod
    def expire_holds(self, now: datetime) -> list[Hold]:
        """Release every open, unpinned hold whose ``expires_at`` is at or before ``now``."""

    @abstractmethod
    def verify(self) -> list[str]:
        """Every violation of this module's contract found in the ledger's state; empty means consistent.

        One line per violation, naming the account, hold or asset. At least: per asset
        the balances sum to zero, and what is held equals the open holds. Read-only; for
        tests, demos and the bench's checks, not the settlement path.
        """

    def close(self) -> None:  # noqa: B027 - optional for adapters without resources
        """Release connections and other resources."""


def as_decimal(value: Any, what: str) -> Decimal:
    """``value`` as a finite ``Decimal``; ``InvalidAmount`` naming ``what`` if it is not one (or a float)."""
    if isinstance(value, (bool, float)):
        raise InvalidAmount(f"{what} must be a Decimal, not {type(value).__name__} {value!r}")
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise InvalidAmount(f"{what} {value!r} is not a decimal number") from None
    if not amount.is_finite():
        raise InvalidAmount(f"{what} {value!r} is not a finite number")
    return amount
