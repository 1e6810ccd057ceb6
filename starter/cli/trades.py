"""``dvp submit``, ``status``, ``list``, ``approve``, ``cancel``, ``affirm``, ``claim``: one trade at a time.

The acting commands (submit, approve, cancel, affirm, claim) send the token of
``--token``, ``--token-file`` or ``$DVP_TOKEN`` and act for its subject; without one
they send nothing and exit 2. ``--as NAME``, where accepted, must be that subject.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from domain import AuthError, InvalidInstruction, TradeStatus, TradeView, load_config
from identity import unverified_claims
from starter.client import SettlementClient, parse_instruction

from .auth import add_token_options, token_from
from .output import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    command,
    emit_json,
    read_json,
    summaries_table,
    summary_json,
    trade_json,
    trade_text,
    trades_table,
)


def _acting(args: argparse.Namespace) -> str:
    """The token an acting command sends, checked against ``--as`` before anything is sent."""
    token = token_from(args)
    party = getattr(args, "party", None)
    if party:
        try:
            subject = unverified_claims(token).get("sub")
        except AuthError as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        if subject != party:
            raise CliError(
                f"--as {party}: the token is {subject!r}'s, not {party!r}'s; nothing was sent", EXIT_BAD_INPUT
            )
    return token


async def _client(args: argparse.Namespace, token: str | None = None) -> SettlementClient:
    config = load_config(args.config)
    try:
        return await SettlementClient.connect(config, token)
    except RuntimeError as exc:
        raise CliError(
            f"cannot reach Temporal at {config.temporal.address} (start one with `dvp server`): {exc}"
        ) from None


async def cmd_submit(args: argparse.Namespace) -> int:
    token = _acting(args)
    data = read_json(args.file, "instruction file")
    many = isinstance(data, list)
    items = data if many else [data]
    config = load_config(args.config)
    # every instruction is checked before any is submitted: a bad file changes nothing
    for i, item in enumerate(items):
        try:
            parse_instruction(item, config)
        except InvalidInstruction as exc:
            where = f"instruction {i} " if many else ""
            raise CliError(f"{where}refused: {exc}", EXIT_BAD_INPUT) from None
    client = await _client(args, token)
    results = await client.submit_many(items)
    refused = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
    views = [r for r in results if isinstance(r, TradeView)]
    if args.wait and views:
        views = list(await asyncio.gather(*(client.wait(v.trade_id) for v in views)))
    if args.json:
        out = [trade_json(v) for v in views]
        out += [{"error": str(r), "index": i} for i, r in refused]
        emit_json(out if many else out[0])
    else:
        if views:
            print(trades_table(views))
        for i, error in refused:
            print(f"instruction {i} refused: {error}", file=sys.stderr)
    if refused:
        return EXIT_BAD_INPUT
    if args.wait and any(v.status is not TradeStatus.SETTLED for v in views):
        return EXIT_FAILED
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    view = await (await _client(args)).status(args.trade_id)
    if args.json:
        emit_json(trade_json(view))
    else:
        print(trade_text(view))
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    client = await _client(args)
    if args.limit is None and args.page_token is None:
        trades = await client.list(status=args.status, party=args.party)
        if args.json:
            emit_json([summary_json(t) for t in trades])
        else:
            print(summaries_table(trades) if trades else "no trades")
        return EXIT_OK
    page = await client.list_page(
        status=args.status, party=args.party, page_size=args.limit or 100, page_token=args.page_token
    )
    if args.json:
        emit_json({"trades": [summary_json(t) for t in page.trades], "next_page_token": page.next_page_token})
        return EXIT_OK
    print(summaries_table(page.trades) if page.trades else "no trades")
    if page.next_page_token:
        print(f"\nmore: dvp list --limit {args.limit or 100} --page-token {page.next_page_token}")
    return EXIT_OK


def _who(token: str) -> str:
    return str(unverified_claims(token).get("sub"))


async def cmd_approve(args: argparse.Namespace) -> int:
    token = _acting(args)
    await (await _client(args, token)).approve(args.trade_id, args.party)
    print(f"approval by {_who(token)} accepted")
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace) -> int:
    token = _acting(args)
    await (await _client(args, token)).cancel(args.trade_id, args.party, args.reason or "")
    print(f"cancel by {_who(token)} accepted")
    return EXIT_OK


async def cmd_affirm(args: argparse.Namespace) -> int:
    token = _acting(args)
    await (await _client(args, token)).affirm(args.trade_id, args.party)
    print(f"affirmation by {_who(token)} accepted")
    return EXIT_OK


async def cmd_claim(args: argparse.Namespace) -> int:
    token = _acting(args)
    view = await (await _client(args, token)).claim(args.trade_id, args.preimage, args.leg)
    if args.json:
        emit_json(trade_json(view))
    else:
        print(trade_text(view))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """``dvp submit``, ``status``, ``list``, ``approve``, ``cancel``, ``affirm`` and ``claim``."""
    p = command(sub, "submit", cmd_submit, "submit one instruction or a JSON list of them")
    p.add_argument("file", help="instruction JSON file, or - for stdin")
    add_token_options(p)
    p.add_argument(
        "--wait", action="store_true", help="wait until every trade ends; exit 1 unless all settled"
    )
    p.add_argument("--json", action="store_true")

    p = command(sub, "status", cmd_status, "one trade: status, legs and timeline")
    p.add_argument("trade_id")
    p.add_argument("--json", action="store_true")

    p = command(
        sub,
        "list",
        cmd_list,
        "trades, newest first, optionally those in one status or of one party; from Temporal's visibility "
        "(no worker needed)",
    )
    p.add_argument("--status", choices=[s.value for s in TradeStatus])
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="one page of at most N trades (1 to 1000); --json then prints "
        '{"trades": [...], "next_page_token": ...}',
    )
    p.add_argument("--page-token", metavar="TOKEN", help="the page after the one that gave this token")
    p.add_argument("--party", help="only trades with this account or owner (searched by its keyed hash)")
    p.add_argument("--json", action="store_true")

    as_help = "the token's subject, checked (optional)"
    p = command(sub, "approve", cmd_approve, "approve a trade as one of its required approvers")
    p.add_argument("trade_id")
    p.add_argument("--as", dest="party", help=f"the approver: {as_help}")
    add_token_options(p)

    p = command(sub, "cancel", cmd_cancel, "cancel a trade before its commit decision")
    p.add_argument("trade_id")
    p.add_argument("--as", dest="party", help=f"a party of the trade or an operator: {as_help}")
    p.add_argument("--reason", help="recorded in the trade's timeline (at most 500 characters)")
    add_token_options(p)

    p = command(
        sub,
        "affirm",
        cmd_affirm,
        "consent to a trade's debits of your accounts (it waits in AWAITING_AFFIRMATION)",
    )
    p.add_argument("trade_id")
    p.add_argument("--as", dest="party", help=f"the owner of a debited account: {as_help}")
    add_token_options(p)

    p = command(
        sub, "claim", cmd_claim, "claim a leg of an htlc trade with the secret (the hashlock's preimage)"
    )
    p.add_argument("trade_id")
    p.add_argument(
        "--preimage", required=True, help="the secret: 32 bytes in hex whose SHA-256 is the hashlock"
    )
    p.add_argument("--leg", type=int, help="the leg to claim (default: legs[1], the payment, while open)")
    p.add_argument("--json", action="store_true")
    add_token_options(p)
