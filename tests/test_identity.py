"""Tokens and keys, without a server: what the verifier accepts, and every way it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from domain import AuthError, ConfigError, default_config, parse_config
from identity import TokenIssuer, Verifier, local_issuer_key

from ._fixtures_auth import write_key_pair

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def auth(**section: Any) -> Any:
    return parse_config({"ledgers": {}, "auth": section}).auth


@pytest.fixture
def ed_keys(tmp_path: Path) -> dict[str, Any]:
    private, public = write_key_pair(tmp_path, "ed")
    return {"private": str(private), "public": str(public)}


@pytest.fixture
def es_jwks(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "es-1", "alg": "ES256"}]}))
    return key, str(path)


def claims(**over: Any) -> dict[str, Any]:
    issued = int(NOW.timestamp()) - 60
    return {"iss": "corp", "aud": "dvp", "sub": "alice", "iat": issued, "exp": issued + 3600, **over}


def test_an_es256_token_from_a_jwks_key_verifies_and_names_its_subject_and_roles(es_jwks: Any) -> None:
    key, path = es_jwks
    verifier = Verifier.from_config(auth(issuers=["corp"], jwks=path))
    token = jwt.encode(claims(roles=["trader"]), key, algorithm="ES256", headers={"kid": "es-1"})

    principal = verifier.verify(token, NOW)

    assert (principal.subject, principal.roles, principal.issuer, principal.kid) == (
        "alice",
        ("trader",),
        "corp",
        "es-1",
    )


def test_algorithm_confusion_is_refused(es_jwks: Any, ed_keys: dict[str, Any]) -> None:
    key, path = es_jwks
    verifier = Verifier.from_config(
        auth(issuers=["corp"], jwks=path, keys=[{"kid": "ed-1", "public_key": ed_keys["public"]}])
    )
    # an HMAC token naming an asymmetric key's kid: the classic confusion
    hmac = jwt.encode(claims(), "x" * 32, algorithm="HS256", headers={"kid": "ed-1"})
    es_with_ed_kid = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "ed-1"})

    with pytest.raises(AuthError, match="algorithm 'HS256' is not accepted"):
        verifier.verify(hmac, NOW)
    with pytest.raises(AuthError, match="key ed-1 verifies EdDSA, not ES256"):
        verifier.verify(es_with_ed_kid, NOW)


def test_each_claim_is_checked_against_the_callers_now(ed_keys: dict[str, Any]) -> None:
    section = {
        "issuers": ["corp", "other"],
        "keys": [{"kid": "k", "public_key": ed_keys["public"], "issuer": "corp"}],
        "max_token_lifetime": "PT2H",
    }
    verifier = Verifier.from_config(auth(**section))
    private = serialization.load_pem_private_key(Path(ed_keys["private"]).read_bytes(), None)

    def sign(**over: Any) -> str:
        return jwt.encode(claims(**over), private, algorithm="EdDSA", headers={"kid": "k"})  # type: ignore[arg-type]

    assert verifier.verify(sign(), NOW).subject == "alice"
    no_subject = jwt.encode({**claims(), "sub": None}, private, "EdDSA", {"kid": "k"})  # type: ignore[arg-type]
    refusals = {
        "expired at": (sign(), NOW + timedelta(hours=2)),
        "issued in the future": (sign(iat=int(NOW.timestamp()) + 600), NOW),
        "not valid before": (sign(nbf=int(NOW.timestamp()) + 600), NOW),
        "lifetime": (sign(exp=int(NOW.timestamp()) + 5 * 3600), NOW),
        "not for this audience": (sign(aud="elsewhere"), NOW),
        "issuer 'mallory' is not accepted": (sign(iss="mallory"), NOW),
        "does not sign for issuer 'other'": (sign(iss="other"), NOW),
        "claim 'sub' is missing": (no_subject, NOW),
        "longer than 128": (sign(sub="x" * 129), NOW),
    }
    for reason, (token, at) in refusals.items():
        with pytest.raises(AuthError, match=reason):
            verifier.verify(token, at)


def test_a_retired_key_verifies_only_before_its_not_after(ed_keys: dict[str, Any]) -> None:
    retired = NOW - timedelta(minutes=30)
    verifier = Verifier.from_config(
        auth(
            issuers=["corp"],
            keys=[{"kid": "k", "public_key": ed_keys["public"], "not_after": retired.isoformat()}],
        )
    )
    private = serialization.load_pem_private_key(Path(ed_keys["private"]).read_bytes(), None)
    issued = int((retired - timedelta(minutes=10)).timestamp())
    token = jwt.encode(claims(iat=issued, exp=issued + 7200), private, "EdDSA", {"kid": "k"})  # type: ignore[arg-type]

    # the same token: judged at a workflow time before the retirement, and after it
    assert verifier.verify(token, retired - timedelta(seconds=1)).subject == "alice"
    with pytest.raises(AuthError, match="key k was retired"):
        verifier.verify(token, NOW)


def test_configuration_errors_name_the_field(ed_keys: dict[str, Any], tmp_path: Path) -> None:
    key = {"kid": "k", "public_key": ed_keys["public"]}
    with pytest.raises(ConfigError, match="auth.keys: kid 'k' is listed twice"):
        auth(keys=[key, key])
    with pytest.raises(ConfigError, match="signing_kid: is required with signing_key"):
        auth(signing_key=ed_keys["private"])
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].public_key: .* does not exist"):
        Verifier.from_config(auth(keys=[{"kid": "k", "public_key": str(tmp_path / "nope.pem")}]))
    rsa = tmp_path / "not-a-key.pem"
    rsa.write_text("hello")
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].public_key: .* is not a PEM public key"):
        Verifier.from_config(auth(keys=[{"kid": "k", "public_key": str(rsa)}]))
    with pytest.raises(ConfigError, match="no key to verify tokens with"):
        Verifier.from_config(auth())
    with pytest.raises(ConfigError, match="no private key to sign tokens with"):
        TokenIssuer.from_config(auth(keys=[key]))


def test_the_local_issuer_makes_one_key_pair_on_first_use(tmp_path: Path) -> None:
    base = tmp_path / "dvp"
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: local_issuer_key(base / "auth"), range(8)))

    raw = {k.private_bytes_raw() for k in keys}
    assert len(raw) == 1  # every caller got the same key
    assert oct((base / "auth" / "local-ed25519.pem").stat().st_mode & 0o777) == "0o600"
    config = default_config(base)
    token = TokenIssuer.from_config(config.auth).issue("alice", ["trader"])
    assert Verifier.from_config(config.auth).verify(token, datetime.now(UTC)).roles == ("trader",)


def run_dvp(*args: str, cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DVP_CONFIG", "DVP_TOKEN")}
    if config is not None:
        env["DVP_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "starter.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO)},
        timeout=60,
    )


def test_dvp_auth_token_signs_with_the_local_issuer_and_exits_2_without_a_private_key(tmp_path: Path) -> None:
    made = run_dvp("auth", "token", "alice", "--role", "trader", "--ttl", "PT2H", cwd=tmp_path)

    assert made.returncode == 0, made.stderr
    principal = Verifier.from_config(default_config(tmp_path / ".dvp").auth).verify(
        made.stdout.strip(), datetime.now(UTC)
    )
    assert (principal.subject, principal.roles) == ("alice", ("trader",))
    assert timedelta(minutes=119) < principal.expires_at - datetime.now(UTC) <= timedelta(hours=2)

    bare = tmp_path / "bare.toml"
    bare.write_text('[ledgers.cash]\nkind = "sql"\nurl = "sqlite:///cash.db"\n')
    refused = run_dvp("auth", "token", "alice", cwd=tmp_path, config=bare)
    assert refused.returncode == 2
    assert "no private key to sign tokens with" in refused.stderr
    assert refused.stdout == ""
    bad_ttl = run_dvp("auth", "token", "alice", "--ttl", "an hour", cwd=tmp_path)
    assert bad_ttl.returncode == 2 and "--ttl" in bad_ttl.stderr


def test_a_worker_without_keys_to_verify_tokens_with_does_not_start(tmp_path: Path) -> None:
    bare = tmp_path / "bare.toml"
    bare.write_text('[ledgers.cash]\nkind = "sql"\nurl = "sqlite:///cash.db"\n')

    result = subprocess.run(
        [sys.executable, str(REPO / "worker.py"), "--config", str(bare)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )

    assert result.returncode == 2
    assert "auth: no key to verify tokens with" in result.stderr
