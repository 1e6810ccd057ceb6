"""Encrypted payloads: AES-256-GCM under a key ring, applied by every client and worker.

Every payload (workflow input and result, activity and local activity arguments and
results, signals, updates, queries, headers, and the message and stack trace of
failures) is serialised whole, metadata included, and sealed with the ring's
active key under a fresh random 96-bit nonce. What Temporal stores then says only
``encoding: binary/encrypted`` and ``encryption-key-id: <id>`` in the clear; the
data is ``nonce || ciphertext || tag``. The layout is the one of samples-python's
``encryption/codec.py``, so its codec servers in other languages read ours.

Decoding picks the key by that id, so the ring decrypts what any key it still holds
sealed: rotating is adding a key and making it the active one, never dropping the
old one while a history may need it (``docs/encryption.md``).

What cannot be decoded (an unknown key id, a payload that does not authenticate, a
payload with no encryption at all) is never passed on as it came. The codec
replaces it with a *refused* payload that the payload converter refuses to turn
into a value (``PayloadRefused``, naming why). Raising in the codec instead would
fail the whole workflow task, again on every retry, so that one forged signal
would wedge a trade; refused at conversion, a signal is dropped and an update
rejected, and nothing else of the trade changes.

Search attributes are not payloads a codec sees: Temporal indexes them in the
clear. ``party_tag`` is what ``DvpParties`` holds instead of the names.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    EncodingPayloadConverter,
    PayloadCodec,
)

from domain import CodecConfig, ConfigError, DvpError

__all__ = [
    "ENCRYPTED",
    "KEY_ID",
    "REFUSED",
    "EncryptionCodec",
    "KeyRing",
    "PayloadConverter",
    "PayloadRefused",
    "codec_for",
    "codec_cost",
    "data_converter",
    "history_payloads",
    "load_key_ring",
    "party_tag",
    "rotate_key_file",
]

ENCRYPTED = b"binary/encrypted"
"""The ``encoding`` of a sealed payload."""
KEY_ID = "encryption-key-id"
"""The metadata key naming the key that sealed a payload."""
REFUSED = "binary/dvp-refused"
"""The ``encoding`` of what the codec put in place of a payload it refused."""

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's native nonce: random per payload, 2^-32 collision bound far off
MAX_KEY_ID_LENGTH = 64
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PayloadRefused(DvpError):
    """A payload could not be decoded: encrypted under an unknown key, tampered with, or not encrypted."""


# ------------------------------------------------------------------ the key ring


def _key_bytes(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected base64 text of {KEY_BYTES} bytes")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: {len(key)} bytes, expected {KEY_BYTES} (AES-256)")
    return key


def _new_key_id(existing: Sequence[str] = ()) -> str:
    while True:
        kid = f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(3)}"
        if kid not in existing:
            return kid


@dataclass(frozen=True)
class KeyRing:
    """The keys a process may decrypt with, the one it encrypts with, and the party-hash key."""

    keys: dict[str, bytes]
    active: str
    party_key: bytes | None = None
    source: str = "this key ring"
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._ciphers.update({kid: AESGCM(key) for kid, key in self.keys.items()})

    @classmethod
    def parse(cls, text: str, source: str) -> KeyRing:
        """A ring from its JSON; ``ConfigError`` naming ``source`` and the field at fault."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object with active, keys and party_key")
        unknown = sorted(set(data) - {"active", "keys", "party_key"})
        if unknown:
            raise ConfigError(f"{source}: {unknown[0]}: unknown field (expected active, keys, party_key)")
        raw_keys = data.get("keys")
        if not isinstance(raw_keys, dict) or not raw_keys:
            raise ConfigError(f"{source}: keys: expected an object of at least one key id -> base64 key")
        keys: dict[str, bytes] = {}
        for kid, value in raw_keys.items():
            if len(kid) > MAX_KEY_ID_LENGTH or not _KEY_ID.fullmatch(kid):
                raise ConfigError(
                    f"{source}: keys.{kid[:MAX_KEY_ID_LENGTH]}: a key id is 1 to {MAX_KEY_ID_LENGTH} "
                    "letters, digits, '.', '_' or '-'"
                )
            keys[kid] = _key_bytes(value, f"{source}: keys.{kid}")
        active = data.get("active")
        if not isinstance(active, str) or active not in keys:
            raise ConfigError(f"{source}: active: {active!r} is not one of the keys ({', '.join(keys)})")
        party = data.get("party_key")
        party_key = None if party is None else _key_bytes(party, f"{source}: party_key")
        return cls(keys=keys, active=active, party_key=party_key, source=source)

    @classmethod
    def generate(cls) -> KeyRing:
        """A ring of one fresh random key, active, and a fresh party key."""
        kid = _new_key_id()
        return cls(keys={kid: AESGCM.generate_key(256)}, active=kid, party_key=secrets.token_bytes(KEY_BYTES))

    def rotated(self) -> KeyRing:
        """This ring with a fresh key added and made active; every old key kept, the party key too."""
        kid = _new_key_id(list(self.keys))
        keys = {**self.keys, kid: AESGCM.generate_key(256)}
        return KeyRing(keys=keys, active=kid, party_key=self.party_key, source=self.source)

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "active": self.active,
            "keys": {kid: base64.b64encode(key).decode() for kid, key in self.keys.items()},
        }
        if self.party_key is not None:
            data["party_key"] = base64.b64encode(self.party_key).decode()
        return json.dumps(data, indent=2) + "\n"

    def cipher(self, kid: str) -> AESGCM | None:
        return self._ciphers.get(kid)


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a fresh file beside ``path``, readable by its owner only; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    return temporary


def create_key_file(path: Path) -> None:
    """Make a new ring at ``path`` unless one is there (or another process made it first: theirs stays).

    For a ring that several processes of one setup share from the start (the demos'),
    before any of them loads it; a deployment makes its ring with ``dvp codec-keys new``.
    """
    temporary = _write_private(path, KeyRing.generate().to_json())
    try:
        os.link(temporary, path)  # fails if the file exists: the first writer wins, atomically
    except FileExistsError:
        pass
    finally:
        temporary.unlink()


def load_key_ring(config: CodecConfig) -> KeyRing:
    """The ring ``[codec]`` names: ``key_env``, ``key_file``, else the default file, made on first use.

    Only the default is ever made: a configured file or variable that is missing is
    an error, since a new key could not read a single existing history.
    """
    if config.key_env:
        text = os.environ.get(config.key_env)
        if not text:
            raise ConfigError(f"codec.key_env: the environment variable {config.key_env} is not set")
        ring = KeyRing.parse(text, f"${config.key_env}")
    else:
        path = config.key_path()
        if not config.key_file and not path.exists():
            create_key_file(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"codec.key_file: {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"codec.key_file: cannot read {path}: {exc.strerror}") from None
        ring = KeyRing.parse(text, str(path))
    if config.hash_parties and ring.party_key is None:
        raise ConfigError(f"{ring.source}: party_key: is required by [codec] hash_parties = true")
    return ring


def rotate_key_file(path: str | os.PathLike[str]) -> KeyRing:
    """Add a fresh key to the ring in ``path`` and make it active, keeping every old key."""
    file = Path(path)
    try:
        ring = KeyRing.parse(file.read_text(), str(file))
    except FileNotFoundError:
        raise ConfigError(f"codec.key_file: {file} does not exist") from None
    rotated = ring.rotated()
    temporary = _write_private(file, rotated.to_json())
    os.replace(temporary, file)
    return rotated


def party_tag(key: bytes, name: str) -> str:
    """What ``DvpParties`` holds for ``name``: HMAC-SHA256 under the party key, 128 bits in hex."""
    return "p-" + hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:32]


# ------------------------------------------------------------------ the codec


def _refused(reason: str) -> Payload:
    # Its data is a JSON string, so a Web UI shows the reason in the payload's place.
    return Payload(metadata={"encoding": REFUSED.encode()}, data=json.dumps(reason).encode())


class EncryptionCodec(PayloadCodec):
    """Seal every payload with the ring's active key; open it with whichever key it names.

    ``accept_plaintext`` lets a payload with no encryption through decoding unchanged:
    for a worker while trades started before the codec finish, and for a codec
    server's ``/decode``, where it reveals nothing that was not already in the clear.
    """

    def __init__(self, ring: KeyRing, *, accept_plaintext: bool = False, hash_parties: bool = True) -> None:
        super().__init__()
        self.ring = ring
        self.accept_plaintext = accept_plaintext
        key = ring.party_key
        self.party_tag: Callable[[str], str] | None = (
            (lambda name: party_tag(key, name)) if hash_parties and key is not None else None
        )
        self._active = ring.cipher(ring.active)
        self._active_id = ring.active.encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.seal(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.open(p) for p in payloads]

    def seal(self, payload: Payload) -> Payload:
        assert self._active is not None
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._active.encrypt(nonce, payload.SerializeToString(), None)
        return Payload(metadata={"encoding": ENCRYPTED, KEY_ID: self._active_id}, data=nonce + sealed)

    def open(self, payload: Payload) -> Payload:
        encoding = payload.metadata.get("encoding")
        if encoding != ENCRYPTED:
            if self.accept_plaintext and encoding != REFUSED.encode():
                return payload
            shown = "none" if encoding is None else encoding.decode(errors="replace")[:64]
            return _refused(f"payload refused: not encrypted (encoding {shown})")
        kid = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self.ring.cipher(kid)
        if cipher is None:
            return _refused(
                f"payload refused: encrypted with key id {kid[:MAX_KEY_ID_LENGTH]!r}, which "
                f"{self.ring.source} does not hold (it holds: {', '.join(self.ring.keys)})"
            )
        data = payload.data
        try:
            opened = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
            return Payload.FromString(opened)
        except (InvalidTag, ValueError):
            return _refused(f"payload refused: it does not authenticate under key {kid!r} (altered?)")


class _RefusedConverter(EncodingPayloadConverter):
    """Turns a refused payload into ``PayloadRefused`` wherever a value is wanted; never encodes."""

    @property
    def encoding(self) -> str:
        return REFUSED

    def to_payload(self, value: Any) -> Payload | None:
        return None

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        reason = "payload refused"
        with contextlib.suppress(ValueError):
            reason = str(json.loads(payload.data))
        raise PayloadRefused(reason)


class PayloadConverter(PydanticPayloadConverter):
    """The pydantic payload converter, and a refusal for what the codec refused."""

    def __init__(self) -> None:
        super().__init__()
        self._set_converters(*self.converters.values(), _RefusedConverter())


def codec_for(config: CodecConfig, *, accept_plaintext: bool | None = None) -> EncryptionCodec:
    """The codec ``[codec]`` describes; ``ConfigError`` if its key ring is missing or malformed."""
    return EncryptionCodec(
        load_key_ring(config),
        accept_plaintext=config.accept_plaintext if accept_plaintext is None else accept_plaintext,
        hash_parties=config.hash_parties,
    )


def data_converter(codec: CodecConfig | EncryptionCodec | None = None) -> DataConverter:
    """The data converter of every client, worker and replayer: pydantic, encrypted, failures too.

    ``encode_common_attributes`` moves each failure's message and stack trace (which
    name accounts and amounts) into an encrypted payload; Temporal keeps only the
    failure's type in the clear.
    """
    payload_codec = codec if isinstance(codec, EncryptionCodec) else codec_for(codec or CodecConfig())
    return DataConverter(
        payload_converter_class=PayloadConverter,
        payload_codec=payload_codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


# ------------------------------------------------------------------ a history's payloads

# The SDK's core writes two payloads of a history itself, which no codec sees: a local
# activity marker's "data" (sequence number, attempt, activity type, times: the result
# beside it is ours), and a patch marker's "patch-data" (the patch id).
CORE_MARKERS = {"core_local_activity": "data", "core_patch": "patch-data"}


def _walk(message: Any, skip: frozenset[str]) -> Iterator[Payload]:
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.name in skip:
            continue
        if hasattr(value, "ListFields"):
            yield from _walk(value, skip)
        elif hasattr(value, "values") and not hasattr(value, "append"):  # a map field
            for item in value.values():
                if hasattr(item, "ListFields"):
                    yield from _walk(item, skip)
        else:  # a repeated field
            for item in value:
                yield from _walk(item, skip)


def core_marker_data(event: HistoryEvent) -> Payload | None:
    """The payload the SDK's core wrote itself into ``event``, if it is such a marker."""
    marker = event.marker_recorded_event_attributes
    key = CORE_MARKERS.get(marker.marker_name)
    if key is not None and key in marker.details:
        (payload,) = marker.details[key].payloads
        return payload
    return None


def history_payloads(
    history: WorkflowHistory, *, search_attributes: bool = False, core_markers: bool = False
) -> list[Payload]:
    """Every payload of ``history`` that went through a codec, as the server stores it.

    ``search_attributes`` adds the search attributes' (which no codec sees), and
    ``core_markers`` the markers' data the SDK's core writes (``CORE_MARKERS``).
    """
    skip = frozenset() if search_attributes else frozenset({"search_attributes"})
    found = []
    for event in history.events:
        own = None if core_markers else core_marker_data(event)
        found += [p for p in _walk(event, skip) if own is None or p != own]
    return found


def codec_cost(codec: EncryptionCodec, sealed: Sequence[Payload], rounds: int = 200) -> dict[str, Any]:
    """CPU of opening each of ``sealed`` and sealing it again, once: one workflow's codec work.

    Every payload is sealed once by whoever wrote it and opened at least once (by the
    worker; by a client reading it too). Measured on this thread over ``rounds`` rounds.
    """
    encrypted = [p for p in sealed if p.metadata.get("encoding") == ENCRYPTED]
    started = time.thread_time()
    for _ in range(rounds):
        for payload in encrypted:
            codec.seal(codec.open(payload))
    seconds = (time.thread_time() - started) / rounds
    return {
        "payloads": len(sealed),
        "encrypted": len(encrypted),
        "bytes": sum(len(p.data) for p in encrypted),
        "cpu_ms": round(seconds * 1000, 3),
    }
