"""The processes dvp starts for a user: they restart at once after a crash, never outlive
the command that started them, and never share a database.

``dvp server`` and ``dvp chain up`` run as real commands (``python -m starter.cli``)
with the real ``temporal`` binary and anvil; a crash is a SIGKILL of one process, as
the OOM killer would send it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connection import connect_client
from domain import Instruction, TradeStatus, load_config
from processes.anvil import AnvilError, find_anvil
from processes.children import Child, parent_of, pid_alive
from processes.devserver import DevServer, find_temporal_binary
from processes.ports import free_port, port_in_use
from starter.client import SettlementClient
from starter.ledgers import all_open_holds

from ._fixtures_auth import token
from ._fixtures_evm import need
from .test_faults import (
    WorkerProcess,
    assert_whole,
    balances,
    config_for,
    dvp,
    expected_balances,
    seeded_ledgers,
    wait_all,
    workers,
)

# Who runs and who listens is read from Linux's /proc.
pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc")

REPO = Path(__file__).resolve().parent.parent
TIME_WAIT = "06"  # the TCP state, as /proc/net/tcp writes it


# --------------------------------------------------------------------- helpers


@dataclass
class Address:
    """Where a ``dvp server`` that a test runs serves (what ``config_for`` needs)."""

    address: str
    namespace: str = "default"


def dvp_command(log_path: Path, *args: str) -> Child:
    """``python -m starter.cli ARGS`` (the ``dvp`` command) as a child process."""
    return Child([sys.executable, "-m", "starter.cli", *args], name="dvp", cwd=REPO, log_path=log_path)


def dvp_server(log_path: Path, port: int, ui_port: int, db: Path | None = None) -> Child:
    args = ["server", "--port", str(port), "--ui-port", str(ui_port)]
    return dvp_command(log_path, *args, *(["--db", str(db)] if db else []))


@dataclass
class Leftovers:
    """What a test's processes may leave behind when they are killed, removed after it."""

    pids: list[int] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    left = Leftovers()
    yield left
    for pid in left.pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for path in left.files:
        path.unlink(missing_ok=True)


def serving(server: Child, leftovers: Leftovers, timeout: float = 60) -> int:
    """Wait until ``dvp server`` serves; the pid of its Temporal server (its only child)."""
    server.wait_ready(lambda: server.logged("Press Ctrl-C"), timeout)
    assert server.pid is not None
    found = children_of(server.pid)
    leftovers.pids += found
    # A server's temporary log outlives a dvp server that is killed.
    leftovers.files += [Path(log) for log in re.findall(r"^Log\s+(\S+)", server.log_text(), re.M)]
    assert len(found) == 1, (found, server.log_text())
    return found[0]


def children_of(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [child for child in pids if parent_of(child) == pid]


def gone_within(seconds: float, pids: list[int], ports: list[int]) -> bool:
    """Whether every process in ``pids`` has ended and every port is free within ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(pid_alive(p) for p in pids) and not any(port_in_use(p) for p in ports):
            return True
        time.sleep(0.1)
    return False


def time_wait_on(port: int) -> bool:
    """Whether a TCP connection of local port ``port`` sits in TIME_WAIT."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TIME_WAIT and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def plain_bind_fails(port: int) -> bool:
    """Whether a bind without SO_REUSEADDR (the old port check) fails on ``port``."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# ------------------------------------------- a restart right after a crash


@pytest.mark.slow
async def test_after_the_temporal_server_is_killed_dvp_server_restarts_at_once_and_trades_end_whole(
    tmp_path: Path, leftovers: Leftovers
) -> None:
    """Given the standard accounts and 24 trades in flight (20 that settle, 4 whose seller is
    short), the Temporal server and the worker are SIGKILLed. ``dvp server`` on the same
    ``--db`` and port serves again within seconds, though the killed server's connections
    are in TIME_WAIT; with a new worker every trade ends whole."""
    port, ui_port = free_port(), free_port()
    db = tmp_path / "temporal.db"
    first = dvp_server(tmp_path / "server-1.log", port, ui_port, db).start()
    try:
        temporal_pid = serving(first, leftovers)
        config_path = config_for(tmp_path, Address(f"127.0.0.1:{port}"), "restart")
        config = load_config(config_path)
        good = [dvp(f"R-dvp-{i}", "bob", "10", f"{100 + i}.25") for i in range(20)]
        short = [dvp(f"R-short-{i}", "carol", "5000", f"10.0{i}", settle_within="PT15S") for i in range(4)]
        instructions = [Instruction.model_validate(t) for t in good + short]
        trade_ids = [i.trade_id for i in instructions]

        with seeded_ledgers(config) as ledgers:
            seeded = balances(ledgers)
            async with workers() as started:
                worker = WorkerProcess(config_path, tmp_path / "worker-1.log")
                started.append(worker)
                await worker.started()
                client = SettlementClient(await connect_client(config.temporal.address), config, token("ops"))
                await client.submit_many(good + short, wait_accepted=False)
                end = time.monotonic() + 20
                while not all_open_holds(ledgers):
                    assert time.monotonic() < end, "no trade ever held a leg"
                    await asyncio.sleep(0.01)

                # A connection of our own, closed after the server died, is sure to leave
                # the server's end in TIME_WAIT (the worker's connections may too).
                probe = socket.create_connection(("127.0.0.1", port))
                await asyncio.sleep(0.2)
                os.kill(temporal_pid, signal.SIGKILL)
                assert first.process is not None
                assert first.process.wait(20) == 1  # dvp server reports its server's death
                probe.close()
                worker.kill()
                assert all_open_holds(ledgers), "every trade ended before the kill"
                assert time_wait_on(port) and plain_bind_fails(port)  # what blocked the restart

                began = time.monotonic()
                second = dvp_server(tmp_path / "server-2.log", port, ui_port, db).start()
                try:
                    serving(second, leftovers)
                    took = time.monotonic() - began
                    assert took < 10, f"dvp server took {took:.1f}s to serve again"

                    again = WorkerProcess(config_path, tmp_path / "worker-2.log")
                    started.append(again)
                    await again.started()
                    client = SettlementClient(
                        await connect_client(config.temporal.address), config, token("ops")
                    )
                    views = await wait_all(client, trade_ids, timeout=90)
                finally:
                    assert second.stop(20) == 0, second.log_tail()

            assert_whole(instructions, views, ledgers)
            assert {views[t["trade_id"]].status for t in good} == {TradeStatus.SETTLED}
            assert {views[t["trade_id"]].status for t in short} == {TradeStatus.EXPIRED}
            assert balances(ledgers) == expected_balances(seeded, instructions, views)
    finally:
        first.kill()


def test_the_port_check_ignores_time_wait_but_not_a_listener() -> None:
    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        assert port_in_use(port)
        accepted.close()  # the server's end closes first: it is the one left in TIME_WAIT
        client.close()
    assert time_wait_on(port) and plain_bind_fails(port)
    assert not port_in_use(port)


# ------------------------------------------------ never outliving dvp


@pytest.mark.slow
def test_killing_dvp_server_takes_its_temporal_server_and_frees_the_port(
    tmp_path: Path, leftovers: Leftovers
) -> None:
    port, ui_port = free_port(), free_port()
    server = dvp_server(tmp_path / "server.log", port, ui_port, tmp_path / "temporal.db").start()
    try:
        temporal_pid = serving(server, leftovers)
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        assert gone_within(5, [temporal_pid], [port, ui_port]), (
            f"the Temporal server {temporal_pid} outlived dvp server"
        )
    finally:
        server.kill()


@pytest.mark.slow
def test_killing_dvp_chain_up_takes_its_anvil_and_frees_the_port(
    tmp_path: Path, leftovers: Leftovers
) -> None:
    try:
        find_anvil()
    except AnvilError as exc:
        need(str(exc))
    port = free_port()
    config = tmp_path / "dvp.toml"
    chain = dvp_command(tmp_path / "chain.log", "chain", "up", "--config", str(config), "--port", str(port))
    chain.start()
    try:
        chain.wait_ready(lambda: chain.logged("Press Ctrl-C"), 60)
        assert chain.pid is not None
        nodes = children_of(chain.pid)
        leftovers.pids += nodes
        assert len(nodes) == 1 and port_in_use(port), chain.log_text()
        os.kill(chain.pid, signal.SIGKILL)
        assert gone_within(5, nodes, [port]), f"anvil {nodes} outlived dvp chain up"
    finally:
        chain.kill()


# A parent that starts a child from a thread that ends at once (as asyncio.to_thread
# does), says both pids, and waits to be killed.
PARENT = """
import sys, threading, time
from processes.children import Child
child = Child(["sleep", "600"], watch=sys.argv[1], anonymous_log=True)
thread = threading.Thread(target=child.start)
thread.start()
thread.join()
print("child", child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("watch", ["pdeathsig", "pipe"])
def test_a_child_outlives_the_thread_that_started_it_but_not_its_parent(watch: str, tmp_path: Path) -> None:
    parent = Child([sys.executable, "-c", PARENT, watch], cwd=REPO, log_path=tmp_path / "parent.log").start()
    try:
        parent.wait_ready(lambda: parent.logged("child "), 30)
        child_pid = int(parent.log_text().split("child ")[1].split()[0])
        time.sleep(0.5)
        assert pid_alive(child_pid), "the child died with the thread that started it"
        assert parent.pid is not None
        os.kill(parent.pid, signal.SIGKILL)
        assert gone_within(5, [child_pid], []), "the child outlived its parent"
    finally:
        parent.kill()


BANK_PARENT = """
import asyncio, sys
from processes.bank import BankService

async def main():
    bank = await asyncio.to_thread(BankService(sys.argv[1], int(sys.argv[2]), sys.argv[3]).start)
    print("bank", bank.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_bank_service_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """As under ``dvp demo --cross-system`` (and the tests, which start it from a thread)."""
    port, config = free_port(), tmp_path / "bank.toml"
    config.write_text(f'[bank]\nurl = "sqlite:///{tmp_path / "bank.db"}"\n\n[bank.tokens]\nw = "t"\n')
    command = [sys.executable, "-c", BANK_PARENT, str(config), str(port), str(tmp_path / "bank.log")]
    parent = Child(command, cwd=REPO, log_path=tmp_path / "parent.log").start()
    try:
        parent.wait_ready(lambda: parent.logged("bank "), 60)
        bank_pid = int(parent.log_text().split("bank ")[1].split()[0])
        assert port_in_use(port)
        assert parent.pid is not None
        os.kill(parent.pid, signal.SIGKILL)
        assert gone_within(5, [bank_pid], [port]), "the bank service outlived the process that started it"
    finally:
        parent.kill()


# ------------------------------------------------------ who holds what


@pytest.mark.slow
def test_a_second_dvp_server_on_a_database_in_use_is_refused_naming_the_first(
    tmp_path: Path, leftovers: Leftovers
) -> None:
    db = tmp_path / "temporal.db"
    first = dvp_server(tmp_path / "server-1.log", free_port(), free_port(), db).start()
    try:
        temporal_pid = serving(first, leftovers)
        port, ui_port = free_port(), free_port()
        second = dvp_server(tmp_path / "server-2.log", port, ui_port, db).start()
        try:
            assert second.process is not None
            assert second.process.wait(30) == 1, second.log_text()
        finally:
            if second.pid is not None:
                leftovers.pids += children_of(second.pid)
            second.kill()
        message = second.log_text()
        assert f"the database file {db} is in use" in message
        assert f"pid {first.pid}" in message and f"Temporal server is pid {temporal_pid}" in message
        assert f"kill {first.pid}" in message
        assert not port_in_use(port)  # nothing was started
    finally:
        assert first.stop(20) == 0, first.log_tail()
    # Once the first is gone, the same database is free again.
    third = dvp_server(tmp_path / "server-3.log", free_port(), free_port(), db).start()
    try:
        serving(third, leftovers)
    finally:
        assert third.stop(20) == 0, third.log_tail()


@pytest.mark.slow
def test_a_taken_port_is_refused_naming_what_holds_it(tmp_path: Path, leftovers: Leftovers) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused = dvp_server(tmp_path / "refused.log", port, free_port()).start()
        assert refused.process is not None
        assert refused.process.wait(30) == 1, refused.log_text()
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()} (" in refused.log_text()
    assert f"stop it with: kill {os.getpid()}" in refused.log_text()

    # A Temporal server of dvp's left running from the same database by a parent that is gone
    # (a dvp of before the lock, whose server outlived it).
    db, port = tmp_path / "temporal.db", free_port()
    command = DevServer(port=port, headless=True, db_file=db).command(find_temporal_binary())
    spawned = subprocess.run(
        ["sh", "-c", '"$@" >/dev/null 2>&1 </dev/null & echo $!', "sh", *command],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    orphan = int(spawned.stdout)
    leftovers.pids.append(orphan)
    end = time.monotonic() + 30
    while not port_in_use(port):
        assert pid_alive(orphan) and time.monotonic() < end, "the orphan server did not start"
        time.sleep(0.1)
    refused = dvp_server(tmp_path / "refused-2.log", port, free_port(), db).start()
    assert refused.process is not None
    assert refused.process.wait(30) == 1, refused.log_text()
    assert (
        f"port {port} on 127.0.0.1 is held by a Temporal server that dvp started from the same "
        f"database file {db}: pid {orphan}; stop it with: kill {orphan}\n"
    ) in refused.log_text()
