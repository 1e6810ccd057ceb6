"""The securities leg on an EVM chain: ERC-20 tokens locked in an escrow contract.

On the chain (contracts/ holds the Solidity, contracts/build/ the compiled artefacts):

* ``SecurityToken``: one ERC-20 per asset; its owner (the operator) is the issuer.
* ``DvpEscrow``: a hold is a lock, ``lockId = keccak256(hold_id)``. ``place_hold`` pulls
  the amount from the owner's wallet into the escrow (the wallet approved the escrow),
  ``commit_hold`` pays it to the beneficiary (or anyone with the hashlock preimage
  does), ``release_hold`` pays it back. The contract enforces what the ledger contract
  promises: a lock id is used once, a lock ends committed or released at most once,
  an operator release of an unknown id leaves a tombstone that refuses a later lock.
* ``AccountRegistry``: the names. Asset symbol -> token, account id -> (wallet, token,
  owner). Every process that opens the ledger reads the same names from the chain.

Balances are never kept off chain. For an account: ``available`` is the token's
``balanceOf(wallet)``, ``held`` is the escrow's ``held(token, wallet)`` (tokens under
open locks sit in the escrow) and ``balance = available + held``.

Sums to zero: minting creates units, so each asset has a synthetic issuer account
(``issuer:<ASSET>`` by default) whose balance is ``balanceOf(token owner) -
totalSupply``. The accounts of an asset plus its issuer sum to zero as long as the
units stay among registered wallets, the escrow and the issuer, which is all this
adapter ever moves them between.

Wallets: ``open_account`` registers a wallet for a new account. If the ledger's
``accounts`` table names an address for it, that one (its owner must approve the
escrow with their own key); otherwise a dev wallet derived from ``mnemonic`` (anvil's
by default) at index ``sha256(account) mod 2**31``, which the adapter funds with gas
and approves the escrow from. It then issues the opening balance once (an issuance id
per account, recorded in the token).

Configuration (a ``[ledgers.<name>]`` section with ``kind = "evm"``)::

    rpc = "http://127.0.0.1:8545"     # JSON-RPC endpoint (``url`` is taken as well)
    registry = "0x..."                # AccountRegistry address (it names escrow and tokens)
    operator_key = "0x..."            # or operator_key_env = "DVP_OPERATOR_KEY"
    escrow = "0x..."                  # optional: checked against the registry's
    tokens = { BOND = "0x..." }       # optional: checked against the registry's
    chain_id = 31337                  # optional: refuse another chain
    from_block = 0                    # optional: where to start reading events
    mnemonic = "test test ... junk"   # optional: dev wallets
    issuer_account = "issuer:{asset}" # optional
    timeout = 30                      # optional: seconds per RPC call, and per wait for finality
    confirmations = 1                 # optional: blocks deep a transaction must be, or "safe"/"finalized"
    block_time = 0.3                  # optional: the chain's block interval (paces the waits)
    [ledgers.<name>.accounts]         # optional: wallets the operator has no key for
    "alice-bonds" = "0x..."

Finality: ``confirmations`` says when a transaction counts. With N, a lock is
reported placed, pinned, committed or released only once the transaction that did it
is N blocks deep (its block and N - 1 on top), and the state reported is the lock's
as of that depth (block ``latest - N + 1``); with ``"safe"`` or ``"finalized"``, as of
the block the node tags so. While it waits, a transaction that a reorganisation
dropped (or that reverted) is sent again: every call is idempotent on the lock id,
so sending twice has the effect of once. N = 1 (the default) is a mined receipt, which
suits a dev chain that never reorganises; N > 1 needs a chain that mines on its own
(anvil ``--block-time``). A wait longer than ``timeout`` raises ``LedgerUnavailable``
(retryable): the retry resumes it. Balances and ``get_hold`` read the latest block;
``final_hold`` reads at the finality depth. See docs/finality.md.

Preimages and hashlocks are 32 bytes in hex (``0x`` optional):
``hashlock = sha256(preimage)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Context, Decimal
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, ParamSpec, Self, TypeVar

import requests
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import (
    ContractLogicError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)

from domain import (
    AccountBalance,
    AssetMismatch,
    ConfigError,
    Hold,
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

from ._base import Ledger

__all__ = ["ARTEFACTS", "DEFAULT_MNEMONIC", "FINALITY_TAGS", "EvmLedger", "deploy_contracts", "load_artefact"]

DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
"""anvil's default mnemonic: its dev accounts are m/44'/60'/0'/0/i of this phrase."""

ARTEFACTS = Path(__file__).resolve().parents[1] / "contracts" / "build"
"""Compiled contracts (``scripts/compile_contracts.js`` writes them; they are committed)."""

_ZERO_ADDRESS = "0x" + "00" * 20
_ZERO32 = b"\x00" * 32
_MAX_UINT = 2**256 - 1
_GAS_FLOAT = 10**17  # wei a dev wallet gets for its own transactions (approve, release)
_GAS_LOW = 10**16
_WIDE = Context(prec=100)  # 18 decimals of a large amount exceed the default 28 digits

# What a node answers when a nonce was used meanwhile (geth, anvil): take the next one.
_NONCE_TAKEN = ("nonce too low", "already known", "already imported", "underpriced")

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def load_artefact(name: str) -> dict[str, Any]:
    """The compiled contract ``name``: ``abi``, ``bytecode`` and the source digest."""
    path = ARTEFACTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: run `npm run compile`") from None


@functools.cache
def _error_table() -> dict[bytes, tuple[str, list[str]]]:
    """Custom error selector -> (name, argument types), over every contract we deploy."""
    table: dict[bytes, tuple[str, list[str]]] = {}
    for name in ("SecurityToken", "DvpEscrow", "AccountRegistry"):
        for item in load_artefact(name)["abi"]:
            if item["type"] == "error":
                types = [i["type"] for i in item["inputs"]]
                table[keccak(text=f"{item['name']}({','.join(types)})")[:4]] = (item["name"], types)
    return table


class _State(IntEnum):
    NONE = 0
    OPEN = 1
    COMMITTED = 2
    RELEASED = 3


_ENDED = (_State.COMMITTED, _State.RELEASED)

_STATUS = {
    _State.OPEN: HoldStatus.OPEN,
    _State.COMMITTED: HoldStatus.COMMITTED,
    _State.RELEASED: HoldStatus.RELEASED,
}


@dataclass(frozen=True)
class _Lock:
    token: str
    expiry: int
    state: _State
    owner: str
    beneficiary: str
    amount: int
    hashlock: bytes

    @property
    def tombstone(self) -> bool:
        return self.state is _State.RELEASED and self.owner == _ZERO_ADDRESS


@dataclass(frozen=True)
class _Token:
    symbol: str
    address: str
    decimals: int


@dataclass(frozen=True)
class _Account:
    id: str
    wallet: str
    token: str
    owner: str


class _Revert(Exception):
    """A transaction or its simulation reverted; ``name`` is the custom error, if any."""

    def __init__(self, name: str, args: tuple[Any, ...], detail: str) -> None:
        self.name = name
        self.args_ = args
        super().__init__(detail)


def _revert_from(exc: ContractLogicError) -> _Revert:
    data = exc.data if isinstance(exc.data, str) else None
    if data and data.startswith("0x") and len(data) >= 10:
        raw = bytes.fromhex(data[2:])
        known = _error_table().get(raw[:4])
        if known:
            name, types = known
            args = tuple(abi_decode(types, raw[4:]))
            return _Revert(name, args, f"{name}{args}")
    return _Revert("", (), str(exc.message or exc))


def _available(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the node being unreachable into ``LedgerUnavailable`` (retryable)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (requests.ConnectionError, requests.Timeout, ProviderConnectionError, TimeExhausted) as exc:
            raise LedgerUnavailable(f"EVM node unreachable: {exc}") from exc
        except Web3RPCError as exc:
            raise LedgerError(f"EVM node refused the request: {exc}") from exc
        except _Revert as exc:  # a revert no caller mapped to a domain error
            raise LedgerError(f"EVM transaction reverted: {exc}") from None

    return wrapper


def _hex32(value: str, field: str) -> bytes:
    text = value[2:] if value.startswith(("0x", "0X")) else value
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise LedgerError(f"{field}: expected 32 bytes as 64 hex digits, got {value!r}")
    return raw


class _Chain:
    """One JSON-RPC connection: contracts, signed transactions, decoded reverts."""

    def __init__(self, rpc: str, timeout: float = 30.0, chain_id: int | None = None) -> None:
        provider = Web3.HTTPProvider(
            rpc, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
        )
        self.w3 = Web3(provider)
        self.rpc = rpc
        self.timeout = timeout
        self._chain_id = chain_id
        self._checked = False
        self._send_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def chain_id(self) -> int:
        if not self._checked:
            actual = self.w3.eth.chain_id
            if self._chain_id is not None and actual != self._chain_id:
                raise ConfigError(
                    f"{self.rpc} is chain {actual}, the configuration says chain_id {self._chain_id}"
                )
            self._chain_id, self._checked = actual, True
        assert self._chain_id is not None
        return self._chain_id

    def check(self) -> None:
        """Refuse a node of another chain than the configured ``chain_id`` (asked once)."""
        if not self._checked:
            self.chain_id  # noqa: B018 - the property asks the node and compares

    def contract(self, name: str, address: str) -> Any:
        return self.w3.eth.contract(address=to_checksum_address(address), abi=load_artefact(name)["abi"])

    def _lock_for(self, address: str) -> threading.Lock:
        with self._locks_guard:
            return self._send_locks.setdefault(address, threading.Lock())

    def submit(self, fn: Any, signer: LocalAccount) -> HexBytes:
        """Sign and send ``fn`` (a contract function or constructor); its hash, not waiting for it.

        Raises ``_Revert`` if the simulation reverts.
        """
        chain_id = self.chain_id
        with self._lock_for(signer.address):
            for attempt in range(3):
                nonce = self.w3.eth.get_transaction_count(signer.address, "pending")
                try:
                    tx = fn.build_transaction({"from": signer.address, "nonce": nonce, "chainId": chain_id})
                except ContractLogicError as exc:
                    raise _revert_from(exc) from None
                signed = signer.sign_transaction(tx)
                try:
                    return HexBytes(self.w3.eth.send_raw_transaction(signed.raw_transaction))
                except Web3RPCError as exc:
                    # Another process sent with this key meanwhile: take the next nonce.
                    if attempt == 2 or not any(s in str(exc).lower() for s in _NONCE_TAKEN):
                        raise
        raise AssertionError("unreachable")

    def send(self, fn: Any, signer: LocalAccount) -> Any:
        """Sign and send ``fn``, wait for its receipt (mined once: for setup, not for holds).

        Raises ``_Revert`` if the simulation or the mined transaction reverts.
        """
        tx_hash = self.submit(fn, signer)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.timeout, poll_latency=0.05)
        if receipt["status"] != 1:
            raise _Revert(
                "", (), f"transaction {tx_hash.to_0x_hex()} reverted in block {receipt['blockNumber']}"
            )
        return receipt

    def lost(self, tx_hash: HexBytes) -> bool:
        """True if ``tx_hash`` is neither pending nor mined successfully: dropped, or reverted.

        Either way sending the call again is right: a dropped transaction is gone with
        the blocks a reorganisation replaced, and a reverted one's simulation says why.
        """
        try:
            return int(self.w3.eth.get_transaction_receipt(tx_hash)["status"]) != 1
        except TransactionNotFound:
            pass
        try:
            self.w3.eth.get_transaction(tx_hash)
        except TransactionNotFound:
            return True
        return False  # pending

    def send_value(self, to: str, value: int, signer: LocalAccount) -> None:
        with self._lock_for(signer.address):
            tx: dict[str, Any] = {
                "to": to_checksum_address(to),
                "value": value,
                "gas": 21000,
                "gasPrice": self.w3.eth.gas_price,
                "nonce": self.w3.eth.get_transaction_count(signer.address, "pending"),
                "chainId": self.chain_id,
            }
            tx_hash = self.w3.eth.send_raw_transaction(signer.sign_transaction(tx).raw_transaction)
        self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.timeout, poll_latency=0.05)

    def deploy(self, name: str, signer: LocalAccount, *args: Any) -> tuple[str, int]:
        """Deploy contract ``name``; its address and the block it was deployed in."""
        artefact = load_artefact(name)
        factory = self.w3.eth.contract(abi=artefact["abi"], bytecode=artefact["bytecode"])
        receipt = self.send(factory.constructor(*args), signer)
        return str(receipt["contractAddress"]), int(receipt["blockNumber"])


def _operator(key: str) -> LocalAccount:
    account: LocalAccount = Account.from_key(key)
    return account


@_available
def deploy_contracts(rpc: str, operator_key: str, assets: dict[str, int]) -> dict[str, Any]:
    """Deploy the escrow, the registry and one token per asset (symbol -> decimals).

    Returns an ``evm`` ledger section for this deployment (the key included, so this is
    for dev chains): ``kind``, ``rpc``, ``chain_id``, ``registry``, ``escrow``,
    ``tokens``, ``from_block``, ``operator_key``.
    """
    chain = _Chain(rpc)
    operator = _operator(operator_key)
    try:
        escrow, first_block = chain.deploy("DvpEscrow", operator, operator.address)
        registry_address, _ = chain.deploy("AccountRegistry", operator, operator.address, escrow)
        registry = chain.contract("AccountRegistry", registry_address)
        tokens: dict[str, str] = {}
        for symbol, decimals in assets.items():
            tokens[symbol], _ = chain.deploy(
                "SecurityToken", operator, symbol, symbol, decimals, operator.address
            )
            chain.send(registry.functions.registerAsset(symbol, tokens[symbol]), operator)
    except _Revert as exc:
        raise LedgerError(f"deploying the dvp contracts on {rpc} failed: {exc}") from None
    return {
        "kind": "evm",
        "rpc": rpc,
        "chain_id": chain.chain_id,
        "registry": registry_address,
        "escrow": escrow,
        "tokens": tokens,
        "from_block": first_block,
        "operator_key": operator_key,
    }


FinalityTag = Literal["safe", "finalized"]
FINALITY_TAGS: tuple[FinalityTag, ...] = ("safe", "finalized")
"""Block tags a node may keep for the blocks it holds final; ``confirmations`` takes them too."""


def _confirmations(value: Any, field: str) -> int | FinalityTag:
    """``confirmations``: a whole number of blocks (1 or more), or a finality tag."""
    if isinstance(value, str) and value in FINALITY_TAGS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(
        f"{field}: expected a number of blocks (1 or more) or one of {', '.join(FINALITY_TAGS)}, "
        f"got {value!r}"
    )


def _block_time(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(f"{field}: expected a positive number of seconds, got {value!r}")


class EvmLedger(Ledger):
    """A ledger whose balances are ERC-20 balances and whose holds are escrow locks."""

    def __init__(
        self,
        name: str,
        rpc: str,
        registry: str,
        operator_key: str,
        *,
        chain_id: int | None = None,
        from_block: int = 0,
        mnemonic: str = DEFAULT_MNEMONIC,
        accounts: dict[str, str] | None = None,
        issuer_account: str = "issuer:{asset}",
        timeout: float = 30.0,
        escrow: str | None = None,
        tokens: dict[str, str] | None = None,
        confirmations: int | str = 1,
        block_time: float | None = None,
    ) -> None:
        self.name = name
        self._confirmations = _confirmations(confirmations, f"ledgers.{name}.confirmations")
        # A quarter of a block: a confirmation is seen soon after it is mined.
        self._poll = min(max(block_time / 4, 0.02), 0.5) if block_time else 0.05
        self._chain = _Chain(rpc, timeout, chain_id)
        self._operator = _operator(operator_key)
        self._registry_contract = self._chain.contract("AccountRegistry", registry)
        self._escrow_contract: Any = None
        self._from_block = from_block
        self._mnemonic = mnemonic
        self._fixed_wallets = {k: to_checksum_address(v) for k, v in (accounts or {}).items()}
        self._issuer_template = issuer_account
        # What deploy_contracts wrote next to the registry: checked against it, not trusted.
        self._expected_escrow = to_checksum_address(escrow) if escrow else None
        self._expected_tokens = {k: to_checksum_address(v) for k, v in (tokens or {}).items()}
        # Caches of what never changes once on chain: names, decimals, lock memos.
        self._tokens: dict[str, _Token] = {}
        self._accounts: dict[str, _Account] = {}
        self._names: dict[tuple[str, str], str] = {}
        self._memos: dict[bytes, tuple[str, str]] = {}
        self._scanned_to = from_block - 1
        self._scan_lock = threading.Lock()
        self._asset_lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, config: LedgerConfig) -> Self:
        options = config.options()
        where = f"ledgers.{name}"

        def required(key: str, fallback: str | None = None) -> str:
            value = options.get(key) or fallback
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.{key}: an evm ledger needs {key} (a string)")
            return value

        key = options.get("operator_key")
        if not key and options.get("operator_key_env"):
            key = os.environ.get(str(options["operator_key_env"]))
            if not key:
                raise ConfigError(f"{where}.operator_key_env: ${options['operator_key_env']} is not set")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}.operator_key: an evm ledger needs the operator's private key")
        known = {"rpc", "registry", "operator_key", "operator_key_env", "chain_id", "from_block", "mnemonic",
                 "accounts", "issuer_account", "timeout", "escrow", "tokens", "confirmations",
                 "block_time"}  # fmt: skip
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}: not a key of an evm ledger (known: {', '.join(sorted(known))})"
            )
        for table in ("accounts", "tokens"):
            value = options.get(table) or {}
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f'{where}.{table}: expected a table of name = "0x..." address')
        try:
            return cls(
                name,
                required("rpc", config.url),
                required("registry"),
                key,
                chain_id=int(options["chain_id"]) if "chain_id" in options else None,
                from_block=int(options.get("from_block", 0)),
                mnemonic=str(options.get("mnemonic", DEFAULT_MNEMONIC)),
                accounts=options.get("accounts") or {},
                issuer_account=str(options.get("issuer_account", "issuer:{asset}")),
                timeout=float(options.get("timeout", 30)),
                escrow=options.get("escrow"),
                tokens=options.get("tokens") or {},
                confirmations=options.get("confirmations", 1),
                block_time=_block_time(options.get("block_time"), f"{where}.block_time"),
            )
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    # -- names --------------------------------------------------------------

    @property
    def _registry(self) -> Any:
        # Every name, and so every read, starts here: the first one checks the chain id, so a
        # ledger pointed at another chain (a second `dvp chain up` node) refuses to read it.
        self._chain.check()
        return self._registry_contract

    @property
    def _escrow(self) -> Any:
        if self._escrow_contract is None:
            address = self._registry.functions.escrow().call()
            if self._expected_escrow and address != self._expected_escrow:
                raise ConfigError(
                    f"ledgers.{self.name}.escrow: {self._expected_escrow}, but registry "
                    f"{self._registry.address} names escrow {address}"
                )
            self._escrow_contract = self._chain.contract("DvpEscrow", address)
        return self._escrow_contract

    def _token(self, address: str) -> Any:
        return self._chain.contract("SecurityToken", address)

    def _find_asset(self, symbol: str) -> _Token | None:
        token = self._tokens.get(symbol)
        if token is None:
            address = self._registry.functions.tokenOf(symbol).call()
            if address == _ZERO_ADDRESS:
                return None
            expected = self._expected_tokens.get(symbol)
            if expected and address != expected:
                raise ConfigError(
                    f"ledgers.{self.name}.tokens.{symbol}: {expected}, but the registry names {address}"
                )
            token = _Token(symbol, address, int(self._token(address).functions.decimals().call()))
            self._tokens[symbol] = token
        return token

    def _asset(self, symbol: str) -> _Token:
        token = self._find_asset(symbol)
        if token is None:
            raise AssetMismatch(f"asset {symbol!r} has no token on ledger {self.name}")
        return token

    def _assets(self) -> list[_Token]:
        symbols, _ = self._registry.functions.assets().call()
        return [self._asset(s) for s in symbols]

    def _asset_at(self, address: str) -> _Token:
        for token in self._tokens.values():
            if token.address == address:
                return token
        for token in self._assets():
            if token.address == address:
                return token
        raise LedgerError(f"token {address} is not registered on ledger {self.name}")

    def _find_account(self, account: str) -> _Account | None:
        known = self._accounts.get(account)
        if known is None:
            wallet, token, owner = self._registry.functions.accountOf(account).call()
            if wallet == _ZERO_ADDRESS:
                return None
            known = _Account(account, wallet, token, owner)
            self._accounts[account] = known
        return known

    def _account(self, account: str) -> _Account:
        known = self._find_account(account)
        if known is None:
            raise UnknownAccount(f"account {account!r} does not exist on ledger {self.name}")
        return known

    def _name_at(self, token: str, wallet: str) -> str:
        key = (token, wallet)
        if key not in self._names:
            name = self._registry.functions.accountAt(token, wallet).call()
            if not name:
                return wallet  # not ours: show the address rather than invent a name
            self._names[key] = name
        return self._names[key]

    def _issuer_of(self, account: str) -> _Token | None:
        """The asset whose issuer account is ``account``, if it is one."""
        for token in [*self._tokens.values(), *self._assets()]:
            if self._issuer_template.format(asset=token.symbol) == account:
                return token
        return None

    # -- amounts ------------------------------------------------------------

    @staticmethod
    def _units(amount: Decimal, token: _Token, field: str = "amount") -> int:
        scaled = amount.scaleb(token.decimals, context=_WIDE)
        if scaled != scaled.to_integral_value(context=_WIDE):
            raise InvalidAmount(
                f"{field}: {format(amount, 'f')} has more than {token.decimals} decimal places, "
                f"the precision of {token.symbol}"
            )
        return int(scaled)

    @staticmethod
    def _decimal(units: int, token: _Token) -> Decimal:
        return Decimal(units).scaleb(-token.decimals, context=_WIDE)

    # -- holds --------------------------------------------------------------

    def _read_lock(self, lock_id: bytes, block: int | Literal["latest"] = "latest") -> _Lock:
        fields = self._escrow.functions.locks(lock_id).call(block_identifier=block)
        token, expiry, state, owner, beneficiary, amount, hashlock = fields
        return _Lock(token, int(expiry), _State(state), owner, beneficiary, int(amount), bytes(hashlock))

    def _final_block(self) -> int:
        """The newest block this ledger holds final: ``confirmations - 1`` below the latest, or tagged."""
        if isinstance(self._confirmations, str):
            return int(self._chain.w3.eth.get_block(self._confirmations)["number"])
        return max(self._chain.w3.eth.block_number - (self._confirmations - 1), 0)

    def _depth(self) -> str:
        if isinstance(self._confirmations, str):
            return f"in the {self._confirmations} block"
        return f"{self._confirmations} block{'s' if self._confirmations > 1 else ''} deep"

    def _until_final(
        self, lock_id: bytes, what: str, final: Callable[[_Lock], bool], call: Callable[[_Lock], Any]
    ) -> _Lock:
        """Send ``call(latest)`` until ``final`` holds of the lock at the finality depth; that lock.

        ``call`` gets the lock as the latest block has it and returns the contract call
        that moves it on, or ``None`` when the latest block already has what is wanted
        (then only depth is missing); it raises a domain error when the lock is in a
        state the operation refuses. The transaction is sent again when it is lost (a
        reorganisation dropped it, or it reverted): it is idempotent on the lock id.
        Raises ``_Revert`` if a simulation reverts while the latest lock still needs it.
        """
        sent: HexBytes | None = None
        deadline = time.monotonic() + self._chain.timeout
        while True:
            settled = self._read_lock(lock_id, self._final_block())
            if final(settled):
                return settled
            fn = call(self._read_lock(lock_id))
            if fn is not None and (sent is None or self._chain.lost(sent)):
                try:
                    sent = self._chain.submit(fn, self._operator)
                except _Revert:
                    if call(self._read_lock(lock_id)) is not None:
                        raise
                    # someone else's transaction got there first: wait for it to be final
            if time.monotonic() >= deadline:
                raise LedgerUnavailable(
                    f"{what}: not {self._depth()} after {self._chain.timeout:g}s on ledger {self.name} "
                    "(is the chain mining blocks? more than one confirmation needs a block time)"
                )
            time.sleep(self._poll)

    def _memo(self, lock_id: bytes) -> tuple[str, str] | None:
        """(hold_id, trade_id) of a lock, from its ``Locked`` event."""
        if lock_id not in self._memos:
            with self._scan_lock:
                latest = self._chain.w3.eth.block_number
                if latest > self._scanned_to:
                    events = self._escrow.events.Locked.get_logs(
                        from_block=self._scanned_to + 1, to_block=latest
                    )
                    for event in events:
                        try:
                            memo = json.loads(event["args"]["memo"])
                            self._memos[bytes(event["args"]["lockId"])] = (
                                str(memo["hold_id"]),
                                str(memo.get("trade_id", "")),
                            )
                        except (ValueError, KeyError, TypeError):
                            continue  # a lock someone else made: no hold id of ours
                    # Blocks not yet final may be replaced: read them again next time.
                    self._scanned_to = min(latest, self._final_block())
        return self._memos.get(lock_id)

    def _hold(self, hold_id: str, lock_id: bytes, lock: _Lock) -> Hold:
        if lock.tombstone:
            return Hold(
                ledger=self.name, hold_id=hold_id, account="", to_account="", asset="",
                amount=Decimal(0), status=HoldStatus.RELEASED,
            )  # fmt: skip
        token = self._asset_at(lock.token)
        memo = self._memo(lock_id)
        return Hold(
            ledger=self.name,
            hold_id=hold_id,
            account=self._name_at(lock.token, lock.owner),
            to_account=self._name_at(lock.token, lock.beneficiary),
            asset=token.symbol,
            amount=self._decimal(lock.amount, token),
            status=_STATUS[lock.state],
            expires_at=datetime.fromtimestamp(lock.expiry, UTC) if lock.expiry else None,
            trade_id=memo[1] if memo else "",
            hashlock=lock.hashlock.hex() if lock.hashlock != _ZERO32 else None,
        )

    @staticmethod
    def _lock_id(hold_id: str) -> bytes:
        return keccak(text=hold_id)

    def _fail(self, revert: _Revert, what: str) -> LedgerError:
        """The domain error for a revert the caller could not resolve by re-reading."""
        name, args = revert.name, revert.args_
        if name == "LockNotOpen":
            return HoldNotOpen(f"{what}: the hold is already {_State(args[1]).name.lower()}")
        if name == "LockExpired":
            return HoldNotOpen(
                f"{what}: the lock expired at {datetime.fromtimestamp(args[1], UTC).isoformat()}"
            )
        if name == "UnknownLock":
            return UnknownHold(f"{what}: no such lock")
        if name in ("NotOperator", "NotOwner"):
            return LedgerError(
                f"{what}: {args[0]} is not the operator of the contracts of ledger {self.name} "
                f"(check ledgers.{self.name}.operator_key)"
            )
        if name == "WrongPreimage":
            return LedgerError(f"{what}: the preimage does not match the hashlock")
        if name in ("ERC20InsufficientBalance", "ERC20InsufficientAllowance"):
            return InsufficientFunds(f"{what}: {name} {args}")
        return LedgerError(f"{what}: reverted: {revert}")

    @_available
    def place_hold(
        self,
        hold_id: str,
        account: str,
        to_account: str,
        asset: str,
        amount: Decimal,
        expires_at: datetime | None,
        trade_id: str = "",
        hashlock: str | None = None,
    ) -> Hold:
        lock_id = self._lock_id(hold_id)
        terms = (account, to_account, asset, amount, trade_id, hashlock)
        existing = self._read_lock(lock_id)
        if existing.state is not _State.NONE:
            # A known key answers first: a replay must not fail on a check it passed before.
            self._same_terms(hold_id, lock_id, existing, *terms)
        built: list[Any] = []

        def lock(latest: _Lock) -> Any:
            if latest.state is not _State.NONE:
                return None
            if not built:  # checked only when there is something to send
                built.append(self._lock_call(hold_id, lock_id, expires_at, *terms))
            return built[0]

        try:
            final = self._until_final(
                lock_id, f"hold {hold_id!r}", lambda lk: lk.state is not _State.NONE, lock
            )
        except _Revert as revert:
            token = self._asset(asset)
            if revert.name == "ERC20InsufficientBalance":
                raise InsufficientFunds(
                    f"account {account!r} has {format(self._decimal(revert.args_[1], token), 'f')} {asset} "
                    f"available; hold {hold_id!r} requested {format(amount, 'f')} {asset}"
                ) from None
            if revert.name == "ERC20InsufficientAllowance":
                raise InsufficientFunds(
                    f"account {account!r}: wallet {self._account(account).wallet} allows the escrow "
                    f"{format(self._decimal(revert.args_[1], token), 'f')} {asset}; hold {hold_id!r} "
                    f"requested {format(amount, 'f')} {asset} (the owner must approve the escrow)"
                ) from None
            raise self._fail(revert, f"hold {hold_id!r}") from None
        if built:
            self._memos[lock_id] = (hold_id, trade_id)
        return self._same_terms(hold_id, lock_id, final, *terms)

    def _lock_call(
        self, hold_id: str, lock_id: bytes, expires_at: datetime | None, account: str, to_account: str,
        asset: str, amount: Decimal, trade_id: str, hashlock: str | None,
    ) -> Any:  # fmt: skip
        """The escrow's ``lock`` for this hold, once its terms are checked."""
        token = self._asset(asset)
        source, target = self._account(account), self._account(to_account)
        for acct in (source, target):
            if acct.token != token.address:
                held = self._asset_at(acct.token).symbol
                raise AssetMismatch(f"account {acct.id!r} holds asset {held}, not {asset}")
        if account == to_account:
            raise LedgerError(f"hold {hold_id!r} pays account {account!r} to itself")
        if amount <= 0:
            raise InvalidAmount(f"amount must be positive, got {format(amount, 'f')} {asset}")
        units = self._units(amount, token)
        lock_hash = _hex32(hashlock, "hashlock") if hashlock else _ZERO32
        expiry = math.ceil(expires_at.timestamp()) if expires_at else 0
        memo = json.dumps({"hold_id": hold_id, "trade_id": trade_id}, separators=(",", ":"))
        return self._escrow.functions.lock(
            lock_id, token.address, source.wallet, target.wallet, units, expiry, lock_hash, memo
        )

    def _same_terms(
        self, hold_id: str, lock_id: bytes, lock: _Lock, account: str, to_account: str, asset: str,
        amount: Decimal, trade_id: str, hashlock: str | None,
    ) -> Hold:  # fmt: skip
        """The hold already under this key, if the new request matches its terms."""
        held = self._hold(hold_id, lock_id, lock)
        if lock.tombstone:
            return held  # released before it was placed: place nothing
        asked = {
            "account": account, "to_account": to_account, "asset": asset, "trade_id": trade_id,
            "hashlock": hashlock.lower().removeprefix("0x") if hashlock else None,
        }  # fmt: skip
        differs = [
            f"{k} {getattr(held, k)!r} (asked {v!r})" for k, v in asked.items() if getattr(held, k) != v
        ]
        if held.amount != amount:
            differs.append(f"amount {format(held.amount, 'f')} (asked {format(amount, 'f')})")
        if differs:
            raise IdempotencyConflict(f"hold {hold_id!r} exists with different terms: " + ", ".join(differs))
        return held

    @_available
    def pin_hold(self, hold_id: str) -> Hold:
        lock_id = self._lock_id(hold_id)

        def pin(latest: _Lock) -> Any:
            if latest.state is _State.NONE:
                raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r}")
            if latest.state is _State.RELEASED:
                raise HoldNotOpen(f"hold {hold_id!r} is already released; it cannot be pinned")
            if latest.state is _State.OPEN and latest.expiry != 0:
                return self._escrow.functions.pin(lock_id)
            return None

        try:
            lock = self._until_final(
                lock_id,
                f"pin hold {hold_id!r}",
                lambda lk: lk.state in _ENDED or (lk.state is _State.OPEN and lk.expiry == 0),
                pin,
            )
        except _Revert as revert:
            raise self._fail(revert, f"pin hold {hold_id!r}") from None
        if lock.state is _State.RELEASED:
            raise HoldNotOpen(f"hold {hold_id!r} is already released; it cannot be pinned")
        return self._hold(hold_id, lock_id, lock)

    @_available
    def commit_hold(self, hold_id: str, preimage: str | None = None) -> Hold:
        lock_id = self._lock_id(hold_id)

        def commit(latest: _Lock) -> Any:
            if latest.state is _State.NONE:
                raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r}")
            if latest.state is _State.RELEASED:
                raise HoldNotOpen(f"hold {hold_id!r} is already released; it cannot be committed")
            if latest.state is _State.COMMITTED:
                return None
            if latest.hashlock == _ZERO32:
                return self._escrow.functions.commit(lock_id)
            if preimage is None:
                raise LedgerError(f"hold {hold_id!r}: the preimage does not match the hashlock")
            return self._escrow.functions.claim(lock_id, _hex32(preimage, "preimage"))

        try:
            lock = self._until_final(
                lock_id, f"commit hold {hold_id!r}", lambda lk: lk.state in _ENDED, commit
            )
        except _Revert as revert:
            raise self._fail(revert, f"commit hold {hold_id!r}") from None
        if lock.state is not _State.COMMITTED:
            raise HoldNotOpen(f"hold {hold_id!r} is already released; it cannot be committed")
        return self._hold(hold_id, lock_id, lock)

    @_available
    def release_hold(self, hold_id: str) -> Hold:
        lock_id = self._lock_id(hold_id)

        def release(latest: _Lock) -> Any:
            if latest.state in (_State.NONE, _State.OPEN):
                return self._escrow.functions.release(lock_id)
            return None

        try:
            lock = self._until_final(
                lock_id, f"release hold {hold_id!r}", lambda lk: lk.state in _ENDED, release
            )
        except _Revert as revert:
            raise self._fail(revert, f"release hold {hold_id!r}") from None
        if lock.state is not _State.RELEASED:
            raise HoldNotOpen(f"hold {hold_id!r} is already committed; it cannot be released")
        return self._hold(hold_id, lock_id, lock)

    @_available
    def get_hold(self, hold_id: str) -> Hold:
        lock_id = self._lock_id(hold_id)
        lock = self._read_lock(lock_id)
        if lock.state is _State.NONE:
            raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r}")
        return self._hold(hold_id, lock_id, lock)

    @_available
    def final_hold(self, hold_id: str) -> Hold:
        """The hold as of the finality depth; ``UnknownHold`` if no lock is there (yet, or any more)."""
        lock_id = self._lock_id(hold_id)
        lock = self._read_lock(lock_id, self._final_block())
        if lock.state is _State.NONE:
            raise UnknownHold(f"ledger {self.name!r} has no hold {hold_id!r} {self._depth()}")
        return self._hold(hold_id, lock_id, lock)

    def _open_locks(self) -> list[tuple[str, bytes, _Lock]]:
        found = []
        for raw in self._escrow.functions.openLocks().call():
            lock_id = bytes(raw)
            memo = self._memo(lock_id)
            lock = self._read_lock(lock_id)
            if lock.state is _State.OPEN:
                found.append((memo[0] if memo else "0x" + lock_id.hex(), lock_id, lock))
        return found

    @_available
    def open_holds(self) -> list[Hold]:
        holds = [self._hold(hold_id, lock_id, lock) for hold_id, lock_id, lock in self._open_locks()]
        return sorted(holds, key=lambda h: h.hold_id)

    @_available
    def expire_holds(self, now: datetime) -> list[Hold]:
        cutoff = now.timestamp()
        released = []
        for hold_id, lock_id, lock in self._open_locks():
            if lock.expiry and lock.expiry <= cutoff:
                try:
                    self._chain.send(self._escrow.functions.release(lock_id), self._operator)
                except _Revert:
                    continue  # committed or released meanwhile: not ours to expire
                released.append(self._hold(hold_id, lock_id, self._read_lock(lock_id)))
        return released

    # -- accounts -----------------------------------------------------------

    def _balance(self, acct: _Account) -> AccountBalance:
        token = self._asset_at(acct.token)
        available = int(self._token(acct.token).functions.balanceOf(acct.wallet).call())
        held = int(self._escrow.functions.held(acct.token, acct.wallet).call())
        return AccountBalance(
            ledger=self.name, account=acct.id, asset=token.symbol, owner=acct.owner,
            balance=self._decimal(available + held, token), held=self._decimal(held, token),
            available=self._decimal(available, token),
        )  # fmt: skip

    def _issuer_balance(self, token: _Token) -> AccountBalance:
        contract = self._token(token.address)
        issuer = contract.functions.owner().call()
        units = int(contract.functions.balanceOf(issuer).call()) - int(
            contract.functions.totalSupply().call()
        )
        amount = self._decimal(units, token)
        return AccountBalance(
            ledger=self.name, account=self._issuer_template.format(asset=token.symbol), asset=token.symbol,
            owner="issuer", balance=amount, held=Decimal(0), available=amount,
        )  # fmt: skip

    @_available
    def account(self, account: str) -> AccountBalance:
        known = self._find_account(account)
        if known is not None:
            return self._balance(known)
        issued = self._issuer_of(account)
        if issued is not None:
            return self._issuer_balance(issued)
        raise UnknownAccount(f"account {account!r} does not exist on ledger {self.name}")

    @_available
    def balances(self) -> list[AccountBalance]:
        rows = [self._balance(self._account(a)) for a in self._registry.functions.accountIds().call()]
        rows += [self._issuer_balance(token) for token in self._assets()]
        return sorted(rows, key=lambda b: (b.asset, b.account))

    def _dev_wallet(self, account: str) -> LocalAccount:
        index = int.from_bytes(hashlib.sha256(account.encode()).digest()[:4], "big") & 0x7FFFFFFF
        Account.enable_unaudited_hdwallet_features()
        wallet: LocalAccount = Account.from_mnemonic(self._mnemonic, account_path=f"m/44'/60'/0'/0/{index}")
        return wallet

    @_available
    def wallet_key(self, account: str) -> str | None:
        """The private key of ``account``'s wallet if it is a dev wallet, else ``None``."""
        known = self._account(account)
        wallet = self._dev_wallet(account)
        return "0x" + bytes(wallet.key).hex() if wallet.address == known.wallet else None

    @_available
    def wallet(self, account: str) -> str:
        """The address of ``account``'s wallet."""
        return self._account(account).wallet

    def _create_asset(self, symbol: str, precision: int) -> _Token:
        with self._asset_lock:
            token = self._find_asset(symbol)
            if token is not None:
                return token
            address, _ = self._chain.deploy(
                "SecurityToken", self._operator, symbol, symbol, precision, self._operator.address
            )
            try:
                self._chain.send(self._registry.functions.registerAsset(symbol, address), self._operator)
            except _Revert as revert:
                if revert.name != "AssetConflict":  # another process registered it first: use theirs
                    raise self._fail(revert, f"register asset {symbol}") from None
            return self._asset(symbol)

    @_available
    def open_account(
        self, account: str, asset: str, owner: str, balance: Decimal = Decimal(0), precision: int = 0
    ) -> AccountBalance:
        if balance < 0:
            raise InvalidAmount(f"balance: an opening balance cannot be negative, got {format(balance, 'f')}")
        if self._issuer_of(account) is not None:
            raise IdempotencyConflict(f"account {account!r} is an issuer account of ledger {self.name}")
        token = self._find_asset(asset) or self._create_asset(asset, precision)
        units = self._units(balance, token, "balance")
        known = self._find_account(account)
        if known is None:
            wallet = self._fixed_wallets.get(account) or self._dev_wallet(account).address
            try:
                call = self._registry.functions.registerAccount(account, wallet, token.address, owner)
                self._chain.send(call, self._operator)
            except _Revert as revert:
                if revert.name == "WalletInUse":
                    raise IdempotencyConflict(
                        f"account {account!r}: wallet {wallet} already holds account "
                        f"{revert.args_[2]!r} in {asset}"
                    ) from None
                if revert.name != "AccountConflict":
                    raise self._fail(revert, f"open account {account}") from None
            known = self._account(account)
        if known.token != token.address or known.owner != owner:
            held = self._asset_at(known.token).symbol
            raise IdempotencyConflict(
                f"account {account!r} exists for asset {held} and owner {known.owner!r}, "
                f"not {asset} and {owner!r}"
            )
        self._approve_escrow(account, known)
        contract = self._token(token.address)
        issuance = keccak(text=f"dvp-opening-balance:{account}")
        if not contract.functions.issued(issuance).call():
            try:
                self._chain.send(contract.functions.issue(issuance, known.wallet, units), self._operator)
            except _Revert as revert:
                raise self._fail(revert, f"issue the opening balance of {account}") from None
        return self._balance(known)

    def _approve_escrow(self, account: str, known: _Account) -> None:
        """Let the escrow pull from a dev wallet: gas money, then an unlimited allowance."""
        if account in self._fixed_wallets:
            return  # the owner approves with their own key
        wallet = self._dev_wallet(account)
        if wallet.address != known.wallet:
            return
        contract = self._token(known.token)
        escrow = self._escrow.address
        if int(contract.functions.allowance(wallet.address, escrow).call()) == _MAX_UINT:
            return
        if self._chain.w3.eth.get_balance(wallet.address) < _GAS_LOW:
            self._chain.send_value(wallet.address, _GAS_FLOAT, self._operator)
        try:
            self._chain.send(contract.functions.approve(escrow, _MAX_UINT), wallet)
        except _Revert as revert:
            raise self._fail(revert, f"approve the escrow for {account}") from None

    @_available
    def verify(self) -> list[str]:
        """Every invariant violation read from the chain; an empty list means consistent.

        Per asset: the accounts and the issuer sum to zero, and the escrow holds
        exactly the tokens of its open locks (no more, no fewer).
        """
        problems: list[str] = []
        rows = self.balances()
        locks = self._open_locks()
        for token in self._assets():
            total = sum((b.balance for b in rows if b.asset == token.symbol), Decimal(0))
            if total != 0:
                problems.append(f"{token.symbol}: balances sum to {format(total, 'f')}, not 0")
            locked = sum(lock.amount for _, _, lock in locks if lock.token == token.address)
            in_escrow = int(self._token(token.address).functions.balanceOf(self._escrow.address).call())
            if in_escrow != locked:
                problems.append(
                    f"{token.symbol}: the escrow holds {format(self._decimal(in_escrow, token), 'f')}, "
                    f"its open locks {format(self._decimal(locked, token), 'f')}"
                )
        return problems

    def close(self) -> None:
        """Nothing to release: the HTTP provider holds no open resource of ours."""
