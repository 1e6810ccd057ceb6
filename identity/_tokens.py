"""Signed tokens: the verifier every acting request passes, and the issuer ``dvp auth token`` uses.

A token is a JWT signed with EdDSA or ES256 by a key the configuration names by its
``kid``. The verifier checks, in this order, and refuses on the first doubt with one
``AuthError``: its length, that it is a JWT, its algorithm (pinned), its kid (a
known key, of that algorithm), the signature, the audience, the issuer (accepted,
and the one its key may speak for), the key's retirement, expiry and lifetime
against the ``now`` the caller passes (a workflow passes ``workflow.now()``, so the
same history gives the same verdict on replay), and the subject and roles.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain import LOCAL_ISSUER, AuthConfig, AuthError, ConfigError

from ._keys import (
    ALGORITHMS,
    PrivateKey,
    VerificationKey,
    algorithm_of,
    key_id,
    load_private_pem,
    local_issuer_key,
    verification_keys,
)

__all__ = [
    "MAX_ROLES",
    "MAX_ROLE_LENGTH",
    "MAX_SUBJECT_LENGTH",
    "MAX_TOKEN_LENGTH",
    "Principal",
    "TokenIssuer",
    "Verifier",
    "check_subject",
    "unverified_claims",
]

MAX_TOKEN_LENGTH = 4096
"""A token longer than this is refused before anything else is looked at."""
MAX_SUBJECT_LENGTH = 128
MAX_ROLES = 32
MAX_ROLE_LENGTH = 64
# A token may be used this long before its iat or nbf (clocks of issuer and server differ).
CLOCK_SKEW = timedelta(seconds=60)

_NAME = re.compile(r"[^\x00-\x1f\x7f]+")  # printable: no control characters


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str
    roles: tuple[str, ...]
    issuer: str
    kid: str
    expires_at: datetime


def check_subject(subject: Any, what: str = "subject") -> str:
    """A subject name: a non-empty string of at most 128 printable characters; ``AuthError`` otherwise."""
    if not isinstance(subject, str) or not subject or not _NAME.fullmatch(subject):
        raise AuthError(f"{what}: must be a non-empty string of printable characters")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise AuthError(f"{what}: longer than {MAX_SUBJECT_LENGTH} characters")
    return subject


def _roles(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ROLES:
        raise AuthError(f"token: roles must be a list of at most {MAX_ROLES} names")
    for role in value:
        if not isinstance(role, str) or not role or len(role) > MAX_ROLE_LENGTH or not _NAME.fullmatch(role):
            raise AuthError(f"token: a role must be a name of 1 to {MAX_ROLE_LENGTH} printable characters")
    return tuple(value)


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthError(f"token: claim {name!r} must be a number of seconds since the epoch")
    return float(value)


def _at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def _import_signature_errors() -> None:
    """Have cryptography import the exception it raises for a bad signature, here and now.

    Its Rust core imports ``InvalidSignature`` lazily, the first time it raises it; in
    a workflow's sandbox that import fails and aborts the whole process. A verifier
    is built outside any sandbox (a worker starting), so it makes that first raise.
    """
    for verify in (
        lambda: Ed25519PrivateKey.generate().public_key().verify(b"\0" * 64, b""),
        lambda: (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .verify(b"0\x06\x02\x01\x01\x02\x01\x01", b"", ec.ECDSA(hashes.SHA256()))
        ),
    ):
        with contextlib.suppress(InvalidSignature):
            verify()


class Verifier:
    """Checks tokens against known keys, accepted issuers and one audience. Holds no state but those.

    ``verify`` is deterministic: the same token, keys and ``now`` give the same answer,
    so a workflow may call it in a handler that re-runs on replay.
    """

    def __init__(
        self,
        keys: Iterable[VerificationKey],
        *,
        issuers: Sequence[str],
        audience: str,
        max_lifetime: timedelta = timedelta(days=1),
    ) -> None:
        _import_signature_errors()
        self._keys = {key.kid: key for key in keys}
        self._issuers = frozenset(issuers)
        self._audience = audience
        self._max_lifetime = max_lifetime.total_seconds()

    @classmethod
    def from_config(cls, auth: AuthConfig) -> Verifier:
        """The verifier ``[auth]`` describes; ``ConfigError`` if it names no key at all, or a bad one."""
        keys = verification_keys(auth)
        if not keys:
            raise ConfigError(
                "auth: no key to verify tokens with: give keys (PEM files), jwks, or local_issuer = true"
            )
        issuers = [*auth.issuers, *([LOCAL_ISSUER] if auth.local_issuer else [])]
        return cls(keys, issuers=issuers, audience=auth.audience, max_lifetime=auth.max_token_lifetime)

    @property
    def kids(self) -> list[str]:
        """The kids of the known keys."""
        return sorted(self._keys)

    def verify(self, token: Any, now: datetime) -> Principal:
        """The principal ``token`` speaks for at ``now``; ``AuthError`` saying which check failed."""
        if not isinstance(token, str) or not token:
            raise AuthError("token: missing")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(f"token: longer than {MAX_TOKEN_LENGTH} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("token: not a signed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise AuthError(f"token: algorithm {str(algorithm)[:16]!r} is not accepted (only EdDSA, ES256)")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError(f"token: signed by an unknown key (kid {str(kid)[:64]!r})")
        if key.algorithm != algorithm:
            raise AuthError(f"token: key {key.kid} verifies {key.algorithm}, not {algorithm}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self._audience,
                options={
                    # checked below against the caller's `now`, never the system clock
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_iss": False,
                    "require": ["sub", "iss", "aud", "exp", "iat"],
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("token: signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"token: not for this audience ({self._audience})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token: claim {exc.claim!r} is missing") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"token: {exc}") from None
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer not in self._issuers:
            raise AuthError(f"token: issuer {str(issuer)[:64]!r} is not accepted")
        if key.issuer is not None and issuer != key.issuer:
            raise AuthError(f"token: key {key.kid} does not sign for issuer {issuer[:64]!r}")
        at = now.timestamp()
        if key.not_after is not None and now > key.not_after:
            raise AuthError(f"token: key {key.kid} was retired at {key.not_after.isoformat()}")
        expires, issued = _number(claims, "exp"), _number(claims, "iat")
        if at >= expires:
            raise AuthError(f"token: expired at {_at(expires)}")
        if issued > at + CLOCK_SKEW.total_seconds():
            raise AuthError(f"token: issued in the future ({_at(issued)})")
        if "nbf" in claims and _number(claims, "nbf") > at + CLOCK_SKEW.total_seconds():
            raise AuthError(f"token: not valid before {_at(_number(claims, 'nbf'))}")
        if expires - issued > self._max_lifetime:
            raise AuthError("token: its lifetime (exp - iat) is longer than this engine accepts")
        subject = check_subject(claims.get("sub"), "token: subject")
        return Principal(
            subject=subject,
            roles=_roles(claims.get("roles")),
            issuer=issuer,
            kid=key.kid,
            expires_at=datetime.fromtimestamp(expires, UTC),
        )


class TokenIssuer:
    """Signs tokens with one private key: ``[auth] signing_key``, else the local development issuer's."""

    def __init__(self, key: PrivateKey, *, kid: str, issuer: str, audience: str) -> None:
        self._key = key
        self._algorithm = algorithm_of(key, "signing key")
        self.kid = kid
        self.issuer = issuer
        self.audience = audience

    @classmethod
    def from_config(cls, auth: AuthConfig) -> TokenIssuer:
        """The issuer ``[auth]`` configures; ``ConfigError`` when it has no private key."""
        if auth.signing_key and auth.signing_kid:
            key = load_private_pem(auth.signing_key, "auth.signing_key")
            return cls(key, kid=auth.signing_kid, issuer=auth.issuers[0], audience=auth.audience)
        if auth.local_issuer:
            local = local_issuer_key(auth.local_keys)
            kid = f"local-{key_id(local.public_key())}"
            return cls(local, kid=kid, issuer=LOCAL_ISSUER, audience=auth.audience)
        raise ConfigError(
            "auth: no private key to sign tokens with: set signing_key and signing_kid, "
            "or local_issuer = true (the development issuer)"
        )

    def issue(
        self,
        subject: str,
        roles: Sequence[str] = (),
        *,
        ttl: timedelta = timedelta(hours=1),
        now: datetime | None = None,
    ) -> str:
        """A token for ``subject`` with ``roles``, valid for ``ttl`` from ``now`` (default: the clock)."""
        check_subject(subject)
        _roles(list(roles))
        if ttl <= timedelta(0):
            raise AuthError("ttl: must be a positive duration")
        issued = now or datetime.now(UTC)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": int(issued.timestamp()),
            "exp": int((issued + ttl).timestamp()),
        }
        if roles:
            claims["roles"] = list(roles)
        return jwt.encode(claims, self._key, algorithm=self._algorithm, headers={"kid": self.kid})


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of ``token`` read WITHOUT checking its signature: never the basis of a decision.

    For a client's courtesy checks of its own token before it sends anything (is it
    expired? is it the ``--as`` party's?); the engine verifies every token itself.
    ``AuthError`` if ``token`` is not a JWT.
    """
    if not isinstance(token, str) or not token:
        raise AuthError("token: missing")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthError(f"token: longer than {MAX_TOKEN_LENGTH} characters")
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise AuthError("token: not a signed JWT") from None
    return claims
