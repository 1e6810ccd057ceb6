"""The ``dvp`` command: one module per command group, and ``output`` for what they print.

Exit codes and the ``--json`` format: see ``starter.cli.output``. Command groups that
live outside the product (``dvp bank``, ``dvp bench``, ``dvp demo``) plug in through
the ``dvp.commands`` entry points that ``pyproject.toml`` declares, so that nothing
here imports them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace

from connection.telemetry import configure_tracing
from domain import (
    AuthError,
    ConfigError,
    DuplicateTrade,
    DvpError,
    InvalidInstruction,
    RequestRejected,
    TradeNotFound,
)

from . import auth, batch, chain, codec, ledger, server, trades
from .output import EXIT_BAD_INPUT, EXIT_FAILED, CliError

__all__ = ["build_parser", "main", "run"]

PLUGINS = "dvp.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvp", description="Atomic Delivery-versus-Payment settlement on Temporal."
    )
    parser.add_argument(
        "--config", help="TOML configuration (default: $DVP_CONFIG, else the embedded default)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (server, codec, ledger, trades, batch, chain, auth):
        group.add_parser(sub)
    for plugin in sorted(entry_points(group=PLUGINS), key=lambda e: e.name):
        add: Callable[[Any], Any] = plugin.load()
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_tracing("dvp-cli")
    try:
        # The command's span: the root of the trace of a trade it submits (connection.telemetry).
        # An error's message may name an account or an amount: the span does not keep it.
        with trace.get_tracer("dvp.cli").start_as_current_span(
            f"dvp {args.command}", record_exception=False, set_status_on_exception=False
        ):
            result = args.handler(args)
            if asyncio.iscoroutine(result):
                result = asyncio.run(result)
        return int(result)
    except CliError as exc:
        print(f"dvp: {exc}", file=sys.stderr)
        return exc.code
    except InvalidInstruction as exc:
        print(f"dvp: refused: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"dvp: configuration: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AuthError as exc:
        print(f"dvp: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RequestRejected as exc:
        print(f"dvp: rejected: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED
    except (TradeNotFound, DuplicateTrade) as exc:
        print(f"dvp: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except DvpError as exc:
        print(f"dvp: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def run() -> None:
    """Console entry point: every command has cleaned up when ``main`` returns."""
    from connection import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    run()
