"""How every process of dvp connects to Temporal: the worker, the client and the CLI.

``connect_client`` builds every Temporal client in the project that carries payloads,
so that all of them speak the same data converter: pydantic, with every payload
encrypted by the codec of ``[codec]`` (``connection/codec.py``), headers and failure
messages included. It lives here, below both the worker and the client, so that
neither depends on the other to connect.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from temporalio.client import Client
from temporalio.common import HeaderCodecBehavior

from domain import CodecConfig

from .codec import EncryptionCodec, PayloadRefused, codec_for, data_converter
from .telemetry import flush_tracing, tracing_interceptors

__all__ = [
    "HEADER_CODEC",
    "PayloadRefused",
    "connect_client",
    "data_converter",
    "exit_without_teardown",
    "party_tagger",
]

# Headers (where a request's token travels) are payloads in the history too.
HEADER_CODEC = HeaderCodecBehavior.CODEC


async def connect_client(
    address: str,
    namespace: str = "default",
    *,
    codec: CodecConfig | EncryptionCodec | None = None,
    **options: Any,
) -> Client:
    """Connect a Temporal client whose payloads the codec of ``codec`` encrypts.

    ``codec`` is the configuration's ``[codec]`` (None: the embedded default, the key
    ring under .dvp/), or a codec already built. ``options`` go to ``Client.connect``
    unchanged (identity, runtime, ...); the tracing interceptors
    (``telemetry.tracing_interceptors``) come before any given ``interceptors``.
    ``ConfigError`` if the key ring is missing or malformed, before anything is sent.
    """
    built = codec if isinstance(codec, EncryptionCodec) else codec_for(codec or CodecConfig())
    options["interceptors"] = [*tracing_interceptors(), *options.get("interceptors", ())]
    return await Client.connect(
        address,
        namespace=namespace,
        data_converter=data_converter(built),
        header_codec_behavior=HEADER_CODEC,
        **options,
    )


def party_tagger(client: Client) -> Callable[[str], str] | None:
    """What ``DvpParties`` shows of a party for this client's codec: a keyed hash, or None for the name."""
    codec = client.data_converter.payload_codec
    return codec.party_tag if isinstance(codec, EncryptionCodec) else None


def exit_without_teardown(code: int) -> NoReturn:
    """End a process that used a Temporal client, skipping interpreter teardown.

    The client's native threads can outlive the interpreter and abort its
    finalization (temporalio/sdk-python#300), turning a clean exit into -6. Call this
    only once the process has finished its own cleanup: nothing else runs after it.
    """
    flush_tracing()  # the batched spans would be lost with the process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
