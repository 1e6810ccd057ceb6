"""The test issuer: an Ed25519 key pair made once per test session, and tokens it signs.

Every engine the tests start trusts it (``auth_section`` goes into their
configuration), so a test acts as anyone by asking for that party's token:
``token("alice")``, or ``engine.acting("alice")`` for a client that sends it.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain import parse_config
from identity import TokenIssuer

TEST_ISSUER = "dvp-test"
TEST_KID = "test-1"


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new Ed25519 key pair as ``<name>.pem`` and ``<name>.pub.pem`` under ``directory``."""
    key = Ed25519PrivateKey.generate()
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@functools.cache
def _keys() -> tuple[Path, Path]:
    directory = Path(tempfile.mkdtemp(prefix="dvp-test-issuer-"))
    return write_key_pair(directory, "issuer")


def auth_section() -> dict[str, Any]:
    """The ``[auth]`` of every test engine: the test issuer's key, which also signs."""
    private, public = _keys()
    return {
        "issuers": [TEST_ISSUER],
        "keys": [{"kid": TEST_KID, "public_key": str(public)}],
        "signing_key": str(private),
        "signing_kid": TEST_KID,
    }


def auth_toml() -> str:
    """``auth_section`` as the ``[auth]`` of a TOML configuration file."""
    section = auth_section()
    lines = ["[auth]", *(f"{k} = {json.dumps(v)}" for k, v in section.items() if k != "keys")]
    for key in section["keys"]:
        lines += ["", "[[auth.keys]]", *(f"{k} = {json.dumps(v)}" for k, v in key.items())]
    return "\n".join(lines) + "\n"


@functools.cache
def _issuer() -> TokenIssuer:
    config = parse_config({"ledgers": {}, "auth": auth_section()})
    return TokenIssuer.from_config(config.auth)


def token(
    subject: str, roles: Sequence[str] = (), ttl: timedelta = timedelta(hours=1), now: datetime | None = None
) -> str:
    """A token for ``subject`` signed by the test issuer (issued at ``now``, default the clock)."""
    return _issuer().issue(subject, roles, ttl=ttl, now=now)


@pytest.fixture(scope="session")
def tokens() -> Callable[..., str]:
    """``tokens("alice")``: a token for alice signed by the test issuer."""
    return token


__all__ = ["TEST_ISSUER", "TEST_KID", "auth_section", "auth_toml", "token", "tokens", "write_key_pair"]
