"""Encrypted payloads on the real dev server: what Temporal stores, who may read it, rotating keys.

With the default configuration every payload is AES-256-GCM encrypted and
``DvpParties`` holds keyed hashes, so the history the server keeps names no account,
owner, amount or secret; ``dvp status``, the codec server (for a valid token), the
``temporal`` CLI with ``--codec-endpoint`` and the Web UI read the trade in full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.worker import Replayer

from connection import HEADER_CODEC, PayloadRefused, connect_client, data_converter, party_tagger
from connection.codec import (
    ENCRYPTED,
    KEY_ID,
    EncryptionCodec,
    KeyRing,
    history_payloads,
    load_key_ring,
    rotate_key_file,
)
from connection.codec_server import CodecServer, CodecServerThread, origins_of, ui_endpoint
from domain import AuthConfig, CodecConfig, Config, ConfigError, TradeStatus
from identity import TokenIssuer
from processes.devserver import DevServer, find_temporal_binary
from processes.ports import free_port
from starter.instructions import dvp_instruction
from workflows import HtlcWorkflow, SettlementWorkflow, workflow_id_for

from ._fixtures_auth import token
from ._fixtures_settlement import Engine, make_config, run_engine, sqlite_urls, wait_for_status, write_config
from .test_cli import config_file, dvp

BONDS, CASH = "437", "9950.37"
ACCOUNTS = ("bob-sec", "alice-sec", "alice-cash", "bob-cash")
OWNERS = ("alice", "bob")


def trade(trade_id: str, **extra: Any) -> dict[str, Any]:
    return dvp_instruction(trade_id, "bob", "alice", BONDS, CASH, **extra)


def with_codec(config: Config, **codec: Any) -> Config:
    return config.model_copy(update={"codec": CodecConfig(**codec)})


async def raw_history(server: DevServer, workflow_id: str) -> dict[str, Any]:
    """``temporal workflow show --output json``, as anyone with access to the server sees it (no codec)."""
    shown = await asyncio.to_thread(
        subprocess.run,
        [str(find_temporal_binary()), "workflow", "show", "--output", "json", "-w", workflow_id]
        + ["--address", server.address, "--namespace", server.namespace],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    history: dict[str, Any] = json.loads(shown.stdout)
    return history


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode(errors="replace")
    except (binascii.Error, ValueError):
        return text


def readable(node: Any, sealed: list[dict[str, Any]]) -> Any:
    """``node`` with every encrypted payload taken out (into ``sealed``) and every other one decoded."""
    if isinstance(node, list):
        return [readable(item, sealed) for item in node]
    if not isinstance(node, dict):
        return node
    metadata = node.get("metadata")
    if isinstance(metadata, dict) and "data" in node:
        encoding = _b64(str(metadata.get("encoding", "")))
        if encoding == ENCRYPTED.decode():
            sealed.append(node)
            return "(encrypted)"
        return {"metadata": {k: _b64(str(v)) for k, v in metadata.items()}, "data": _b64(str(node["data"]))}
    return {key: readable(value, sealed) for key, value in node.items()}


def secrets_in(text: str, preimage: str | None = None) -> list[str]:
    words = [*ACCOUNTS, *OWNERS, CASH, f'"{BONDS}"', *([preimage, preimage.upper()] if preimage else [])]
    return [word for word in words if word in text]


# ------------------------------------------------------------------ what Temporal stores


async def test_a_settled_trades_raw_history_names_no_account_owner_amount_or_preimage(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    preimage = secrets.token_bytes(32).hex()
    hashlock = hashlib.sha256(bytes.fromhex(preimage)).hexdigest()
    await settlement.client.submit(trade("E-plain"))
    await settlement.client.submit(trade("E-htlc", protocol="htlc", hashlock=hashlock, settle_within="PT60S"))
    await wait_for_status(settlement, "E-htlc", TradeStatus.AWAITING_CLAIM, timeout=60)
    await settlement.acting("bob").claim("E-htlc", preimage)
    for trade_id in ("E-plain", "E-htlc"):
        assert (await settlement.client.wait(trade_id, timeout=60)).status is TradeStatus.SETTLED

    for trade_id in ("E-plain", "E-htlc"):
        sealed: list[dict[str, Any]] = []
        shown = readable(await raw_history(temporal_server, workflow_id_for(trade_id)), sealed)
        text = json.dumps(shown)
        assert sealed, trade_id  # the payloads are there, encrypted
        assert secrets_in(text, preimage) == [], trade_id  # and nothing else names anyone
        assert '"DvpParties"' in text  # the search attributes were looked at too

    # whoever holds the key still reads it all
    config = config_file(settlement, temporal_server.address, tmp_path)
    status = await dvp(config, "status", "E-plain", "--json")
    listed = await dvp(config, "list", "--json")
    alices = await dvp(config, "list", "--party", "alice", "--json")  # searched by alice's tag
    carols = await dvp(config, "list", "--party", "carol", "--json")
    assert status.returncode == 0, status.stderr
    legs = json.loads(status.stdout)["legs"]
    assert [(leg["from"], leg["to"], leg["amount"]) for leg in legs] == [
        ("bob-sec", "alice-sec", BONDS),
        ("alice-cash", "bob-cash", CASH),
    ]
    assert listed.returncode == 0, listed.stderr
    assert {"E-plain", "E-htlc"} <= {row["trade_id"] for row in json.loads(listed.stdout)}
    assert {"E-plain", "E-htlc"} <= {row["trade_id"] for row in json.loads(alices.stdout)}
    assert not {"E-plain", "E-htlc"} & {row["trade_id"] for row in json.loads(carols.stdout)}


async def test_dvp_parties_holds_keyed_hashes_of_accounts_and_owners(settlement: Engine) -> None:
    await settlement.client.submit(trade("E-tags"))
    await settlement.client.wait("E-tags")

    described = await settlement.client.client.get_workflow_handle(workflow_id_for("E-tags")).describe()
    parties = {p.key.name: p.value for p in described.typed_search_attributes}["DvpParties"]
    tag = party_tagger(settlement.client.client)
    assert tag is not None
    assert set(parties) == {tag(name) for name in (*ACCOUNTS, *OWNERS)}
    assert secrets_in(json.dumps(parties)) == []


async def test_hash_parties_off_publishes_the_names(
    temporal_server: DevServer, task_queue_prefix: str, tmp_path: Path
) -> None:
    config = with_codec(make_config(sqlite_urls(tmp_path), task_queue_prefix), hash_parties=False)
    client = await temporal_server.connect(codec=config.codec)
    async with run_engine(client, config) as engine:
        await engine.client.submit(trade("E-names"))
        await engine.client.wait("E-names")
        described = await client.get_workflow_handle(workflow_id_for("E-names")).describe()

    parties = {p.key.name: p.value for p in described.typed_search_attributes}["DvpParties"]
    assert set(parties) == {*ACCOUNTS, *OWNERS}


# ------------------------------------------------------------------ the codec server


@pytest.fixture
def codec_config(settlement: Engine) -> Config:
    """The engine's config: the test issuer's tokens, the codec the session's client uses."""
    return settlement.config


@pytest.fixture
def codec_server(codec_config: Config) -> Iterator[CodecServerThread]:
    server = CodecServer.from_config(codec_config, origins=["http://127.0.0.1:8233"])
    with CodecServerThread(server, "127.0.0.1", free_port()) as running:
        yield running


async def encrypted_payloads(settlement: Engine, trade_id: str) -> list[Payload]:
    await settlement.client.submit(trade(trade_id))
    await settlement.client.wait(trade_id)
    history = await settlement.client.client.get_workflow_handle(workflow_id_for(trade_id)).fetch_history()
    (started,) = history.events[0].workflow_execution_started_event_attributes.input.payloads
    return [started]


def as_json(payloads: list[Payload]) -> dict[str, Any]:
    return {
        "payloads": [
            {
                "metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                "data": base64.b64encode(p.data).decode(),
            }
            for p in payloads
        ]
    }


async def post(url: str, body: Any, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(url, json=body, headers={"X-Namespace": "default", **headers})


async def test_codec_server_decodes_for_a_valid_token(
    settlement: Engine, codec_config: Config, codec_server: CodecServerThread
) -> None:
    body = as_json(await encrypted_payloads(settlement, "E-server"))

    answer = await post(
        f"{codec_server.url}/decode",
        body,
        Authorization=f"Bearer {token('ops')}",
        Origin="http://127.0.0.1:8233",
    )
    viewer = await post(
        f"{codec_server.url}/decode", body, Authorization=f"Bearer {token('v', ['codec-viewer'])}"
    )
    in_path = await post(f"{codec_server.url}/t/{token('ops')}/decode", body)

    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == "http://127.0.0.1:8233"
    (decoded,) = answer.json()["payloads"]
    assert json.loads(_b64(decoded["data"]))["instruction"]["legs"][1]["from"] == "alice-cash"
    assert viewer.status_code == 200 and in_path.status_code == 200
    assert viewer.json() == answer.json() == in_path.json()


async def test_codec_server_refuses_without_a_valid_token_or_from_another_origin(
    settlement: Engine, codec_config: Config, codec_server: CodecServerThread, tmp_path: Path
) -> None:
    body = as_json(await encrypted_payloads(settlement, "E-refused"))
    good = token("ops")
    header, claims, signature = good.split(".")
    altered = f"{header}.{claims[:-4]}AAAA.{signature}"
    local = AuthConfig(local_issuer=True, local_keys=str(tmp_path / "auth"))  # a key the server lacks
    foreign = TokenIssuer.from_config(local).issue("ops")
    decode = f"{codec_server.url}/decode"
    viewer = token("v", ["codec-viewer"])

    answers = {
        "no token": await post(decode, body),
        "altered": await post(decode, body, Authorization=f"Bearer {altered}"),
        "unknown key": await post(decode, body, Authorization=f"Bearer {foreign}"),
        "not a viewer": await post(decode, body, Authorization=f"Bearer {token('alice')}"),
        "wrong origin": await post(
            decode, body, Authorization=f"Bearer {good}", Origin="http://evil.example"
        ),
        "viewer encodes": await post(f"{codec_server.url}/encode", body, Authorization=f"Bearer {viewer}"),
    }
    async with httpx.AsyncClient(timeout=10) as http:
        preflight = {
            origin: await http.options(
                decode, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
            )
            for origin in ("http://127.0.0.1:8233", "http://evil.example")
        }

    assert {name: a.status_code for name, a in answers.items()} == {
        "no token": 401,
        "altered": 401,
        "unknown key": 401,
        "not a viewer": 403,
        "wrong origin": 403,
        "viewer encodes": 403,
    }
    for answer in answers.values():
        assert "alice-cash" not in answer.text and "payloads" not in answer.json()
    assert preflight["http://127.0.0.1:8233"].status_code == 204
    assert (
        preflight["http://127.0.0.1:8233"].headers["access-control-allow-origin"] == "http://127.0.0.1:8233"
    )
    assert "authorization" in preflight["http://127.0.0.1:8233"].headers["access-control-allow-headers"]
    assert preflight["http://evil.example"].status_code == 403
    assert "access-control-allow-origin" not in preflight["http://evil.example"].headers


async def test_temporal_cli_reads_the_trade_through_the_codec_endpoint(
    settlement: Engine, temporal_server: DevServer, codec_config: Config, codec_server: CodecServerThread
) -> None:
    await encrypted_payloads(settlement, "E-cli")
    command = [str(find_temporal_binary()), "workflow", "show", "--output", "json", "-w", "trade-E-cli"]
    command += ["--address", temporal_server.address, "--codec-endpoint", codec_server.url]

    shown = await asyncio.to_thread(
        subprocess.run,
        [*command, "--codec-auth", f"Bearer {token('ops')}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    refused = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)

    assert shown.returncode == 0, shown.stderr
    sealed: list[dict[str, Any]] = []
    decoded = json.dumps(readable(json.loads(shown.stdout), sealed))
    assert "alice-cash" in decoded and CASH in decoded
    assert sealed == []  # every payload came back decoded
    assert refused.returncode != 0 and "alice-cash" not in refused.stdout  # no token: the codec says no


# ------------------------------------------------------------------ the Web UI


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "chromium is not installed: apt-get install -y chromium (make setup installs it)"
    return found


def dump_dom(url: str) -> str:
    """The page at ``url`` as headless Chromium renders it, scripts run for 15 s of virtual time."""
    with tempfile.TemporaryDirectory(prefix="dvp-chromium-", ignore_cleanup_errors=True) as profile:
        rendered = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            + ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
            + ["--virtual-time-budget=15000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    return rendered.stdout


@pytest.mark.slow
async def test_web_ui_shows_a_decoded_trade_through_the_codec_endpoint(
    task_queue_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dvp.codec-server")
    config = make_config(sqlite_urls(tmp_path), task_queue_prefix)
    server = DevServer(port=free_port(), ui_port=free_port())
    assert server.ui_url
    codec = CodecServer.from_config(config, origins=origins_of(server.ui_url))
    with CodecServerThread(codec, "127.0.0.1", free_port()) as running:
        server.ui_codec_endpoint, _ = ui_endpoint(config, running.url)
        with server:
            client = await server.connect(codec=config.codec)
            async with run_engine(client, config) as engine:
                await engine.client.submit(trade("E-ui"))
                await engine.client.wait("E-ui")
                dom = await asyncio.to_thread(
                    dump_dom, f"{server.ui_url}/namespaces/default/workflows/{workflow_id_for('E-ui')}"
                )

    assert "alice-cash" in dom and CASH in dom  # the workflow's input, decoded in the page
    decodes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode ")]
    assert any(f"for dvp-web-ui (origin {server.ui_url}," in line for line in decodes), decodes


# ------------------------------------------------------------------ keys


@asynccontextmanager
async def engine_with(server: DevServer, config: Config) -> AsyncIterator[tuple[Engine, Client]]:
    client = await connect_client(server.address, codec=config.codec)
    async with run_engine(client, config) as engine:
        yield engine, client


async def test_trades_started_under_the_old_key_finish_and_replay_after_rotation(
    temporal_server: DevServer, task_queue_prefix: str, tmp_path: Path
) -> None:
    keys = tmp_path / "codec-keys.json"
    keys.write_text(KeyRing.generate().to_json())
    config = with_codec(make_config(sqlite_urls(tmp_path), task_queue_prefix), key_file=str(keys))
    old = load_key_ring(config.codec).active

    async with engine_with(temporal_server, config) as (engine, _):
        await engine.client.submit(
            dvp_instruction("E-late", "bob", "alice", "1200", CASH, settle_within="PT90S")
        )
        await wait_for_status(engine, "E-late", TradeStatus.RESERVING)  # bob is short: it recycles
    new = rotate_key_file(keys).active

    async with engine_with(temporal_server, config) as (engine, client):
        fund = dvp_instruction("E-fund", "carol", "bob", "500", "1.00")
        fund["legs"][1]["from"], fund["legs"][1]["to"] = "alice-cash", "carol-cash"
        await engine.client.submit(fund)
        final = await engine.client.wait("E-late", timeout=90)
        history = await client.get_workflow_handle(workflow_id_for("E-late")).fetch_history()

    assert final.status is TradeStatus.SETTLED, final.reason
    kids = {p.metadata[KEY_ID].decode() for p in history_payloads(history)}
    assert kids == {old, new}  # begun under the old key, finished under the new one
    ring = load_key_ring(config.codec)
    replayer = Replayer(
        workflows=[SettlementWorkflow, HtlcWorkflow],
        data_converter=data_converter(EncryptionCodec(ring)),
        header_codec_behavior=HEADER_CODEC,
    )
    assert (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure is None
    # without the old key, the same history does not replay: its payloads are refused
    without_old = KeyRing(keys={new: ring.keys[new]}, active=new, party_key=ring.party_key)
    replayer = Replayer(
        workflows=[SettlementWorkflow, HtlcWorkflow],
        data_converter=data_converter(EncryptionCodec(without_old)),
        header_codec_behavior=HEADER_CODEC,
    )
    assert (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure is not None


async def test_an_unknown_key_id_is_refused_and_changes_nothing(
    temporal_server: DevServer, task_queue_prefix: str, tmp_path: Path
) -> None:
    config = with_codec(
        make_config(sqlite_urls(tmp_path), task_queue_prefix), key_file=str(tmp_path / "keys.json")
    )
    (tmp_path / "keys.json").write_text(KeyRing.generate().to_json())
    stranger = await connect_client(temporal_server.address, codec=EncryptionCodec(KeyRing.generate()))
    handle = stranger.get_workflow_handle(workflow_id_for("E-stranger"))

    async with engine_with(temporal_server, config) as (engine, _):
        await engine.client.submit(trade("E-stranger", approvers=["notary"], settle_within="PT60S"))
        await wait_for_status(engine, "E-stranger", TradeStatus.AWAITING_APPROVAL)
        # sealed with a key the worker does not hold: a signal dropped, an update rejected
        approval = {"party": "notary", "token": token("notary")}
        await handle.signal("approve", approval)
        with pytest.raises(WorkflowUpdateFailedError):  # why, only the worker's key holders read
            await handle.execute_update("approve_update", approval)
        with pytest.raises(PayloadRefused, match="encrypted with key id '.+', which this key ring does not"):
            await handle.query(SettlementWorkflow.status)  # the worker's answer, to the stranger
        view = await engine.client.status("E-stranger")
        assert view.status is TradeStatus.AWAITING_APPROVAL
        await engine.acting("notary").approve("E-stranger")  # the trade was not wedged
        assert (await engine.client.wait("E-stranger")).status is TradeStatus.SETTLED


async def test_the_codec_refuses_what_it_cannot_open() -> None:
    ring = KeyRing.generate()
    codec = EncryptionCodec(ring)
    converter = data_converter(codec).payload_converter
    (sealed,) = await codec.encode(converter.to_payloads([{"account": "alice-cash"}]))
    tampered = Payload(metadata=dict(sealed.metadata), data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1]))
    unknown = Payload(metadata={**sealed.metadata, KEY_ID: b"k-gone"}, data=sealed.data)
    (plain,) = converter.to_payloads([{"account": "alice-cash"}])

    assert sealed.metadata["encoding"] == ENCRYPTED and b"alice" not in sealed.data
    assert converter.from_payloads(await codec.decode([sealed])) == [{"account": "alice-cash"}]
    for payload, reason in (
        (tampered, "does not authenticate"),
        (unknown, "key id 'k-gone'"),
        (plain, "not encrypted"),
    ):
        with pytest.raises(PayloadRefused, match=reason):
            converter.from_payloads(await codec.decode([payload]))
    assert converter.from_payloads(await EncryptionCodec(ring, accept_plaintext=True).decode([plain])) == [
        {"account": "alice-cash"}
    ]
    # a fresh nonce each time: the same value never seals to the same bytes
    again = await codec.encode(converter.to_payloads([{"account": "alice-cash"}]))
    assert again[0].data != sealed.data


# ------------------------------------------------------------------ configuration


def test_the_default_key_ring_is_made_once_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    first = load_key_ring(CodecConfig())
    second = load_key_ring(CodecConfig())

    path = tmp_path / ".dvp" / "codec-keys.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert first.keys == second.keys and first.party_key == second.party_key


def test_key_ring_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing.generate()
    monkeypatch.setenv("DVP_TEST_CODEC_KEYS", ring.to_json())

    loaded = load_key_ring(CodecConfig(key_env="DVP_TEST_CODEC_KEYS"))

    assert loaded.keys == ring.keys and loaded.active == ring.active


KEY = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("codec", "ring", "message"),
    [
        ({"key_file": "missing.json"}, None, "codec.key_file: missing.json does not exist"),
        (
            {"key_env": "DVP_TEST_UNSET"},
            None,
            "codec.key_env: the environment variable DVP_TEST_UNSET is not set",
        ),
        ({"key_file": "ring.json"}, {"active": "a", "keys": {}}, "keys: expected an object of at least one"),
        ({"key_file": "ring.json"}, {"active": "b", "keys": {"a": "AAAA"}}, "keys.a: 3 bytes, expected 32"),
        (
            {"key_file": "ring.json"},
            {"active": "b", "keys": {"a": "A" * 43 + "="}},
            "active: 'b' is not one of",
        ),
        ({"key_file": "ring.json"}, {"active": "a", "keys": {"a": "A" * 43 + "="}}, "party_key: is required"),
    ],
)
def test_a_bad_key_ring_is_refused_naming_the_field(
    codec: dict[str, str],
    ring: dict[str, Any] | None,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVP_TEST_UNSET", raising=False)
    if ring is not None:
        Path("ring.json").write_text(json.dumps(ring))

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_key_ring(CodecConfig(**codec))


async def test_dvp_with_a_missing_key_file_exits_2_naming_it(
    settlement: Engine, temporal_server: DevServer, tmp_path: Path
) -> None:
    missing = settlement.config.codec.model_copy(update={"key_file": str(tmp_path / "nope.json")})
    engine_config = settlement.config.model_copy(update={"codec": missing})
    config = write_config(tmp_path / "dvp.toml", engine_config, address=temporal_server.address)

    listed = await dvp(config, "list")
    submitted = await dvp(config, "submit", "-", stdin=json.dumps(trade("E-nokey")))

    for result in (listed, submitted):
        assert result.returncode == 2, result.stderr
        assert f"codec.key_file: {tmp_path / 'nope.json'} does not exist" in result.stderr
    with pytest.raises(Exception):  # noqa: B017 - nothing was started
        await settlement.client.status("E-nokey")


def test_codec_config_errors_name_the_field() -> None:
    from domain import parse_config

    base = {"ledgers": {"cash": {"kind": "sql", "url": "sqlite://"}}}
    for codec, message in (
        ({"key_file": "a", "key_env": "B"}, "key_file and key_env: give one source"),
        ({"key_env": "1X"}, "codec.key_env: '1X' is not an environment variable name"),
        ({"ui_origins": ["http://x/ui"]}, "codec.ui_origins: 'http://x/ui' is not an origin"),
        ({"server": "8081"}, "codec.server: '8081' is not HOST:PORT"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "codec": codec})
