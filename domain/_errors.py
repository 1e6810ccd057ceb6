"""The exception tree of dvp.

    DvpError                      root: catch this to catch everything dvp raises
    ├── ConfigError               the TOML configuration is wrong
    ├── InvalidInstruction        a settlement instruction is malformed (names the field)
    ├── DuplicateTrade            the trade id exists with different content
    ├── TradeNotFound             no trade with that id
    ├── RequestRejected           an approve or cancel was refused (carries the reason)
    ├── AuthError                 a token is missing, malformed, unsigned, expired or not ours
    └── LedgerError               a ledger refused an operation (carries a stable code)
        ├── UnknownAccount
        ├── UnknownHold
        ├── InsufficientFunds
        ├── InvalidAmount
        ├── AssetMismatch
        ├── IdempotencyConflict   same key, different terms
        ├── HoldNotOpen           the hold was already committed or released
        └── LedgerUnavailable     transient: the ledger cannot be reached (retry)

Every ``LedgerError`` has a ``code`` that stays stable across versions and
transports (the bank service returns it in its JSON errors).
"""

from __future__ import annotations


class DvpError(Exception):
    """Root of every error dvp raises on purpose."""


class ConfigError(DvpError):
    """The configuration file (``DVP_CONFIG``) is missing a key or has a bad value."""


class InvalidInstruction(DvpError):
    """A settlement instruction was refused before anything reached a ledger."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DuplicateTrade(DvpError):
    """A trade with this id exists and its content differs from the one submitted."""


class TradeNotFound(DvpError):
    """No settlement workflow exists for this trade id."""


class RequestRejected(DvpError):
    """An approve or cancel request was refused; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AuthError(DvpError):
    """A token was refused: missing, malformed, signed by an unknown key, expired, or not for us.

    Raised on any doubt; the message says which check failed (never the token itself).
    """


class LedgerError(DvpError):
    """A ledger refused an operation. ``code`` is stable and machine-readable."""

    code = "ledger_error"
    retryable = False

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class UnknownAccount(LedgerError):
    code = "unknown_account"


class UnknownHold(LedgerError):
    code = "unknown_hold"


class InsufficientFunds(LedgerError):
    code = "insufficient_funds"


class InvalidAmount(LedgerError):
    code = "invalid_amount"


class AssetMismatch(LedgerError):
    code = "asset_mismatch"


class IdempotencyConflict(LedgerError):
    code = "idempotency_conflict"


class HoldNotOpen(LedgerError):
    code = "hold_not_open"


class LedgerUnavailable(LedgerError):
    code = "unavailable"
    retryable = True


LEDGER_ERRORS: dict[str, type[LedgerError]] = {
    cls.code: cls
    for cls in (
        LedgerError,
        UnknownAccount,
        UnknownHold,
        InsufficientFunds,
        InvalidAmount,
        AssetMismatch,
        IdempotencyConflict,
        HoldNotOpen,
        LedgerUnavailable,
    )
}
"""Ledger error classes by their stable code (for transports that carry the code)."""
