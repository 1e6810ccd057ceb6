"""A local EVM node for development and tests: anvil, from the npm package ``@foundry-rs/anvil``.

    with Anvil() as node:          # a free port on 127.0.0.1, ready when this returns
        ledger = EvmLedger(...)    # node.url is the JSON-RPC endpoint
    # the process is gone here

The node's funded dev accounts derive from ``DEFAULT_MNEMONIC`` (anvil's default);
``dev_key(i)`` gives the private key of account ``i`` (0 is the first, 10 are funded).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from adapters.evm import DEFAULT_MNEMONIC

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


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise AnvilError("anvil is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Anvil:
        """Start anvil and wait until it answers ``eth_chainId``; a second start is a no-op."""
        if self.running:
            return self
        binary = self.binary or find_anvil()
        # A free port found here can be taken before anvil binds it: try a few.
        attempts = 1 if self.port is not None else 3
        fixed_port = self.port
        for attempt in range(attempts):
            self.port = fixed_port if fixed_port is not None else _free_port(self.host)
            self._log = self._open_log()
            args = [
                str(binary),
                "--host", self.host,
                "--port", str(self.port),
                "--chain-id", str(self.chain_id),
                "--accounts", str(self.accounts),
                "--mnemonic", self.mnemonic,
                *self.extra_args,
            ]  # fmt: skip
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
            try:
                self._wait_ready()
                return self
            except AnvilError:
                log = self._log_tail()
                self.stop()
                if attempt == attempts - 1:
                    raise AnvilError(f"anvil did not start on {self.host}:{self.port}: {log}") from None
        raise AssertionError("unreachable")

    def _open_log(self) -> IO[bytes]:
        # Kept open while anvil runs, closed in stop().
        if self.log_file:
            return open(self.log_file, "ab")
        return tempfile.TemporaryFile(prefix="anvil-")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise AnvilError(f"anvil exited with status {self._process.returncode}")
            try:
                if int(self.rpc("eth_chainId"), 16) == self.chain_id:
                    return
            except (OSError, AnvilError):
                pass
            time.sleep(0.05)
        raise AnvilError(f"no answer to eth_chainId within {self.startup_timeout}s")

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - 2000))
            return self._log.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

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
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
