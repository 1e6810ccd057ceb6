"""``dvp server`` and ``dvp worker``: the processes a settlement runs on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .output import EXIT_OK, command


def cmd_server(args: argparse.Namespace) -> int:
    from processes.devserver import DevServer

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


def add_parser(sub: Any) -> None:
    """``dvp server`` and ``dvp worker``."""
    p = command(
        sub, "server", cmd_server, "run the embedded Temporal dev server (and Web UI) in the foreground"
    )
    p.add_argument(
        "--db", help="keep the server's state in this SQLite file, one server at a time (default: in memory)"
    )
    p.add_argument("--port", type=int, default=7233, help="frontend gRPC port (default 7233)")
    p.add_argument("--ui-port", type=int, default=None, help="Web UI port (default: port + 1000)")

    p = command(sub, "worker", cmd_worker, "run a worker: settlement workflows and ledger activities")
    p.add_argument("--ledger", action="append", help="run only this ledger's activities (repeatable)")
    p.add_argument("--no-workflows", action="store_true", help="run ledger activities only")
