"""Netting batches on the real dev server: worked examples, balances, removals, bad input.

Given these balances and these trades, these balances after: the expected balances
are computed here trade by trade (gross), independently of the netting under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from activities.netting import net_trades, parse_legs
from adapters.sql import SqlLedger
from connection import HEADER_CODEC, data_converter
from domain import (
    MAX_BATCH_ACCOUNTS,
    BatchNotFound,
    BatchStatus,
    DuplicateBatch,
    InvalidInstruction,
    LedgerError,
    LedgerUnavailable,
    load_config,
)
from starter.batch import BatchClient, parse_batch, parse_batch_text
from starter.ledgers import all_open_holds, opened, parse_seed, seed
from stores import BatchStore
from workflows import NettingBatchWorkflow

from ._fixtures_auth import token
from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls, write_config
from .test_faults import WorkerProcess, config_for, workers

REPO = Path(__file__).resolve().parent.parent
PARTICIPANTS = [f"p{i:02d}" for i in range(20)]


def _leg(ledger: str, asset: str, payer: str, payee: str, amount: str) -> dict[str, str]:
    return {"ledger": ledger, "asset": asset, "from": payer, "to": payee, "amount": amount}


def dvp(
    trade_id: str, seller: str, buyer: str, bonds: int, cash: str, bond: str = "BOND-2030"
) -> dict[str, Any]:
    """``seller`` delivers ``bonds`` to ``buyer`` against ``cash`` EUR."""
    suffix = "sec" if bond == "BOND-2030" else bond
    return {
        "trade_id": trade_id,
        "legs": [
            _leg("securities", bond, f"{seller}-{suffix}", f"{buyer}-{suffix}", str(bonds)),
            _leg("cash", "EUR", f"{buyer}-cash", f"{seller}-cash", cash),
        ],
    }


def expected_balances(
    before: dict[tuple[str, str], Decimal], trades: list[dict[str, Any]]
) -> dict[tuple[str, str], Decimal]:
    """Settle ``trades`` one by one, gross: every leg moves its amount."""
    after = dict(before)
    for trade in trades:
        for leg in trade["legs"]:
            after[(leg["ledger"], leg["from"])] -= Decimal(leg["amount"])
            after[(leg["ledger"], leg["to"])] += Decimal(leg["amount"])
    return after


def balances(engine: Engine) -> dict[tuple[str, str], Decimal]:
    """Every account's balance but the clearing accounts' (``assert_whole`` checks those are 0)."""
    return {k: v for k, v in engine.balances().items() if not k[1].startswith("clearing:")}


def seed_accounts(engine: Engine, accounts: list[dict[str, str]]) -> None:
    seed(engine.config, parse_seed({"accounts": accounts}, engine.config), engine.ledgers)


def assert_whole(engine: Engine) -> None:
    """Every ledger sums to zero and agrees with its journal; no hold is left open."""
    engine.assert_invariants()
    assert engine.open_holds() == []
    for (_ledger, account), balance in engine.balances().items():
        if account.startswith("clearing:"):
            assert balance == 0, account


async def assert_replays(history: WorkflowHistory) -> None:
    """The workflow code replays its own history: it is deterministic."""
    replayer = Replayer(
        workflows=[NettingBatchWorkflow], data_converter=data_converter(), header_codec_behavior=HEADER_CODEC
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, repr(result.replay_failure)


@pytest.fixture
async def engine(temporal_client: Any, task_queue_prefix: str, tmp_path: Path) -> Any:
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    async with run_engine(temporal_client, config) as running:
        yield running


# ----------------------------------------------------------------- random batch


def random_batch(n: int, seed_value: int) -> list[dict[str, Any]]:
    rng = random.Random(seed_value)
    trades = []
    for i in range(n):
        seller, buyer = rng.sample(PARTICIPANTS, 2)
        bond = rng.choice(["BOND-2030", "BOND-2031"])
        trades.append(
            dvp(f"R{i:06d}", seller, buyer, rng.randint(1, 50), f"{rng.randint(100, 999999) / 100:.2f}", bond)
        )
    return trades


def participant_accounts() -> list[dict[str, str]]:
    accounts = []
    for p in PARTICIPANTS:
        accounts += [
            {"ledger": "cash", "id": f"{p}-cash", "asset": "EUR", "owner": p, "balance": "10000000.00"},
            {"ledger": "securities", "id": f"{p}-sec", "asset": "BOND-2030", "owner": p, "balance": "100000"},
            {
                "ledger": "securities",
                "id": f"{p}-BOND-2031",
                "asset": "BOND-2031",
                "owner": p,
                "balance": "100000",
            },
        ]
    return accounts


async def test_random_batch_settles_like_every_trade_one_by_one(engine: Engine, temporal_client: Any) -> None:
    seed_accounts(engine, participant_accounts())
    trades = random_batch(10_000, seed_value=20240601)
    before = balances(engine)
    client = BatchClient(temporal_client, engine.config, token=token("ops"))
    view = await client.submit(trades, batch_id="random-10k", wait=True, timeout=240)

    assert view.status is BatchStatus.SETTLED, view.reason
    assert (view.trades, view.settled, view.removed, view.removed_trades) == (10_000, 10_000, 0, [])
    assert balances(engine) == expected_balances(before, trades)
    assert_whole(engine)

    # gross: every leg's amount; net: what the receivers got, per asset
    gross: dict[str, Decimal] = defaultdict(Decimal)
    for trade in trades:
        for leg in trade["legs"]:
            gross[leg["asset"]] += Decimal(leg["amount"])
    received: dict[str, Decimal] = defaultdict(Decimal)
    for (ledger, account), balance in balances(engine).items():
        change = balance - before[(ledger, account)]
        if change > 0:
            received[engine.ledgers[ledger].account(account).asset] += change
    reported = {a.asset: (a.gross, a.net, a.saved) for a in view.assets}
    assert reported == {
        asset: (gross[asset], received[asset], gross[asset] - received[asset]) for asset in gross
    }
    assert all(a.net < a.gross for a in view.assets)  # netting saved liquidity
    outcomes = await client.outcomes("random-10k")
    assert set(outcomes.values()) == {("settled", "")} and len(outcomes) == 10_000

    # passed by reference: no trade in the workflow's history, which stays small
    history = await temporal_client.get_workflow_handle(view.workflow_id).fetch_history()
    text = json.dumps(history.to_json_dict())
    assert "R000123" not in text and "R009999" not in text
    assert len(text) < 200_000, len(text)
    await assert_replays(history)


# ------------------------------------------------------------ insolvency example

WORKED_ACCOUNTS = [
    {"ledger": "cash", "id": "ann-cash", "asset": "EUR", "owner": "ann", "balance": "1000.00"},
    {"ledger": "cash", "id": "ben-cash", "asset": "EUR", "owner": "ben", "balance": "0.00"},
    {"ledger": "cash", "id": "cat-cash", "asset": "EUR", "owner": "cat", "balance": "0.00"},
    {"ledger": "cash", "id": "dan-cash", "asset": "EUR", "owner": "dan", "balance": "100.00"},
    {"ledger": "cash", "id": "eve-cash", "asset": "EUR", "owner": "eve", "balance": "0.00"},
    {"ledger": "securities", "id": "ann-sec", "asset": "BOND-2030", "owner": "ann", "balance": "0"},
    {"ledger": "securities", "id": "ben-sec", "asset": "BOND-2030", "owner": "ben", "balance": "100"},
    {"ledger": "securities", "id": "cat-sec", "asset": "BOND-2030", "owner": "cat", "balance": "100"},
    {"ledger": "securities", "id": "dan-sec", "asset": "BOND-2030", "owner": "dan", "balance": "20"},
    {"ledger": "securities", "id": "eve-sec", "asset": "BOND-2030", "owner": "eve", "balance": "50"},
]


def worked_trades() -> list[dict[str, Any]]:
    ghost = dvp("N8", "ann", "ben", 1, "10.00")
    ghost["legs"][0]["from"] = "ghost-sec"
    return [
        dvp("N1", "ben", "dan", 10, "300.00"),  # dan pays 300
        dvp("N2", "cat", "dan", 5, "150.00"),  # dan pays 150
        dvp("N3", "dan", "ann", 20, "200.00"),  # dan receives 200: dan's net debit is 250, he has 100
        dvp("N5", "eve", "ben", 5, "200.00"),  # ben pays 200 out of what N1 brings him
        dvp("N6", "cat", "ann", 10, "400.00"),
        dvp("N7", "mallory", "ann", 1, "10.00"),  # mallory is sanctioned
        ghost,  # an unknown account
    ]


async def test_insolvent_participant_removes_the_trades_it_cannot_cover(
    engine: Engine, temporal_client: Any
) -> None:
    seed_accounts(engine, WORKED_ACCOUNTS)
    trades = worked_trades()
    before = balances(engine)
    client = BatchClient(temporal_client, engine.config, token=token("ops"))
    view = await client.submit(trades, batch_id="insolvent", wait=True, timeout=120)

    assert view.status is BatchStatus.SETTLED, view.reason
    # dan is short 150 of his 250 net debit: N1 (his largest payment) goes, which
    # covers him; ben then cannot pay N5 without N1's 300: N5 goes too.
    assert [(r.index, r.trade_id, r.reason) for r in view.removed_trades] == [
        (0, "N1", "dan-cash on cash cannot cover its net debit: 250.00 EUR due, 100.00 available"),
        (3, "N5", "ben-cash on cash cannot cover its net debit: 200.00 EUR due, 0.00 available"),
        (5, "N7", "legs[0].from: sanctioned party: mallory"),
        (6, "N8", "legs[0].from: unknown account 'ghost-sec' on ledger 'securities'"),
    ]
    assert (view.trades, view.settled, view.removed) == (7, 3, 4)
    settled = [t for t in trades if t["trade_id"] in ("N2", "N3", "N6")]
    assert balances(engine) == expected_balances(before, settled)
    assert engine.balance("cash", "dan-cash") == Decimal("150.00")  # 100 - 150 + 200
    assert_whole(engine)
    outcomes = await client.outcomes("insolvent")
    assert {t: s for t, (s, _r) in outcomes.items()} == {
        "N1": "removed",
        "N2": "settled",
        "N3": "settled",
        "N5": "removed",
        "N6": "settled",
        "N7": "removed",
        "N8": "removed",
    }
    cash = next(a for a in view.assets if a.asset == "EUR")
    assert (cash.gross, cash.net) == (Decimal("750.00"), Decimal("600.00"))  # ann pays 600 net


def test_removal_rule_is_deterministic_and_covers_every_account() -> None:
    """The rule alone: same input, same removals, whatever the order of the trades."""
    rng = random.Random(7)
    trades = []
    for i in range(400):
        seller, buyer = rng.sample(PARTICIPANTS[:6], 2)
        trades.append(dvp(f"T{i:04d}", seller, buyer, rng.randint(1, 9), f"{rng.randint(1, 500)}.00"))
    parsed = [
        (
            i,
            t["trade_id"],
            parse_legs(
                json.dumps(
                    [[lg["ledger"], lg["asset"], lg["from"], lg["to"], lg["amount"]] for lg in t["legs"]]
                )
            ),
        )
        for i, t in enumerate(trades)
    ]
    available = {("cash", f"{p}-cash"): Decimal(rng.randint(0, 3000)) for p in PARTICIPANTS[:6]}
    available |= {("securities", f"{p}-sec"): Decimal(rng.randint(0, 40)) for p in PARTICIPANTS[:6]}
    first = net_trades(parsed, available)
    again = net_trades(list(reversed(parsed)), available)
    assert first.removed == again.removed and first.positions == again.positions
    assert 0 < len(first.removed) < len(trades)
    for key, position in first.positions.items():
        assert position >= -available[key], key  # every net debit is covered
    # each removal names an account that pays in the removed trade
    for seq, reason in first.removed.items():
        payers = {leg["from"] for leg in trades[seq]["legs"]}
        assert reason.split(" ")[0] in payers, (trades[seq], reason)


# ----------------------------------------------------------- refusals and ids


async def test_duplicate_batch_id_is_refused_and_resubmission_settles_once(
    engine: Engine, temporal_client: Any
) -> None:
    seed_accounts(engine, WORKED_ACCOUNTS)
    client = BatchClient(temporal_client, engine.config, token=token("ops"))
    trades = [dvp("D1", "ben", "ann", 10, "100.00"), dvp("D2", "cat", "ann", 5, "50.00")]
    before = balances(engine)
    first = await client.submit(trades, batch_id="dup", wait=True, timeout=120)
    assert first.status is BatchStatus.SETTLED
    again = await client.submit(trades, batch_id="dup", wait=True, timeout=120)
    assert (again.status, again.settled) == (BatchStatus.SETTLED, 2)
    with pytest.raises(DuplicateBatch):
        await client.submit([trades[0]], batch_id="dup")
    assert balances(engine) == expected_balances(before, trades)  # settled once
    # without an id, the id comes from the content: the same trades make the same batch
    other = [dvp("D3", "ben", "ann", 1, "10.00"), dvp("D4", "cat", "ann", 1, "10.00")]
    a = await client.submit(other, wait=True, timeout=120)
    b = await client.submit(other, wait=True, timeout=120)
    assert a.batch_id == b.batch_id and b.status is BatchStatus.SETTLED
    assert balances(engine) == expected_balances(before, trades + other)
    assert_whole(engine)


def test_a_malformed_trade_is_refused_naming_its_index_and_field(tmp_path: Path) -> None:
    config = make_config(sqlite_urls(tmp_path), "t-unused")
    good = [dvp(f"G{i}", "ben", "ann", 1, "10.00") for i in range(5)]
    cases = [
        (lambda t: t[3]["legs"][1].update(amount="10.001"), "trades[3].legs[1].amount", "3 decimals"),
        (lambda t: t[2]["legs"][0].pop("to"), "trades[2].legs[0].to", "is required"),
        (lambda t: t[4].update(trade_id="G0"), "trades[4].trade_id", "also trades[0]"),
        (lambda t: t[1]["legs"][0].update(ledger="nowhere"), "trades[1].legs[0].ledger", "unknown ledger"),
        (lambda t: t[0].update(approvers=["notary"]), "trades[0].approvers", "not accepted in a batch"),
        (lambda t: t[1]["legs"][1].update(amount=10.5), "trades[1].legs[1].amount", "not a float"),
        (lambda t: t[2]["legs"][1].update(to="clearing:EUR"), "trades[2].legs[1].to", "the batch's own"),
        (lambda t: t[3]["legs"][0].update(amount="1" * 65), "trades[3].legs[0].amount", "more than 64"),
        (lambda t: t[0]["legs"][0].update(amount="1E+70"), "trades[0].legs[0].amount", "written out in full"),
    ]
    for spoil, field, message in cases:
        trades = json.loads(json.dumps(good))
        spoil(trades)
        with pytest.raises(InvalidInstruction) as refused:
            parse_batch_text(json.dumps(trades), config)
        assert refused.value.field == field and message in refused.value.message, refused.value
    lines = "\n".join(json.dumps(t) for t in good) + "\n{not json\n"
    with pytest.raises(InvalidInstruction, match="line 6"):
        parse_batch_text(lines, config)
    assert len(parse_batch_text("\n".join(json.dumps(t) for t in good), config).trades) == 5


def test_a_batch_past_the_most_accounts_it_may_touch_is_refused_naming_the_trade(tmp_path: Path) -> None:
    config = make_config(sqlite_urls(tmp_path), "t-unused")
    # each trade brings four accounts of its own: the 251st makes 1,004
    trades = [dvp(f"W{i}", f"s{i}", f"b{i}", 1, "10.00") for i in range(MAX_BATCH_ACCOUNTS // 4 + 1)]

    with pytest.raises(InvalidInstruction) as refused:
        parse_batch(trades, config)

    assert refused.value.field == f"trades[{MAX_BATCH_ACCOUNTS // 4}]"
    assert f"a batch touches at most {MAX_BATCH_ACCOUNTS:,}" in refused.value.message
    assert len(parse_batch(trades[:-1], config).accounts) == MAX_BATCH_ACCOUNTS


async def _dvp(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVP_CONFIG": str(config), "DVP_TOKEN": token("ops")}
    env.pop("TEMPORAL_ADDRESS", None)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "starter.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=180,
    )


async def test_cli_refuses_a_bad_file_storing_nothing_and_settles_a_good_one(
    engine: Engine, temporal_server: Any, temporal_client: Any, tmp_path: Path
) -> None:
    seed_accounts(engine, WORKED_ACCOUNTS)
    config = write_config(tmp_path / "dvp.toml", engine.config, address=temporal_server.address)
    before = balances(engine)
    bad = [dvp("C1", "ben", "ann", 1, "10.00"), dvp("C2", "cat", "ann", 1, "10.00")]
    bad[1]["legs"][1]["amount"] = "-5"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    refused = await _dvp(config, "batch", "submit", str(tmp_path / "bad.json"), "--id", "cli-bad")
    assert refused.returncode == 2, refused.stderr
    assert "trades[1].legs[1].amount" in refused.stderr and "positive" in refused.stderr
    with pytest.raises(BatchNotFound):
        await BatchClient(temporal_client, engine.config, token=token("ops")).status("cli-bad")
    missing = await _dvp(config, "batch", "status", "cli-bad")
    assert missing.returncode == 1 and "no batch" in missing.stderr

    example = REPO / "examples" / "netting-batch.jsonl"
    good = [json.loads(line) for line in example.read_text().splitlines() if line.strip()]
    done = await _dvp(config, "batch", "submit", str(example), "--id", "cli-good", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["batch_id"], out["status"], out["settled"], out["removed_trades"]) == (
        "cli-good",
        "SETTLED",
        4,
        [],
    )
    totals = {a["asset"]: (a["gross"], a["net"], a["saved"]) for a in out["assets"]}
    # net: bob receives 8,955.00 EUR (alice pays 3,980.00, carol 4,975.00); bob delivers 90 bonds
    assert totals == {"EUR": ("22885.00", "8955.00", "13930.00"), "BOND-2030": ("230", "90", "140")}
    status = await _dvp(config, "batch", "status", "cli-good", "--json")
    assert json.loads(status.stdout)["status"] == "SETTLED"
    assert balances(engine) == expected_balances(before, good)
    assert_whole(engine)


# ------------------------------------------------------------------------ faults


class FlakyLedger(SqlLedger):
    """The real SQL ledger; chosen calls fail as if the database were briefly unreachable."""

    def __init__(self, *args: Any, fail_commit_at: int = 0, refuse_holds: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.commits = 0
        self.fail_commit_at = fail_commit_at
        self.refuse_holds = refuse_holds

    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Any:
        self.commits += 1
        if self.commits == self.fail_commit_at:
            raise LedgerUnavailable("database unreachable (injected)")
        return super().commit_hold(hold_id, preimage)

    def place_hold(self, hold_id: str, *args: Any, **kw: Any) -> Any:
        if self.refuse_holds:
            raise LedgerError(f"hold {hold_id} refused (injected)")
        return super().place_hold(hold_id, *args, **kw)


async def test_a_ledger_failing_after_the_decision_delays_but_settles_the_batch(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """The cash ledger fails once mid-settlement, after two commits: the retry finishes the rest."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    flaky = FlakyLedger("cash", config.ledgers["cash"].url or "", fail_commit_at=3)
    async with run_engine(temporal_client, config, instances={"cash": flaky}) as engine:
        seed_accounts(engine, WORKED_ACCOUNTS)
        before = balances(engine)
        trades = [t for t in worked_trades() if t["trade_id"] in ("N2", "N3", "N6")]
        view = await BatchClient(temporal_client, engine.config, token=token("ops")).submit(
            trades, batch_id="flaky", wait=True, timeout=120
        )
        assert view.status is BatchStatus.SETTLED, view.reason
        assert flaky.commits > 3  # the failed call was retried
        assert balances(engine) == expected_balances(before, trades)
        assert_whole(engine)
    flaky.close()


async def test_a_ledger_refusing_before_the_decision_releases_everything(
    temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """The securities ledger refuses the holds: the cash holds are released, nothing settles."""
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    refusing = FlakyLedger("securities", config.ledgers["securities"].url or "", refuse_holds=True)
    async with run_engine(temporal_client, config, instances={"securities": refusing}) as engine:
        seed_accounts(engine, WORKED_ACCOUNTS)
        before = balances(engine)
        client = BatchClient(temporal_client, engine.config, token=token("ops"))
        view = await client.submit(worked_trades()[1:5], batch_id="refused", wait=True, timeout=120)
        assert view.status is BatchStatus.EXPIRED and "refused (injected)" in view.reason
        await assert_replays(await temporal_client.get_workflow_handle(view.workflow_id).fetch_history())
        assert view.settled == 0
        assert balances(engine) == before
        assert_whole(engine)
        outcomes = await client.outcomes("refused")
        # ben cannot pay N5 without N1 (not in this batch): removed; the rest released
        assert {t: s for t, (s, _r) in outcomes.items()} == {
            "N2": "released",
            "N3": "released",
            "N5": "removed",
            "N6": "released",
        }
    refusing.close()


# ------------------------------------------------------------------ batch store


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_batch_store_keeps_a_batch_whole_on_both_databases(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        str(request.getfixturevalue("postgres_url"))
        if backend == "postgres"
        else f"sqlite:///{tmp_path}/b.db"
    )
    store = BatchStore(url)
    try:
        rows = [(f"S{i}", json.dumps([["cash", "EUR", "a", "b", f"{i}.00"]])) for i in range(1, 2001)]
        accounts = [("cash", "a", "EUR"), ("cash", "b", "EUR")]
        assert store.insert_batch("s1", "fp-1", rows, accounts) is True
        assert store.insert_batch("s1", "fp-1", rows, accounts) is False  # same content: stored once
        with pytest.raises(DuplicateBatch):
            store.insert_batch("s1", "fp-2", rows[:1], accounts)
        assert store.trades("s1")[1999] == (1999, "S2000", rows[1999][1])
        assert store.accounts("s1") == accounts
        store.mark_removed("s1", [(0, "first round")])
        store.mark_removed("s1", [(5, "second round")])  # replaces the earlier round's
        assert [(r.index, r.trade_id, r.reason) for r in store.removed("s1")] == [(5, "S6", "second round")]
        assert store.finish("s1", "SETTLED", True, "", "{}") == 1999
        outcomes = store.outcomes("s1")
        assert outcomes["S6"] == ("removed", "second round") and outcomes["S1"] == ("settled", "")
        assert store.batch("s1") == (2000, "SETTLED", "{}")
        with pytest.raises(BatchNotFound):
            store.batch("nope")
        # a duplicate trade id inside one batch: nothing of that batch is stored
        with pytest.raises(Exception):  # noqa: B017 - the driver's own IntegrityError
            store.insert_batch("s2", "fp-3", [("X", "[]"), ("X", "[]")], accounts)
        with pytest.raises(BatchNotFound):
            store.batch("s2")
    finally:
        store.close()


@pytest.mark.slow
async def test_worker_killed_mid_batch_still_settles_it_whole(
    temporal_server: Any, temporal_client: Any, task_queue_prefix: str, tmp_path: Path
) -> None:
    """The only worker is SIGKILLed while the batch's net debits are held; a new one finishes it."""
    config_path = config_for(tmp_path, temporal_server, task_queue_prefix)
    config = load_config(config_path)
    trades = random_batch(3000, seed_value=99)
    with opened(config) as ledgers:
        seed(config, parse_seed({"accounts": participant_accounts()}, config), ledgers)
        before = {k: v for k, v in _balances(ledgers).items()}
        async with workers() as started:
            first = WorkerProcess(config_path, tmp_path / "worker-1.log")
            started.append(first)
            await first.started()
            client = BatchClient(temporal_client, config, token=token("ops"))
            await client.submit(trades, batch_id="killed")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not [h for h in all_open_holds(ledgers) if h.trade_id == "batch:killed"]:
                assert loop.time() < deadline, "the batch never held its net debits"
                await asyncio.sleep(0.002)
            first.kill()
            second = WorkerProcess(config_path, tmp_path / "worker-2.log")
            started.append(second)
            await second.started()
            view = await client.wait("killed", timeout=120)
        assert view.status is BatchStatus.SETTLED, view.reason
        assert view.settled == 3000
        after = {k: v for k, v in _balances(ledgers).items() if not k[1].startswith("clearing:")}
        assert after == expected_balances(before, trades)
        assert all_open_holds(ledgers) == []
        for ledger in ledgers.values():
            assert ledger.verify() == [], ledger.name
        assert all(v == 0 for k, v in _balances(ledgers).items() if k[1].startswith("clearing:"))
        client.store.close()


def _balances(ledgers: dict[str, Any]) -> dict[tuple[str, str], Decimal]:
    return {(b.ledger, b.account): b.balance for lg in ledgers.values() for b in lg.balances()}
