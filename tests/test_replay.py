"""Replay the recorded settlement histories against the current workflow code.

A change to the trade saga (``workflows/settlement.py``, ``workflows/_trade.py``) or to
``workflows/htlc.py`` that would break a trade already running
(a reordered activity, a new timer, a changed condition) fails here as a
non-determinism error. The histories under ``tests/histories/`` are recorded by
``python -m tests.record_histories``; re-record them only for an intended,
versioned change, and keep the old ones: those under ``before-local-steps/`` are
trades whose request had no ``local_steps`` (one call per local ledger in each step),
those under ``before-trust/`` trades from before verified tokens, and those under
``before-token-rules/`` trades that took the trust rules by the ``dvp-trust`` patch
marker (docs/decisions/0012-trust-rules-in-the-request.md); all must still replay on
today's code. Those under ``continued/<n>/`` are the runs,
one file each, of a trade that continued as new twice before it settled.

The replayer runs with the sandbox's default restrictions, so unlike the worker
(``worker.WORKFLOW_RUNNER``) it imports ``workflows/_trade.py`` in the sandbox: a
call there that a workflow must not make (the system clock, I/O) fails here.

It decodes with the data converter every client and worker uses
(``connection.data_converter``: payloads encrypted, failures too), under the fixture
key ring the histories were recorded with (``tests/codec-fixture-keys.json``). The
histories recorded before payloads were encrypted hold plaintext only; they are
replayed with ``accept_plaintext``, the setting (``[codec] accept_plaintext``) a
worker runs with while such trades finish, and with nothing else: a history is
either wholly encrypted or wholly from before the codec, and the codec alone refuses
the plaintext ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from connection import HEADER_CODEC, data_converter
from connection.codec import ENCRYPTED, EncryptionCodec, KeyRing, history_payloads
from domain import SettlementRequest, TradeStatus, TradeView
from workflows import HtlcWorkflow, SettlementWorkflow
from workflows._saga import TRUST_PATCH

from .record_histories import FIXTURE_KEYS

HERE = Path(__file__).resolve().parent / "histories"
HISTORIES = sorted(HERE.glob("**/*.json"))
RING = KeyRing.parse(FIXTURE_KEYS.read_text(), str(FIXTURE_KEYS))


def load(path: Path) -> WorkflowHistory:
    """The file is named after its workflow id."""
    return WorkflowHistory.from_json(path.stem, path.read_text())


def recorded_before_the_codec(history: WorkflowHistory) -> bool:
    return not any(p.metadata.get("encoding") == ENCRYPTED for p in history_payloads(history))


def codec_for(history: WorkflowHistory) -> EncryptionCodec:
    """The fixture ring's codec; plaintext let through for a history recorded before the codec only."""
    return EncryptionCodec(RING, accept_plaintext=recorded_before_the_codec(history))


def value(history: WorkflowHistory, payload: Payload, kind: type) -> object:
    converted: object = data_converter(codec_for(history)).payload_converter.from_payload(
        codec_for(history).open(payload), kind
    )
    assert isinstance(converted, kind)
    return converted


def final_view(history: WorkflowHistory) -> TradeView:
    """The TradeView the workflow returned, from its completion event."""
    last = history.events[-1]
    assert last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, history.workflow_id
    (payload,) = last.workflow_execution_completed_event_attributes.result.payloads
    view = value(history, payload, TradeView)
    assert isinstance(view, TradeView)
    return view


def test_histories_are_present() -> None:
    assert HISTORIES, "no recorded histories under tests/histories (run: python -m tests.record_histories)"


@pytest.mark.parametrize("path", HISTORIES, ids=[str(p.relative_to(HERE).with_suffix("")) for p in HISTORIES])
async def test_history_replays_without_nondeterminism(path: Path) -> None:
    history = load(path)
    replayer = Replayer(
        workflows=[SettlementWorkflow, HtlcWorkflow],
        data_converter=data_converter(codec_for(history)),
        header_codec_behavior=HEADER_CODEC,
    )

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, f"{path.name}: {result.replay_failure!r}"


def test_a_history_is_wholly_encrypted_or_wholly_from_before_the_codec() -> None:
    encrypted = {}
    for path in HISTORIES:
        kinds = {p.metadata.get("encoding") == ENCRYPTED for p in history_payloads(load(path))}
        assert len(kinds) == 1, f"{path.name} mixes encrypted and plaintext payloads"
        encrypted[path.relative_to(HERE)] = kinds.pop()

    assert any(encrypted.values()) and not all(encrypted.values())
    assert all(encrypted[p] for p in encrypted if p.parts[0] == "encrypted")


async def test_the_codec_alone_refuses_the_histories_from_before_it() -> None:
    history = load(HERE / "before-token-rules" / "trade-R-settled.json")
    assert recorded_before_the_codec(history)
    replayer = Replayer(
        workflows=[SettlementWorkflow, HtlcWorkflow],
        data_converter=data_converter(EncryptionCodec(RING)),
        header_codec_behavior=HEADER_CODEC,
    )

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is not None


def completed(history: WorkflowHistory) -> bool:
    """A run that ended the trade (not one that continued as new)."""
    return history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


def test_recorded_histories_cover_every_terminal_status() -> None:
    statuses = {final_view(load(path)).status for path in HISTORIES if completed(load(path))}

    assert statuses == {s for s in TradeStatus if s.terminal}


def request(history: WorkflowHistory) -> SettlementRequest:
    """The workflow's input, from its start event."""
    (payload,) = history.events[0].workflow_execution_started_event_attributes.input.payloads
    converted = value(history, payload, SettlementRequest)
    assert isinstance(converted, SettlementRequest)
    return converted


def test_trades_from_before_and_after_local_steps_are_both_replayed() -> None:
    trades = [p for p in HISTORIES if "htlc" not in p.stem]
    before = [p for p in trades if p.parent.name == "before-local-steps"]
    after = [p for p in trades if p.parent == HERE]

    assert before and after
    assert not any(request(load(p)).local_steps for p in before)
    assert all(request(load(p)).local_steps for p in after)
    # One of each layout of ledger calls: all local, all queued, mixed.
    assert {"trade-R-settled", "trade-R-settled-queued", "trade-R-settled-mixed"} <= {p.stem for p in after}


def patch_markers(history: WorkflowHistory) -> set[str]:
    """The ``workflow.patched`` ids the history's markers record."""
    ids = set()
    for event in history.events:
        marker = event.marker_recorded_event_attributes
        if event.HasField("marker_recorded_event_attributes") and marker.marker_name == "core_patch":
            (data,) = marker.details["patch-data"].payloads  # the SDK's own JSON, not encoded by ours
            ids.add(json.loads(data.data)["id"])
    return ids


def test_trades_from_before_and_after_token_rules_in_the_request_are_both_replayed() -> None:
    """Today's trades ask for the trust rules in their request; those before took the patch marker."""
    before = [p for p in HISTORIES if p.parent.name == "before-token-rules"]
    after = [p for p in HISTORIES if p.parent == HERE]

    assert before and after
    assert not any(request(load(p)).token_rules for p in before)
    assert any(TRUST_PATCH in patch_markers(load(p)) for p in before)
    assert all(TRUST_PATCH not in patch_markers(load(p)) and request(load(p)).token_rules for p in after)


def test_a_trade_that_ends_without_a_reason_writes_no_memo_and_the_others_do() -> None:
    """The memo holds a trade's reason for `dvp list`; a settled escrow trade has none to put."""

    def memos(path: Path) -> int:
        modified = EventType.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED
        return sum(e.event_type == modified for e in load(path).events)

    assert (
        memos(HERE / "trade-R-settled.json") == 0
        and final_view(load(HERE / "trade-R-settled.json")).reason == ""
    )
    assert memos(HERE / "trade-R-expired.json") == 1


def test_a_trade_that_continued_as_new_is_replayed_run_by_run() -> None:
    """Its first run started afresh and continued as new; each later run took up the carried
    state (the server gave it its predecessor's run id) and the last one settled."""
    paths = sorted(HERE.glob("continued/*/trade-R-continued.json"), key=lambda p: int(p.parent.name))
    runs = [load(p) for p in paths]

    assert len(runs) >= 3
    continued_as_new = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert all(run.events[-1].event_type == continued_as_new for run in runs[:-1])
    assert final_view(runs[-1]).status is TradeStatus.SETTLED
    assert request(runs[0]).carried is None
    for before, run in zip(runs, runs[1:], strict=False):
        started = run.events[0].workflow_execution_started_event_attributes
        assert started.continued_execution_run_id
        carried = request(run).carried
        assert carried is not None and carried.phase == "reserve" and carried.escrow is not None
        assert carried.escrow.hold_ids == ["R-continued#0", "R-continued#1"]
        assert before.events[-1].workflow_execution_continued_as_new_event_attributes.new_execution_run_id
