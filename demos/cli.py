"""``dvp demo``: plugged into the ``dvp`` command through its ``dvp.commands`` entry point."""

from __future__ import annotations

import argparse
from typing import Any

from starter.cli.output import command


def cmd_demo(args: argparse.Namespace) -> int:
    if args.cross_system:
        from demos.cross_system import run_cross_demo

        return run_cross_demo(keep=args.keep)
    from demos.settlement import run_demo

    return run_demo(keep=args.keep)


def add_parser(sub: Any) -> None:
    p = command(sub, "demo", cmd_demo, "start a server and a worker and settle the seed scenarios")
    p.add_argument(
        "--keep", action="store_true", help="leave server and worker running to explore the Web UI"
    )
    p.add_argument(
        "--cross-system",
        action="store_true",
        help="bonds on a local EVM chain (anvil) against EUR at the bank's HTTP service",
    )
