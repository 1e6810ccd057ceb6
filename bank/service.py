"""The bank's core-ledger service: a ledger of accounts and holds behind a REST API.

    dvp bank serve [--config FILE] [--port N] [--metrics-port N]   (or python -m bank serve ...)

A small ASGI app (FastAPI) over one ledger, normally the SQL ledger (SQLite by
default, PostgreSQL when its URL says so), where the bank keeps its state. The
settlement engine reaches it through ``adapters.http.HttpLedger`` (a ledger of kind
``http``), so the cash leg of a trade can settle on a system the engine does not own.

Endpoints (JSON; amounts are decimal strings, never numbers; times ISO 8601):

    GET  /health                      no token needed
    GET  /accounts                    {"accounts": [balance, ...]}
    GET  /accounts/{id}               balance
    POST /accounts                    open (idempotent): account, asset, owner, balance?, precision?
    POST /holds                       place: hold_id, account, to_account, asset, amount,
                                      expires_at (ISO or null), trade_id?, hashlock?
    GET  /holds?status=open           {"holds": [hold, ...]}
    GET  /holds/{id}                  hold
    POST /holds/{id}/pin              hold
    POST /holds/{id}/commit           hold; optional body {"preimage": hex}
    POST /holds/{id}/release          hold
    POST /holds/expire                {"holds": [expired, ...]}; optional body {"now": ISO}
    GET  /verify                      {"problems": [...]}: the ledger's invariant check

Every endpoint but ``/health`` needs ``Authorization: Bearer <token>``; without a
valid one the answer is 401 and nothing runs. Every error is
``{"error": {"code", "message"[, "field"]}}``; the codes are the stable codes of
``domain.LEDGER_ERRORS`` plus ``unauthorized``, ``invalid_request`` (names the
``field``), ``not_found``, ``method_not_allowed`` and ``internal``. Every write is
idempotent on its key (the account id, the hold id), so a client may retry any call.

Configuration, a TOML file of its own (``--config``, else ``$DVP_BANK_CONFIG``)::

    [bank]
    url = "sqlite:///.dvp/bank.db"     # or postgresql+psycopg://user@host/db
    host = "127.0.0.1"
    port = 8081
    name = "bank"                      # the ledger's name in its answers

    [bank.tokens]                      # client name = bearer token
    dvp-worker = "secret-token"

Every request is a span (OpenTelemetry's FastAPI instrumentation) that joins the
caller's trace when the request carries its context (``traceparent``, as the engine's
``HttpLedger`` sends), exported by the standard ``OTEL_*`` variables
(``connection.telemetry``); paths in spans name the route, never the account or hold.
``--metrics-port N`` serves Prometheus metrics at ``http://127.0.0.1:N/metrics``: the
requests by route and status, and the open holds and held amounts by asset
(docs/operations.md, "Metrics").
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters import Ledger
from adapters.http import redact_span, redacted_path
from connection.telemetry import configure_tracing, flush_tracing
from domain import (
    AccountBalance,
    AssetMismatch,
    ConfigError,
    Hold,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerError,
    LedgerUnavailable,
    UnknownAccount,
    UnknownHold,
)

__all__ = ["BankConfig", "add_parser", "create_app", "load_bank_config", "main", "serve"]

log = logging.getLogger("dvp.bank")

OPEN_PATHS = frozenset({"/health"})
STATUS_BY_ERROR: dict[type[LedgerError], int] = {
    UnknownAccount: 404,
    UnknownHold: 404,
    IdempotencyConflict: 409,
    HoldNotOpen: 409,
    InsufficientFunds: 422,
    InvalidAmount: 422,
    AssetMismatch: 422,
    LedgerUnavailable: 503,
}
"""HTTP status per ledger error; any other ``LedgerError`` is 422 (the request was refused)."""


# --------------------------------------------------------------------- errors


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The one error shape of the service: ``{"error": {"code", "message"[, "field"]}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


def _status_of(exc: LedgerError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 422


def _field_of(error: Mapping[str, Any]) -> str:
    # ("body", "amount") -> "amount"; ("query", "status") -> "status"; ("body",) -> "body"
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid" or len(loc) < 2:
        return "body"
    return ".".join(str(p) for p in loc[1:])


def _validation_message(error: Mapping[str, Any], field: str) -> str:
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', message)}"
    if error.get("type") == "missing":
        return f"{field}: required, but missing"
    if "input" in error and error.get("type") != "extra_forbidden":
        return f"{field}: {message} (got {error['input']!r})"
    return f"{field}: {message}"


# --------------------------------------------------------------------- bodies


def _decimal_string(value: Any) -> Decimal:
    if not isinstance(value, str):
        kind = "a float" if isinstance(value, float) else f"a JSON {type(value).__name__}"
        raise ValueError(f'must be a decimal string such as "100.50", not {kind}')
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise ValueError("is not a decimal number") from None
    if not amount.is_finite():
        raise ValueError("is not a finite number")
    return amount


DecimalString = Annotated[Decimal, BeforeValidator(_decimal_string)]
"""A decimal amount that arrived as a JSON string (a JSON number is refused)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAccountBody(_Body):
    account: str = Field(min_length=1)
    asset: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    balance: DecimalString = Decimal(0)
    precision: StrictInt = Field(default=0, ge=0, le=18)

    @field_validator("balance")
    @classmethod
    def _not_negative(cls, value: Decimal) -> Decimal:
        if value < 0:
            raise ValueError("an opening balance cannot be negative")
        return value


class PlaceHoldBody(_Body):
    hold_id: str = Field(min_length=1)
    account: str = Field(min_length=1)
    to_account: str = Field(min_length=1)
    asset: str = Field(min_length=1)
    amount: DecimalString
    # Required, though it may be null: a forgotten expiry must not silently pin a hold.
    expires_at: AwareDatetime | None
    trade_id: str = ""
    hashlock: str | None = None

    @field_validator("amount")
    @classmethod
    def _positive(cls, value: Decimal) -> Decimal:
        if value <= 0:
            raise ValueError("must be positive")
        return value


class CommitBody(_Body):
    preimage: str | None = None


class ExpireBody(_Body):
    now: AwareDatetime | None = None


class AccountList(BaseModel):
    accounts: list[AccountBalance]


class HoldList(BaseModel):
    holds: list[Hold]


class Problems(BaseModel):
    problems: list[str]


# ----------------------------------------------------------------------- auth


class BearerAuth:
    """ASGI middleware: every path but ``OPEN_PATHS`` needs a known bearer token.

    It answers 401 before routing, so an unauthenticated request reaches neither
    body parsing nor the ledger. The client's name goes to ``request.state.client``.
    """

    def __init__(self, app: ASGIApp, tokens: Mapping[str, str]) -> None:
        self.app = app
        self._tokens = [(token.encode(), client) for token, client in tokens.items()]

    def _client(self, scope: Scope) -> str | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        found = None
        for known, client in self._tokens:  # compare with every token, in constant time
            if hmac.compare_digest(known, token.strip()):
                found = client
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = self._client(scope)
        if client is None:
            response = error_response(
                401,
                "unauthorized",
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


# -------------------------------------------------------------------- metrics


class BankMetrics(Collector):
    """The service's Prometheus metrics: requests counted as they end, holds read at each scrape."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dvp_bank_requests",
            "Requests by method, route (ids replaced by placeholders) and HTTP status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(self)

    def collect(self) -> Any:
        holds = GaugeMetricFamily(
            "dvp_open_holds", "Open holds by ledger and asset", labels=["ledger", "asset"]
        )
        held = GaugeMetricFamily(
            "dvp_held_amount", "Amount held by open holds, by ledger and asset", labels=["ledger", "asset"]
        )
        totals: dict[str, tuple[int, Decimal]] = {}
        for hold in self.ledger.open_holds():
            count, amount = totals.get(hold.asset, (0, Decimal(0)))
            totals[hold.asset] = (count + 1, amount + hold.amount)
        for asset, (count, amount) in sorted(totals.items()):
            holds.add_metric([self.ledger.name, asset], count)
            held.add_metric([self.ledger.name, asset], float(amount))
        yield holds
        yield held

    def serve(self, port: int, host: str) -> None:
        """Serve ``/metrics`` on ``host:port`` from a thread of this process."""
        start_http_server(port, addr=host, registry=self.registry)


class CountRequests:
    """ASGI middleware: count each request by method, redacted route and status."""

    def __init__(self, app: ASGIApp, metrics: BankMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "500"

        async def send_counted(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(scope["method"], redacted_path(scope["path"]), status).inc()


def _redact_server_span(span: Span, scope: dict[str, Any]) -> None:
    redact_span(span)


# ------------------------------------------------------------------------ app


def create_app(ledger: Ledger, tokens: Mapping[str, str], metrics: BankMetrics | None = None) -> FastAPI:
    """The service over ``ledger``; ``tokens`` maps each bearer token to its client's name.

    ``metrics``, when given, counts every request.

    The ledger's calls are synchronous: the endpoints are plain ``def`` functions, so
    FastAPI runs each in its thread pool and the event loop never blocks.
    """
    if not tokens:
        raise ConfigError("bank.tokens: no client tokens; every endpoint but /health needs one")
    app = FastAPI(
        title="dvp bank ledger",
        summary="A bank's core ledger: accounts and holds, for delivery-versus-payment settlement",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BearerAuth, tokens=dict(tokens))
    if metrics is not None:
        app.add_middleware(CountRequests, metrics=metrics)
    # Outermost: a refused token is a span too. The hook runs once the span has its
    # attributes, before the request is handled.
    FastAPIInstrumentor.instrument_app(
        app,
        server_request_hook=_redact_server_span,
        excluded_urls="/health",
        exclude_spans=["receive", "send"],
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The first problem names "field"; "errors" lists every problem found.
        found = [(_field_of(e), e) for e in exc.errors()] or [("body", {"msg": "invalid request"})]
        errors = [{"field": f, "message": _validation_message(e, f)} for f, e in found]
        first = errors[0]
        return error_response(422, "invalid_request", first["message"], first["field"], errors=errors)

    @app.exception_handler(LedgerError)
    async def _refused(request: Request, exc: LedgerError) -> JSONResponse:
        status = _status_of(exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        return error_response(status, exc.code, exc.message, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server logs the traceback.
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")

    def client(request: Request) -> str:
        return str(getattr(request.state, "client", "?"))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "ledger": ledger.name}

    @app.get("/accounts", response_model=AccountList)
    def list_accounts() -> AccountList:
        return AccountList(accounts=ledger.balances())

    @app.get("/accounts/{account_id:path}", response_model=AccountBalance)
    def get_account(account_id: str) -> AccountBalance:
        return ledger.account(account_id)

    @app.post("/accounts", response_model=AccountBalance)
    def open_account(body: OpenAccountBody, request: Request) -> AccountBalance:
        log.info("bank: %s opens account %s", client(request), body.account)
        return ledger.open_account(body.account, body.asset, body.owner, body.balance, body.precision)

    @app.post("/holds", response_model=Hold)
    def place_hold(body: PlaceHoldBody, request: Request) -> Hold:
        log.info("bank: %s places hold %s", client(request), body.hold_id)
        return ledger.place_hold(
            body.hold_id,
            body.account,
            body.to_account,
            body.asset,
            body.amount,
            body.expires_at,
            body.trade_id,
            body.hashlock,
        )

    @app.get("/holds", response_model=HoldList)
    def list_holds(status: Literal["open"] = "open") -> HoldList:
        return HoldList(holds=ledger.open_holds())

    # Declared before the ``{hold_id:path}`` routes; a hold named "expire" is still
    # reachable as /holds/expire/commit and so on.
    @app.post("/holds/expire", response_model=HoldList)
    def expire_holds(request: Request, body: Annotated[ExpireBody | None, Body()] = None) -> HoldList:
        # The bank trusts its own clock: a client's "now" may sweep less, never more.
        now = datetime.now(UTC)
        if body is not None and body.now is not None:
            now = min(now, body.now)
        return HoldList(holds=ledger.expire_holds(now))

    @app.get("/holds/{hold_id:path}", response_model=Hold)
    def get_hold(hold_id: str) -> Hold:
        return ledger.get_hold(hold_id)

    @app.post("/holds/{hold_id:path}/pin", response_model=Hold)
    def pin_hold(hold_id: str, request: Request) -> Hold:
        log.info("bank: %s pins hold %s", client(request), hold_id)
        return ledger.pin_hold(hold_id)

    @app.post("/holds/{hold_id:path}/commit", response_model=Hold)
    def commit_hold(
        hold_id: str, request: Request, body: Annotated[CommitBody | None, Body()] = None
    ) -> Hold:
        log.info("bank: %s commits hold %s", client(request), hold_id)
        return ledger.commit_hold(hold_id, body.preimage if body else None)

    @app.post("/holds/{hold_id:path}/release", response_model=Hold)
    def release_hold(hold_id: str, request: Request) -> Hold:
        log.info("bank: %s releases hold %s", client(request), hold_id)
        return ledger.release_hold(hold_id)

    @app.get("/verify", response_model=Problems)
    def verify() -> Problems | JSONResponse:
        check: Callable[[], list[str]] | None = getattr(ledger, "verify", None)
        if check is None:
            return error_response(501, "not_implemented", f"ledger {ledger.name!r} has no invariant check")
        return Problems(problems=check())

    return app


# --------------------------------------------------------------------- config


class _BankSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "sqlite:///.dvp/bank.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    name: str = Field(default="bank", min_length=1)
    pool_size: int | None = Field(default=None, ge=1)
    max_overflow: int | None = Field(default=None, ge=0)
    tokens: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class BankConfig:
    """The service's configuration: where its ledger is, where it listens, who may call."""

    url: str
    host: str
    port: int
    name: str
    tokens: dict[str, str]  # token -> client name
    ledger_options: dict[str, int]

    def open_ledger(self) -> Ledger:
        from adapters.sql import SqlLedger

        return SqlLedger(self.name, self.url, **self.ledger_options)


def parse_bank_config(data: Mapping[str, Any], source: str = "bank configuration") -> BankConfig:
    """``BankConfig`` from a parsed TOML document; ``ConfigError`` names the bad key."""
    unknown = sorted(set(data) - {"bank"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown section (the bank service reads [bank])")
    try:
        section = _BankSection.model_validate(data.get("bank", {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in ("bank", *first["loc"]))
        raise ConfigError(f"{source}: {field}: {first['msg']}") from None
    tokens: dict[str, str] = {}
    for client, token in section.tokens.items():
        if not token.strip():
            raise ConfigError(f"{source}: bank.tokens.{client}: the token is empty")
        if token in tokens:
            raise ConfigError(
                f"{source}: bank.tokens.{client}: same token as client {tokens[token]!r}; "
                "give every client its own"
            )
        tokens[token] = client
    if not tokens:
        raise ConfigError(
            f'{source}: bank.tokens: no client tokens; add e.g. [bank.tokens] dvp-worker = "<secret>"'
        )
    options = {k: v for k in ("pool_size", "max_overflow") if (v := getattr(section, k)) is not None}
    return BankConfig(section.url, section.host, section.port, section.name, tokens, options)


def load_bank_config(path: str | os.PathLike[str] | None = None) -> BankConfig:
    """Load ``path``, else ``$DVP_BANK_CONFIG``."""
    path = path or os.environ.get("DVP_BANK_CONFIG")
    if not path:
        raise ConfigError(
            "the bank service needs its configuration: give --config FILE or set DVP_BANK_CONFIG"
        )
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"bank configuration file {file} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse_bank_config(data, str(file))


# ---------------------------------------------------------------------- serve


def serve(
    config_path: str | os.PathLike[str] | None = None,
    port: int | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run the service with uvicorn until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    config = load_bank_config(config_path)
    listen = config.port if port is None else port
    if not 0 <= listen <= 65535:
        raise ConfigError(f"--port: {listen} is not a TCP port (0 to 65535)")
    if metrics_port is not None and not 1 <= metrics_port <= 65535:
        raise ConfigError(f"--metrics-port: {metrics_port} is not a TCP port (1 to 65535)")
    configure_tracing("dvp-bank")
    ledger = config.open_ledger()
    try:
        metrics = None
        if metrics_port is not None:
            metrics = BankMetrics(ledger)
            try:
                metrics.serve(metrics_port, config.host)
            except OSError as exc:
                raise ConfigError(
                    f"--metrics-port: cannot listen on {metrics_port}: {exc.strerror}"
                ) from None
            log.info("metrics on http://%s:%d/metrics", config.host, metrics_port)
        app = create_app(ledger, config.tokens, metrics)
        log.info("bank ledger %r on %r for clients %s", config.name, ledger, sorted(config.tokens.values()))
        uvicorn.run(app, host=config.host, port=listen, log_level="info", lifespan="off")
    finally:
        flush_tracing()
        ledger.close()


def cmd_serve(args: argparse.Namespace) -> int:
    serve(args.bank_config, args.port, args.metrics_port)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bank serve [--config FILE] [--port N] [--metrics-port N]`` on the dvp CLI's subparsers.

    The handler (``args.handler``) returns an exit code; a ``ConfigError`` propagates
    to the CLI, which reports it and exits 2.
    """
    bank = subparsers.add_parser(
        "bank",
        help="the bank's core-ledger service (a ledger of kind http)",
        description=__doc__.split("\n\n")[0],
    )
    commands = bank.add_subparsers(dest="bank_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "serve",
        help="serve the bank's ledger over HTTP until interrupted",
        description="Serve the bank's ledger over HTTP until interrupted.",
    )
    # Not dest="config": the dvp CLI's own --config names the engine's configuration.
    p.add_argument(
        "--config", dest="bank_config", metavar="FILE", help="the service's TOML (default: $DVP_BANK_CONFIG)"
    )
    p.add_argument("--port", type=int, help="listen on this port (default: bank.port in the file, else 8081)")
    p.add_argument(
        "--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port (at /metrics)"
    )
    p.set_defaults(handler=cmd_serve)
    return bank


def main(argv: list[str] | None = None) -> int:
    """``python -m bank serve ...``: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="dvp")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    # ``bank`` is implied here: accept both `serve ...` and `bank serve ...`.
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv if argv[:1] == ["bank"] else ["bank", *argv])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"dvp bank: configuration: {exc}", file=sys.stderr)
        return 2
    except LedgerError as exc:
        print(f"dvp bank: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
