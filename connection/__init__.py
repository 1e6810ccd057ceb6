"""How every process of dvp connects to Temporal: the worker, the client and the CLI.

``connect_client`` builds every Temporal client in the project, so that all of them
speak the same data converter (pydantic). It lives here, below both the worker and
the client, so that neither depends on the other to connect.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from .telemetry import flush_tracing, tracing_interceptors

__all__ = ["connect_client", "exit_without_teardown"]


async def connect_client(address: str, namespace: str = "default", **options: Any) -> Client:
    """Connect a Temporal client that uses the pydantic data converter.

    ``options`` go to ``Client.connect`` unchanged (identity, runtime, ...); the tracing
    interceptors (``telemetry.tracing_interceptors``) come before any given ``interceptors``.
    """
    options["interceptors"] = [*tracing_interceptors(), *options.get("interceptors", ())]
    return await Client.connect(
        address, namespace=namespace, data_converter=pydantic_data_converter, **options
    )


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
