"""A ledger reached over HTTP: the bank's core-ledger service (``bank/service.py``).

Configuration (``kind = "http"``)::

    [ledgers.cash]
    kind = "http"
    url = "http://127.0.0.1:8081"     # the bank service
    token = "secret-token"            # its bearer token for this client
    timeout = 5                       # seconds per request (optional, default 5)
    retries = 3                       # extra attempts on a transport error or 5xx (default 3)
    deadline = 8                      # seconds for one call, its retries included (default 8)

Amounts go over the wire as decimal strings and come back as ``Decimal``. The
service answers errors as ``{"error": {"code", "message"}}``; the code maps back to
the domain exception through ``LEDGER_ERRORS``, so callers see exactly what the SQL
ledger would raise.

Transport errors (connection refused or reset, timeouts) and 5xx answers are
retried with exponential backoff, then raised as ``LedgerUnavailable``, which the
ledger activities retry further. Retrying is safe because every call is idempotent
on its key: a commit whose answer was lost is committed once and answered twice.
One call never takes longer than ``deadline``, retries included, so it stays within
the ledger activities' heartbeat timeout (they heartbeat between holds, at most every
0.5 s).

Every request is a span of the caller's trace (OpenTelemetry's httpx instrumentation),
and carries that trace's context to the bank (``traceparent``), whose own spans join it.
A span names the route, never the account or hold in the path (``redacted_path``).
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Self
from urllib.parse import quote

import httpx
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor, RequestInfo
from opentelemetry.trace import Span
from pydantic import ValidationError

from domain import (
    LEDGER_ERRORS,
    AccountBalance,
    ConfigError,
    Hold,
    InvalidAmount,
    LedgerConfig,
    LedgerError,
    LedgerUnavailable,
)

from ._base import Ledger, as_decimal

__all__ = ["HttpLedger", "redacted_path"]

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRIES = 3
DEFAULT_DEADLINE_S = 8.0  # below the engine's 10 s heartbeat timeout for ledger activities
BACKOFF_S = 0.2  # first pause between attempts; doubles, with jitter, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 2.0
KNOWN_OPTIONS = ("token", "timeout", "retries", "deadline")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Fields of the service's request bodies whose refusal is an amount problem.
AMOUNT_FIELDS = frozenset({"amount", "balance", "precision"})


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).isoformat()


_HOLD_ACTIONS = frozenset({"pin", "commit", "release"})
# The span attributes in which OpenTelemetry's HTTP instrumentations put the request's
# URL or path (the older and the stable semantic conventions).
URL_ATTRIBUTES = ("http.url", "url.full")
PATH_ATTRIBUTES = ("http.target", "url.path")


def redacted_path(path: str) -> str:
    """``path`` of the bank's API with its account or hold id replaced by a placeholder.

    ``/holds/T-1%230/commit`` -> ``/holds/{hold_id}/commit``; ``/accounts/alice-cash`` ->
    ``/accounts/{account_id}``. Spans carry this, never the id: an account id names a
    client, and what a trace holds is readable by whoever runs the tracing backend.
    """
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts[0] == "accounts" and len(parts) > 1:
        return "/accounts/{account_id}"
    if parts[0] == "holds" and len(parts) > 1 and parts[1:] != ["expire"]:
        action = f"/{parts[-1]}" if len(parts) > 2 and parts[-1] in _HOLD_ACTIONS else ""
        return "/holds/{hold_id}" + action
    return path


def redact_span(span: Span) -> None:
    """Replace the URL and path attributes of an HTTP span with their redacted forms."""
    attributes = getattr(span, "attributes", None) or {}
    for key in URL_ATTRIBUTES:
        if isinstance(url := attributes.get(key), str):
            parsed = httpx.URL(url)
            span.set_attribute(key, str(parsed.copy_with(raw_path=redacted_path(parsed.path).encode())))
    for key in PATH_ATTRIBUTES:
        if isinstance(path := attributes.get(key), str):
            span.set_attribute(key, redacted_path(path))


def _redact_request(span: Span, request: RequestInfo) -> None:
    redact_span(span)


def _segment(key: str) -> str:
    # Hold ids carry '#' and may carry '/': encode everything into one path segment.
    return quote(key, safe="")


class HttpLedger(Ledger):
    """The ledger ``name`` served by the bank service at ``url`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        deadline: float = DEFAULT_DEADLINE_S,
        backoff: float = BACKOFF_S,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._retries = retries
        self._deadline = deadline
        self._backoff = backoff
        # One client for the adapter's life: connections are pooled and reused, and
        # the client is safe to share between the activity threads.
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=httpx.Timeout(timeout),
        )
        HTTPXClientInstrumentor.instrument_client(self._client, request_hook=_redact_request)

    @classmethod
    def from_config(cls, name: str, config: LedgerConfig) -> Self:
        """Build from ``[ledgers.<name>]``: ``url``, ``token``; ``timeout``, ``retries``, ``deadline``."""
        options = config.options()
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise ConfigError(
                f"ledgers.{name}.{unknown[0]}: not an option of an http ledger (known: url, "
                f"{', '.join(KNOWN_OPTIONS)})"
            )
        url = config.url
        if not url:
            raise ConfigError(
                f"ledgers.{name}.url: an http ledger needs the bank service's URL, e.g. http://127.0.0.1:8081"
            )
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"ledgers.{name}.url: {url!r} is not a URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"ledgers.{name}.url: {url!r} is not an http:// or https:// URL")
        token = options.get("token")
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(f"ledgers.{name}.token: an http ledger needs the bank's bearer token")
        seconds = {}
        for key, default in (("timeout", DEFAULT_TIMEOUT_S), ("deadline", DEFAULT_DEADLINE_S)):
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(
                    f"ledgers.{name}.{key}: must be a positive number of seconds, got {value!r}"
                )
            seconds[key] = float(value)
        retries = options.get("retries", DEFAULT_RETRIES)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise ConfigError(f"ledgers.{name}.retries: must be a whole number from 0 to 20, got {retries!r}")
        return cls(name, url, token.strip(), retries=retries, **seconds)

    def __repr__(self) -> str:
        return f"HttpLedger({self.name!r}, {self.url!r})"

    # ------------------------------------------------------------------ transport

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: str) -> Any:
        """One API call: the decoded JSON answer, or the domain error the service named."""
        problem = ""
        end = time.monotonic() + self._deadline
        attempts = 0
        while attempts <= self._retries:
            if attempts:
                pause = min(self._backoff * 2 ** (attempts - 1), BACKOFF_MAX_S) * random.uniform(0.5, 1.0)
                if time.monotonic() + pause >= end:
                    break
                time.sleep(pause)
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            attempts += 1
            try:
                response = self._client.request(
                    method, path, json=body, params=params or None, timeout=min(self._timeout, remaining)
                )
            except httpx.RequestError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.is_success:
                try:
                    return response.json()
                except ValueError:
                    raise self._unexpected(method, path, response) from None
            if response.status_code in RETRY_STATUSES:
                error = self._error(method, path, response)
                problem = f"HTTP {response.status_code}: {error.message}"
                continue
            raise self._error(method, path, response)
        raise LedgerUnavailable(
            f"ledger {self.name!r}: the bank service at {self.url} did not answer {method} {path} "
            f"after {attempts} attempts: {problem}"
        )

    def _error(self, method: str, path: str, response: httpx.Response) -> LedgerError:
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return self._unexpected(method, path, response)
        if code == "unauthorized":
            return LedgerError(
                f"ledger {self.name!r}: the bank service refused our token ({message}); "
                f"check ledgers.{self.name}.token"
            )
        if code == "invalid_request":
            cls = InvalidAmount if error.get("field") in AMOUNT_FIELDS else LedgerError
            return cls(f"ledger {self.name!r}: {message}")
        return LEDGER_ERRORS.get(code, LedgerError)(message)

    def _unexpected(self, method: str, path: str, response: httpx.Response) -> LedgerError:
        text = response.text[:200].strip()
        return LedgerError(
            f"ledger {self.name!r}: {method} {self.url}{path} answered HTTP {response.status_code} "
            f"that is not the bank service's API: {text!r}"
        )

    def _hold(self, data: Any) -> Hold:
        return self._parse(Hold, data)

    def _parse(self, model: Any, data: Any) -> Any:
        try:
            return model.model_validate({**data, "ledger": self.name})
        except (ValidationError, TypeError) as exc:
            raise LedgerError(
                f"ledger {self.name!r}: the bank service answered a {model.__name__} this "
                f"adapter does not understand: {exc}"
            ) from None

    # ------------------------------------------------------------------- accounts

    def open_account(
        self, account: str, asset: str, owner: str, balance: Decimal = Decimal(0), precision: int = 0
    ) -> AccountBalance:
        opening = as_decimal(balance, "opening balance")
        body = {
            "account": account,
            "asset": asset,
            "owner": owner,
            "balance": format(opening, "f"),
            "precision": precision,
        }
        result: AccountBalance = self._parse(AccountBalance, self._call("POST", "/accounts", body))
        return result

    def account(self, account: str) -> AccountBalance:
        result: AccountBalance = self._parse(
            AccountBalance, self._call("GET", f"/accounts/{_segment(account)}")
        )
        return result

    def balances(self) -> list[AccountBalance]:
        return [self._parse(AccountBalance, a) for a in self._call("GET", "/accounts")["accounts"]]

    # ---------------------------------------------------------------------- holds

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
        body = {
            "hold_id": hold_id,
            "account": account,
            "to_account": to_account,
            "asset": asset,
            "amount": format(as_decimal(amount, "amount"), "f"),
            "expires_at": _iso(expires_at),
            "trade_id": trade_id,
            "hashlock": hashlock,
        }
        return self._hold(self._call("POST", "/holds", body))

    def pin_hold(self, hold_id: str) -> Hold:
        return self._hold(self._call("POST", f"/holds/{_segment(hold_id)}/pin"))

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        body = {"preimage": preimage}
        return self._hold(self._call("POST", f"/holds/{_segment(hold_id)}/commit", body))

    def release_hold(self, hold_id: str) -> Hold:
        return self._hold(self._call("POST", f"/holds/{_segment(hold_id)}/release"))

    def get_hold(self, hold_id: str) -> Hold:
        return self._hold(self._call("GET", f"/holds/{_segment(hold_id)}"))

    def open_holds(self) -> list[Hold]:
        return [self._hold(h) for h in self._call("GET", "/holds", status="open")["holds"]]

    def expire_holds(self, now: datetime) -> list[Hold]:
        """Ask the bank to sweep; it never expires holds ahead of its own clock.

        A sweep retried after a lost answer returns only what the retry expired.
        """
        return [self._hold(h) for h in self._call("POST", "/holds/expire", {"now": _iso(now)})["holds"]]

    # -------------------------------------------------------------------- checks

    def verify(self) -> list[str]:
        """The bank ledger's own invariant check (``SqlLedger.verify``); empty means consistent."""
        return [str(p) for p in self._call("GET", "/verify")["problems"]]

    def close(self) -> None:
        """Close the pooled connections."""
        self._client.close()
