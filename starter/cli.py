"""The ``dvp`` command.

Exit codes: 0 done; 1 refused or failed (an approve/cancel rejected, a trade that
did not settle under ``--wait``, Temporal unreachable); 2 bad input (a malformed
instruction, seed file or configuration), in which case nothing was changed.

``--json`` output is stable: amounts are strings, times ISO 8601.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from domain import (
    AccountBalance,
    ConfigError,
    DuplicateTrade,
    DvpError,
    Hold,
    InvalidInstruction,
    RequestRejected,
    TradeNotFound,
    TradeStatus,
    TradeView,
    load_config,
)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ output


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], right: Sequence[int] = ()) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])


def balances_table(balances: Sequence[AccountBalance]) -> str:
    rows = [(b.ledger, b.account, b.asset, b.owner, b.balance, b.held, b.available) for b in balances]
    return table(
        rows, ["ledger", "account", "asset", "owner", "balance", "held", "available"], right=(4, 5, 6)
    )


def balance_json(b: AccountBalance) -> dict[str, Any]:
    return b.model_dump(mode="json")


def hold_json(h: Hold) -> dict[str, Any]:
    data = h.model_dump(mode="json")
    return {
        k: data[k] for k in ("ledger", "hold_id", "account", "amount", "status", "expires_at", "trade_id")
    }


def holds_table(holds: Sequence[Hold]) -> str:
    rows = [
        (
            h.ledger,
            h.hold_id,
            h.account,
            h.amount,
            h.asset,
            h.status.value,
            h.expires_at or "pinned",
            h.trade_id,
        )
        for h in holds
    ]
    return table(
        rows, ["ledger", "hold", "account", "amount", "asset", "status", "expires", "trade"], right=(3,)
    )


def trade_json(view: TradeView, timeline: bool = True) -> dict[str, Any]:
    data = view.model_dump(mode="json", exclude={"fingerprint"})
    if not timeline:
        data.pop("timeline")
    return data


def trades_table(views: Sequence[TradeView]) -> str:
    rows = [
        (v.trade_id, v.status.value, ", ".join(f"{leg.index}:{leg.state.value}" for leg in v.legs), v.reason)
        for v in views
    ]
    return table(rows, ["trade", "status", "legs", "reason"])


def trade_text(view: TradeView) -> str:
    head = [
        f"trade     {view.trade_id}   (workflow {view.workflow_id})",
        f"status    {view.status.value}" + (f"   {view.reason}" if view.reason else ""),
        f"deadline  {view.deadline.isoformat() if view.deadline else '-'}",
    ]
    if view.approvers:
        approved = ", ".join(view.approved_by) or "nobody yet"
        head.append(f"approvers {', '.join(view.approvers)}   approved by: {approved}")
    legs = table(
        [
            (leg.index, leg.ledger, leg.from_, leg.to, leg.amount, leg.asset, leg.state.value, leg.detail)
            for leg in view.legs
        ],
        ["leg", "ledger", "from", "to", "amount", "asset", "state", "detail"],
        right=(4,),
    )
    timeline = table(
        [(e.at.strftime("%H:%M:%S.%f")[:-3], e.event, e.detail) for e in view.timeline],
        ["time", "event", "detail"],
    )
    return "\n\n".join(["\n".join(head), legs, *fills_text(view), timeline])


def fills_text(view: TradeView) -> list[str]:
    """The fills of a partial trade, if it has any."""
    if not view.fills:
        return []
    delivery, payment = view.legs[0], view.legs[1]
    rows = [
        (f.number, f.quantity, f.amount, f.settled_at.strftime("%H:%M:%S.%f")[:-3], ", ".join(f.hold_ids))
        for f in view.fills
    ]
    return [table(rows, ["fill", delivery.asset, payment.asset, "settled", "holds"], right=(1, 2))]


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# ---------------------------------------------------------------- commands


def read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror}", EXIT_BAD_INPUT) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} {path}: not valid JSON: {exc}", EXIT_BAD_INPUT) from None


async def _client(args: argparse.Namespace) -> Any:
    from starter.client import SettlementClient

    config = load_config(args.config)
    try:
        return await SettlementClient.connect(config)
    except RuntimeError as exc:
        raise CliError(
            f"cannot reach Temporal at {config.temporal.address} (start one with `dvp server`): {exc}"
        ) from None


def cmd_server(args: argparse.Namespace) -> int:
    from starter.devserver import DevServer

    if args.db:
        Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    DevServer(port=args.port, ui_port=args.ui_port, db_file=args.db).run_forever()
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    import worker

    argv = (["--config", args.config] if args.config else []) + sum(
        (["--ledger", n] for n in args.ledger or []), []
    )
    return worker.main(argv + (["--no-workflows"] if args.no_workflows else []))


def cmd_ledger_seed(args: argparse.Namespace) -> int:
    from starter.ledgers import opened, parse_seed, seed

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
    from starter.ledgers import all_balances, opened

    with opened(load_config(args.config)) as ledgers:
        balances = all_balances(ledgers)
    if args.json:
        emit_json([balance_json(b) for b in balances])
    else:
        print(balances_table(balances))
    return EXIT_OK


def cmd_ledger_holds(args: argparse.Namespace) -> int:
    from starter.ledgers import all_open_holds, opened

    with opened(load_config(args.config)) as ledgers:
        holds = all_open_holds(ledgers)
    if args.json:
        emit_json([hold_json(h) for h in holds])
    else:
        print(holds_table(holds) if holds else "no open holds")
    return EXIT_OK


async def cmd_submit(args: argparse.Namespace) -> int:
    from starter.client import parse_instruction

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
    client = await _client(args)
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
        for i, exc in refused:
            print(f"instruction {i} refused: {exc}", file=sys.stderr)
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
    views = await (await _client(args)).list(status=args.status)
    if args.json:
        emit_json([trade_json(v, timeline=False) for v in views])
    else:
        print(trades_table(views) if views else "no trades")
    return EXIT_OK


async def cmd_approve(args: argparse.Namespace) -> int:
    await (await _client(args)).approve(args.trade_id, args.party)
    print(f"approval by {args.party} accepted")
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace) -> int:
    await (await _client(args)).cancel(args.trade_id, args.party, args.reason or "")
    print(f"cancel by {args.party} accepted")
    return EXIT_OK


async def cmd_claim(args: argparse.Namespace) -> int:
    view = await (await _client(args)).claim(args.trade_id, args.preimage, args.leg)
    if args.json:
        emit_json(trade_json(view))
    else:
        print(trade_text(view))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if args.cross_system:
        from starter.demo_cross import run_cross_demo

        return run_cross_demo(keep=args.keep)
    from starter.demo import run_demo

    return run_demo(keep=args.keep)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvp", description="Atomic Delivery-versus-Payment settlement on Temporal."
    )
    parser.add_argument(
        "--config", help="TOML configuration (default: $DVP_CONFIG, else the embedded default)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], Any], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("server", cmd_server, "run the embedded Temporal dev server (and Web UI) in the foreground")
    p.add_argument("--db", help="keep the server's state in this SQLite file (default: in memory)")
    p.add_argument("--port", type=int, default=7233, help="frontend gRPC port (default 7233)")
    p.add_argument("--ui-port", type=int, default=None, help="Web UI port (default: port + 1000)")

    p = command("worker", cmd_worker, "run a worker: settlement workflows and ledger activities")
    p.add_argument("--ledger", action="append", help="run only this ledger's activities (repeatable)")
    p.add_argument("--no-workflows", action="store_true", help="run ledger activities only")

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

    p = command("submit", cmd_submit, "submit one instruction or a JSON list of them")
    p.add_argument("file", help="instruction JSON file, or - for stdin")
    p.add_argument(
        "--wait", action="store_true", help="wait until every trade ends; exit 1 unless all settled"
    )
    p.add_argument("--json", action="store_true")

    p = command("status", cmd_status, "one trade: status, legs and timeline")
    p.add_argument("trade_id")
    p.add_argument("--json", action="store_true")

    p = command("list", cmd_list, "trades, optionally those in one status")
    p.add_argument("--status", choices=[s.value for s in TradeStatus])
    p.add_argument("--json", action="store_true")

    p = command("approve", cmd_approve, "approve a trade as one of its required approvers")
    p.add_argument("trade_id")
    p.add_argument("--as", dest="party", required=True, help="the approving party")

    p = command("cancel", cmd_cancel, "cancel a trade before its commit decision")
    p.add_argument("trade_id")
    p.add_argument("--as", dest="party", required=True, help="a party of the trade or an operator")
    p.add_argument("--reason", help="recorded in the trade's timeline")

    p = command("claim", cmd_claim, "claim a leg of an htlc trade with the secret (the hashlock's preimage)")
    p.add_argument("trade_id")
    p.add_argument(
        "--preimage", required=True, help="the secret: 32 bytes in hex whose SHA-256 is the hashlock"
    )
    p.add_argument("--leg", type=int, help="the leg to claim (default: legs[1], the payment, while open)")
    p.add_argument("--json", action="store_true")

    from starter import bank, batch, bench, chain

    bank.add_parser(sub)
    batch.add_parser(sub)
    bench.add_parser(sub)
    chain.add_parser(sub)

    p = command("demo", cmd_demo, "start a server and a worker and settle the seed scenarios")
    p.add_argument(
        "--keep", action="store_true", help="leave server and worker running to explore the Web UI"
    )
    p.add_argument(
        "--cross-system",
        action="store_true",
        help="bonds on a local EVM chain (anvil) against EUR at the bank's HTTP service",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
    from starter.devserver import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    run()
