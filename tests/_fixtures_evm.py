"""EVM fixtures: a real anvil node (npm ``@foundry-rs/anvil``) and the dvp contracts on it.

``anvil_node`` is one node per test module; ``evm_deployment`` deploys a fresh set of
contracts on it for each test (an ``evm`` ledger section, operator key included), so
tests that reuse account ids do not see each other's balances. Without anvil these
tests skip locally and fail in CI (``CI=true``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from web3 import Web3

from adapters.evm import deploy_contracts, load_artefact
from processes.anvil import Anvil, AnvilError, find_anvil

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(reason: str) -> None:
    """Skip for ``reason``, or fail in CI, where everything the tests need is installed."""
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def anvil_node() -> Iterator[Anvil]:
    """A running anvil on a free port of 127.0.0.1, stopped after the module."""
    try:
        find_anvil()
    except AnvilError as exc:
        need(str(exc))
    with Anvil() as anvil:
        yield anvil


@pytest.fixture
def evm_deployment(anvil_node: Anvil) -> dict[str, Any]:
    """Fresh contracts on ``anvil_node``, operated by its dev account 0; no tokens yet."""
    return deploy_contracts(anvil_node.url, anvil_node.key(0), {})


def token_balance(rpc: str, deployment: dict[str, Any], asset: str, wallet: str) -> int:
    """``balanceOf(wallet)`` of ``asset``'s token, straight from the chain (no adapter)."""
    w3 = Web3(Web3.HTTPProvider(rpc))
    registry = w3.eth.contract(address=deployment["registry"], abi=load_artefact("AccountRegistry")["abi"])
    address = registry.functions.tokenOf(asset).call()
    token = w3.eth.contract(address=address, abi=load_artefact("SecurityToken")["abi"])
    return int(token.functions.balanceOf(wallet).call())


__all__ = ["anvil_node", "evm_deployment", "need", "token_balance"]
