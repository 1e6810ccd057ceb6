"""The EVM ledger against a real anvil node: tokens move on chain, the escrow enforces the rules.

One node and one deployment per module; each test opens its own accounts (a fresh
suffix), so tests do not see each other's balances. Without node_modules (no anvil)
these tests skip locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractCustomError

from adapters import open_ledger
from adapters.evm import ARTEFACTS, EvmLedger, deploy_contracts, load_artefact
from domain import (
    AssetMismatch,
    ConfigError,
    HoldNotOpen,
    HoldStatus,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    LedgerConfig,
    LedgerError,
    LedgerUnavailable,
    UnknownAccount,
    UnknownHold,
)
from processes.anvil import Anvil

from ._fixtures_evm import need

ROOT = Path(__file__).resolve().parents[1]
LATER = datetime.now(UTC) + timedelta(hours=1)


@pytest.fixture(scope="module")
def node(anvil_node: Anvil) -> Anvil:
    return anvil_node


@pytest.fixture(scope="module")
def deployment(node: Anvil) -> dict[str, Any]:
    return deploy_contracts(node.url, node.key(0), {"BOND": 0})


@pytest.fixture(scope="module")
def ledger(deployment: dict[str, Any]) -> EvmLedger:
    built = open_ledger("securities", LedgerConfig.model_validate(deployment))
    assert isinstance(built, EvmLedger)
    return built


@pytest.fixture(scope="module")
def w3(node: Anvil) -> Web3:
    return Web3(Web3.HTTPProvider(node.url))


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


def balance_of(w3: Web3, deployment: dict[str, Any], asset: str, wallet: str) -> int:
    token = w3.eth.contract(address=deployment["tokens"][asset], abi=load_artefact("SecurityToken")["abi"])
    return int(token.functions.balanceOf(wallet).call())


def escrow(w3: Web3, deployment: dict[str, Any]) -> Any:
    return w3.eth.contract(address=deployment["escrow"], abi=load_artefact("DvpEscrow")["abi"])


def send_as(w3: Web3, key: str, fn: Any) -> Any:
    """Sign ``fn`` with ``key`` and send it straight to the chain, not through the adapter."""
    sender = Account.from_key(key)
    tx = fn.build_transaction(
        {
            "from": sender.address,
            "nonce": w3.eth.get_transaction_count(sender.address),
            "chainId": w3.eth.chain_id,
        }
    )
    receipt = w3.eth.wait_for_transaction_receipt(
        w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
    )
    assert receipt["status"] == 1
    return receipt


def open_pair(ledger: EvmLedger, tag: str, alice: int = 100, bob: int = 0) -> tuple[str, str]:
    seller, buyer = f"alice-{tag}", f"bob-{tag}"
    ledger.open_account(seller, "BOND", "alice", Decimal(alice))
    ledger.open_account(buyer, "BOND", "bob", Decimal(bob))
    return seller, buyer


def amounts(ledger: EvmLedger, *accounts: str) -> list[tuple[Decimal, Decimal]]:
    """(balance, held) of each account, as the adapter reads them from the chain."""
    return [(b.balance, b.held) for b in (ledger.account(a) for a in accounts)]


# -- the compiled contracts -------------------------------------------------


def test_committed_artefacts_were_built_from_the_committed_sources() -> None:
    for artefact in sorted(ARTEFACTS.glob("*.json")):
        built = json.loads(artefact.read_text())
        source = (ROOT / built["source"]).read_bytes()
        assert built["sourceSha256"] == hashlib.sha256(source).hexdigest(), (
            f"{artefact.name} is stale: run `npm run compile` and commit contracts/build"
        )
    assert {p.stem for p in ARTEFACTS.glob("*.json")} == {"SecurityToken", "DvpEscrow", "AccountRegistry"}


def test_recompiling_reproduces_the_committed_artefacts() -> None:
    if not (ROOT / "node_modules" / "solc").is_dir():
        need("node_modules/solc is missing: run `npm ci`")
    result = subprocess.run(
        ["node", "scripts/compile_contracts.js", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# -- accounts and balances --------------------------------------------------


def test_open_account_issues_the_opening_balance_once(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, tag: str
) -> None:
    account = f"alice-{tag}"
    opened = ledger.open_account(account, "BOND", "alice", Decimal(100))
    again = ledger.open_account(account, "BOND", "alice", Decimal(500))

    assert (opened.balance, opened.available, opened.held) == (100, 100, 0)
    assert again == opened
    assert balance_of(w3, deployment, "BOND", ledger.wallet(account)) == 100
    with pytest.raises(IdempotencyConflict):
        ledger.open_account(account, "BOND", "mallory", Decimal(100))
    with pytest.raises(IdempotencyConflict):
        ledger.open_account(account, "GILT", "alice", Decimal(100))


def test_balances_per_asset_sum_to_zero_with_the_issuer(ledger: EvmLedger, tag: str) -> None:
    seller, buyer = open_pair(ledger, tag, alice=70, bob=5)
    ledger.place_hold(f"{tag}:open", seller, buyer, "BOND", Decimal(7), LATER)

    rows = [b for b in ledger.balances() if b.asset == "BOND"]
    issuer = ledger.account("issuer:BOND")

    assert sum(b.balance for b in rows) == 0
    assert issuer in rows and issuer.balance < 0
    assert [(b.balance, b.held, b.available) for b in rows if b.account == seller] == [(70, 7, 63)]
    assert rows == sorted(rows, key=lambda b: b.account)


def test_an_account_id_unknown_to_the_registry_is_refused(ledger: EvmLedger, tag: str) -> None:
    seller, _ = open_pair(ledger, tag)
    with pytest.raises(UnknownAccount):
        ledger.account(f"nobody-{tag}")
    with pytest.raises(UnknownAccount):
        ledger.place_hold(f"{tag}:x", seller, f"nobody-{tag}", "BOND", Decimal(1), LATER)


def test_a_new_asset_gets_its_own_token_with_its_precision(ledger: EvmLedger, tag: str) -> None:
    asset = f"N{tag.upper()}"
    seller = f"alice-{tag}"
    ledger.open_account(seller, asset, "alice", Decimal("10.50"), precision=2)
    ledger.open_account(f"bob-{tag}", asset, "bob", precision=2)

    hold = ledger.place_hold(f"{tag}:cents", seller, f"bob-{tag}", asset, Decimal("0.25"), LATER)

    assert hold.amount == Decimal("0.25")
    assert ledger.account(seller).available == Decimal("10.25")
    with pytest.raises(InvalidAmount):
        ledger.place_hold(f"{tag}:mills", seller, f"bob-{tag}", asset, Decimal("0.001"), LATER)
    with pytest.raises(AssetMismatch):
        ledger.place_hold(f"{tag}:bond", seller, f"bob-{tag}", "BOND", Decimal(1), LATER)


# -- holds --------------------------------------------------------------------


def test_hold_then_commit_moves_the_tokens_on_chain(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag, alice=100, bob=0)
    hold_id = f"trade-{tag}:leg-0"

    placed = ledger.place_hold(hold_id, seller, buyer, "BOND", Decimal(40), LATER, trade_id=f"trade-{tag}")
    assert (
        ledger.place_hold(hold_id, seller, buyer, "BOND", Decimal(40), LATER, trade_id=f"trade-{tag}")
        == placed
    )
    assert placed.status is HoldStatus.OPEN
    assert balance_of(w3, deployment, "BOND", ledger.wallet(seller)) == 60
    assert amounts(ledger, seller, buyer) == [(100, 40), (0, 0)]

    committed = ledger.commit_hold(hold_id)
    assert ledger.commit_hold(hold_id) == committed
    assert committed.status is HoldStatus.COMMITTED
    assert committed.trade_id == f"trade-{tag}"
    assert balance_of(w3, deployment, "BOND", ledger.wallet(seller)) == 60
    assert balance_of(w3, deployment, "BOND", ledger.wallet(buyer)) == 40
    assert amounts(ledger, seller, buyer) == [(60, 0), (40, 0)]


def test_hold_then_release_gives_the_tokens_back(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    hold_id = f"trade-{tag}:leg-0"
    ledger.place_hold(hold_id, seller, buyer, "BOND", Decimal(30), LATER)

    released = ledger.release_hold(hold_id)

    assert ledger.release_hold(hold_id) == released
    assert released.status is HoldStatus.RELEASED
    assert balance_of(w3, deployment, "BOND", ledger.wallet(seller)) == 100
    assert amounts(ledger, seller, buyer) == [(100, 0), (0, 0)]


def test_a_hold_ends_once_committed_or_once_released(ledger: EvmLedger, tag: str) -> None:
    seller, buyer = open_pair(ledger, tag)
    ledger.place_hold(f"{tag}:a", seller, buyer, "BOND", Decimal(10), LATER)
    ledger.place_hold(f"{tag}:b", seller, buyer, "BOND", Decimal(10), LATER)
    ledger.release_hold(f"{tag}:a")
    ledger.commit_hold(f"{tag}:b")

    with pytest.raises(HoldNotOpen):
        ledger.commit_hold(f"{tag}:a")
    with pytest.raises(HoldNotOpen):
        ledger.release_hold(f"{tag}:b")
    with pytest.raises(HoldNotOpen):
        ledger.pin_hold(f"{tag}:a")
    assert amounts(ledger, seller, buyer) == [(90, 0), (10, 0)]


def test_the_escrow_itself_refuses_to_pay_a_lock_twice(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, node: Anvil, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    ledger.place_hold(f"{tag}:a", seller, buyer, "BOND", Decimal(10), LATER)
    ledger.commit_hold(f"{tag}:a")
    lock_id = Web3.keccak(text=f"{tag}:a")

    for call in (
        escrow(w3, deployment).functions.release(lock_id),
        escrow(w3, deployment).functions.commit(lock_id),
    ):
        with pytest.raises(ContractCustomError):
            send_as(w3, node.key(0), call)


def test_same_key_with_different_terms_is_a_conflict(ledger: EvmLedger, tag: str) -> None:
    seller, buyer = open_pair(ledger, tag)
    ledger.place_hold(f"{tag}:a", seller, buyer, "BOND", Decimal(10), LATER)

    with pytest.raises(IdempotencyConflict):
        ledger.place_hold(f"{tag}:a", seller, buyer, "BOND", Decimal(11), LATER)
    with pytest.raises(IdempotencyConflict):
        ledger.place_hold(f"{tag}:a", buyer, seller, "BOND", Decimal(10), LATER)
    assert amounts(ledger, seller) == [(100, 10)]


def test_insufficient_balance_locks_nothing(ledger: EvmLedger, tag: str) -> None:
    seller, buyer = open_pair(ledger, tag, alice=5)

    with pytest.raises(InsufficientFunds, match="has 5 BOND available"):
        ledger.place_hold(f"{tag}:big", seller, buyer, "BOND", Decimal(6), LATER)

    with pytest.raises(UnknownHold):
        ledger.get_hold(f"{tag}:big")
    assert amounts(ledger, seller, buyer) == [(5, 0), (0, 0)]


def test_release_of_an_unknown_key_leaves_a_tombstone_that_refuses_a_late_lock(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, node: Anvil, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    hold_id = f"trade-{tag}:leg-0"

    tombstone = ledger.release_hold(hold_id)
    late = ledger.place_hold(hold_id, seller, buyer, "BOND", Decimal(10), LATER)

    assert tombstone.status is HoldStatus.RELEASED
    assert late.status is HoldStatus.RELEASED
    assert ledger.get_hold(hold_id).status is HoldStatus.RELEASED
    assert amounts(ledger, seller, buyer) == [(100, 0), (0, 0)]
    lock = escrow(w3, deployment).functions.lock(
        Web3.keccak(text=hold_id), deployment["tokens"]["BOND"], ledger.wallet(seller), ledger.wallet(buyer),
        10, 0, b"\x00" * 32, "",
    )  # fmt: skip
    with pytest.raises(ContractCustomError):
        send_as(w3, node.key(0), lock)


def test_an_expired_lock_can_be_released_by_its_owner_without_the_operator(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, node: Anvil, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    hold_id = f"trade-{tag}:leg-0"
    chain_now = w3.eth.get_block("latest")["timestamp"]
    ledger.place_hold(
        hold_id, seller, buyer, "BOND", Decimal(25), datetime.fromtimestamp(chain_now + 60, UTC)
    )
    owner_key = ledger.wallet_key(seller)
    assert owner_key is not None
    release = escrow(w3, deployment).functions.release(Web3.keccak(text=hold_id))

    with pytest.raises(ContractCustomError):
        send_as(w3, owner_key, release)  # not expired yet: only the operator may release
    node.advance_time(120)
    send_as(w3, owner_key, release)

    assert ledger.get_hold(hold_id).status is HoldStatus.RELEASED
    assert ledger.release_hold(hold_id).status is HoldStatus.RELEASED
    with pytest.raises(HoldNotOpen):
        ledger.commit_hold(hold_id)
    assert balance_of(w3, deployment, "BOND", ledger.wallet(seller)) == 100


def test_a_hashlocked_hold_commits_only_with_its_preimage(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    secret = os.urandom(32)
    hashlock = hashlib.sha256(secret).hexdigest()
    hold_id = f"trade-{tag}:leg-0"
    placed = ledger.place_hold(hold_id, seller, buyer, "BOND", Decimal(10), LATER, hashlock=hashlock)
    assert placed.hashlock == hashlock

    with pytest.raises(LedgerError, match="preimage") as wrong:
        ledger.commit_hold(hold_id, preimage=os.urandom(32).hex())
    assert not isinstance(wrong.value, HoldNotOpen)
    with pytest.raises(LedgerError, match="preimage"):
        ledger.commit_hold(hold_id)
    assert ledger.get_hold(hold_id).status is HoldStatus.OPEN

    committed = ledger.commit_hold(hold_id, preimage=secret.hex())

    assert committed.status is HoldStatus.COMMITTED
    assert amounts(ledger, seller, buyer) == [(90, 0), (10, 0)]
    events = escrow(w3, deployment).events.Committed.get_logs(
        from_block=0, argument_filters={"lockId": Web3.keccak(text=hold_id)}
    )
    assert [bytes(e["args"]["preimage"]) for e in events] == [secret]


def test_anyone_who_knows_the_preimage_can_claim(
    ledger: EvmLedger, deployment: dict[str, Any], w3: Web3, node: Anvil, tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    secret = os.urandom(32)
    hold_id = f"trade-{tag}:leg-0"
    ledger.place_hold(
        hold_id, seller, buyer, "BOND", Decimal(10), LATER, hashlock=hashlib.sha256(secret).hexdigest()
    )
    claim = escrow(w3, deployment).functions.claim

    with pytest.raises(ContractCustomError):
        send_as(w3, node.key(7), claim(Web3.keccak(text=hold_id), os.urandom(32)))
    send_as(w3, node.key(7), claim(Web3.keccak(text=hold_id), secret))

    assert ledger.commit_hold(hold_id, preimage=secret.hex()).status is HoldStatus.COMMITTED
    assert balance_of(w3, deployment, "BOND", ledger.wallet(buyer)) == 10


def test_pinned_holds_do_not_expire(ledger: EvmLedger, tag: str) -> None:
    seller, buyer = open_pair(ledger, tag)
    soon = datetime.now(UTC) + timedelta(seconds=30)
    ledger.place_hold(f"{tag}:a", seller, buyer, "BOND", Decimal(10), soon)
    ledger.place_hold(f"{tag}:b", seller, buyer, "BOND", Decimal(20), soon)

    pinned = ledger.pin_hold(f"{tag}:b")
    assert ledger.pin_hold(f"{tag}:b") == pinned
    expired = ledger.expire_holds(soon + timedelta(seconds=1))

    assert pinned.expires_at is None
    assert [h.hold_id for h in expired if h.hold_id.startswith(tag)] == [f"{tag}:a"]
    assert [h.hold_id for h in ledger.open_holds() if h.hold_id.startswith(tag)] == [f"{tag}:b"]
    assert amounts(ledger, seller) == [(100, 20)]
    assert ledger.commit_hold(f"{tag}:b").status is HoldStatus.COMMITTED


def test_a_second_process_reads_holds_and_names_from_the_chain(
    ledger: EvmLedger, deployment: dict[str, Any], tag: str
) -> None:
    seller, buyer = open_pair(ledger, tag)
    placed = ledger.place_hold(
        f"trade-{tag}:leg-0", seller, buyer, "BOND", Decimal(3), LATER, trade_id=f"trade-{tag}"
    )

    fresh = EvmLedger.from_config("securities", LedgerConfig.model_validate(deployment))

    assert fresh.get_hold(placed.hold_id) == placed
    assert placed in fresh.open_holds()
    assert fresh.account(seller) == ledger.account(seller)


# -- configuration and failures -------------------------------------------------


def test_an_unreachable_node_is_ledger_unavailable(deployment: dict[str, Any]) -> None:
    down = EvmLedger.from_config(
        "securities", LedgerConfig.model_validate({**deployment, "rpc": "http://127.0.0.1:9", "timeout": 2})
    )
    with pytest.raises(LedgerUnavailable):
        down.balances()


def test_a_section_without_rpc_is_a_config_error(deployment: dict[str, Any]) -> None:
    section = {k: v for k, v in deployment.items() if k != "rpc"}
    with pytest.raises(ConfigError, match="rpc"):
        EvmLedger.from_config("securities", LedgerConfig.model_validate(section))
    with pytest.raises(ConfigError, match="colour"):
        EvmLedger.from_config("securities", LedgerConfig.model_validate({**deployment, "colour": "blue"}))


def test_a_configured_wallet_must_approve_the_escrow_itself(
    deployment: dict[str, Any], w3: Web3, node: Anvil, tag: str
) -> None:
    key = node.key(5)
    wallet = Account.from_key(key).address
    own = EvmLedger.from_config(
        "securities", LedgerConfig.model_validate({**deployment, "accounts": {f"carol-{tag}": wallet}})
    )
    own.open_account(f"carol-{tag}", "BOND", "carol", Decimal(50))
    own.open_account(f"dave-{tag}", "BOND", "dave")

    with pytest.raises(InsufficientFunds, match="approve the escrow"):
        own.place_hold(f"{tag}:a", f"carol-{tag}", f"dave-{tag}", "BOND", Decimal(5), LATER)
    token = w3.eth.contract(address=deployment["tokens"]["BOND"], abi=load_artefact("SecurityToken")["abi"])
    send_as(w3, key, token.functions.approve(deployment["escrow"], 5))
    own.place_hold(f"{tag}:a", f"carol-{tag}", f"dave-{tag}", "BOND", Decimal(5), LATER)

    assert own.wallet(f"carol-{tag}") == wallet
    assert own.wallet_key(f"carol-{tag}") is None
    assert amounts(own, f"carol-{tag}") == [(50, 5)]


def test_an_escrow_address_the_registry_does_not_name_is_a_config_error(deployment: dict[str, Any]) -> None:
    wrong = EvmLedger.from_config(
        "securities", LedgerConfig.model_validate({**deployment, "escrow": deployment["registry"]})
    )
    with pytest.raises(ConfigError, match="escrow"):
        wrong.open_holds()
