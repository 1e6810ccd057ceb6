"""Keys: the public keys that verify tokens, the private key that signs them, the local issuer's pair.

Only two kinds of key are accepted, each with its one algorithm: Ed25519 (``EdDSA``)
and NIST P-256 (``ES256``). A key of any other kind is refused where it is loaded,
so a token can never be checked with an algorithm the configuration did not mean.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from domain import LOCAL_ISSUER, AuthConfig, ConfigError

__all__ = [
    "ALGORITHMS",
    "LOCAL_KEY_FILE",
    "PrivateKey",
    "PublicKey",
    "VerificationKey",
    "algorithm_of",
    "key_id",
    "load_private_pem",
    "load_public_pem",
    "local_issuer_key",
    "verification_keys",
]

ALGORITHMS = ("EdDSA", "ES256")
"""The only JWT algorithms dvp accepts, each tied to its kind of key."""

LOCAL_KEY_FILE = "local-ed25519.pem"
"""The local development issuer's private key, in ``[auth] local_keys``."""

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class VerificationKey:
    """A public key known by its ``kid``: the algorithm it verifies and the issuer it may speak for."""

    kid: str
    algorithm: str
    key: PublicKey
    issuer: str | None = None  # None: any accepted issuer
    not_after: datetime | None = None  # tokens are refused after this instant


def algorithm_of(key: PublicKey | PrivateKey, what: str) -> str:
    """``EdDSA`` for an Ed25519 key, ``ES256`` for a P-256 key; ``ConfigError`` naming ``what`` otherwise."""
    if isinstance(key, (Ed25519PublicKey, Ed25519PrivateKey)):
        return "EdDSA"
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return "ES256"
    raise ConfigError(f"{what}: not an Ed25519 or P-256 key (only EdDSA and ES256 are accepted)")


def key_id(key: PublicKey) -> str:
    """A stable kid for a public key: the first 16 hex digits of the SHA-256 of its DER form."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {path}: {exc.strerror}") from None


def load_public_pem(path: str | Path, what: str) -> PublicKey:
    """A PEM public key (or the public half of a PEM private key) from ``path``."""
    data = _read(path, what)
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise ConfigError(f"{what}: {path} is not a PEM public key") from None
    algorithm_of(key, what)
    return cast(PublicKey, key)


def load_private_pem(path: str | Path, what: str) -> PrivateKey:
    """An unencrypted PEM private key from ``path``."""
    data = _read(path, what)
    try:
        key: Any = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{what}: {path} is not an unencrypted PEM private key") from None
    algorithm_of(key, what)
    return cast(PrivateKey, key)


def _jwks_keys(path: str, what: str) -> list[VerificationKey]:
    try:
        document = json.loads(_read(path, what))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: {path} is not valid JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{what}: {path} has no 'keys' list")
    keys: list[VerificationKey] = []
    for i, jwk in enumerate(entries):
        where = f"{what}: {path}: keys[{i}]"
        if not isinstance(jwk, dict):
            raise ConfigError(f"{where}: not a JSON object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f"{where}.kid: is required (tokens name their key by kid)")
        if jwk.get("use", "sig") != "sig":
            raise ConfigError(f"{where}.use: {jwk.get('use')!r} is not a signing key")
        kty, crv = jwk.get("kty"), jwk.get("crv")
        try:
            if kty == "OKP" and crv == "Ed25519":
                key: Any = OKPAlgorithm.from_jwk(jwk)
            elif kty == "EC" and crv == "P-256":
                key = ECAlgorithm.from_jwk(jwk)
            else:
                raise ConfigError(
                    f"{where}: kty {kty!r} crv {crv!r}: only OKP Ed25519 and EC P-256 are accepted"
                )
        except ConfigError:
            raise
        except Exception as exc:  # PyJWT raises several kinds for a malformed JWK
            raise ConfigError(f"{where}: not a valid JWK: {exc}") from None
        if isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
            raise ConfigError(f"{where}: holds a private key; a JWKS file lists public keys only")
        algorithm = algorithm_of(key, where)
        if jwk.get("alg", algorithm) != algorithm:
            raise ConfigError(f"{where}.alg: {jwk.get('alg')!r} does not fit a {crv} key ({algorithm})")
        keys.append(VerificationKey(kid=kid, algorithm=algorithm, key=key))
    return keys


def local_issuer_key(directory: str | Path) -> Ed25519PrivateKey:
    """The local development issuer's private key under ``directory``, made on first use.

    Several processes may start at once (``dvp demo`` starts a worker and clients):
    each writes its new key to a file of its own and links it into place, so the
    first link wins and every process then reads that one.
    """
    path = Path(directory) / LOCAL_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.with_name("local-ed25519.pub.pem").write_bytes(public)  # to copy to other hosts
    private = load_private_pem(path, "auth.local_keys")
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"auth.local_keys: {path} is not an Ed25519 key")
    return private


def verification_keys(auth: AuthConfig) -> list[VerificationKey]:
    """Every public key ``[auth]`` names: ``keys``, the ``jwks`` file, the signing and local issuers'.

    Raises ``ConfigError`` naming the field for a key that cannot be read or is of a
    kind not accepted, and for a kid given twice.
    """
    keys: list[VerificationKey] = []
    for i, entry in enumerate(auth.keys):
        what = f"auth.keys[{i}].public_key"
        key = load_public_pem(entry.public_key, what)
        keys.append(
            VerificationKey(
                kid=entry.kid,
                algorithm=algorithm_of(key, what),
                key=key,
                issuer=entry.issuer,
                not_after=entry.not_after,
            )
        )
    if auth.jwks:
        keys += _jwks_keys(auth.jwks, "auth.jwks")
    if auth.signing_key and auth.signing_kid and auth.signing_kid not in {k.kid for k in keys}:
        private = load_private_pem(auth.signing_key, "auth.signing_key")
        public = private.public_key()
        keys.append(
            VerificationKey(
                kid=auth.signing_kid,
                algorithm=algorithm_of(public, "auth.signing_key"),
                key=public,
                issuer=auth.issuers[0],
            )
        )
    if auth.local_issuer:
        public = local_issuer_key(auth.local_keys).public_key()
        keys.append(
            VerificationKey(kid=f"local-{key_id(public)}", algorithm="EdDSA", key=public, issuer=LOCAL_ISSUER)
        )
    seen: set[str] = set()
    for known in keys:
        if known.kid in seen:
            raise ConfigError(f"auth: kid {known.kid!r} names two keys (keys, jwks, signing_kid)")
        seen.add(known.kid)
    return keys
