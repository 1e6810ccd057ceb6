"""Pieces the saga workflows (trade, HTLC, netting batch) share.

Deterministic and free of side effects at import, like the workflows themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate

T = TypeVar("T")


async def shielded(coroutine: Coroutine[Any, Any, T], on_cancel_ignored: Callable[[], None]) -> T:
    """Run ``coroutine`` to completion even if the workflow is cancelled meanwhile.

    Each cancellation that arrives while it runs calls ``on_cancel_ignored`` (which
    records it in the timeline) and is otherwise ignored.
    """
    task = asyncio.ensure_future(coroutine)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
            on_cancel_ignored()


def upsert_changed(published: dict[str, Any], wanted: Iterable[SearchAttributeUpdate[Any]]) -> None:
    """Upsert, in one command, those of ``wanted`` that differ from ``published``; note them there."""
    changed = [update for update in wanted if published.get(update.key.name) != update.value]
    if changed:
        workflow.upsert_search_attributes(changed)
        published.update({update.key.name: update.value for update in changed})


def cause(err: BaseException) -> str:
    """The message of the innermost cause of ``err``."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__
