"""Every payload of a workflow history, as the server stores it: what the codec tests look into."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory

# The SDK's core writes two payloads itself, which no codec sees: a local activity
# marker's "data" (sequence number, attempt, activity type, times; the result beside it
# is ours), and a patch marker's "patch-data" (the patch id).
CORE_MARKERS = {"core_local_activity": "data", "core_patch": "patch-data"}


def _walk(message: Any, skip: frozenset[str]) -> Iterator[Payload]:
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.name in skip:
            continue
        if hasattr(value, "ListFields"):
            yield from _walk(value, skip)
        elif hasattr(value, "values") and not hasattr(value, "append"):  # a map field
            for item in value.values():
                if hasattr(item, "ListFields"):
                    yield from _walk(item, skip)
        else:  # a repeated field
            for item in value:
                yield from _walk(item, skip)


def core_marker_data(event: HistoryEvent) -> Payload | None:
    """The payload core wrote itself into a marker event, if the event is such a marker."""
    marker = event.marker_recorded_event_attributes
    key = CORE_MARKERS.get(marker.marker_name)
    if key is not None and key in marker.details:
        (payload,) = marker.details[key].payloads
        return payload
    return None


def history_payloads(
    history: WorkflowHistory, *, search_attributes: bool = False, core_markers: bool = False
) -> list[Payload]:
    """The payloads of every event that went through the codec.

    ``search_attributes`` adds the search attributes' (which no codec sees), and
    ``core_markers`` the markers' data that the SDK's core writes (``CORE_MARKERS``).
    """
    skip = frozenset() if search_attributes else frozenset({"search_attributes"})
    found = []
    for event in history.events:
        own = None if core_markers else core_marker_data(event)
        found += [p for p in _walk(event, skip) if own is None or p is not own and p != own]
    return found
