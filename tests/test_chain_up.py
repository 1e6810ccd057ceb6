"""``dvp chain up`` and ``dvp ledger seed`` on the chain, as a user runs them.

``chain up`` runs as a real process (it stays in the foreground until SIGINT); the
configuration it writes is then used by ``dvp ledger seed``, and the result is read
straight from the chain with web3: tokens minted to the holders' wallets, and the
escrow allowed to pull them.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from web3 import Web3

from adapters.evm import EvmLedger, load_artefact
from domain import LedgerConfig, load_config
from processes.anvil import find_anvil
from processes.ports import free_port
from starter import cli

from ._fixtures_evm import need

REPO = Path(__file__).resolve().parent.parent
BEFORE = """# the team's configuration: comments and order are kept
[ledgers.cash]
kind = "sql"
url = "sqlite:///{tmp}/cash.db"   # the cash ledger

[ledgers.chain]
kind = "evm"
rpc = "http://127.0.0.1:1"        # a chain that is long gone
registry = "0x0000000000000000000000000000000000000001"
operator_key = "0x01"
[ledgers.chain.accounts]
"old" = "0x0000000000000000000000000000000000000002"

[compliance]
sanctioned = ["mallory"]
"""
SEED = {
    "accounts": [
        {"ledger": "chain", "id": "bob-bonds", "asset": "BOND-2030", "owner": "bob", "balance": "1000"},
        {"ledger": "chain", "id": "alice-bonds", "asset": "BOND-2030", "owner": "alice", "balance": "0"},
        {"ledger": "cash", "id": "alice-eur", "asset": "EUR", "owner": "alice", "balance": "100.00"},
    ]
}


@pytest.fixture
def chain_up(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, int]:
    try:
        find_anvil()
    except Exception as exc:  # AnvilError, reported as a skip or a CI failure
        need(str(exc))
    config = tmp_path / "dvp.toml"
    config.write_text(BEFORE.format(tmp=tmp_path))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "starter.cli", "chain", "up", "--config", str(config), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, config, port


@pytest.mark.slow
def test_chain_up_writes_the_deployment_and_seed_mints_and_approves_on_chain(
    chain_up: tuple[subprocess.Popen[str], Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    process, config_path, port = chain_up
    try:
        assert process.stdout is not None
        lines: list[str] = []
        end = time.monotonic() + 60
        while not any("Ctrl-C" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)
            assert time.monotonic() < end, "".join(lines)
            lines.append(line)

        text = config_path.read_text()
        written = tomllib.loads(text)
        chain = written["ledgers"]["chain"]
        assert chain["kind"] == "evm" and chain["rpc"] == f"http://127.0.0.1:{port}"
        assert {"registry", "escrow", "operator_key", "chain_id"} <= set(chain)
        assert "accounts" not in chain and "long gone" not in text  # the old section is replaced
        assert text.startswith("# the team's configuration") and "# the cash ledger" in text
        assert text.index("[ledgers.cash]") < text.index("[ledgers.chain]") < text.index("[compliance]")
        assert load_config(config_path).compliance.sanctioned == ["mallory"]

        seed_file = tmp_path / "seed.json"
        seed_file.write_text(json.dumps(SEED))
        args = ["--config", str(config_path), "ledger", "seed", str(seed_file), "--json"]
        assert cli.main(args) == 0
        seeded = {row["account"]: row["balance"] for row in json.loads(capsys.readouterr().out)}
        assert cli.main(args) == 0  # safe to re-run: nothing is minted twice
        assert seeded == {"bob-bonds": "1000", "alice-bonds": "0", "alice-eur": "100.00"}

        ledger = EvmLedger.from_config("chain", LedgerConfig.model_validate(chain))
        w3 = Web3(Web3.HTTPProvider(chain["rpc"]))
        registry = w3.eth.contract(address=chain["registry"], abi=load_artefact("AccountRegistry")["abi"])
        token = w3.eth.contract(
            address=registry.functions.tokenOf("BOND-2030").call(), abi=load_artefact("SecurityToken")["abi"]
        )
        for account, units in (("bob-bonds", 1000), ("alice-bonds", 0)):
            wallet = ledger.wallet(account)
            assert token.functions.balanceOf(wallet).call() == units
            assert token.functions.allowance(wallet, chain["escrow"]).call() == 2**256 - 1
        assert token.functions.totalSupply().call() == 1000
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert "stopping anvil" in out
    with pytest.raises(ConnectionRefusedError):  # the node is gone with the command
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_chain_up_refuses_a_taken_port_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "dvp.toml"
    config.write_text(BEFORE.format(tmp=tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["chain", "up", "--config", str(config), "--port", str(port)])
    assert code == 1
    assert f"127.0.0.1:{port} is taken" in capsys.readouterr().err
    assert config.read_text() == BEFORE.format(tmp=tmp_path)


def test_chain_up_without_anvil_or_a_config_file_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DVP_CONFIG", raising=False)
    assert cli.main(["chain", "up"]) == 2
    assert "--config FILE" in capsys.readouterr().err

    monkeypatch.setenv("ANVIL_BIN", str(tmp_path / "no-such-anvil"))
    config = tmp_path / "dvp.toml"
    assert cli.main(["chain", "up", "--config", str(config), "--port", str(free_port())]) == 1
    assert "no-such-anvil is not an executable file" in capsys.readouterr().err
    assert not config.exists()

    config.write_text("[ledgers.chain]\nkind = 'sql'\nurl = 'sqlite:///x.db'\n")
    assert cli.main(["--config", str(config), "chain", "up"]) == 2
    assert "ledgers.chain is a sql ledger" in capsys.readouterr().err


def test_chain_up_refuses_confirmations_an_idle_chain_never_gives_and_a_taken_chain_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before anything starts: exit 2, the configuration unchanged."""
    config = tmp_path / "dvp.toml"
    config.write_text(
        BEFORE.format(tmp=tmp_path).replace(
            'operator_key = "0x01"', 'operator_key = "0x01"\nchain_id = 31337'
        )
    )
    before = config.read_text()
    up = ["chain", "up", "--config", str(config), "--ledger", "other", "--port", str(free_port())]

    assert cli.main([*up, "--confirmations", "3"]) == 2
    assert "--confirmations: 3 needs --block-time" in capsys.readouterr().err
    assert cli.main([*up, "--confirmations", "0", "--block-time", "1"]) == 2
    assert "--confirmations: 0 is not a number of blocks" in capsys.readouterr().err
    assert cli.main([*up, "--block-time", "0"]) == 2
    assert "--block-time: 0 is not a block time" in capsys.readouterr().err
    assert cli.main([*up, "--chain-id", "31337"]) == 2
    assert "--chain-id: 31337 is already the chain id of ledgers.chain" in capsys.readouterr().err
    assert config.read_text() == before
