"""A local EVM node for development and tests: anvil, from the npm package ``@foundry-rs/anvil``.

    with Anvil() as node:          # a free port on 127.0.0.1, ready when this returns
        ledger = EvmLedger(...)    # node.url is the JSON-RPC endpoint
    # the process is gone here

The node is a ``processes.children.Child``: it dies with the process that started it.

The node's funded dev accounts derive from ``DEFAULT_MNEMONIC`` (anvil's default);
``dev_key(i)`` gives the private key of account ``i`` (0 is the first, 10 are funded).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from adapters.evm import DEFAULT_MNEMONIC

from .children import Child, ChildError
from .ports import free_port

__all__ = ["DEFAULT_MNEMONIC", "Anvil", "AnvilError", "dev_key", "find_anvil"]


_ROOT = Path(__file__).resolve().parents[1]
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class AnvilError(RuntimeError):
    """anvil is missing, would not start, or did not answer in time."""


def find_anvil() -> Path:
    """The anvil binary: ``$ANVIL_BIN``, else node_modules, else ``anvil`` on ``PATH``.

    In node_modules the platform package's binary is preferred to ``.bin/anvil``,
    which is a node wrapper around the same binary (one process fewer).
    """
    explicit = os.environ.get("ANVIL_BIN")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise AnvilError(f"ANVIL_BIN={explicit} is not an executable file")
        return Path(explicit)
    system = platform.system().lower().replace("windows", "win32")
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    for base in dict.fromkeys([_ROOT, Path.cwd()]):
        modules = base / "node_modules"
        for candidate in (
            modules / "@foundry-rs" / f"anvil-{system}-{arch}" / "bin" / "anvil",
            modules / ".bin" / "anvil",
        ):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise AnvilError(
        f"anvil not found in {_ROOT / 'node_modules'} nor on PATH: run `npm ci` in {_ROOT} "
        "(it installs @foundry-rs/anvil) or set ANVIL_BIN"
    )


def dev_key(index: int, mnemonic: str = DEFAULT_MNEMONIC) -> str:
    """The private key (0x-hex) of account ``index`` of ``mnemonic`` (anvil's by default)."""
    from eth_account import Account

    Account.enable_unaudited_hdwallet_features()
    key = Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{index}").key
    return "0x" + bytes(key).hex()


class Anvil:
    """One anvil process on ``host:port`` (a free port unless given). A context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        chain_id: int = 31337,
        accounts: int = 10,
        mnemonic: str = DEFAULT_MNEMONIC,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: list[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.chain_id = chain_id
        self.accounts = accounts
        self.mnemonic = mnemonic
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = list(extra_args or [])
        self.binary = Path(binary) if binary else None
        self.startup_timeout = startup_timeout
        self._child: Child | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise AnvilError("anvil is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    @property
    def pid(self) -> int | None:
        """The node's pid while it runs."""
        return self._child.pid if self.running and self._child is not None else None

    def start(self) -> Anvil:
        """Start anvil and wait until it answers ``eth_chainId``; a second start is a no-op."""
        if self.running:
            return self
        binary = self.binary or find_anvil()
        # A free port found here can be taken before anvil binds it: try a few.
        attempts = 1 if self.port is not None else 3
        fixed_port = self.port
        for attempt in range(attempts):
            self.port = fixed_port if fixed_port is not None else free_port(self.host)
            args = [
                str(binary),
                "--host", self.host,
                "--port", str(self.port),
                "--chain-id", str(self.chain_id),
                "--accounts", str(self.accounts),
                "--mnemonic", self.mnemonic,
                *self.extra_args,
            ]  # fmt: skip
            self._child = Child(
                args, name="anvil", log_path=self.log_file, stop_timeout=5, anonymous_log=True
            )
            try:
                self._child.start()
                self._child.wait_ready(self._answers, self.startup_timeout, interval=0.05)
                return self
            except ChildError as exc:
                child, code = self._child, self._child.returncode
                if child.pid is None:
                    why = str(exc)
                elif code is None:
                    why = f"no answer to eth_chainId within {self.startup_timeout}s"
                else:
                    why = f"anvil exited with status {code}"
                log = f"{why}; {child.log_tail(20)[-2000:]}"
                self.stop()
                if attempt == attempts - 1:
                    raise AnvilError(f"anvil did not start on {self.host}:{self.port}: {log}") from None
        raise AssertionError("unreachable")

    def _answers(self) -> bool:
        try:
            return bool(int(self.rpc("eth_chainId"), 16) == self.chain_id)
        except (OSError, AnvilError):
            return False

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        """One JSON-RPC call (``evm_increaseTime``, ``evm_mine``, ``eth_chainId`` ...)."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            reply = json.loads(response.read())
        if "error" in reply:
            raise AnvilError(f"{method}: {reply['error']}")
        return reply["result"]

    def advance_time(self, seconds: int) -> int:
        """Move the chain clock forward and mine a block; returns the new block timestamp."""
        self.rpc("evm_increaseTime", [seconds])
        self.rpc("evm_mine")
        return int(self.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)

    def key(self, index: int) -> str:
        """The private key of this node's dev account ``index``."""
        return dev_key(index, self.mnemonic)

    def stop(self) -> None:
        """Stop anvil (terminate, then kill after 5 s); a second stop is a no-op."""
        child, self._child = self._child, None
        if child is not None:
            child.stop()

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
