"""One child process dvp starts (a server, a node, a worker, a service), and how it ends.

A ``Child`` runs its command in a session of its own (so Ctrl-C in a terminal reaches
only the parent, and a stop signals the child and anything it spawned in one go), with
its output in a log file, and dies with the process that started it however that one
ends, SIGKILL and the OOM killer included:

* on Linux the child asks the kernel for it (``prctl(PR_SET_PDEATHSIG)``) before it
  runs its command. The kernel sends that signal when the *thread* that forked the
  child ends, so only the main thread forks children itself; a start from any other
  thread (one of ``asyncio.to_thread``'s, say) is handed to one spawner thread that
  lives as long as the process;
* elsewhere a small watcher in the child's process group reads a pipe whose other end
  only the parent holds; when the parent is gone the pipe closes, and the watcher kills
  the group.

    with Child([sys.executable, "worker.py"], name="the worker", log_path=log) as worker:
        worker.wait_ready(lambda: worker.logged("worker running"), timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

__all__ = ["DEATH_SIGNAL", "Child", "ChildError", "Watch", "default_watch", "parent_of", "pid_alive"]

# Sent to a child whose parent is gone: nobody is left to wait for a graceful stop, and
# what the children keep (SQLite in WAL mode, the ledgers) is safe against a kill.
DEATH_SIGNAL = signal.SIGKILL
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 64 * 1024

Watch = Literal["pdeathsig", "pipe"]


class ChildError(RuntimeError):
    """A child process could not be started, exited, or was not ready in time."""


def default_watch() -> Watch:
    """How children learn that their parent is gone on this platform."""
    return "pdeathsig" if sys.platform.startswith("linux") else "pipe"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) is all there is to go on
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (None if gone or unknown; Linux only)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


# -------------------------------------------------------------- the death watch

_prctl: Any = None


def _pdeathsig_preexec() -> Callable[[], None]:
    """What the forked child runs before its command: die when the parent's thread ends."""
    global _prctl
    if _prctl is None:  # looked up here, in the parent: the forked child only calls it
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        _prctl = prctl
    prctl, parent, sig = _prctl, os.getpid(), int(DEATH_SIGNAL)

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(126)
        # The parent may have died before the request was made: then nobody will signal.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


# Runs in the child as ``python -c``: forks the watcher (twice, so that init reaps it,
# not the command), then becomes the command itself, keeping its pid.
_PIPE_WATCHER = r"""
import os, signal, sys
fd = int(sys.argv[1])
if os.fork() == 0:
    if os.fork() == 0:
        try:
            while os.read(fd, 64):
                pass
        except OSError:
            pass
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(0)
os.wait()
os.close(fd)
os.execvp(sys.argv[2], sys.argv[2:])
"""


class _Spawner:
    """One daemon thread that forks children for callers on other threads (see the module doc).

    A daemon thread is never joined at exit, so it outlives everything but the process.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="dvp-child-spawner", daemon=True)
                self._thread.start()
        future: Future[Any] = Future()
        self._jobs.put((job, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)


_spawner = _Spawner()


# ------------------------------------------------------------------- the child


class Child:
    """A command run as a child process in its own session, logging to ``log_path``.

    ``log_path`` None logs to a temporary file, deleted by ``stop()`` unless
    ``keep_log()`` was called; with ``anonymous_log`` one that has no name from the
    start, so that nothing is left behind however the parent ends (an error message
    then quotes it but cannot name it). ``env`` None inherits this process's environment.
    ``pass_fds`` are file descriptors the child inherits (e.g. a lock it must hold
    while it lives). ``watch`` picks how the child learns its parent is gone
    (``default_watch()`` for the platform). ``start()`` may be called again after the
    child ended: it runs the command anew, appending to the same log.
    """

    def __init__(
        self,
        command: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        stop_timeout: float = 10.0,
        pass_fds: Sequence[int] = (),
        watch: Watch | None = None,
        anonymous_log: bool = False,
    ) -> None:
        self.command = [os.fspath(part) for part in command]
        self.name = name or Path(self.command[0]).name
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.stop_timeout = stop_timeout
        self.pass_fds = tuple(pass_fds)
        self.watch: Watch = watch or default_watch()
        self._log_path = Path(log_path) if log_path is not None else None
        self._temporary_log = log_path is None
        self._anonymous_log = anonymous_log and log_path is None
        self._log_file: IO[bytes] | None = None  # the anonymous log, open while the child may write
        self._process: subprocess.Popen[bytes] | None = None
        self._watch_fd: int | None = None  # the parent's end of the watched pipe

    # ------------------------------------------------------------- state

    @property
    def pid(self) -> int | None:
        """The child's pid (its process group's id too), None before the first start."""
        return self._process.pid if self._process is not None else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once ended (negative: the signal that ended it), else None."""
        return self._process.poll() if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def keep_log(self) -> None:
        """Keep a temporary log after ``stop()``: an error message names it."""
        self._temporary_log = False

    # ------------------------------------------------------------ start

    def start(self) -> Self:
        """Run the command; a second start while it runs is a no-op."""
        if self.running:
            return self
        self._close_watch()
        if self._anonymous_log:
            if self._log_file is None:
                self._log_file = tempfile.TemporaryFile(prefix=f"{Path(self.command[0]).name}-")  # noqa: SIM115
        elif self._log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"{Path(self.command[0]).name}-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        else:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.watch == "pdeathsig" and threading.current_thread() is not threading.main_thread():
            self._process = _spawner.run(self._popen)
        else:
            self._process = self._popen()
        return self

    def _popen(self) -> subprocess.Popen[bytes]:
        command, pass_fds = self.command, self.pass_fds
        preexec: Callable[[], None] | None = None
        read_fd: int | None = None
        if self.watch == "pdeathsig":
            preexec = _pdeathsig_preexec()
        else:
            read_fd, self._watch_fd = os.pipe()  # both ends close on exec unless passed
            command = [sys.executable, "-I", "-S", "-c", _PIPE_WATCHER, str(read_fd), *command]
            pass_fds = (*pass_fds, read_fd)
        try:
            with self._log_file_for_child() as log:
                return subprocess.Popen(
                    command,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=pass_fds,
                    preexec_fn=preexec,
                )
        except OSError as exc:
            self._close_watch()
            raise ChildError(f"cannot run {self.name} ({self.command[0]}): {exc}") from exc
        finally:
            if read_fd is not None:
                os.close(read_fd)

    @contextlib.contextmanager
    def _log_file_for_child(self) -> Iterator[IO[bytes]]:
        if self._log_file is not None:
            yield self._log_file
            return
        assert self._log_path is not None
        with self._log_path.open("ab") as log:
            yield log

    # --------------------------------------------------------- readiness

    def check_alive(self) -> None:
        """Raise ``ChildError`` with the log's last lines if the child has exited."""
        code = self.returncode
        if self._process is not None and code is not None:
            raise ChildError(
                f"{self.name} exited with code {code}; last lines of {self._log_name}:\n{self.log_tail()}"
            )

    def wait_ready(self, ready: Callable[[], bool], timeout: float, interval: float = 0.1) -> None:
        """Poll ``ready()`` until true; ``ChildError`` if the child exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._not_ready(timeout)
            time.sleep(interval)

    async def wait_ready_async(
        self, ready: Callable[[], bool], timeout: float, interval: float = 0.05
    ) -> None:
        """``wait_ready`` for an event loop: ``ready()`` must not block."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise self._not_ready(timeout)
            await asyncio.sleep(interval)

    def _not_ready(self, timeout: float) -> ChildError:
        return ChildError(
            f"{self.name} was not ready within {timeout:.0f}s; last lines of {self._log_name}:\n"
            f"{self.log_tail()}"
        )

    def logged(self, text: str) -> bool:
        """Whether the log contains ``text`` (a readiness check for children that say so)."""
        return text in self.log_text()

    def log_text(self) -> str:
        return self._read_log(None).decode(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        """The log's last ``lines`` lines, or a note that it is empty."""
        text = self._read_log(_LOG_TAIL_BYTES).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"

    @property
    def _log_name(self) -> str:
        return str(self._log_path) if self._log_path is not None else "its log"

    def _read_log(self, last: int | None) -> bytes:
        """The log's content (its ``last`` bytes only, if given)."""
        try:
            if self._log_file is not None:
                fd = self._log_file.fileno()
                size = os.fstat(fd).st_size
                start = 0 if last is None else max(0, size - last)
                return os.pread(fd, size - start, start)
            if self._log_path is None:
                return b""
            with self._log_path.open("rb") as log:
                if last is not None:
                    log.seek(0, os.SEEK_END)
                    log.seek(max(0, log.tell() - last))
                return log.read()
        except (OSError, ValueError):
            return b""

    # -------------------------------------------------------------- stop

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (the child and whatever it spawned)."""
        if self.running:
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, sig)

    def stop(self, timeout: float | None = None, *, keep_log: bool = False) -> int | None:
        """SIGTERM the group; SIGKILL it if still alive after ``timeout`` (default ``stop_timeout``).

        Returns the exit status (None if never started). A second stop is a no-op.
        """
        process = self._process
        if process is not None and process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_watch()
        if keep_log:
            self.keep_log()
        if self._temporary_log and self._log_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._log_path.unlink()
            self._log_path = None
        log_file, self._log_file = self._log_file, None
        if log_file is not None:
            log_file.close()
        return process.returncode if process is not None else None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the group at once, no graceful shutdown, and reap the child."""
        process = self._process
        if process is not None and process.poll() is None:
            self.signal(signal.SIGKILL)
            process.wait(timeout)
        self._close_watch()

    def _close_watch(self) -> None:
        fd, self._watch_fd = self._watch_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"ended {self.returncode}" if self._process else "not started"
        return f"<Child {self.name} pid={self.pid} {state}>"
