"""``dvp ledger seed``, ``balances``, ``holds``, ``reconcile`` and ``verify-trades``: the configured ledgers.

``reconcile`` and ``verify-trades`` also ask Temporal about the trades: the first about
each open hold's trade (``operations.reconcile``), the second for the settled trades,
reading each one's chain commits at the chain's finality depth (``starter.finality``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError
from temporalio.service import RPCError

from domain import load_config
from operations import DEFAULT_GRACE, DEFAULT_STUCK_AFTER, Reconciliation
from starter.client import SettlementClient
from starter.finality import chain_ledgers, verify_trades
from starter.ledgers import all_balances, all_open_holds, opened, parse_seed, reconcile_ledgers, seed

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


def _duration(option: str, text: str) -> timedelta:
    try:
        value = TypeAdapter(timedelta).validate_python(text)
    except ValidationError:
        raise CliError(
            f"{option}: {text!r} is not an ISO 8601 duration such as PT5M", EXIT_BAD_INPUT
        ) from None
    if value < timedelta(0):
        raise CliError(f"{option}: must not be negative, got {text}", EXIT_BAD_INPUT)
    return value


async def cmd_ledger_reconcile(args: argparse.Namespace) -> int:
    stuck_after = _duration("--stuck-after", args.stuck_after)
    grace = _duration("--grace", args.grace)
    config = load_config(args.config)
    try:
        found = await reconcile_ledgers(
            config, release=args.release_orphans, stuck_after=stuck_after, grace=grace
        )
    except RPCError as exc:  # Temporal answered, but not about a hold's trade
        raise CliError(f"Temporal at {config.temporal.address} did not answer: {exc.message}") from None
    except RuntimeError as exc:
        raise CliError(f"cannot reach Temporal at {config.temporal.address}: {exc}") from None
    if args.json:
        emit_json(found.model_dump(mode="json"))
    else:
        print(reconciliation_text(found))
    return EXIT_FAILED if found.found else EXIT_OK


def reconciliation_text(found: Reconciliation) -> str:
    if not found.found:
        return "every open hold belongs to an open trade; no trade is stuck; every ledger is consistent"
    parts: list[str] = []
    if found.orphans:
        rows = [
            (
                o.ledger,
                o.hold_id,
                o.account,
                o.amount,
                o.asset,
                f"{o.workflow_status} {o.trade_status}".strip(),
                "released" if o.released else "releasable" if o.releasable else "kept",
                o.why,
            )
            for o in found.orphans
        ]
        parts.append(f"{len(found.orphans)} open hold(s) whose trade is closed or unknown")
        parts.append(
            table(
                rows, ["ledger", "hold", "account", "amount", "asset", "trade", "action", "why"], right=(3,)
            )
        )
    if found.stuck:
        rows2 = [(t.trade_id, t.status, t.started_at.isoformat()) for t in found.stuck]
        parts.append(f"{len(found.stuck)} trade(s) stuck (COMMITTING too long, or AWAITING_OPERATOR)")
        parts.append(table(rows2, ["trade", "status", "started"]))
    if found.problems:
        parts.append(f"{len(found.problems)} ledger problem(s)")
        parts.append(table([(p.ledger, p.problem) for p in found.problems], ["ledger", "problem"]))
    return "\n\n".join(parts)


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
    """``dvp ledger seed``, ``balances``, ``holds``, ``reconcile`` and ``verify-trades``."""
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
        "reconcile",
        help="every open hold against its trade; trades stuck committing; each ledger's invariants "
        "(exit 1 if anything is found)",
    )
    p.add_argument(
        "--release-orphans",
        action="store_true",
        help="release the open holds of trades that are closed and committed none of their legs",
    )
    p.add_argument(
        "--stuck-after",
        default=f"PT{int(DEFAULT_STUCK_AFTER.total_seconds())}S",
        metavar="DURATION",
        help="a trade COMMITTING that started longer ago than this is stuck (ISO 8601, default PT5M)",
    )
    p.add_argument(
        "--grace",
        default=f"PT{int(DEFAULT_GRACE.total_seconds())}S",
        metavar="DURATION",
        help="pinned holds of a closed trade are released only this long after it closed (default PT2M)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ledger_reconcile)
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
