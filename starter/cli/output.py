"""What the ``dvp`` command prints, and the exit codes it ends with.

Exit codes: 0 done; 1 refused or failed (an approve/cancel rejected, a trade that
did not settle under ``--wait``, Temporal unreachable); 2 bad input (a malformed
instruction, seed file or configuration), in which case nothing was changed.

``--json`` output is stable: amounts are strings, times ISO 8601.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from domain import AccountBalance, BatchView, Hold, TradeSummary, TradeView

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CliError(Exception):
    """A command's failure, worded for the user, with the exit code it ends with."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


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


def summary_json(summary: TradeSummary) -> dict[str, Any]:
    return summary.model_dump(mode="json")


def summaries_table(trades: Sequence[TradeSummary]) -> str:
    """``dvp list``: a trade terminated through Temporal shows its workflow's status beside its own."""

    def status(t: TradeSummary) -> str:
        shown = t.status.value if t.status else "?"
        if t.workflow_status not in ("RUNNING", "COMPLETED", ""):
            shown += f" (workflow {t.workflow_status})"
        return shown

    def at(value: Any) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"

    rows = [(t.trade_id, status(t), at(t.started_at), at(t.closed_at), t.reason) for t in trades]
    return table(rows, ["trade", "status", "started", "ended", "reason"])


def trade_text(view: TradeView) -> str:
    head = [
        f"trade     {view.trade_id}   (workflow {view.workflow_id})",
        f"status    {view.status.value}" + (f"   {view.reason}" if view.reason else ""),
        f"deadline  {view.deadline.isoformat() if view.deadline else '-'}",
    ]
    if view.submitted_by:
        head.append(f"submitted {view.submitted_by}")
    if view.consent_from:
        consented = ", ".join(view.consented) or "nobody yet"
        head.append(f"consent   from {', '.join(view.consent_from)}   given by: {consented}")
    if view.approvers:
        approved = ", ".join(view.approved_by) or "nobody yet"
        head.append(f"approvers {', '.join(view.approvers)}   approved by: {approved}")
    if view.refused_signals:
        head.append(f"refused   {view.refused_signals} signal(s) without a valid token or not allowed")
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
    shown = table(rows, ["fill", delivery.asset, payment.asset, "settled", "holds"], right=(1, 2))
    if view.fill_count > len(view.fills):
        earlier = view.fill_count - len(view.fills)
        shown = f"({earlier} earlier fill(s) not listed: a trade keeps its latest {len(view.fills)})\n{shown}"
    return [shown]


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def batch_json(view: BatchView) -> dict[str, Any]:
    return view.model_dump(mode="json", exclude={"fingerprint"})


def batch_text(view: BatchView, removed_shown: int = 20) -> str:
    lines = [
        f"batch     {view.batch_id}   (workflow {view.workflow_id})",
        f"status    {view.status.value}" + (f"   {view.reason}" if view.reason else ""),
        f"trades    {view.trades} submitted, {view.settled} settled, {view.removed} removed"
        + (f" ({view.rounds} netting rounds)" if view.rounds > 1 else ""),
    ]
    if view.assets:
        assets = [
            (a.ledger, a.asset, a.gross, a.net, a.saved, f"{a.saved_percent:.2f}%") for a in view.assets
        ]
        lines += [
            "",
            table(assets, ["ledger", "asset", "gross", "net", "saved", "saved %"], right=(2, 3, 4, 5)),
        ]
    if view.positions:
        positions = [(p.ledger, p.account, p.asset, p.amount) for p in view.positions]
        lines += [
            "",
            "net positions (+ receives, - pays)",
            table(positions, ["ledger", "account", "asset", "net"], right=(3,)),
        ]
    if view.removed_trades:
        removed = [(r.index, r.trade_id, r.reason) for r in view.removed_trades[:removed_shown]]
        lines += ["", "removed trades", table(removed, ["index", "trade", "reason"])]
        if len(view.removed_trades) > removed_shown:
            lines.append(f"... and {len(view.removed_trades) - removed_shown} more (--json lists them all)")
    return "\n".join(lines)


def read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror}", EXIT_BAD_INPUT) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what} {path}: not valid JSON: {exc}", EXIT_BAD_INPUT) from None


def command(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], Any], help: str
) -> argparse.ArgumentParser:
    """Add the command ``name`` to the subparsers ``sub``, run by ``handler``."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    return p
