"""``dvp server`` and ``dvp worker``: the processes a settlement runs on.

``dvp server`` starts the codec server (``dvp codec-server``) in its own process
first and gives the dev server's Web UI its endpoint, so the UI shows trades decoded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .output import EXIT_OK, command


def cmd_server(args: argparse.Namespace) -> int:
    import logging

    from domain import load_config
    from processes.devserver import DevServer
    from processes.ports import free_port, port_in_use

    from .codec import start_codec_server

    if args.db:
        Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    server = DevServer(port=args.port, ui_port=args.ui_port, db_file=args.db)
    server.claim_database()  # a database another server uses is refused before anything starts
    codec = None
    if server.ui_url and not args.no_codec_server:
        # the codec server first: the UI asks it to decode as soon as a page opens
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = load_config(args.config)
        address = config.codec.server
        host, _, port = address.rpartition(":")
        if "server" not in config.codec.model_fields_set and port_in_use(int(port), host):
            address = f"{host}:{free_port()}"  # the default is taken (another dvp server): any free port
        codec, server.ui_codec_endpoint, note = start_codec_server(config, server.ui_url, address)
        print(note, flush=True)
    try:
        server.run_forever()
    finally:
        if codec is not None:
            codec.stop()
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    import worker

    argv = (["--config", args.config] if args.config else []) + sum(
        (["--ledger", n] for n in args.ledger or []), []
    )
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port), "--metrics-host", args.metrics_host]
    argv += ["--reconcile-every", args.reconcile_every]
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
    p.add_argument(
        "--no-codec-server",
        action="store_true",
        help="no codec server: the Web UI shows payloads encrypted (default: one on [codec] server)",
    )

    p = command(sub, "worker", cmd_worker, "run a worker: settlement workflows and ledger activities")
    p.add_argument("--ledger", action="append", help="run only this ledger's activities (repeatable)")
    p.add_argument("--no-workflows", action="store_true", help="run ledger activities only")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics (the Temporal SDK's and dvp's) at http://HOST:N/metrics",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST", help="address of the metrics endpoint"
    )
    p.add_argument(
        "--reconcile-every",
        default="PT5M",
        metavar="DURATION",
        help="reconcile open holds with their trades this often, reporting only (ISO 8601; PT0S: never)",
    )
