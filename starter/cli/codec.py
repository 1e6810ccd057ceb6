"""``dvp codec-server`` and ``dvp codec-keys``: the payload codec for people and the Web UI."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from domain import Config, ConfigError, load_config

from .output import EXIT_BAD_INPUT, EXIT_OK, CliError, command


def start_codec_server(config: Config, ui_url: str, address: str | None = None) -> tuple[Any, str, str]:
    """Start the codec server in this process for the Web UI at ``ui_url``.

    Returns the running server, the endpoint to give the dev server's UI (with its
    token) and a line saying what it does. ``CliError`` when it cannot start.
    """
    from connection.codec_server import serve_ui

    try:
        running, endpoint, expires = serve_ui(config, ui_url, address)
    except ConfigError as exc:
        raise CliError(f"codec server: {exc}", EXIT_BAD_INPUT) from None
    except OSError as exc:
        raise CliError(f"codec.server: {exc}", EXIT_BAD_INPUT) from None
    note = (
        f"Codec server         {running.url}  (the Web UI decodes as a codec viewer "
        f"until {expires:%Y-%m-%d %H:%M} UTC)"
    )
    return running, endpoint, note


def cmd_codec_server(args: argparse.Namespace) -> int:
    from connection.codec_server import CodecServer, CodecServerThread, split_address

    config = load_config(args.config)
    try:
        host, port = split_address(args.listen or config.codec.server)
    except ValueError:
        raise CliError(f"--listen: {args.listen!r} is not HOST:PORT", EXIT_BAD_INPUT) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = CodecServer.from_config(config)
    try:
        running = CodecServerThread(server, host, port).start()
    except OSError as exc:
        raise CliError(f"--listen: {exc}", EXIT_BAD_INPUT) from None
    print(f"Codec server on {running.url}: POST /decode and /encode with a token", flush=True)
    print(f"  browser origins allowed: {', '.join(sorted(server.origins)) or '(none)'}", flush=True)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        stopping.wait()
    finally:
        running.stop()
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    from connection.codec import load_key_ring

    ring = load_key_ring(load_config(args.config).codec)
    print(f"key ring {ring.source}")
    for kid in ring.keys:
        print(f"  {kid}{'  (active: encrypts)' if kid == ring.active else ''}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from connection.codec import load_key_ring, rotate_key_file

    codec = load_config(args.config).codec
    if codec.key_env:
        raise CliError(
            f"codec.key_env: the keys come from ${codec.key_env}; rotate them where that is set",
            EXIT_BAD_INPUT,
        )
    load_key_ring(codec)  # the default ring is made if it is not there yet
    ring = rotate_key_file(codec.key_path())
    print(f"{ring.source}: {ring.active} is the active key; still decrypting with {', '.join(ring.keys)}")
    print("restart every worker and client to encrypt with it (docs/encryption.md: rotating keys)")
    return EXIT_OK


def cmd_keys_new(args: argparse.Namespace) -> int:
    from connection.codec import KeyRing

    # for [codec] key_env, e.g.: export DVP_CODEC_KEYS="$(dvp codec-keys new)"
    print(KeyRing.generate().to_json(), end="")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """``dvp codec-server`` and ``dvp codec-keys list|rotate|new``."""
    p = command(
        sub,
        "codec-server",
        cmd_codec_server,
        "serve /decode and /encode for the Web UI and `temporal --codec-endpoint` (a token required)",
    )
    p.add_argument("--listen", help="HOST:PORT to listen on (default: [codec] server, 127.0.0.1:8081)")

    keys = sub.add_parser("codec-keys", help="the key ring that encrypts every payload")
    ksub = keys.add_subparsers(dest="codec_keys_command", required=True, metavar="COMMAND")
    command(ksub, "list", cmd_keys_list, "list the key ids of the ring and the active one (no key material)")
    command(ksub, "rotate", cmd_keys_rotate, "add a fresh key to the ring's file and make it active")
    command(ksub, "new", cmd_keys_new, "print a fresh key ring (JSON), e.g. for [codec] key_env")
