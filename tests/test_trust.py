"""Trust: every acting request proves who sent it; no account is debited without its owner's consent.

On the real dev server. Refusals leave the trade as it was: its status, its
approvals, and (for an update) its history, event for event. Signals cannot be kept
out of the history (the server records them before the workflow sees them), so a
refused one changes nothing and is only counted in the view.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio import activity
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import RawValue, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Replayer, Worker

from connection import HEADER_CODEC, data_converter
from connection.codec_server import CodecServer, CodecServerThread
from domain import (
    MAX_NAME,
    AuthError,
    BatchStatus,
    CheckAccountsResult,
    Config,
    HoldOutcome,
    HoldOutcomes,
    HoldStatus,
    Instruction,
    InvalidInstruction,
    RequestRejected,
    SettlementRequest,
    TradeStatus,
    parse_config,
)
from identity import TokenIssuer, Verifier, install_verifier, uninstall_verifier
from processes.devserver import DevServer, find_temporal_binary
from processes.ports import free_port
from starter.batch import BatchClient
from starter.instructions import dvp_instruction
from starter.ledgers import parse_seed, seed
from workflows import HtlcWorkflow, SettlementWorkflow, initial_search_attributes, workflow_id_for

from ._fixtures_auth import TEST_ISSUER, TEST_KID, auth_section, token, write_key_pair
from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls, wait_for_status
from .test_cli import config_file, dvp

# ------------------------------------------------------------------ helpers


def approval_trade(trade_id: str, **extra: Any) -> dict[str, Any]:
    """Bob delivers 100 bonds to alice against 9,950.00 EUR, once the notary approves."""
    return dvp_instruction(trade_id, "bob", "alice", "100", "9950.00", approvers=["notary"], **extra)


async def history_length(engine: Engine, trade_id: str) -> int:
    handle = engine.client.client.get_workflow_handle(workflow_id_for(trade_id))
    return len((await handle.fetch_history()).events)


# The raw CLI's payloads go through a codec server (the operator's, with its token):
# without one, the worker's codec refuses them before any token check could
# (tests/test_encryption.py shows that); with it, they reach the workflow's checks.
CLI_CODEC: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _cli_codec() -> Iterator[None]:
    server = CodecServer.from_config(parse_config({"ledgers": {}, "auth": auth_section()}))
    with CodecServerThread(server, "127.0.0.1", free_port()) as running:
        CLI_CODEC[:] = ["--codec-endpoint", running.url, "--codec-auth", f"Bearer {token('ops')}"]
        yield
        CLI_CODEC.clear()


async def temporal_cli(server: DevServer, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``temporal`` CLI against the test server, as anyone with access to its API runs it."""
    command = [
        str(find_temporal_binary()),
        *args,
        "--address",
        server.address,
        "--namespace",
        server.namespace,
        *CLI_CODEC,
    ]
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)


def forged(real: str, **claims: Any) -> str:
    """``real`` with its payload changed after signing, signature kept."""
    header, payload, signature = real.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(claims)
    changed = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{header}.{changed}.{signature}"


def foreign_key_token(subject: str) -> str:
    """Signed by a key the test issuer does not have, claiming to be its key (same kid, issuer)."""
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": TEST_ISSUER, "aud": "dvp", "sub": subject, "iat": now, "exp": now + 3600}
    return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": TEST_KID})


def unsigned_token(subject: str) -> str:
    """``alg: none``: no signature at all."""
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": TEST_ISSUER, "aud": "dvp", "sub": subject, "iat": now, "exp": now + 3600}
    return jwt.encode(claims, "", algorithm="none", headers={"kid": TEST_KID})


def expired_token(subject: str) -> str:
    """Signed by the test issuer, but expired an hour ago."""
    return token(subject, ttl=timedelta(hours=1), now=datetime.now(UTC) - timedelta(hours=2))


async def update_refusal(handle: Any, update: str, message: dict[str, Any]) -> str:
    """Send a raw update; the reason its validator refused it with."""
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(update, message)
    cause = refused.value.cause
    return cause.message if isinstance(cause, ApplicationError) else str(cause)


# ------------------------------------------- approve: refused, and what is accepted


BAD_APPROVER_TOKENS = {
    "another-subject": (lambda: token("bob"), "bob is not an approver"),
    "unknown-key": (lambda: foreign_key_token("notary"), "signature does not verify"),
    "alg-none": (lambda: unsigned_token("notary"), "algorithm 'none' is not accepted"),
    "altered-payload": (lambda: forged(token("bob"), sub="notary"), "signature does not verify"),
    "expired": (lambda: expired_token("notary"), "token: expired"),
}


async def test_dvp_approve_without_a_token_sends_nothing(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)
    await settlement.client.submit(approval_trade("TR-none"))
    await wait_for_status(settlement, "TR-none", TradeStatus.AWAITING_APPROVAL)
    events = await history_length(settlement, "TR-none")

    result = await dvp(config, "approve", "TR-none", "--as", "notary", as_=None)

    assert result.returncode == 2
    assert "no token" in result.stderr and "DVP_TOKEN" in result.stderr and "--token" in result.stderr
    view = await settlement.client.status("TR-none")
    assert (view.status, view.approved_by) == (TradeStatus.AWAITING_APPROVAL, [])
    assert await history_length(settlement, "TR-none") == events


@pytest.mark.parametrize("bad", BAD_APPROVER_TOKENS, ids=list(BAD_APPROVER_TOKENS))
async def test_dvp_approve_with_a_bad_token_is_refused_and_leaves_no_event(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path, bad: str
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)
    trade_id = f"TR-bad-{bad}"
    await settlement.client.submit(approval_trade(trade_id))
    await wait_for_status(settlement, trade_id, TradeStatus.AWAITING_APPROVAL)
    events = await history_length(settlement, trade_id)
    make, reason = BAD_APPROVER_TOKENS[bad]
    token_file = tmp_path / "token"
    token_file.write_text(make())

    refused = await dvp(config, "approve", trade_id, "--token-file", str(token_file), as_=None)

    assert refused.returncode == 1, refused.stderr
    assert "rejected" in refused.stderr and reason in refused.stderr
    view = await settlement.client.status(trade_id)
    assert (view.status, view.approved_by) == (TradeStatus.AWAITING_APPROVAL, [])
    assert await history_length(settlement, trade_id) == events  # refused in the validator
    # the valid counterpart is accepted
    accepted = await dvp(config, "approve", trade_id, "--as", "notary", as_="notary")
    assert accepted.returncode == 0, accepted.stderr
    assert (await settlement.client.wait(trade_id)).status is TradeStatus.SETTLED


async def test_as_another_party_than_the_token_is_refused_before_sending(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)
    await settlement.client.submit(approval_trade("TR-as"))
    await wait_for_status(settlement, "TR-as", TradeStatus.AWAITING_APPROVAL)
    events = await history_length(settlement, "TR-as")

    result = await dvp(config, "approve", "TR-as", "--as", "notary", as_="bob")

    assert result.returncode == 2 and "--as notary" in result.stderr and "'bob'" in result.stderr
    assert await history_length(settlement, "TR-as") == events
    # ...and the workflow refuses it too, were it sent: the party must be the token's subject
    handle = settlement.client.client.get_workflow_handle(workflow_id_for("TR-as"))
    reason = await update_refusal(handle, "approve_update", {"party": "notary", "token": token("bob")})
    assert reason == "party: 'notary' is not the token's subject 'bob'"
    assert await history_length(settlement, "TR-as") == events


async def test_raw_updates_naming_only_a_party_are_refused_without_a_trace(
    settlement: Engine, temporal_server: DevServer
) -> None:
    await settlement.client.submit(approval_trade("TR-raw"))
    await wait_for_status(settlement, "TR-raw", TradeStatus.AWAITING_APPROVAL)
    events = await history_length(settlement, "TR-raw")
    workflow_id = workflow_id_for("TR-raw")

    approve = await temporal_cli(
        temporal_server, "workflow", "update", "execute", "-w", workflow_id, "--name", "approve_update",
        "--input", json.dumps({"party": "notary"}),
    )  # fmt: skip
    cancel = await temporal_cli(
        temporal_server, "workflow", "update", "execute", "-w", workflow_id, "--name", "cancel_update",
        "--input", json.dumps({"party": "ops"}),
    )  # fmt: skip

    assert approve.returncode != 0 and "token: missing" in approve.stderr + approve.stdout
    assert cancel.returncode != 0 and "token: missing" in cancel.stderr + cancel.stdout
    view = await settlement.client.status("TR-raw")
    assert (view.status, view.approved_by) == (TradeStatus.AWAITING_APPROVAL, [])
    assert await history_length(settlement, "TR-raw") == events
    # the valid counterparts: the same updates with the sender's token
    good = {"party": "notary", "token": token("notary")}
    accepted = await temporal_cli(
        temporal_server, "workflow", "update", "execute", "-w", workflow_id, "--name", "approve_update",
        "--input", json.dumps(good),
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
    assert (await settlement.client.wait("TR-raw")).approved_by == ["notary"]


async def test_raw_cancel_update_with_an_operators_token_is_accepted(settlement: Engine) -> None:
    await settlement.client.submit(approval_trade("TR-raw-cancel"))
    await wait_for_status(settlement, "TR-raw-cancel", TradeStatus.AWAITING_APPROVAL)
    handle = settlement.client.client.get_workflow_handle(workflow_id_for("TR-raw-cancel"))

    decision = await handle.execute_update("cancel_update", {"token": token("ops"), "reason": "review"})

    assert decision["accepted"] is True
    final = await settlement.client.wait("TR-raw-cancel")
    assert (final.status, final.reason) == (TradeStatus.CANCELLED, "cancelled by ops: review")


async def test_raw_signals_without_a_valid_token_change_nothing_and_are_counted(
    settlement: Engine, temporal_server: DevServer
) -> None:
    await settlement.client.submit(approval_trade("TR-signal"))
    await settlement.client.submit(approval_trade("TR-signal-ok"))
    before = await wait_for_status(settlement, "TR-signal", TradeStatus.AWAITING_APPROVAL)
    workflow_id = workflow_id_for("TR-signal")

    for name, party in (("approve", "notary"), ("cancel", "ops"), ("cancel", "alice")):
        sent = await temporal_cli(
            temporal_server, "workflow", "signal", "-w", workflow_id, "--name", name,
            "--input", json.dumps({"party": party}),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr  # the server takes any signal...
    handle = settlement.client.client.get_workflow_handle(workflow_id)
    await handle.signal("approve", {"party": "notary", "token": forged(token("bob"), sub="notary")})
    await handle.signal("cancel", {"token": token("eve")})  # valid, but eve is no party

    for _ in range(100):
        view = await settlement.client.status("TR-signal")
        if view.refused_signals == 5:
            break
        await asyncio.sleep(0.1)
    # ...the trade counts them and changes nothing, its timeline neither
    assert view.refused_signals == 5
    assert (view.status, view.approved_by) == (TradeStatus.AWAITING_APPROVAL, [])
    assert view.timeline == before.timeline
    # the valid counterparts, by signal: alice's cancel, and on the other trade the notary's approval
    await handle.signal("cancel", {"token": token("alice"), "reason": "changed my mind"})
    final = await settlement.client.wait("TR-signal")
    assert (final.status, final.reason) == (TradeStatus.CANCELLED, "cancelled by alice: changed my mind")
    other = settlement.client.client.get_workflow_handle(workflow_id_for("TR-signal-ok"))
    await other.signal("approve", {"token": token("notary")})
    approved = await settlement.client.wait("TR-signal-ok")
    assert (approved.status, approved.approved_by, approved.refused_signals) == (
        TradeStatus.SETTLED,
        ["notary"],
        0,
    )


async def test_a_stranger_cannot_cancel_and_an_owner_can(settlement: Engine) -> None:
    await settlement.client.submit(approval_trade("TR-cancel"))
    await wait_for_status(settlement, "TR-cancel", TradeStatus.AWAITING_APPROVAL)
    events = await history_length(settlement, "TR-cancel")

    with pytest.raises(RequestRejected, match="eve is neither a party"):
        await settlement.acting("eve").cancel("TR-cancel")
    with pytest.raises(RequestRejected, match="signature does not verify"):
        await settlement.client.cancel("TR-cancel", token=forged(token("eve"), sub="alice"))
    assert await history_length(settlement, "TR-cancel") == events

    await settlement.acting("alice").cancel("TR-cancel", reason="no longer needed")
    assert (await settlement.client.wait("TR-cancel")).reason == "cancelled by alice: no longer needed"


# ---------------------------------------------------------------- submission


async def test_a_submission_without_a_token_exits_non_zero_and_starts_nothing(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    config = config_file(settlement, temporal_server.address, tmp_path)
    before = settlement.balances()

    result = await dvp(config, "submit", "-", stdin=json.dumps(approval_trade("TR-anon")), as_=None)

    assert result.returncode == 2
    assert "no token" in result.stderr and "nothing was sent" in result.stderr
    status = await dvp(config, "status", "TR-anon")
    assert status.returncode == 1 and "no trade 'TR-anon'" in status.stderr
    assert settlement.balances() == before


async def test_a_submission_with_a_bad_token_is_rejected_before_any_ledger_call(settlement: Engine) -> None:
    before = settlement.balances()

    with pytest.raises(Exception, match="token"):
        await settlement.client.submit(approval_trade("TR-forged"), token=foreign_key_token("ops"))

    view = await settlement.client.status("TR-forged")
    assert view.status is TradeStatus.REJECTED
    assert "signature does not verify" in view.reason
    assert [e.event for e in view.timeline] == ["status REJECTED"]  # not even the accounts were checked
    assert settlement.balances() == before


async def test_a_party_that_owns_no_account_of_the_trade_cannot_submit_it(settlement: Engine) -> None:
    before = settlement.balances()

    view = await settlement.acting("eve").submit(dvp_instruction("TR-eve", "bob", "alice", "10", "995.00"))
    final = await settlement.client.wait("TR-eve")

    assert view.status is final.status is TradeStatus.REJECTED
    assert final.reason == "submitted by eve, who owns no account of this trade and is not an operator"
    assert settlement.balances() == before and settlement.open_holds() == []


# ------------------------------------------------------------------- consent

ERIN = [
    {"ledger": "securities", "id": "erin-sec", "asset": "BOND-2030", "owner": "erin", "balance": "1"},
    {"ledger": "cash", "id": "erin-cash", "asset": "EUR", "owner": "erin", "balance": "0.00"},
]


def erins_trade(trade_id: str, settle_within: str = "PT30S") -> dict[str, Any]:
    """erin delivers 1 bond to alice against 50,000.00 EUR of alice's cash: erin's instruction."""
    return dvp_instruction(trade_id, "erin", "alice", "1", "50000.00", settle_within=settle_within)


@pytest.fixture
def with_erin(settlement: Engine) -> Engine:
    seed(settlement.config, parse_seed({"accounts": ERIN}, settlement.config), settlement.ledgers)
    return settlement


async def test_erins_instruction_reserves_nothing_until_alice_affirms_and_then_settles_exactly(
    with_erin: Engine,
) -> None:
    engine = with_erin
    before = engine.balances()

    submitted = await engine.acting("erin").submit(erins_trade("TR-erin"))
    waiting = await wait_for_status(engine, "TR-erin", TradeStatus.AWAITING_AFFIRMATION)
    await asyncio.sleep(1)  # a reservation would have been made by now

    assert submitted.submitted_by == "erin"
    assert (waiting.consent_from, waiting.consented) == (["erin", "alice"], ["erin"])
    assert waiting.reason == "waiting for alice"
    assert engine.open_holds() == [] and engine.balances() == before
    # no one but alice consents for alice's cash: not erin, not another party, not a forged token
    for who, refused_with in (
        ("erin", "already consented"),
        ("bob", "bob owns no account this trade debits"),
    ):
        with pytest.raises(RequestRejected, match=refused_with):
            await engine.acting(who).affirm("TR-erin")
    with pytest.raises(RequestRejected, match="signature"):
        await engine.client.affirm("TR-erin", token=forged(token("erin"), sub="alice"))
    assert (await engine.client.status("TR-erin")).status is TradeStatus.AWAITING_AFFIRMATION

    await engine.acting("alice").affirm("TR-erin", "alice")
    final = await engine.client.wait("TR-erin")

    assert final.status is TradeStatus.SETTLED, final.reason
    assert final.consented == ["erin", "alice"]
    after = engine.balances()
    assert {k: after[k] - before[k] for k in before if after[k] != before[k]} == {
        ("securities", "erin-sec"): Decimal("-1"),
        ("securities", "alice-sec"): Decimal("1"),
        ("cash", "alice-cash"): Decimal("-50000.00"),
        ("cash", "erin-cash"): Decimal("50000.00"),
    }
    engine.assert_invariants()


async def test_erins_instruction_without_alices_affirmation_expires_with_every_balance_unchanged(
    with_erin: Engine,
) -> None:
    engine = with_erin
    before = engine.balances()

    await engine.acting("erin").submit(erins_trade("TR-erin-late", settle_within="PT2S"))
    final = await engine.client.wait("TR-erin-late", timeout=30)

    assert final.status is TradeStatus.EXPIRED
    assert final.reason == "no affirmation from alice before the deadline"
    assert [leg.state.value for leg in final.legs] == ["PENDING", "PENDING"]  # nothing was reserved
    assert engine.balances() == before and engine.open_holds() == []


async def test_dvp_status_and_list_show_a_trade_awaiting_affirmation(
    with_erin: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    config = config_file(with_erin, temporal_server.address, tmp_path)
    await with_erin.acting("erin").submit(erins_trade("TR-erin-cli"))
    await wait_for_status(with_erin, "TR-erin-cli", TradeStatus.AWAITING_AFFIRMATION)

    status = await dvp(config, "status", "TR-erin-cli")
    for _ in range(100):  # visibility is eventually consistent
        listed = await dvp(config, "list", "--status", "AWAITING_AFFIRMATION", "--json")
        if "TR-erin-cli" in [t["trade_id"] for t in json.loads(listed.stdout)]:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("TR-erin-cli never listed as AWAITING_AFFIRMATION")
    affirmed = await dvp(config, "affirm", "TR-erin-cli", "--as", "alice", as_="alice")

    assert "AWAITING_AFFIRMATION   waiting for alice" in status.stdout
    assert "submitted erin" in status.stdout
    assert "consent   from erin, alice   given by: erin" in status.stdout
    assert affirmed.returncode == 0 and "affirmation by alice accepted" in affirmed.stdout
    assert (await with_erin.client.wait("TR-erin-cli")).status is TradeStatus.SETTLED


async def test_an_operators_submission_consents_for_every_account(with_erin: Engine) -> None:
    final = await with_erin.client.wait((await with_erin.client.submit(erins_trade("TR-venue"))).trade_id)

    assert final.status is TradeStatus.SETTLED
    assert final.submitted_by == "ops" and final.consented == ["erin", "alice"]


async def test_an_htlc_submitted_by_one_party_waits_for_the_others_affirmation(settlement: Engine) -> None:
    import hashlib
    import secrets

    secret = secrets.token_bytes(32)
    trade = dvp_instruction(
        "TR-htlc",
        "bob",
        "alice",
        "10",
        "995.00",
        protocol="htlc",
        hashlock=hashlib.sha256(secret).hexdigest(),
    )
    await settlement.acting("bob").submit(trade)
    await wait_for_status(settlement, "TR-htlc", TradeStatus.AWAITING_AFFIRMATION)
    assert settlement.open_holds() == []

    await settlement.acting("alice").affirm("TR-htlc")
    await wait_for_status(settlement, "TR-htlc", TradeStatus.AWAITING_CLAIM)
    with pytest.raises(RequestRejected, match="eve is not a party"):
        await settlement.acting("eve").claim("TR-htlc", secret.hex())
    await settlement.acting("bob").claim("TR-htlc", secret.hex())

    assert (await settlement.client.wait("TR-htlc", timeout=60)).status is TradeStatus.SETTLED


# ------------------------------------------------------------ netting batches


async def test_only_an_operator_submits_a_netting_batch(settlement: Engine, temporal_client: Client) -> None:
    before = settlement.balances()
    trades = [dvp_instruction(f"TR-b{i}", "bob", "alice", "1", "99.50") for i in range(3)]
    for trade in trades:
        del trade["settle_within"]

    with pytest.raises(AuthError, match="no token"):
        await BatchClient(temporal_client, settlement.config).submit(trades, batch_id="tr-anon")
    async with BatchClient(temporal_client, settlement.config, token=token("alice")) as client:
        refused = await client.submit(trades, batch_id="tr-alice", wait=True, timeout=60)
    async with BatchClient(temporal_client, settlement.config, token=token("ops")) as client:
        settled = await client.submit(trades, batch_id="tr-ops", wait=True, timeout=60)

    assert refused.status is BatchStatus.REJECTED
    assert refused.reason == "submitted by alice: only an operator submits batches"
    assert settled.status is BatchStatus.SETTLED and settled.settled == 3
    assert settlement.balance("cash", "bob-cash") == before[("cash", "bob-cash")] + Decimal("298.50")


# ------------------------------------------------------------- bounded inputs


LONG = "x" * (MAX_NAME + 1)


def _with(trade: dict[str, Any], change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    change(trade)
    return trade


def _plain(trade_id: str, **extra: Any) -> dict[str, Any]:
    return dvp_instruction(trade_id, "bob", "alice", "1", "99.50", **extra)


# Past each maximum of docs/design.md, "Limits": the field the refusal names -> the instruction.
OVERSIZED: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
    "trade_id": lambda: ("trade_id", _plain("T" + LONG)),
    "legs": lambda: ("legs", {"trade_id": "TR-legs", "legs": _plain("TR-legs")["legs"] * 33}),
    "ledger": lambda: (
        "legs[0].ledger",
        _with(_plain("TR-ledger"), lambda t: t["legs"][0].update(ledger=LONG)),
    ),
    "asset": lambda: ("legs[1].asset", _with(_plain("TR-asset"), lambda t: t["legs"][1].update(asset=LONG))),
    "from": lambda: ("legs[0].from", _with(_plain("TR-from"), lambda t: t["legs"][0].update({"from": LONG}))),
    "to": lambda: ("legs[1].to", _with(_plain("TR-to"), lambda t: t["legs"][1].update(to=LONG))),
    "amount": lambda: (
        "legs[1].amount",
        _with(_plain("TR-amt"), lambda t: t["legs"][1].update(amount="9" * 65)),
    ),
    "amount in full": lambda: (
        "legs[0].amount",
        _with(_plain("TR-amt-e"), lambda t: t["legs"][0].update(amount="1E+70")),
    ),
    "approvers": lambda: ("approvers", _plain("TR-many", approvers=[f"a{i}" for i in range(17)])),
    "approver": lambda: ("approvers[0]", _plain("TR-approver", approvers=[LONG])),
    "min_quantity": lambda: (
        "partial.min_quantity",
        _plain("TR-partial", partial={"min_quantity": "1" * 65}),
    ),
    "hashlock": lambda: (
        "hashlock",
        _plain("TR-hashlock", protocol="htlc", hashlock=" " * 70 + "ab" * 32),
    ),
}


@pytest.mark.parametrize("case", OVERSIZED)
async def test_an_instruction_past_a_maximum_is_refused_naming_the_field_and_nothing_starts(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path, case: str
) -> None:
    field, instruction = OVERSIZED[case]()
    file = tmp_path / "trade.json"
    file.write_text(json.dumps(instruction))

    refused = await dvp(config_file(settlement, temporal_server.address, tmp_path), "submit", str(file))
    with pytest.raises(InvalidInstruction) as raised:
        await settlement.client.submit(instruction)

    assert refused.returncode == 2, refused.stderr
    assert f"refused: {field}: " in refused.stderr
    assert raised.value.field == field, raised.value
    with pytest.raises(RPCError) as missing:
        await settlement.client.client.get_workflow_handle(
            workflow_id_for(instruction["trade_id"])
        ).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND  # nothing started
    assert settlement.open_holds() == []


async def test_every_message_a_caller_sends_is_bounded_and_refused_naming_the_field(
    settlement: Engine,
) -> None:
    await settlement.client.submit(approval_trade("TR-bounded"))
    await wait_for_status(settlement, "TR-bounded", TradeStatus.AWAITING_APPROVAL)
    with pytest.raises(InvalidInstruction, match="reason: String should have at most 500 characters"):
        await settlement.acting("alice").cancel("TR-bounded", reason="r" * 501)
    events = await history_length(settlement, "TR-bounded")
    # sent raw, past the client: the workflow's message type refuses it as well, leaving no event
    handle = settlement.client.client.get_workflow_handle(workflow_id_for("TR-bounded"))
    reason = await update_refusal(handle, "cancel_update", {"token": token("alice"), "reason": "r" * 5000})
    assert reason == "Failed decoding arguments"  # the SDK refuses what the message type does not accept
    assert await history_length(settlement, "TR-bounded") == events
    assert (await settlement.client.status("TR-bounded")).status is TradeStatus.AWAITING_APPROVAL
    assert settlement.open_holds() == []


# ------------------------------------------------------------------- routing


def _answers_ok(args: Sequence[RawValue]) -> Any:
    """An attacker's ledger worker: every account exists, every hold is placed and committed."""
    name = activity.info().activity_type
    request = pydantic_data_converter.payload_converter.from_payload(args[0].payload, dict)
    if name.startswith("ledger.check_accounts"):
        return CheckAccountsResult(owners={c["account"]: "alice" for c in request["checks"]}).model_dump()
    holds = request.get("holds") or [{"hold_id": h} for h in request.get("hold_ids", [])]
    status = HoldStatus.COMMITTED if name.startswith("ledger.commit") else HoldStatus.OPEN
    outcomes = [HoldOutcome(hold_id=h["hold_id"], ok=True, status=status, amount=Decimal(1)) for h in holds]
    return HoldOutcomes(outcomes=outcomes).model_dump(mode="json")


@pytest.fixture
async def attacker(temporal_client: Client, task_queue_prefix: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A task queue served by the attacker's worker, and the calls it received."""
    queue = f"{task_queue_prefix}-evil"
    calls: list[str] = []

    @activity.defn(dynamic=True)
    async def answers(args: Sequence[RawValue]) -> Any:
        calls.append(activity.info().activity_type)
        return _answers_ok(args)

    async with Worker(temporal_client, task_queue=queue, activities=[answers]):
        yield queue, calls


FORGERIES: dict[str, Callable[[Config, str], dict[str, Any]]] = {
    "ledger_queues": lambda config, evil: {
        "ledger_queues": {"cash": evil, "securities": config.ledger_queue("securities")},
        "local_ledgers": ["securities"],
    },
    "local_ledgers": lambda config, evil: {"local_ledgers": []},
    "settlement": lambda config, evil: {
        "settlement": config.settlement.model_copy(update={"hold_backstop": timedelta(days=3650)})
    },
}


@pytest.mark.parametrize("field", FORGERIES)
async def test_a_workflow_started_directly_with_forged_routing_is_rejected_and_nothing_moves(
    settlement: Engine, attacker: tuple[str, list[str]], field: str
) -> None:
    evil, calls = attacker
    before = settlement.balances()
    trade_id = f"TR-forged-{field}"
    instruction = Instruction.model_validate(dvp_instruction(trade_id, "bob", "alice", "100", "9950.00"))
    request = SettlementRequest(
        instruction=instruction,
        fingerprint=instruction.fingerprint(),
        token=token("ops"),
        **FORGERIES[field](settlement.config, evil),
    )

    handle = await settlement.client.client.start_workflow(
        SettlementWorkflow.run,
        request,
        id=workflow_id_for(trade_id),
        task_queue=settlement.config.settlement_queue(),
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=initial_search_attributes(instruction),
    )
    final = await asyncio.wait_for(handle.result(), 30)

    assert final.status is TradeStatus.REJECTED
    assert field in final.reason
    assert field in {e.field.split(".")[0] for e in final.errors}
    assert calls == []  # the attacker's worker was never called
    assert settlement.balances() == before and settlement.open_holds() == []


@pytest.mark.parametrize("token_rules", [False, True], ids=["without-token-rules", "with-token-rules"])
async def test_a_workflow_started_directly_without_a_token_is_rejected_whatever_its_request_says(
    settlement: Engine, token_rules: bool
) -> None:
    """``token_rules`` only spares the patch marker: a request without it still gets the trust rules."""
    before = settlement.balances()
    trade_id = f"TR-no-token-{token_rules}"
    instruction = Instruction.model_validate(dvp_instruction(trade_id, "bob", "alice", "100", "9950.00"))
    request = SettlementRequest(
        instruction=instruction, fingerprint=instruction.fingerprint(), token_rules=token_rules
    )

    handle = await settlement.client.client.start_workflow(
        SettlementWorkflow.run,
        request,
        id=workflow_id_for(trade_id),
        task_queue=settlement.config.settlement_queue(),
    )
    final = await asyncio.wait_for(handle.result(), 30)

    assert final.status is TradeStatus.REJECTED
    assert [e.field for e in final.errors] == ["token"]
    assert [e.event for e in final.timeline] == ["status REJECTED"]
    assert settlement.balances() == before and settlement.open_holds() == []
    markers = [
        e.marker_recorded_event_attributes.marker_name
        async for e in handle.fetch_history_events()
        if e.HasField("marker_recorded_event_attributes")
    ]
    # the patch marker is written only where the request did not ask for the rules itself
    assert ("core_patch" in markers) is not token_rules


async def test_a_workflow_started_directly_naming_no_routing_takes_the_workers(settlement: Engine) -> None:
    instruction = Instruction.model_validate(dvp_instruction("TR-plain", "bob", "alice", "100", "9950.00"))
    request = SettlementRequest(
        instruction=instruction, fingerprint=instruction.fingerprint(), token=token("ops")
    )

    handle = await settlement.client.client.start_workflow(
        SettlementWorkflow.run,
        request,
        id=workflow_id_for("TR-plain"),
        task_queue=settlement.config.settlement_queue(),
    )

    assert (await asyncio.wait_for(handle.result(), 30)).status is TradeStatus.SETTLED


# -------------------------------------------------------------- key rotation


async def test_rotating_keys_the_trade_finishes_with_the_new_key_and_replays(
    temporal_client: Client, task_queue_prefix: str, tmp_path: Path
) -> None:
    """Key A signs the submission and an approval; B becomes active, A still known; B's approval ends it."""
    keys = tmp_path / "keys"
    keys.mkdir()
    private_a, public_a = write_key_pair(keys, "a")
    private_b, public_b = write_key_pair(keys, "b")
    key_a = {"kid": "a", "public_key": str(public_a)}
    key_b = {"kid": "b", "public_key": str(public_b)}
    under_a = {"issuers": ["corp"], "keys": [key_a], "signing_key": str(private_a), "signing_kid": "a"}
    under_b = {"issuers": ["corp"], "keys": [key_a, key_b], "signing_key": str(private_b), "signing_kid": "b"}
    urls = sqlite_urls(tmp_path)
    config_a = make_config(urls, task_queue_prefix, auth=under_a)
    config_b = make_config(urls, task_queue_prefix, auth=under_b)
    trade = dvp_instruction("TR-rotate", "bob", "alice", "100", "9950.00", approvers=["notary", "custodian"])

    def issue(config: Any, subject: str) -> str:
        return TokenIssuer.from_config(config.auth).issue(subject)

    async with run_engine(temporal_client, config_a) as engine:
        engine.client.token = issue(config_a, "ops")
        await engine.client.submit(trade)
        handle = engine.client.client.get_workflow_handle(workflow_id_for("TR-rotate"))
        await handle.signal("approve", {"token": issue(config_a, "notary")})
        for _ in range(100):
            if (await engine.client.status("TR-rotate")).approved_by == ["notary"]:
                break
            await asyncio.sleep(0.1)
    # a new worker, with B active and A still known; the trade's cached state is gone
    async with run_engine(temporal_client, config_b) as engine:
        with pytest.raises(RequestRejected, match="unknown key"):  # tokens of neither key are refused
            await engine.client.approve("TR-rotate", token=token("custodian"))
        await engine.client.approve("TR-rotate", "custodian", token=issue(config_b, "custodian"))
        final = await engine.client.wait("TR-rotate", timeout=60)
        history = await handle.fetch_history()

    assert final.status is TradeStatus.SETTLED, final.reason
    assert final.approved_by == ["notary", "custodian"]
    queue = "replay-rotation"  # a Replayer runs its workflows on the task queue replay-<build id>

    async def replays_with(auth: dict[str, Any]) -> bool:
        verifier = Verifier.from_config(parse_config({"ledgers": {}, "auth": auth}).auth)
        install_verifier(queue, verifier)
        try:
            replayer = Replayer(
                workflows=[SettlementWorkflow, HtlcWorkflow],
                data_converter=data_converter(),
                header_codec_behavior=HEADER_CODEC,
                build_id="rotation",
            )
            result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        finally:
            uninstall_verifier(queue, verifier)
        return result.replay_failure is None

    assert await replays_with({"issuers": ["corp"], "keys": [key_a, key_b]})
    # A must stay known while its tokens' histories may replay: without it, notary's signal is refused
    assert not await replays_with({"issuers": ["corp"], "keys": [key_b]})
