"""TCP ports on this host: a free one, whether one is in use, and who listens on it.

``port_in_use`` answers what a server about to listen there needs to know: whether
something accepts connections on the port, or a bind with ``SO_REUSEADDR`` (as the
Temporal binary, anvil and uvicorn all bind) fails. Connections left in TIME_WAIT by a
server that just died do not count, so a restart right after a crash goes ahead.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

__all__ = [
    "HOST",
    "accepts_connections",
    "command_line",
    "free_port",
    "listener",
    "listener_pids",
    "port_in_use",
]

HOST = "127.0.0.1"
_LISTEN = "0A"  # the TCP state LISTEN, as /proc/net/tcp writes it


def free_port(host: str = HOST) -> int:
    """A port nothing uses now (the kernel's pick; another process may take it before you do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts_connections(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    """Whether something accepts a TCP connection on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether a server could not listen on ``host:port`` now (see the module docstring)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return accepts_connections(port, host)


def listener_pids(port: int) -> list[int]:
    """The pids of the processes listening on TCP ``port`` (any address); [] where unknown.

    Read from Linux's /proc; elsewhere, or for processes of other users, nothing is known.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
    return sorted(pids)


def command_line(pid: int) -> list[str]:
    """The command line of process ``pid`` ([] if gone or unreadable; Linux only)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def listener(port: int) -> tuple[int, str] | None:
    """A process listening on ``port`` and its command line (shortened), if known."""
    pids = listener_pids(port)
    if not pids:
        return None
    shown = " ".join(command_line(pids[0])) or "?"
    return pids[0], shown if len(shown) <= 100 else shown[:97] + "..."
