"""``dvp ledger seed``, ``balances`` and ``holds``: the configured ledgers, read and seeded directly."""

from __future__ import annotations

import argparse
from typing import Any

from domain import load_config
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, seed

from .output import EXIT_OK, balance_json, balances_table, emit_json, hold_json, holds_table, read_json


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


def add_parser(sub: Any) -> None:
    """``dvp ledger seed``, ``balances`` and ``holds``."""
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
