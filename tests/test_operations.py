"""Operating dvp: traces, metrics, the trade list without a worker, reconciliation, the Web UI.

Every process here is the real one a deployment runs: ``dvp`` commands, ``worker.py``,
the bank service (``python -m bank serve``), the Temporal dev server and its Web UI in
headless Chromium. Spans are received over OTLP/HTTP by a small receiver in this test,
metrics read from the worker's Prometheus endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from temporalio.client import Client

from domain import Config, HoldStatus, LedgerConfig, TradeStatus
from processes.bank import BankService
from processes.ports import free_port
from processes.workers import WorkerProcess
from starter.client import SettlementClient
from starter.instructions import dvp_instruction
from starter.ledgers import opened, parse_seed, seed

from ._fixtures_auth import token
from ._fixtures_settlement import STANDARD_ACCOUNTS, make_config, run_engine, sqlite_urls, write_config

REPO = Path(__file__).resolve().parent.parent
D = Decimal
BANK_TOKEN = "ops-bank-token"

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ helpers


async def dvp(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``dvp ARGS`` as a user runs it, with ``config``, acting as the operator ``ops``."""
    full = {**os.environ, "DVP_CONFIG": str(config), "DVP_TOKEN": token("ops"), **(env or {})}
    full.pop("TEMPORAL_ADDRESS", None)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "starter.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full,
        timeout=180,
    )


async def until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while not (value := await asyncio.to_thread(condition)):
        assert time.monotonic() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)
    return value


def forged_token(subject: str) -> str:
    """A real token of eve's whose subject was changed to ``subject`` after signing."""
    header, payload, signature = token("eve").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    changed = base64.urlsafe_b64encode(json.dumps({**claims, "sub": subject}).encode()).rstrip(b"=").decode()
    return f"{header}.{changed}.{signature}"


def seeded(config: Config) -> None:
    with opened(config) as ledgers:
        seed(config, parse_seed({"accounts": STANDARD_ACCOUNTS}, config), ledgers)


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    receiver._received(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _received(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = next(
                (_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    with self._lock:
                        self.spans.append(
                            {
                                "service": service,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "events": [
                                    {a.key: _value(a.value) for a in event.attributes}
                                    for event in span.events
                                ],
                                "status": span.status.message,
                            }
                        )

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def bank_service(tmp_path: Path, metrics_port: int | None = None) -> BankService:
    config = tmp_path / "bank.toml"
    config.write_text(
        f'[bank]\nurl = "sqlite:///{tmp_path / "bank.db"}"\nport = 1\nname = "bank"\n\n'
        f'[bank.tokens]\ndvp-worker = "{BANK_TOKEN}"\n'
    )
    return BankService(config, free_port(), tmp_path / "bank.log", metrics_port=metrics_port)


def with_bank(config: Config, bank: BankService) -> Config:
    """``config`` with its ``cash`` ledger at the bank (kind http)."""
    cash = LedgerConfig.model_validate({"kind": "http", "url": bank.url, "token": BANK_TOKEN})
    return config.model_copy(update={"ledgers": {**config.ledgers, "cash": cash}})


# ------------------------------------------------------------------ tracing


def orphans(spans: list[dict[str, Any]]) -> list[str]:
    """The spans of the submission's trace whose parent is not in it: the root alone, once all came."""
    root = next(s for s in spans if s["name"] == "dvp submit")
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    ids = {s["span_id"] for s in trace}
    return [s["name"] for s in trace if s["parent_id"] not in ids]


async def test_one_trade_is_one_trace_from_dvp_submit_to_the_bank(
    temporal_server: Any, task_queue_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given the worker, the bank and ``dvp submit`` exporting to an OTLP/HTTP receiver: the
    spans of one settled DvP (cash at the bank) form one trace holding the CLI's, the
    client's, the workflow's, each ledger call's and the bank service's spans; none of
    them carries an account id, an owner or an amount."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s: processes get killed
        bank = await asyncio.to_thread(bank_service(tmp_path).start)
        try:
            config = with_bank(make_config(sqlite_urls(tmp_path), task_queue_prefix), bank)
            seeded(config)
            path = write_config(tmp_path / "dvp.toml", config, address=temporal_server.address)
            (tmp_path / "trade.json").write_text(
                json.dumps(dvp_instruction("OT-1", "bob", "alice", "100", "9950.00"))
            )
            with WorkerProcess(path, tmp_path / "worker.log") as worker:
                await worker.started()
                submitted = await dvp(path, "submit", str(tmp_path / "trade.json"), "--wait", "--json")
                assert submitted.returncode == 0, submitted.stderr
                assert json.loads(submitted.stdout)["status"] == "SETTLED"

                def complete() -> list[dict[str, Any]] | None:
                    spans = receiver.received()
                    names = {s["name"] for s in spans}
                    wanted = {"dvp submit", "commit cash", "commit securities"}
                    bank_commit = any(s["service"] == "dvp-bank" and "commit" in s["name"] for s in spans)
                    return spans if wanted <= names and bank_commit else None

                spans = await until(complete, "the trade's spans arrived")
                # A parent span ends after its children and may come in a later export
                # batch: give the stragglers a few seconds before judging the tree.
                for _ in range(50):
                    if orphans(spans) == ["dvp submit"]:
                        break
                    await asyncio.sleep(0.1)
                    spans = receiver.received()
        finally:
            bank.kill()

    root = next(s for s in spans if s["name"] == "dvp submit")
    trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
    by_service = {s["service"] for s in trace}
    names = {s["name"] for s in trace}
    assert {"dvp-cli", "dvp-worker", "dvp-bank"} <= by_service, by_service
    assert "StartUpdateWithStartWorkflow:Settlement" in names, names
    assert "RunWorkflow:Settlement" in names, names
    for step in ("check_accounts", "reserve", "pin", "commit"):
        for ledger in ("cash", "securities"):
            span = next(s for s in trace if s["name"] == f"{step} {ledger}")
            assert span["attributes"]["dvp.outcome"] == "ok", span
            assert span["attributes"]["dvp.ledger"] == ledger
    bank_spans = [s for s in trace if s["service"] == "dvp-bank"]
    assert any(s["name"] == "POST /holds/{hold_id:path}/commit" for s in bank_spans), bank_spans
    # every span of the trade has a parent in the trade's trace, but the root
    assert orphans(spans) == ["dvp submit"]

    secrets = {a["id"] for a in STANDARD_ACCOUNTS} | {a["owner"] for a in STANDARD_ACCOUNTS}
    amounts = {"100", "9950.00", "9950"}
    for span in spans:
        values = [*span["attributes"].values(), *(v for e in span["events"] for v in e.values())]
        for value in values:
            text = str(value)
            leaked = [x for x in secrets if re.search(rf"(?<![\w-]){re.escape(x)}(?![\w-])", text)]
            assert not leaked, f"span {span['name']} holds {leaked}: {text}"
            assert text not in amounts, f"span {span['name']} holds an amount: {text}"
            assert not re.search(r"(?<![\w.#-])(9950(\.00)?)(?![\w.])", text), f"{span['name']}: {text}"


# ------------------------------------------------------------------ metrics


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line.strip())
        if not match or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


async def test_worker_metrics_count_exactly_the_outcomes_of_a_run(
    temporal_client: Client, temporal_server: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Given a worker with --metrics-port: two trades settle, one is rejected (a sanctioned
    party), one cancelled (after two refused approvals: eve's, who is no approver, and a
    forged token's), one expires short of funds after recycling. /metrics then counts
    exactly those endings, those refusals by reason, the recycles and the compensations,
    and the open-holds gauges read 0 once every trade has ended."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix, sweep_interval="PT0.3S")
    seeded(config)
    path = write_config(tmp_path / "dvp.toml", config, address=temporal_server.address)
    port = free_port()
    client = SettlementClient(temporal_client, config, token("ops"))
    with WorkerProcess(path, tmp_path / "worker.log", "--metrics-port", str(port)) as worker:
        await worker.started()
        before = await asyncio.to_thread(scrape, port)
        assert total(before, "dvp_trades_ended_total") == 0

        await client.submit(dvp_instruction("M-ok-1", "bob", "alice", "10", "995.00"))
        await client.submit(dvp_instruction("M-ok-2", "bob", "alice", "20", "1990.00"))
        await client.submit(dvp_instruction("M-sanctioned", "mallory", "alice", "1", "99.50"))
        await client.submit(dvp_instruction("M-cancel", "bob", "alice", "5", "497.50", approvers=["notary"]))
        with contextlib.suppress(Exception):
            await client.approve("M-cancel", token=token("eve"))  # not an approver: refused
        with contextlib.suppress(Exception):  # signed by a key the worker does not know
            await client.approve("M-cancel", token=forged_token("notary"))
        await client.cancel("M-cancel", "ops", "metrics test")
        # carol has 5,000.00 EUR: she recycles until the deadline, holding her bonds' counterpart
        await client.submit(dvp_instruction("M-short", "bob", "carol", "1", "6000.00", settle_within="PT2S"))
        ends = {
            t: (await client.wait(t, timeout=30)).status
            for t in ("M-ok-1", "M-ok-2", "M-sanctioned", "M-cancel", "M-short")
        }
        assert ends == {
            "M-ok-1": TradeStatus.SETTLED,
            "M-ok-2": TradeStatus.SETTLED,
            "M-sanctioned": TradeStatus.REJECTED,
            "M-cancel": TradeStatus.CANCELLED,
            "M-short": TradeStatus.EXPIRED,
        }

        def settled_down() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            samples = scrape(port)
            gauges = [v for (n, _), v in samples.items() if n == "dvp_open_holds"]
            measured = any(
                n == "dvp_open_holds" and ("ledger", "securities") in ls for (n, ls), _ in samples.items()
            )
            return (
                samples
                if measured and total(samples, "dvp_trades_ended_total") == 5 and not any(gauges)
                else None
            )

        samples = await until(settled_down, "every trade counted and no hold open", timeout=20)

    ended = {
        status: total(samples, "dvp_trades_ended_total", status=status)
        for status in ("SETTLED", "REJECTED", "CANCELLED", "EXPIRED", "SETTLED_PARTIAL", "ONE_SIDED")
    }
    assert ended == {
        "SETTLED": 2,
        "REJECTED": 1,
        "CANCELLED": 1,
        "EXPIRED": 1,
        "SETTLED_PARTIAL": 0,
        "ONE_SIDED": 0,
    }
    assert total(samples, "dvp_settlement_latency_count") == 5
    assert total(samples, "dvp_settlement_latency_count", status="SETTLED") == 2
    assert total(samples, "dvp_refusals_total") == 2
    assert total(samples, "dvp_refusals_total", request="approval", reason="not_an_approver") == 1
    assert total(samples, "dvp_refusals_total", request="approval", reason="Unauthenticated") == 1
    assert total(samples, "dvp_recycles_total") >= 1
    assert total(samples, "dvp_fills_total") == 0
    # M-short's bond hold was released at its expiry; the cancelled trade reserved nothing
    assert total(samples, "dvp_compensations_total", ledger="securities", held="true") == 1
    assert total(samples, "dvp_held_amount") == 0
    assert total(samples, "dvp_ledger_calls_total", step="commit", outcome="ok") >= 2
    # the SDK's own metrics are there too
    assert any(n.startswith("temporal_") for n, _ in samples)


# ------------------------------------------------------------------ dvp list


async def test_dvp_list_pages_through_200_trades_with_no_worker_running(
    temporal_client: Client, temporal_server: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Given a run of 200 trades (150 settled, 25 rejected for a sanctioned party, 25
    cancelled while awaiting approval) and then no worker at all: ``dvp list --json``
    pages through them 40 at a time and shows each with its status and reason, and
    without --limit lists them all at once."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    ids = {f"{task_queue_prefix}-L{i:03d}": i for i in range(200)}

    def instruction(trade_id: str, i: int) -> dict[str, Any]:
        if i < 150:
            return dvp_instruction(trade_id, "bob", "alice", "1", "99.50")
        if i < 175:
            return dvp_instruction(trade_id, "mallory", "alice", "1", "99.50")
        return dvp_instruction(trade_id, "bob", "alice", "1", "99.50", approvers=["notary"])

    expected = {t: "SETTLED" if i < 150 else "REJECTED" if i < 175 else "CANCELLED" for t, i in ids.items()}
    async with run_engine(temporal_client, config) as engine:
        results = await engine.client.submit_many(instruction(t, i) for t, i in ids.items())
        assert not [r for r in results if isinstance(r, Exception)]
        await asyncio.gather(
            *(engine.client.cancel(t, "ops", "not needed") for t, i in ids.items() if i >= 175)
        )
        finals = await asyncio.gather(*(engine.client.wait(t, timeout=60) for t in ids))
        assert {f.trade_id: f.status.value for f in finals} == expected
    # the worker has stopped: nothing answers a query now
    path = write_config(tmp_path / "dvp.toml", config, address=temporal_server.address)

    async def listed_everything() -> tuple[dict[str, dict[str, Any]], int] | None:
        seen: dict[str, dict[str, Any]] = {}
        token: str | None = None
        pages = 0
        while True:
            args = ["list", "--json", "--limit", "40", *(["--page-token", token] if token else [])]
            result = await dvp(path, *args)
            assert result.returncode == 0, result.stderr
            page = json.loads(result.stdout)
            assert len(page["trades"]) <= 40
            pages += 1
            seen.update({t["trade_id"]: t for t in page["trades"] if t["trade_id"] in ids})
            token = page["next_page_token"]
            if token is None:
                break
        return (seen, pages) if {t: s["status"] for t, s in seen.items()} == expected else None

    for _ in range(50):  # visibility is eventually consistent
        found = await listed_everything()
        if found:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("dvp list never showed every trade with its final status")
    seen, pages = found
    assert pages >= 5
    cancelled = seen[f"{task_queue_prefix}-L199"]
    assert cancelled["reason"] == "cancelled by ops: not needed"
    assert cancelled["workflow_status"] == "COMPLETED" and cancelled["closed_at"]
    assert "sanctioned party: mallory" in seen[f"{task_queue_prefix}-L160"]["reason"]
    assert seen[f"{task_queue_prefix}-L000"]["reason"] == ""

    everything = await dvp(path, "list", "--json")
    assert everything.returncode == 0, everything.stderr
    assert {
        t["trade_id"]: t["status"] for t in json.loads(everything.stdout) if t["trade_id"] in ids
    } == expected
    text = await dvp(path, "list", "--status", "CANCELLED")
    assert text.returncode == 0 and f"{task_queue_prefix}-L180" in text.stdout
    assert "cancelled by ops: not needed" in text.stdout
    status = await dvp(path, "status", f"{task_queue_prefix}-L199", "--json")  # from its result
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "CANCELLED"
    bad = await dvp(path, "list", "--limit", "40", "--page-token", "not-a-token")
    assert bad.returncode == 2 and "page_token" in bad.stderr, bad.stderr


# ------------------------------------------------------------------ reconcile


def three_legs(trade_id: str, payer: str, cash: str) -> dict[str, Any]:
    """Bob delivers a bond to alice against 99.50 EUR, and ``payer`` pays bob ``cash`` EUR too."""
    instruction = dvp_instruction(trade_id, "bob", "alice", "1", "99.50", settle_within="PT120S")
    extra = {"ledger": "cash", "asset": "EUR", "from": f"{payer}-cash", "to": "bob-cash", "amount": cash}
    return {**instruction, "legs": [*instruction["legs"], extra]}


async def test_reconcile_reports_and_releases_the_holds_of_a_terminated_trade(
    temporal_client: Client, temporal_server: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Given a trade holding a bond and 99.50 EUR while it recycles for carol's 6,000.00 EUR
    (she has 5,000.00), terminated through the Temporal API, beside another trade recycling
    the same way and left running: ``dvp ledger reconcile`` reports the terminated trade's
    two holds and exits 1; ``--release-orphans`` releases exactly those; a second run finds
    nothing; no balance changes and the running trade's holds stay as they were."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    path = write_config(tmp_path / "dvp.toml", config, address=temporal_server.address)
    orphan, running = f"{task_queue_prefix}-orphan", f"{task_queue_prefix}-running"
    async with run_engine(temporal_client, config) as engine:
        await engine.client.submit(three_legs(orphan, "carol", "6000.00"))
        await engine.client.submit(three_legs(running, "carol", "6000.00"))

        def held(trade_id: str) -> list[Any]:
            return sorted((h.ledger, h.hold_id) for h in engine.open_holds() if h.trade_id == trade_id)

        await until(lambda: len(held(orphan)) == 2 and len(held(running)) == 2, "both trades hold two legs")
        await temporal_client.get_workflow_handle(f"trade-{orphan}").terminate(reason="ops test")
        balances = engine.balances()
        running_holds = [h for h in engine.open_holds() if h.trade_id == running]

        found = await dvp(path, "ledger", "reconcile", "--json", "--stuck-after", "P1D")
        assert found.returncode == 1, found.stderr
        report = json.loads(found.stdout)
        assert sorted((o["ledger"], o["hold_id"]) for o in report["orphans"]) == held(orphan)
        assert {(o["workflow_status"], o["releasable"], o["released"]) for o in report["orphans"]} == {
            ("TERMINATED", True, False)
        }
        assert report["stuck"] == [] and report["problems"] == []
        assert len(engine.open_holds()) == 4  # reporting changes nothing

        text = await dvp(path, "ledger", "reconcile", "--stuck-after", "P1D")
        assert text.returncode == 1 and f"{orphan}#0" in text.stdout and "TERMINATED" in text.stdout

        # A worker reconciles on its own too, logging and measuring what it finds (it serves
        # task queues of its own here, so that the trades stay with the engine above).
        other = write_config(
            tmp_path / "other.toml",
            config.model_copy(
                update={
                    "temporal": config.temporal.model_copy(
                        update={"task_queue_prefix": f"{task_queue_prefix}-r"}
                    )
                }
            ),
            address=temporal_server.address,
        )
        port = free_port()
        args = ("--reconcile-every", "PT0.5S", "--metrics-port", str(port))
        with WorkerProcess(other, tmp_path / "reconciling.log", *args) as reconciling:
            await reconciling.started()
            await until(lambda: reconciling.logged(f"hold {orphan}#1 is open"), "the worker logs the orphan")
            samples = await until(
                lambda: (s := scrape(port)) and total(s, "dvp_reconcile_findings", kind="orphans") == 2 and s,
                "the worker measures the orphans",
            )
            assert total(samples, "dvp_reconcile_runs_total", result="found") >= 1
            assert len(held(orphan)) == 2  # it reports, never releases

        released = await dvp(
            path, "ledger", "reconcile", "--release-orphans", "--json", "--stuck-after", "P1D"
        )
        assert released.returncode == 1, released.stderr
        assert sorted(
            (o["ledger"], o["hold_id"]) for o in json.loads(released.stdout)["orphans"] if o["released"]
        ) == [("cash", f"{orphan}#1"), ("securities", f"{orphan}#0")]
        assert held(orphan) == []
        assert [h for h in engine.open_holds() if h.trade_id == running] == running_holds
        assert engine.balances() == balances
        assert engine.ledgers["cash"].get_hold(f"{orphan}#1").status is HoldStatus.RELEASED
        engine.assert_invariants()

        again = await dvp(path, "ledger", "reconcile", "--release-orphans", "--json", "--stuck-after", "P1D")
        assert again.returncode == 0, again.stdout
        assert json.loads(again.stdout) == {"orphans": [], "stuck": [], "problems": []}
        assert engine.balances() == balances

        await engine.client.cancel(running, "ops")
        assert (await engine.client.wait(running, timeout=30)).status is TradeStatus.CANCELLED


# ------------------------------------------------------------------ the Web UI

# Where the Web UI's "Configure columns" dialog keeps the workflow list's columns (the
# browser's localStorage): set here as an operator following the README sets it there.
UI_COLUMNS_KEY = "namespace-workflow-table-columns"


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "chromium is not installed: apt-get install -y chromium (make setup installs it)"
    return found


class Browser:
    """Headless Chromium driven over its DevTools protocol (one page)."""

    def __init__(self, profile: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={self.port}",
                "--window-size=1600,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its renderers and crash handler too: killed as one group
        )
        self._next = 0
        self._socket: Any = None

    async def __aenter__(self) -> Browser:
        import websockets

        def page_socket() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=1) as r:
                    pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            except OSError:
                return None
            return str(pages[0]["webSocketDebuggerUrl"]) if pages else None

        url = await until(page_socket, "chromium answers on its DevTools port")
        self._socket = await websockets.connect(url, max_size=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._socket is not None:
            await self._socket.close()
        # Every chromium process, not only the first: the others go on writing to the
        # profile, which the caller is about to delete.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        await self._socket.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(await self._socket.recv())
            if message.get("id") == self._next:
                assert "error" not in message, message
                return dict(message.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")


async def test_the_web_ui_lists_a_cancelled_trade_as_cancelled(
    task_queue_prefix: str, tmp_path: Path
) -> None:
    """Given a dev server with its Web UI, one trade cancelled, one settled and one awaiting
    approval: the UI's workflow list, with the columns the README has an operator pick,
    shows the cancelled trade's row as CANCELLED (and the settled one's as SETTLED), though
    Temporal's own status column says COMPLETED for both; and the "needs attention" link
    that ``dvp server`` prints lists the one awaiting approval and neither of the others."""
    from processes.devserver import UI_LIST_COLUMNS, DevServer, attention_url

    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    cancelled, settled = f"{task_queue_prefix}-ui-cancelled", f"{task_queue_prefix}-ui-settled"
    waiting = f"{task_queue_prefix}-ui-waiting"
    with DevServer(log_file=tmp_path / "server.log") as server:
        client = await server.connect()
        async with run_engine(client, config) as engine:
            await engine.client.submit(
                dvp_instruction(cancelled, "bob", "alice", "1", "99.50", approvers=["notary"])
            )
            await engine.client.cancel(cancelled, "ops", "UI test")
            await engine.client.submit(dvp_instruction(settled, "bob", "alice", "1", "99.50"))
            await engine.client.submit(
                dvp_instruction(waiting, "bob", "alice", "1", "99.50", approvers=["notary"])
            )
            assert (await engine.client.wait(cancelled, timeout=30)).status is TradeStatus.CANCELLED
            assert (await engine.client.wait(settled, timeout=30)).status is TradeStatus.SETTLED

        assert server.ui_url is not None
        workflows = f"{server.ui_url}/namespaces/default/workflows"
        with tempfile.TemporaryDirectory(prefix="dvp-chromium-", ignore_cleanup_errors=True) as profile:
            async with Browser(profile) as browser:
                await browser.call("Page.enable")
                await browser.call("Page.navigate", url=workflows)
                await until(lambda: True, "")  # let the first load begin
                columns = json.dumps({"default": [{"label": c} for c in UI_LIST_COLUMNS]})
                await browser.evaluate(
                    f"localStorage.setItem({json.dumps(UI_COLUMNS_KEY)}, {json.dumps(columns)})"
                )
                await browser.call("Page.navigate", url=workflows)

                async def row(workflow_id: str) -> str:
                    script = f"""(() => {{
                        const cell = [...document.querySelectorAll('a, td, span')]
                            .find(e => e.textContent.trim() === {json.dumps(workflow_id)});
                        const row = cell && (cell.closest('tr') || cell.closest('[role="row"]'));
                        return row ? row.innerText : '';
                    }})()"""
                    end = time.monotonic() + 60
                    while time.monotonic() < end:
                        text = str(await browser.evaluate(script) or "")
                        if re.search(r"\b(CANCELLED|SETTLED|AWAITING_APPROVAL)\b", text):
                            return text
                        await asyncio.sleep(0.5)
                    return text

                cancelled_row = await row(f"trade-{cancelled}")
                settled_row = await row(f"trade-{settled}")
                shot = await browser.call("Page.captureScreenshot", format="png")
                (tmp_path / "web-ui.png").write_bytes(base64.b64decode(shot["data"]))
                page_text = str(await browser.evaluate("document.body.innerText"))

                await browser.call("Page.navigate", url=attention_url(server.ui_url))
                waiting_row = await row(f"trade-{waiting}")
                attention_text = str(await browser.evaluate("document.body.innerText"))
                shot = await browser.call("Page.captureScreenshot", format="png")
                (tmp_path / "web-ui-attention.png").write_bytes(base64.b64decode(shot["data"]))

    assert "CANCELLED" in cancelled_row and "SETTLED" not in cancelled_row, (cancelled_row, page_text[:2000])
    assert "COMPLETED" in cancelled_row.upper()  # Temporal's own status: the outcome is only in DvpStatus
    assert "SETTLED" in settled_row and "CANCELLED" not in settled_row, settled_row
    assert (tmp_path / "web-ui.png").stat().st_size > 10_000
    assert "AWAITING_APPROVAL" in waiting_row, (waiting_row, attention_text[:2000])
    assert f"trade-{cancelled}" not in attention_text and f"trade-{settled}" not in attention_text


async def test_the_bank_service_serves_its_requests_and_holds_as_metrics(tmp_path: Path) -> None:
    """``dvp bank serve --metrics-port N``: after a hold is placed and another committed over
    HTTP, /metrics counts the requests by route (no account or hold id in a label) and
    reads the open holds and the amount they hold, per asset."""
    import httpx

    port = free_port()
    bank = bank_service(tmp_path, metrics_port=port)
    await asyncio.to_thread(bank.start)
    try:
        auth = {"Authorization": f"Bearer {BANK_TOKEN}"}
        async with httpx.AsyncClient(base_url=bank.url, headers=auth) as http:
            for account, balance in (("alice-cash", "1000.00"), ("bob-cash", "0.00")):
                body = {
                    "account": account,
                    "asset": "EUR",
                    "owner": account,
                    "balance": balance,
                    "precision": 2,
                }
                assert (await http.post("/accounts", json=body)).status_code == 200
            for hold_id, amount in (("T-1#1", "100.00"), ("T-2#1", "25.50")):
                hold = {
                    "hold_id": hold_id,
                    "account": "alice-cash",
                    "to_account": "bob-cash",
                    "asset": "EUR",
                    "amount": amount,
                    "expires_at": None,
                    "trade_id": hold_id[:3],
                }
                assert (await http.post("/holds", json=hold)).status_code == 200
            assert (await http.post("/holds/T-2%231/commit", json={})).status_code == 200
            assert (await http.get("/accounts/nobody")).status_code == 404
        samples = await asyncio.to_thread(scrape, port)
    finally:
        bank.kill()
    assert total(samples, "dvp_bank_requests_total", route="/holds", method="POST", status="200") == 2
    assert total(samples, "dvp_bank_requests_total", route="/holds/{hold_id}/commit") == 1
    assert total(samples, "dvp_bank_requests_total", route="/accounts/{account_id}", status="404") == 1
    assert total(samples, "dvp_open_holds", ledger="bank", asset="EUR") == 1
    assert total(samples, "dvp_held_amount", ledger="bank", asset="EUR") == 100.0
    labels = {value for (_, ls) in samples for _, value in ls}
    assert not labels & {"alice-cash", "bob-cash", "nobody", "T-1#1", "T-2#1"}


async def test_reconcile_never_releases_the_rest_of_a_trade_with_a_committed_leg(
    temporal_client: Client, temporal_server: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Given a trade terminated after one of its legs was committed at its ledger (as when a
    commit ran just before the terminate): ``--release-orphans`` releases none of its other
    holds, since a trade moves all its legs or none, and says why; nothing changes."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    path = write_config(tmp_path / "dvp.toml", config, address=temporal_server.address)
    trade = f"{task_queue_prefix}-half"
    async with run_engine(temporal_client, config) as engine:
        await engine.client.submit(three_legs(trade, "carol", "6000.00"))
        await until(
            lambda: len([h for h in engine.open_holds() if h.trade_id == trade]) == 2, "two legs held"
        )
        await temporal_client.get_workflow_handle(f"trade-{trade}").terminate(reason="ops test")
        engine.ledgers["securities"].commit_hold(f"{trade}#0")
        balances = engine.balances()

        result = await dvp(path, "ledger", "reconcile", "--release-orphans", "--json", "--stuck-after", "P1D")

        assert result.returncode == 1, result.stderr
        (orphan,) = json.loads(result.stdout)["orphans"]
        assert (orphan["hold_id"], orphan["releasable"], orphan["released"]) == (f"{trade}#1", False, False)
        assert f"hold {trade}#0 of the same trade is committed" in orphan["why"]
        assert engine.ledgers["cash"].get_hold(f"{trade}#1").status is HoldStatus.OPEN
        assert engine.balances() == balances
