"""``dvp codec-server``: the codec over HTTP, for the Web UI and ``temporal --codec-endpoint``.

Temporal's remote codec protocol: ``POST /decode`` and ``POST /encode`` take a JSON
``Payloads`` (``{"payloads": [...]}``) and answer one, with CORS for the browser::

    temporal workflow show -w trade-T --codec-endpoint http://127.0.0.1:8081 \\
        --codec-auth "Bearer $(dvp auth token ops)"

Every request needs a valid token (identity's ``Verifier``: signature, issuer,
audience, expiry), in ``Authorization: Bearer`` or in the path (``/t/<token>/decode``:
the dev server's UI can be given an endpoint but no header, see docs/encryption.md).
Decoding is for operators (``[roles]``) and tokens with a role of ``[codec]
viewer_roles``; encoding, which makes payloads the workers accept, for operators
only. A browser request from an origin other than the UI's (``[codec] ui_origins``)
is refused, preflight included. Request paths are never logged: they may hold a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payloads

from domain import AuthError, Config, ConfigError
from identity import Principal, TokenIssuer, Verifier

from .codec import EncryptionCodec, load_key_ring

__all__ = [
    "UI_SUBJECT",
    "CodecServer",
    "CodecServerThread",
    "build_app",
    "origins_of",
    "serve_ui",
    "split_address",
    "ui_endpoint",
]

log = logging.getLogger("dvp.codec-server")

MAX_BODY = 4 * 1024 * 1024
ALLOWED_HEADERS = "content-type, x-namespace, authorization, authorization-extras"


@dataclass(frozen=True)
class CodecServer:
    """What the codec server needs: the codec, who may use it, and which browser origins it answers."""

    codec: EncryptionCodec
    verifier: Verifier
    origins: frozenset[str]
    operators: frozenset[str]
    operator_roles: frozenset[str]
    viewer_roles: frozenset[str]

    @classmethod
    def from_config(cls, config: Config, origins: Iterable[str] | None = None) -> CodecServer:
        """From ``[codec]``, ``[auth]`` and ``[roles]``; ``origins`` overrides ``[codec] ui_origins``.

        ``ConfigError`` if the key ring or the verification keys cannot be loaded.
        """
        # /decode of a payload that was never encrypted shows only what was in the clear
        codec = EncryptionCodec(load_key_ring(config.codec), accept_plaintext=True, hash_parties=False)
        return cls(
            codec=codec,
            verifier=Verifier.from_config(config.auth),
            origins=frozenset(config.codec.ui_origins if origins is None else origins),
            operators=frozenset(config.roles.operators),
            operator_roles=frozenset(config.roles.operator_roles),
            viewer_roles=frozenset(config.codec.viewer_roles),
        )

    def may(self, principal: Principal, action: str) -> bool:
        operator = principal.subject in self.operators or bool(self.operator_roles & set(principal.roles))
        return operator or (action == "decode" and bool(self.viewer_roles & set(principal.roles)))


def _cors(origin: str | None, server: CodecServer) -> dict[str, str]:
    if origin is None or origin not in server.origins:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Vary": "Origin",
    }


def _refuse(status: int, reason: str, headers: dict[str, str], **extra: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers={**headers, **extra})


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    path_token: str | None = request.path_params.get("token")
    return path_token


def build_app(server: CodecServer) -> Starlette:
    """The Starlette application serving ``server``."""

    async def preflight(request: Request) -> Response:
        origin = request.headers.get("origin")
        headers = _cors(origin, server)
        if not headers:
            log.warning("refused a preflight from origin %s", origin or "(none)")
            return _refuse(403, "origin not allowed", {})
        return Response(
            status_code=204,
            headers={
                **headers,
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    async def convert(request: Request) -> Response:
        action = "encode" if request.url.path.endswith("/encode") else "decode"
        origin = request.headers.get("origin")
        cors = _cors(origin, server)
        # A browser always names the page's origin; only a browser page can be tricked
        # into calling us, so any origin but the UI's is refused. Tools send none.
        if origin is not None and not cors:
            log.warning("refused %s from origin %s", action, origin)
            return _refuse(403, "origin not allowed", {})
        try:
            principal = server.verifier.verify(_token(request), datetime.now(UTC))
        except AuthError as exc:
            log.warning("refused %s (origin %s): %s", action, origin or "-", exc)
            return _refuse(401, str(exc), cors, **{"WWW-Authenticate": 'Bearer realm="dvp-codec"'})
        if not server.may(principal, action):
            log.warning("refused %s for %s: not permitted", action, principal.subject)
            needed = "an operator" if action == "encode" else "an operator or a codec viewer"
            return _refuse(403, f"{principal.subject} may not {action}: only {needed} may", cors)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _refuse(415, "expected Content-Type: application/json", cors)
        body = await request.body()
        if len(body) > MAX_BODY:
            return _refuse(413, f"body larger than {MAX_BODY} bytes", cors)
        try:
            payloads = json_format.Parse(body, Payloads())
        except json_format.ParseError as exc:
            return _refuse(400, f"not a JSON Payloads object: {exc}", cors)
        codec = server.codec
        done = await (codec.encode if action == "encode" else codec.decode)(payloads.payloads)
        log.info(
            "%s %d payloads for %s (origin %s, namespace %s)",
            action,
            len(done),
            principal.subject,
            origin or "-",
            request.headers.get("x-namespace", "-"),
        )
        text = json_format.MessageToJson(Payloads(payloads=done))
        return Response(text, media_type="application/json", headers=cors)

    routes = [
        Route(path, endpoint, methods=[method])
        for prefix in ("", "/t/{token}")
        for path in (f"{prefix}/decode", f"{prefix}/encode")
        for endpoint, method in ((convert, "POST"), (preflight, "OPTIONS"))
    ]
    return Starlette(routes=routes)


class CodecServerThread:
    """The codec server on ``host:port`` in a thread of this process (``dvp server``, the demo, tests)."""

    def __init__(self, server: CodecServer, host: str, port: int) -> None:
        import uvicorn

        self.host, self.port = host, port
        # access_log off: a request's path may carry a token
        config = uvicorn.Config(
            build_app(server), host=host, port=port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="dvp-codec-server", daemon=True)
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve())
        except BaseException as exc:  # reported by start()
            self._failed = exc

    def start(self, timeout: float = 15.0) -> CodecServerThread:
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > timeout:
                raise OSError(f"the codec server did not start on {self.host}:{self.port}: {self._failed}")
            self._thread.join(0.05)
            waited += 0.05
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(RuntimeError):
            self._thread.join(10)

    def __enter__(self) -> CodecServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[codec] server``) as a pair."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def origins_of(ui_url: str) -> Sequence[str]:
    """The origins a browser may show for a UI at ``ui_url`` (127.0.0.1 is also ``localhost``)."""
    origins = [ui_url]
    if "://127.0.0.1:" in ui_url:
        origins.append(ui_url.replace("://127.0.0.1:", "://localhost:"))
    return origins


UI_SUBJECT = "dvp-web-ui"
"""The subject of the token ``ui_endpoint`` makes for the dev server's Web UI."""


def ui_endpoint(config: Config, url: str, *, ttl: timedelta = timedelta(hours=12)) -> tuple[str, datetime]:
    """The codec endpoint to give the dev server's Web UI, and when its token expires.

    The dev server's UI sends no header of its own (``docs/encryption.md``), so the
    endpoint carries a token in its path: one of the local development issuer, for
    ``UI_SUBJECT`` with the first of ``[codec] viewer_roles`` (decode only), valid
    ``ttl`` (at most ``[auth] max_token_lifetime``). ``ConfigError`` if there is no
    local issuer key to sign it with, or no viewer role to give it.
    """
    if not config.codec.viewer_roles:
        raise ConfigError("codec.viewer_roles: empty, so no token could let the Web UI decode")
    ttl = min(ttl, config.auth.max_token_lifetime)
    token = TokenIssuer.from_config(config.auth).issue(UI_SUBJECT, [config.codec.viewer_roles[0]], ttl=ttl)
    return f"{url}/t/{token}", datetime.now(UTC) + ttl


def serve_ui(
    config: Config, ui_url: str, address: str | None = None
) -> tuple[CodecServerThread, str, datetime]:
    """Start the codec server in this process for the dev server's Web UI at ``ui_url``.

    It listens on ``address`` (default ``[codec] server``) and answers that UI's origin
    only. Returns it, the endpoint to give the UI (``ui_endpoint``) and when the UI's
    token expires. ``ConfigError`` for a key that cannot be loaded, ``OSError`` when it
    cannot listen.
    """
    host, port = split_address(address or config.codec.server)
    server = CodecServer.from_config(config, origins=origins_of(ui_url))
    endpoint, expires = ui_endpoint(config, f"http://{host}:{port}")
    return CodecServerThread(server, host, port).start(), endpoint, expires
