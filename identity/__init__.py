"""Identity: who sent a request, proved by a signed token (a JWT, EdDSA or ES256 only).

    verifier = Verifier.from_config(config.auth)          # keys loaded once, at start
    principal = verifier.verify(token, now=workflow.now())   # AuthError on any doubt
    principal.subject, principal.roles

    token = TokenIssuer.from_config(config.auth).issue("alice", ttl=timedelta(hours=1))

``[auth]`` names the accepted issuers, the audience and the public keys by ``kid``
(PEM files or a JWKS file; several at once, for rotation). The embedded default
configuration uses the local development issuer, whose Ed25519 key pair is made
under ``.dvp/auth/`` on first use. A worker installs its verifier for the workflows
it runs with ``install_verifier``. Imports only ``domain`` of the project.
"""

from domain import AuthError

from ._installed import install_verifier, installed_verifier, uninstall_verifier
from ._keys import ALGORITHMS, VerificationKey, key_id, local_issuer_key, verification_keys
from ._tokens import (
    MAX_ROLE_LENGTH,
    MAX_ROLES,
    MAX_SUBJECT_LENGTH,
    MAX_TOKEN_LENGTH,
    Principal,
    TokenIssuer,
    Verifier,
    check_subject,
    unverified_claims,
)

__all__ = [
    "ALGORITHMS",
    "MAX_ROLES",
    "MAX_ROLE_LENGTH",
    "MAX_SUBJECT_LENGTH",
    "MAX_TOKEN_LENGTH",
    "AuthError",
    "Principal",
    "TokenIssuer",
    "VerificationKey",
    "Verifier",
    "check_subject",
    "install_verifier",
    "installed_verifier",
    "key_id",
    "local_issuer_key",
    "uninstall_verifier",
    "unverified_claims",
    "verification_keys",
]
