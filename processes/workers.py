"""A dvp worker in a process of its own, as it would be deployed.

    worker = await WorkerProcess(config_path, log_path).started()   # polls its task queues
    worker.kill()                                                   # SIGKILL, mid-whatever

``module`` runs ``python -m MODULE --config FILE`` instead (the bench's ``bench.worker``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from .children import Child

__all__ = ["RUNNING", "WorkerProcess"]

REPO = Path(__file__).resolve().parents[1]
RUNNING = "worker running"  # what worker.py logs once it polls its task queues


class WorkerProcess(Child):
    """``python worker.py --config FILE [ARGS]`` (or ``-m module``) as a child process."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        *args: str,
        module: str | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 20.0,
    ) -> None:
        program = ["-m", module] if module else [str(REPO / "worker.py")]
        super().__init__(
            [sys.executable, *program, "--config", os.fspath(config_path), *args],
            name=f"the worker ({module or 'worker.py'})",
            cwd=REPO,
            env=env,
            log_path=log_path,
            stop_timeout=stop_timeout,
        )

    def wait_running(self, timeout: float = 30.0) -> None:
        """Until the worker logs that it polls its task queues (``worker.py`` only)."""
        self.wait_ready(lambda: self.logged(RUNNING), timeout)

    async def started(self, timeout: float = 30.0) -> Self:
        """Start, then wait (without blocking the event loop) until it polls its task queues."""
        self.start()
        await self.wait_ready_async(lambda: self.logged(RUNNING), timeout)
        return self
