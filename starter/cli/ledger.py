"""``dvp ledger seed``, ``balances``, ``holds`` and ``verify-trades``: the configured ledgers, directly.

``verify-trades`` also asks Temporal for the settled trades, and reads each one's chain
commits at the chain's finality depth (``starter.finality``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import datetime
from typing import Any

from domain import load_config
from starter.client import SettlementClient
from starter.finality import chain_ledgers, verify_trades
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, seed

from .output import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    CliError,
    balance_json,
    balances_table,
    emit_json,
    hold_json,
    holds_table,
    read_json,
    table,
)


def cmd_ledger_seed(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    seed_file = parse_seed(read_json(args.file, "seed file"), config)
    with opened(config, sorted({a.ledger for a in seed_file.accounts})) as ledgers:
        result = seed(config, seed_file, ledgers)
    if args.json:
        emit_json([balance_json(b) for b in result])
    else:
        print(f"{len(result)} accounts ready")
        print(balances_table(result))
    return EXIT_OK


def cmd_ledger_balances(args: argparse.Namespace) -> int:
    with opened(load_config(args.config)) as ledgers:
        balances = all_balances(ledgers)
    if args.json:
        emit_json([balance_json(b) for b in balances])
    else:
        print(balances_table(balances))
    return EXIT_OK


def cmd_ledger_holds(args: argparse.Namespace) -> int:
    with opened(load_config(args.config)) as ledgers:
        holds = all_open_holds(ledgers)
    if args.json:
        emit_json([hold_json(h) for h in holds])
    else:
        print(holds_table(holds) if holds else "no open holds")
    return EXIT_OK


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time with a UTC offset")
    return when


async def cmd_ledger_verify_trades(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    chains = chain_ledgers(config)
    if not chains:
        raise CliError("no ledger of kind evm is configured: no chain commit to verify", EXIT_BAD_INPUT)
    try:
        client = await SettlementClient.connect(config)
    except RuntimeError as exc:
        raise CliError(f"cannot reach Temporal at {config.temporal.address}: {exc}") from None
    with opened(config, chains) as ledgers:
        verified = await verify_trades(client, ledgers, since=args.since)
    problems = verified.problems
    if args.json:
        emit_json(
            {
                "trades": verified.trades,
                "commits": len(verified.commits),
                "not_final": [asdict(p) for p in problems],
            }
        )
    else:
        print(
            f"{len(verified.commits)} commits of {verified.trades} settled trades on {', '.join(chains)}: "
            + (f"{len(problems)} NOT final on the chain" if problems else "every one final on its chain")
        )
        if problems:
            rows = [(p.trade_id, p.leg, p.ledger, p.hold_id, p.found) for p in problems]
            print(table(rows, ["trade", "leg", "ledger", "hold", "at finality"]))
    return EXIT_FAILED if problems else EXIT_OK


def add_parser(sub: Any) -> None:
    """``dvp ledger seed``, ``balances``, ``holds`` and ``verify-trades``."""
    ledger = sub.add_parser("ledger", help="administer the configured ledgers directly")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")
    p = lsub.add_parser("seed", help="open accounts with opening balances from a JSON file (safe to re-run)")
    p.add_argument(
        "file", help='{"accounts": [{"ledger", "id", "asset", "owner", "balance"}]}, or - for stdin'
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ledger_seed)
    p = lsub.add_parser("balances", help="every account's balance, held and available amounts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ledger_balances)
    p = lsub.add_parser("holds", help="open holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ledger_holds)
    p = lsub.add_parser(
        "verify-trades",
        help="check every settled trade's chain commits are still on their chain at finality "
        "(exit 1 if one is not)",
    )
    p.add_argument(
        "--since", type=_instant, metavar="TIME",
        help="only trades that ended at or after TIME (ISO 8601 with an offset: 2030-01-31T00:00:00Z)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ledger_verify_trades)
