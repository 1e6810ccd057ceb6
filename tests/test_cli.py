"""The ``dvp`` command as a user runs it: exit codes and the documented JSON shapes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from starter.instructions import dvp_instruction

from ._fixtures_auth import auth_toml, token
from ._fixtures_settlement import Engine

REPO = Path(__file__).resolve().parent.parent


def config_file(engine: Engine, address: str, tmp_path: Path) -> Path:
    lines = []
    for name, ledger in engine.config.ledgers.items():
        lines += [f"[ledgers.{name}]", 'kind = "sql"', f'url = "{ledger.url}"', ""]
    prefix = engine.config.temporal.task_queue_prefix
    lines += ["[compliance]", 'sanctioned = ["mallory"]', ""]
    lines += ["[temporal]", f'address = "{address}"', f'task_queue_prefix = "{prefix}"', "", auth_toml()]
    path = tmp_path / "dvp.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def dvp(
    config: Path, *args: str, stdin: str | None = None, as_: str | None = "ops"
) -> subprocess.CompletedProcess[str]:
    """Run ``dvp`` with ``$DVP_TOKEN`` a test issuer's token for ``as_`` (None: no token)."""
    env = {**os.environ, "DVP_CONFIG": str(config)}
    env.pop("TEMPORAL_ADDRESS", None)
    env.pop("DVP_TOKEN", None)
    if as_ is not None:
        env["DVP_TOKEN"] = token(as_)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "starter.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def trade(trade_id: str, cash: str = "9950.00") -> dict[str, Any]:
    return dvp_instruction(trade_id, "bob", "alice", "100", cash)


async def test_submit_wait_status_and_balances_as_json(
    settlement: Engine, temporal_server: Any, tmp_path: Path
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)

    submitted = await dvp(config, "submit", "-", "--wait", "--json", stdin=json.dumps(trade("C-1")))
    status = await dvp(config, "status", "C-1", "--json")
    balances = await dvp(config, "ledger", "balances", "--json")
    holds = await dvp(config, "ledger", "holds", "--json")

    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["status"] == "SETTLED"
    view = json.loads(status.stdout)
    assert {"trade_id", "status", "reason", "legs", "timeline"} <= set(view)
    assert view["legs"][1]["amount"] == "9950.00"
    rows = {(r["ledger"], r["account"]): r for r in json.loads(balances.stdout)}
    columns = {"ledger", "account", "asset", "owner", "balance", "held", "available"}
    assert set(rows[("cash", "bob-cash")]) == columns
    assert rows[("cash", "bob-cash")]["balance"] == "9950.00"
    assert json.loads(holds.stdout) == []


async def test_malformed_file_exits_2_naming_the_field_and_submits_nothing(
    settlement: Engine, temporal_server: Any, tmp_path: Path
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)
    before = settlement.balances()
    batch = [trade("C-ok"), trade("C-bad", cash="99.999")]

    result = await dvp(config, "submit", "-", stdin=json.dumps(batch))
    missing = await dvp(config, "status", "C-ok")

    assert result.returncode == 2
    assert "instruction 1 refused: legs[1].amount: 99.999 has 3 decimals; EUR allows 2" in result.stderr
    assert missing.returncode == 1 and "no trade 'C-ok'" in missing.stderr
    assert settlement.balances() == before


async def test_rejected_approve_exits_1_with_the_reason(
    settlement: Engine, temporal_server: Any, tmp_path: Path
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)
    await settlement.client.submit({**trade("C-appr"), "approvers": ["notary"]})

    wrong = await dvp(config, "approve", "C-appr", "--as", "bob", as_="bob")
    right = await dvp(config, "approve", "C-appr", "--as", "notary", as_="notary")

    assert wrong.returncode == 1
    assert "rejected: bob is not an approver of this trade" in wrong.stderr
    assert right.returncode == 0, right.stderr
    assert (await settlement.client.wait("C-appr")).status.value == "SETTLED"
