"""``dvp chain up``: a local EVM chain with the dvp contracts, wired into the configuration.

    dvp chain up --config dvp.toml [--port 8545] [--ledger chain] [--asset BOND-2030]
                 [--chain-id ID] [--block-time SECONDS] [--confirmations N]

Starts anvil (npm ``@foundry-rs/anvil``), deploys the escrow, the account registry and
a token per ``--asset`` (more are deployed as ``dvp ledger seed`` meets them), and
writes the ledger's section into the configuration file: ``[ledgers.chain]`` with
``kind = "evm"``, the RPC URL, the chain id, the contract addresses and the operator
key (anvil's dev account 0: this is for development). Every other line of the file is
kept as it was; a previous ``[ledgers.chain]`` is replaced. Then it stays in the
foreground until Ctrl-C (or SIGTERM) and stops the node.

Each chain in one configuration gets its own chain id (``--chain-id``, else the first
from 31337 up that no other evm ledger there has), so that the ledgers' ``chain_id``
check tells the chains apart and a transaction signed for one is refused by another.
``--block-time`` mines a block every SECONDS even when idle (anvil's interval mining),
which ``--confirmations N`` needs: the adapter then reports a hold placed, pinned or
committed only once its transaction is N blocks deep (see docs/finality.md). The
section records ``chain_id``, ``confirmations`` and ``block_time``.

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

from domain import Config, ConfigError, LedgerError, parse_config
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
    if isinstance(value, (int, float)):
        return repr(value)  # a finite float's repr is a TOML float
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


FIRST_CHAIN_ID = 31337  # anvil's own default


def _current_config(path: Path) -> Config:
    """The configuration as it is; one without a ``[ledgers]`` table yet is fine (this adds one)."""
    if not path.exists():
        return parse_config({"ledgers": {}})
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config({"ledgers": {}, **data}, str(path))


def _chain_id(config: Config, ledger: str, wanted: int | None) -> int:
    """``wanted``, else the first id from 31337 up that no other evm ledger of ``config`` has."""
    taken = {
        int(options["chain_id"]): name
        for name, section in config.ledgers.items()
        if section.kind == "evm" and name != ledger and "chain_id" in (options := section.options())
    }
    if wanted is None:
        wanted = FIRST_CHAIN_ID
        while wanted in taken:
            wanted += 1
    elif not 1 <= wanted < 2**63:
        raise CliError(f"--chain-id: {wanted} is not a chain id (1 to 2**63 - 1)", EXIT_BAD_INPUT)
    elif wanted in taken:
        raise CliError(
            f"--chain-id: {wanted} is already the chain id of ledgers.{taken[wanted]}; each chain needs "
            "its own, so that a ledger's chain_id check can tell them apart",
            EXIT_BAD_INPUT,
        )
    return wanted


def _finality(block_time: float | None, confirmations: int) -> None:
    if block_time is not None and not 0 < block_time <= 3600:
        raise CliError(
            f"--block-time: {block_time:g} is not a block time (above 0, at most 3600 s)", EXIT_BAD_INPUT
        )
    if confirmations < 1:
        raise CliError(
            f"--confirmations: {confirmations} is not a number of blocks (1 or more)", EXIT_BAD_INPUT
        )
    if confirmations > 1 and block_time is None:
        raise CliError(
            f"--confirmations: {confirmations} needs --block-time: without it anvil mines a block only "
            "when a transaction arrives, so an idle chain never confirms the last one",
            EXIT_BAD_INPUT,
        )


def chain_up(
    config_path: Path,
    port: int,
    ledger: str,
    assets: list[str],
    *,
    chain_id: int | None = None,
    block_time: float | None = None,
    confirmations: int = 1,
) -> int:
    """Start anvil, deploy, write the configuration, then wait for a signal (see module doc)."""
    from adapters.evm import deploy_contracts

    if not 1 <= port <= 65535:
        raise CliError(f"--port: {port} is not a TCP port (1 to 65535)", EXIT_BAD_INPUT)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", ledger):
        raise CliError(
            f"--ledger: {ledger!r} is not a ledger name (letters, digits, - and _)", EXIT_BAD_INPUT
        )
    _finality(block_time, confirmations)
    # A broken configuration is reported before anything starts.
    config = _current_config(config_path)
    existing = config.ledgers.get(ledger)
    if existing is not None and existing.kind != "evm":
        raise CliError(
            f"{config_path}: ledgers.{ledger} is a {existing.kind} ledger; give --ledger another name",
            EXIT_BAD_INPUT,
        )
    chain_id = _chain_id(config, ledger, chain_id)
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

    mining = ["--block-time", f"{block_time:g}"] if block_time is not None else []
    node = Anvil(host=host, port=port, chain_id=chain_id, extra_args=mining)
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
        section["confirmations"] = confirmations
        if block_time is not None:
            section["block_time"] = block_time
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
    return chain_up(
        Path(path),
        args.port,
        args.ledger,
        args.asset or [],
        chain_id=args.chain_id,
        block_time=args.block_time,
        confirmations=args.confirmations,
    )


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
    p.add_argument(
        "--chain-id", type=int, metavar="ID",
        help="the chain's id (default: the first from 31337 up that no other evm ledger of the file has)",
    )  # fmt: skip
    p.add_argument(
        "--block-time", type=float, metavar="SECONDS",
        help="mine a block every SECONDS, idle or not (default: a block per transaction)",
    )  # fmt: skip
    p.add_argument(
        "--confirmations", type=int, default=1, metavar="N",
        help="blocks deep a transaction must be before the ledger reports it done (default 1; "
        "more needs --block-time)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_up)
    return chain
