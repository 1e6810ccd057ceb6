"""``dvp chain up``: a local EVM chain with the dvp contracts, wired into the configuration.

    dvp chain up --config dvp.toml [--port 8545] [--ledger chain] [--asset BOND-2030]

Starts anvil (npm ``@foundry-rs/anvil``), deploys the escrow, the account registry and
a token per ``--asset`` (more are deployed as ``dvp ledger seed`` meets them), and
writes the ledger's section into the configuration file: ``[ledgers.chain]`` with
``kind = "evm"``, the RPC URL, the chain id, the contract addresses and the operator
key (anvil's dev account 0: this is for development). Every other line of the file is
kept as it was; a previous ``[ledgers.chain]`` is replaced. Then it stays in the
foreground until Ctrl-C (or SIGTERM) and stops the node.

The chain lives in the node's memory: once stopped, its contracts and balances are
gone; ``chain up`` again writes the new addresses, and ``dvp ledger seed`` refills it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import tomllib
from pathlib import Path
from typing import Any

from domain import ConfigError, LedgerError, load_config, parse_config
from processes.anvil import Anvil, AnvilError, find_anvil
from processes.ports import listener, port_in_use

from .output import EXIT_BAD_INPUT, CliError

__all__ = ["add_parser", "chain_up", "render_section", "write_section"]

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$")


def _key_path(header: str) -> list[str]:
    """``ledgers . "chain" . accounts`` -> ``["ledgers", "chain", "accounts"]``."""
    return [part.strip().strip("\"'") for part in header.split(".")]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))  # a JSON string of ASCII text is a TOML basic string


def render_section(name: str, section: dict[str, Any]) -> str:
    """``section`` as a ``[ledgers.<name>]`` TOML table."""
    lines = [
        f"[ledgers.{json.dumps(name) if not re.fullmatch(r'[A-Za-z0-9_-]+', name) else name}]",
        "# written by `dvp chain up`; the operator key is anvil's dev account 0 (development only)",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in section.items()]
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, section: dict[str, Any]) -> str:
    """Replace (or add) ``[ledgers.<name>]`` in the TOML file ``path``, keeping every other line.

    The file must parse before and after; it is replaced in one rename, so a failure
    leaves it as it was. Returns the new text.
    """
    text = path.read_text() if path.exists() else ""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    kept: list[str] = []
    at: int | None = None  # where the old section was: the new one goes there
    skipping = False
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            skipping = _key_path(header.group(1))[:2] == ["ledgers", name]
            if skipping and at is None:
                at = len(kept)
        if not skipping:
            kept.append(line)
    if name in tomllib.loads("\n".join(kept)).get("ledgers", {}):
        raise ConfigError(
            f"{path}: ledgers.{name} is defined inline; make it a [ledgers.{name}] table or remove it, "
            "so that `dvp chain up` can replace it"
        )
    before = "\n".join(kept[:at] if at is not None else kept).rstrip()
    after = "\n".join(kept[at:] if at is not None else []).strip()
    new = (
        (before + "\n\n" if before else "")
        + render_section(name, section)
        + ("\n" + after + "\n" if after else "")
    )
    parse_config(tomllib.loads(new), str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return new


def chain_up(config_path: Path, port: int, ledger: str, assets: list[str]) -> int:
    """Start anvil, deploy, write the configuration, then wait for a signal (see module doc)."""
    from adapters.evm import deploy_contracts

    if not 1 <= port <= 65535:
        raise CliError(f"--port: {port} is not a TCP port (1 to 65535)", EXIT_BAD_INPUT)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", ledger):
        raise CliError(
            f"--ledger: {ledger!r} is not a ledger name (letters, digits, - and _)", EXIT_BAD_INPUT
        )
    # A broken configuration is reported before anything starts.
    config = load_config(config_path) if config_path.exists() else parse_config({"ledgers": {}})
    existing = config.ledgers.get(ledger)
    if existing is not None and existing.kind != "evm":
        raise CliError(
            f"{config_path}: ledgers.{ledger} is a {existing.kind} ledger; give --ledger another name",
            EXIT_BAD_INPUT,
        )
    try:
        find_anvil()
    except AnvilError as exc:
        raise CliError(str(exc)) from None
    host = "127.0.0.1"
    if port_in_use(port, host):
        held = listener(port)
        stop = f"stop it (kill {held[0]})" if held else "stop what listens there"
        by = f" by pid {held[0]} ({held[1]})" if held else ""
        raise CliError(f"--port: {host}:{port} is taken{by}; {stop} or give another --port")

    node = Anvil(host=host, port=port)
    signals = {signal.SIGINT, signal.SIGTERM}
    try:
        try:
            node.start()
        except AnvilError as exc:
            raise CliError(str(exc)) from None
        try:
            section = deploy_contracts(node.url, node.key(0), {a: config.precision(a) for a in assets})
        except LedgerError as exc:
            raise CliError(f"deploying the contracts failed: {exc}") from None
        config_path.parent.mkdir(parents=True, exist_ok=True)
        write_section(config_path, ledger, section)
        print(
            f"anvil is up at {node.url} (chain id {section['chain_id']}, pid {node.pid}); "
            "the dvp contracts are deployed."
        )
        print(f"Wrote [ledgers.{ledger}] into {config_path}:\n")
        print(render_section(ledger, section))
        print(f"Seed accounts on it:  dvp --config {config_path} ledger seed SEED.json")
        print("Press Ctrl-C to stop the chain (it lives in memory: its contracts and balances go with it).")
        print(flush=True)
        # Blocked only now: anvil, started before, keeps the default signal mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        while True:
            if signal.sigtimedwait(signals, 1.0) is not None:
                print("stopping anvil", flush=True)
                break
            if not node.running:
                raise CliError(f"anvil on {node.url} exited on its own")
        return 0
    finally:
        node.stop()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def cmd_up(args: argparse.Namespace) -> int:
    path = getattr(args, "config", None) or os.environ.get("DVP_CONFIG")
    if not path:
        raise CliError(
            "dvp chain up writes the chain's addresses into a configuration file: give --config FILE "
            "(created if missing) or set DVP_CONFIG",
            EXIT_BAD_INPUT,
        )
    return chain_up(Path(path), args.port, args.ledger, args.asset or [])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chain up`` on the dvp CLI's subparsers."""
    chain = subparsers.add_parser(
        "chain", help="a local EVM chain (anvil) for the securities leg", description=__doc__.split("\n\n")[0]
    )
    commands = chain.add_subparsers(dest="chain_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "up",
        help="start anvil, deploy the contracts, write them into the configuration, run until Ctrl-C",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # SUPPRESS: without --config here, the dvp CLI's own --config (before `chain`) stands.
    p.add_argument(
        "--config", default=argparse.SUPPRESS, metavar="FILE",
        help="the configuration to write [ledgers.<ledger>] into (default: $DVP_CONFIG)",
    )  # fmt: skip
    p.add_argument(
        "--port", type=int, default=8545, help="the node's JSON-RPC port on 127.0.0.1 (default 8545)"
    )
    p.add_argument(
        "--ledger", default="chain", help="the ledger's name in the configuration (default: chain)"
    )
    p.add_argument(
        "--asset", action="append", metavar="SYMBOL",
        help="deploy this asset's token now (repeatable; precision from [assets], else 0)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_up)
    return chain
