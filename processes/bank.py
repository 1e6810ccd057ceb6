"""The bank's core-ledger service in a process of its own: ``python -m bank serve``.

    service = BankService(config_path, port, log_path).start()   # ready: GET /health is 200
    service.kill()                                                # SIGKILL, mid-whatever
    service.start()                                               # back on the same port

The configuration file is the bank's own (``bank/service.py``); ``port`` overrides its
``[bank] port``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from .children import Child, ChildError
from .ports import HOST

__all__ = ["BankService"]

REPO = Path(__file__).resolve().parents[1]


class BankService(Child):
    """``python -m bank serve --config FILE --port N`` as a child process on 127.0.0.1."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        port: int,
        log_path: str | os.PathLike[str] | None = None,
        *,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            [sys.executable, "-m", "bank", "serve", "--config", os.fspath(config_path), "--port", str(port)],
            name="the bank service",
            cwd=REPO,
            log_path=log_path,
        )
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.startup_timeout = startup_timeout

    def start(self) -> Self:
        """Run the service and wait until ``/health`` answers 200."""
        if not self.running:
            super().start()
            try:
                self.wait_ready(self.healthy, self.startup_timeout, interval=0.05)
            except ChildError:
                self.stop(keep_log=True)
                raise
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False
