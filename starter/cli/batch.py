"""``dvp batch submit`` and ``dvp batch status``: netting batches."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from domain import BatchStatus, Config, load_config
from starter.batch import BatchClient, check_batch_id, parse_batch_text

from .auth import add_token_options, token_from
from .output import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, batch_json, batch_text, emit_json


def _duration(text: str) -> timedelta:
    try:
        value = TypeAdapter(timedelta).validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an ISO 8601 duration such as PT5M") from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


async def _connect(config: Config, token: str | None = None) -> BatchClient | None:
    try:
        return await BatchClient.connect(config, token)
    except RuntimeError as exc:
        print(
            f"dvp: cannot reach Temporal at {config.temporal.address} (start one with `dvp server`): {exc}",
            file=sys.stderr,
        )
        return None


async def cmd_batch_submit(args: argparse.Namespace) -> int:
    token = token_from(args)  # an operator's; none: nothing is stored or sent
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        print(f"dvp: batch file {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = load_config(args.config)
    batch = parse_batch_text(text, config)  # every trade checked before anything is stored
    if args.id:
        check_batch_id(args.id)
    client = await _connect(config, token)
    if client is None:
        return EXIT_FAILED
    async with client:
        view = await client.submit(batch, batch_id=args.id, settle_within=args.settle_within, wait=args.wait)
    if args.json:
        emit_json(batch_json(view))
    else:
        print(batch_text(view) if args.wait else f"batch {view.batch_id} submitted: {view.trades} trades")
    if args.wait and view.status is not BatchStatus.SETTLED:
        return EXIT_FAILED
    return EXIT_OK


async def cmd_batch_status(args: argparse.Namespace) -> int:
    client = await _connect(load_config(args.config))
    if client is None:
        return EXIT_FAILED
    async with client:
        view = await client.status(args.batch_id)
    if args.json:
        emit_json(batch_json(view))
    else:
        print(batch_text(view))
    return EXIT_OK


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``dvp batch submit`` and ``dvp batch status``."""
    batch = subparsers.add_parser("batch", help="multilateral netting batches (many trades, net legs)")
    bsub = batch.add_subparsers(dest="batch_command", required=True, metavar="COMMAND")
    p = bsub.add_parser("submit", help="store a file of trades and settle them as one netting batch")
    p.add_argument("file", help="a JSON array of instructions, or JSON Lines; - for stdin")
    p.add_argument("--id", help="the batch id (default: derived from the content)")
    p.add_argument(
        "--settle-within",
        type=_duration,
        help="ISO 8601 duration for the whole batch (default from [batches])",
    )
    p.add_argument("--wait", action="store_true", help="wait until the batch ends; exit 1 unless SETTLED")
    p.add_argument("--json", action="store_true")
    add_token_options(p)
    p.set_defaults(handler=cmd_batch_submit)
    p = bsub.add_parser("status", help="a batch: counts, gross vs net per asset, removed trades")
    p.add_argument("batch_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_batch_status)
    return batch
