"""Configuration: a TOML file named by ``DVP_CONFIG``, or the embedded default.

The embedded default keeps two SQLite ledgers (``cash`` and ``securities``) under
``.dvp/`` in the working directory. Temporal is reached through the usual
``TEMPORAL_ADDRESS`` and ``TEMPORAL_NAMESPACE`` variables.
"""

from __future__ import annotations

import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ._errors import ConfigError
from ._models import MAX_TIME_ZONE

# ISO 4217 minor units for the currencies whose minor unit is not 2; every other
# three-letter currency code in ISO_4217_TWO_DECIMALS has 2.
ISO_4217_MINOR_UNITS: dict[str, int] = {
    "BHD": 3,
    "BIF": 0,
    "CLF": 4,
    "CLP": 0,
    "DJF": 0,
    "GNF": 0,
    "IQD": 3,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KMF": 0,
    "KRW": 0,
    "KWD": 3,
    "LYD": 3,
    "OMR": 3,
    "PYG": 0,
    "RWF": 0,
    "TND": 3,
    "UGX": 0,
    "UYI": 0,
    "UYW": 4,
    "VND": 0,
    "VUV": 0,
    "XAF": 0,
    "XOF": 0,
    "XPF": 0,
}
# fmt: off
ISO_4217_TWO_DECIMALS = frozenset(
    [
        "AED", "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "IDR",
        "ILS", "INR", "MXN", "MYR", "NOK", "NZD", "PHP", "PLN", "RON", "RUB", "SAR", "SEK", "SGD",
        "THB", "TRY", "TWD", "USD", "ZAR",
    ]
)
# fmt: on

DEFAULT_DIR = Path(".dvp")

MAX_CONTINUE_AS_NEW_AFTER = 8000
"""The largest ``[settlement] continue_as_new_after``: a run's bound stays below Temporal's
warning at 10,240 events with room for the steps between two wait points."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LedgerConfig(BaseModel):
    """One ledger. ``kind`` picks the adapter; the other keys are the adapter's own."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["sql", "http", "evm"]
    url: str | None = None
    # True: the settlement worker calls this ledger itself, as local activities (no
    # task dispatch through the server per call; it needs the ledger's credentials).
    # False: calls go to activities on the ledger's own task queue, served by
    # ``dvp worker --ledger NAME`` wherever the credentials are.
    local_activities: bool = True

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ComplianceConfig(_Section):
    sanctioned: list[str] = Field(default_factory=list)


class RolesConfig(_Section):
    # Subjects (verified token subjects) the settlement worker trusts as operators.
    operators: list[str] = Field(default_factory=lambda: ["ops"])
    # A verified token holding one of these roles makes its subject an operator too.
    operator_roles: list[str] = Field(default_factory=list)


LOCAL_ISSUER = "dvp-local"
"""The ``iss`` of the local development issuer's tokens."""


class AuthKeyConfig(_Section):
    """One public key that verifies tokens: a PEM file (Ed25519 for EdDSA, P-256 for ES256)."""

    kid: str = Field(min_length=1, max_length=128)
    public_key: str = Field(min_length=1)  # path to a PEM file
    # Only tokens of this issuer verify with this key (default: any accepted issuer).
    issuer: str | None = None
    # Tokens are refused after this instant, however long they were issued for: how a
    # retired or compromised key is cut off. Checked against the time the workflow sees,
    # so a history from before it still replays.
    not_after: AwareDatetime | None = None


class AuthConfig(_Section):
    """Who the engine believes: the accepted issuers, the audience and the keys of signed tokens.

    Tokens are JWTs signed with EdDSA (Ed25519) or ES256 (P-256) only. Keys come from
    ``keys`` (PEM files, each with its ``kid``), a ``jwks`` file, or, with
    ``local_issuer``, the development issuer's key pair under ``local_keys`` (made on
    first use). Several keys may be known at once (rotation); ``signing_key`` (a private
    PEM, with ``signing_kid``) lets ``dvp auth token`` issue tokens.
    """

    issuers: list[str] = Field(default_factory=lambda: [LOCAL_ISSUER], min_length=1)
    audience: str = Field(default="dvp", min_length=1)
    keys: list[AuthKeyConfig] = Field(default_factory=list)
    jwks: str | None = None  # path to a JWKS file
    local_issuer: bool = False
    local_keys: str = str(DEFAULT_DIR / "auth")  # directory of the local issuer's key pair
    signing_key: str | None = None  # path to a private PEM: `dvp auth token` signs with it
    signing_kid: str | None = None
    # The longest lifetime (exp - iat) a token may claim; longer ones are refused.
    max_token_lifetime: timedelta = timedelta(days=1)

    @field_validator("issuers")
    @classmethod
    def _issuers_named(cls, value: list[str]) -> list[str]:
        if any(not issuer.strip() for issuer in value):
            raise ValueError("an issuer name is empty")
        return value

    @field_validator("keys")
    @classmethod
    def _kids_distinct(cls, value: list[AuthKeyConfig]) -> list[AuthKeyConfig]:
        kids = [key.kid for key in value]
        for kid in kids:
            if kids.count(kid) > 1:
                raise ValueError(f"kid {kid!r} is listed twice")
        return value

    @field_validator("max_token_lifetime")
    @classmethod
    def _positive_lifetime(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration")
        return value

    @model_validator(mode="after")
    def _signing_pair(self) -> AuthConfig:
        if self.signing_key and not self.signing_kid:
            raise ValueError("signing_kid: is required with signing_key (the kid its tokens carry)")
        if self.signing_kid and not self.signing_key:
            raise ValueError("signing_key: is required with signing_kid (the private PEM file)")
        return self


class AssetConfig(_Section):
    precision: int = Field(ge=0, le=18)


class TemporalConfig(_Section):
    address: str = "localhost:7233"
    namespace: str = "default"
    task_queue_prefix: str = "dvp"


class SettlementConfig(_Section):
    default_settle_within: timedelta = timedelta(hours=1)
    recycle_interval: timedelta = timedelta(seconds=1)
    max_recycle_interval: timedelta = timedelta(seconds=10)
    # A hold's ledger-side expiry is the trade deadline plus this margin: a backstop
    # for an orchestrator that vanished, never the normal way a hold ends.
    hold_backstop: timedelta = timedelta(hours=1)
    sweep_interval: timedelta = timedelta(seconds=30)
    # A trade short for long recycles less often (docs/design.md, "Recycling"): past the
    # doubling to max_recycle_interval, the interval is this fraction of the time the trade
    # has waited, up to longest_recycle_interval; funds that arrive are found within it.
    recycle_growth: float = Field(default=0.01, ge=0, le=1)
    longest_recycle_interval: timedelta = timedelta(minutes=15)
    # A trade (or batch) continues as new at its first wait point once its run's history
    # holds this many events (docs/decisions/0011-continue-as-new.md), far below
    # Temporal's warning at 10,240 events and its limit at 51,200.
    continue_as_new_after: int = Field(default=2000, ge=100, le=MAX_CONTINUE_AS_NEW_AFTER)
    # The settlement calendar's time zone (IANA): the day an instruction's settle_on names
    # starts at midnight there.
    time_zone: str = Field(default="UTC", min_length=1, max_length=MAX_TIME_ZONE)

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone (an IANA name such as 'Europe/Berlin')") from None
        return value

    @field_validator(
        "recycle_interval", "max_recycle_interval", "default_settle_within", "longest_recycle_interval"
    )
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration")
        return value

    def recycle_after(self, interval: timedelta, waited: timedelta) -> timedelta:
        """The pause before the next reservation attempt of a trade short since ``waited``.

        ``interval`` is the last pause: it doubles from ``recycle_interval`` up to
        ``max_recycle_interval``; past that, it is ``recycle_growth`` of the time waited,
        up to ``longest_recycle_interval`` (never below ``max_recycle_interval``).
        """
        doubled = min(interval * 2, self.max_recycle_interval)
        if doubled < self.max_recycle_interval:
            return doubled
        longest = max(self.longest_recycle_interval, self.max_recycle_interval)
        return min(max(waited * self.recycle_growth, self.max_recycle_interval), longest)


class BatchesConfig(_Section):
    """The batch store of netting batches: a SQL database the client and workers share."""

    url: str | None = None  # default: batches.db next to the first SQLite ledger, else .dvp/
    default_settle_within: timedelta = timedelta(minutes=10)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ORIGIN = re.compile(r"https?://[^/\s?#]+")


class CodecConfig(_Section):
    """``[codec]``: the payload encryption every client and worker applies (``connection/codec.py``).

    The key ring is JSON (``{"active": ID, "keys": {ID: base64 key}, "party_key": base64}``)
    read from ``key_file`` or from the environment variable ``key_env``; with neither,
    from ``.dvp/codec-keys.json``, made on first use.
    """

    key_file: str | None = None
    key_env: str | None = None
    # DvpParties (a search attribute, which Temporal stores in the clear) holds keyed
    # hashes (HMAC-SHA256 under the ring's party_key) of the parties, not their names.
    hash_parties: bool = True
    # Decode payloads that carry no encryption: only while trades started before the
    # codec was turned on finish. Anything else unencrypted is refused.
    accept_plaintext: bool = False
    # `dvp codec-server`: where it listens, the browser origins it answers (the Web
    # UI's), and the token roles it decodes for besides the operators.
    server: str = "127.0.0.1:8081"
    ui_origins: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8233", "http://localhost:8233"])
    viewer_roles: list[str] = Field(default_factory=lambda: ["codec-viewer"])

    @field_validator("key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @field_validator("key_file")
    @classmethod
    def _file_named(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("server")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @field_validator("ui_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> CodecConfig:
        if self.key_file and self.key_env:
            raise ValueError("key_file and key_env: give one source of keys, not both")
        return self

    def key_path(self) -> Path:
        """The key ring file: ``key_file``, else the generated default under .dvp/."""
        return Path(self.key_file) if self.key_file else DEFAULT_DIR / "codec-keys.json"


class Config(_Section):
    ledgers: dict[str, LedgerConfig]
    compliance: ComplianceConfig = Field(default_factory=ComplianceConfig)
    roles: RolesConfig = Field(default_factory=RolesConfig)
    assets: dict[str, AssetConfig] = Field(default_factory=dict)
    temporal: TemporalConfig = Field(default_factory=TemporalConfig)
    settlement: SettlementConfig = Field(default_factory=SettlementConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)

    def batches_url(self) -> str:
        """``[batches] url``, else ``batches.db`` beside the first SQLite ledger, else under .dvp/."""
        if self.batches.url:
            return self.batches.url
        for ledger in self.ledgers.values():
            url = ledger.url or ""
            if ledger.kind == "sql" and url.startswith("sqlite:///") and "?" not in url:
                return f"sqlite:///{Path(url.removeprefix('sqlite:///')).parent / 'batches.db'}"
        return f"sqlite:///{DEFAULT_DIR / 'batches.db'}"

    def precision(self, asset: str) -> int:
        """Decimal places allowed for ``asset``: configured, else ISO 4217, else 0."""
        if asset in self.assets:
            return self.assets[asset].precision
        if asset in ISO_4217_MINOR_UNITS:
            return ISO_4217_MINOR_UNITS[asset]
        if asset in ISO_4217_TWO_DECIMALS:
            return 2
        return 0

    def settlement_queue(self) -> str:
        return f"{self.temporal.task_queue_prefix}-settlement"

    def ledger_queue(self, ledger: str) -> str:
        return f"{self.temporal.task_queue_prefix}-ledger-{ledger}"

    def local_ledgers(self) -> list[str]:
        """The ledgers the settlement worker calls through local activities."""
        return sorted(name for name, ledger in self.ledgers.items() if ledger.local_activities)


def default_config(base: Path = DEFAULT_DIR) -> Config:
    """Two SQLite ledgers under ``base``, ``mallory`` sanctioned, ``ops`` an operator.

    Tokens come from the local development issuer, whose key pair is made under
    ``base/auth`` on first use.
    """
    return Config.model_validate(
        {
            "ledgers": {
                "cash": {"kind": "sql", "url": f"sqlite:///{base / 'cash.db'}"},
                "securities": {"kind": "sql", "url": f"sqlite:///{base / 'securities.db'}"},
            },
            "compliance": {"sanctioned": ["mallory"]},
            "roles": {"operators": ["ops"]},
            "auth": {"local_issuer": True, "local_keys": str(base / "auth")},
        }
    )


def parse_config(data: dict[str, Any], source: str = "configuration") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {field}: {message}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load ``path``, else ``$DVP_CONFIG``, else the embedded default.

    ``TEMPORAL_ADDRESS`` and ``TEMPORAL_NAMESPACE`` override the file.
    """
    path = path or os.environ.get("DVP_CONFIG")
    if path:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        config = parse_config(data, str(file))
    else:
        config = default_config()
    temporal = config.temporal.model_copy(
        update={
            k: v
            for k, v in {
                "address": os.environ.get("TEMPORAL_ADDRESS"),
                "namespace": os.environ.get("TEMPORAL_NAMESPACE"),
            }.items()
            if v
        }
    )
    return config.model_copy(update={"temporal": temporal})
