"""``dvp bench`` at a tiny size: it runs end to end, reports every figure, and its check passes.

No timing is asserted: the figures depend on the machine. The bench starts its own
in-memory dev server and a worker process, so this takes some seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.runner import KINDS, BenchOptions, _round_order, add_parser, cmd_bench, render, run_bench

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# Every figure the bench reports per worker count, as a path into the run's JSON.
FIGURES = [
    *(
        (kind, *path)
        for kind in ("trades", "ceiling", "naive")
        for path in (
            ("rate_per_s",),
            ("wall_s",),
            ("latency_ms", "p50"),
            ("latency_ms", "p95"),
            ("latency_ms", "p99"),
            ("client_latency_ms", "p50"),
            ("cpu_s", "server"),
            ("cpu_s", "workers"),
            ("cpu_ms_per_item",),
        )
    ),
    *(("idle", kind, "latency_ms", "p50") for kind in ("trades", "ceiling", "naive")),
    ("ratios", "trades_per_ceiling"),
    ("ratios", "trades_per_naive"),
    ("ratios", "ceiling_cpu_per_trade_cpu"),
    ("rss_peak_mb", "server"),
    ("history_per_workflow", "trades", "workflow_tasks"),
    # the default: ledger calls as local activities (their activity_tasks count is 0)
    ("history_per_workflow", "trades", "local_activities"),
    *(("codec_per_workflow", kind, "cpu_ms") for kind in ("trades", "ceiling", "naive")),
    ("ratios", "codec_cpu_per_trade_cpu"),
]


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    options = BenchOptions(
        trades=10,
        concurrency=5,
        workers=[1],
        idle=3,
        warmup=5,
        server_storage="memory",
        timeout=120,
        netting=2000,
    )
    return run_bench(options)


def test_bench_reports_every_figure(result: dict[str, Any]) -> None:
    (run,) = result["runs"]
    assert run["workers"] == 1
    for path in FIGURES:
        value = _get(run, path)
        assert isinstance(value, int | float) and value > 0, f"{'.'.join(path)} = {value!r}"
    assert run["trades"]["count"] == run["trades"]["completed"] == 10
    # the load is measured warm: its warm-up runs as many at once as the load does
    assert run["warmup"] == {"before_idle": [5, 1], "before_load": [5, 5]}
    rounds = run["ratios"]["per_round"]
    for name in ("trades_per_ceiling", "trades_per_naive"):
        assert len(rounds[name]) == result["options"]["rounds"], (name, rounds[name])
        assert all(r > 0 for r in rounds[name]), (name, rounds[name])
    assert all(mb > 0 for mb in run["rss_peak_mb"]["workers"])
    env = result["environment"]
    for key in ("cores", "python", "temporalio", "temporal_cli", "temporal_server", "sqlite_ledger"):
        assert env[key], key
    assert env["ledger"] == "sqlite"
    assert "close_time" in env["latency_measure"]
    assert "1 worker" in render(result)
    assert json.loads(json.dumps(result)) == result  # what --json prints and --output writes


def test_bench_encrypts_every_payload_of_all_three_kinds(result: dict[str, Any]) -> None:
    (run,) = result["runs"]
    codec = run["codec_per_workflow"]
    for kind in KINDS:
        assert codec[kind]["payloads"] > 0, kind
        assert codec[kind]["encrypted"] == codec[kind]["payloads"], (kind, codec[kind])
    assert "AES-256-GCM" in codec["measure"]
    assert "codec CPU ms per trade" in render(result)


def test_bench_correctness_check_passed(result: dict[str, Any]) -> None:
    assert result["correctness"]["passed"]
    (run,) = result["runs"]
    check = run["correctness"]
    assert all(check["checks"].values()), check
    # the two warm-ups (before the idle figures, before the load), idle and loaded trades all settled
    assert check["settled"] == check["trades"] == 5 + 5 + 3 + 10
    assert check["problems"] == []


def test_bench_reports_the_netting_batch(result: dict[str, Any]) -> None:
    netting = result["netting"]
    assert (netting["trades"], netting["status"], netting["settled"]) == (2000, "SETTLED", 2000)
    assert netting["rate_per_s"] > 0 and netting["wall_s"] > 0
    assert {a["asset"] for a in netting["assets"]} == {"EUR", "BOND-2030"}
    assert netting["correctness"]["passed"], netting["correctness"]
    assert "netting batch: 2,000 trades" in render(result)


def test_under_load_each_kind_runs_after_each_other_kind_in_turn() -> None:
    """No kind always runs right after the same other one, so none always pays for what
    the batch before it left the server to finish."""
    sequence = [kind for r in range(4) for kind in _round_order(KINDS, r)]
    follows = {(before, after) for before, after in zip(sequence, sequence[1:], strict=False)}

    assert all(sorted(_round_order(KINDS, r)) == sorted(KINDS) for r in range(4))
    assert follows == {(a, b) for a in KINDS for b in KINDS if a != b}


def test_add_parser_registers_dvp_bench() -> None:
    parser = argparse.ArgumentParser(prog="dvp")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "-n", "5", "-c", "2", "--workers", "1,2", "--ledger", "postgres"])
    assert args.handler is cmd_bench
    options = BenchOptions.from_args(args)
    assert (options.trades, options.concurrency, options.workers, options.ledger) == (
        5,
        2,
        [1, 2],
        "postgres",
    )
    assert options.server_storage == "file" and options.submit == "start"
    assert parser.parse_args(["bench", "--netting", "0"]).netting == 0


def test_bench_cli_refuses_bad_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--workers", "0"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr and "at least 1" in done.stderr
