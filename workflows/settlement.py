"""The settlement workflow: one durable workflow per trade.

Its saga (the steps, the guarantees, the state diagram) is ``TradeSaga`` in
``workflows/_trade.py``; this module is only its Temporal definition, which makes
one saga per workflow and hands it the run, the status query and the signals and
updates. The worker's runner passes it through the sandbox (``worker.WORKFLOW_RUNNER``),
so it is loaded once; any other runner (the replay tests') imports it afresh for
every trade, which is why it is kept this small (see ``workflows/_trade.py`` on why
the saga lives apart).
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain import (
        AffirmMessage,
        ApprovalMessage,
        CancelMessage,
        Decision,
        SettlementRequest,
        SubmitCheck,
        TradeView,
    )

# Not passed through here: the worker's runner passes it through (worker.WORKFLOW_RUNNER),
# any other runner imports it in the sandbox and checks it.
from ._trade import TradeSaga


@workflow.defn(name="Settlement")
class SettlementWorkflow:
    @workflow.init
    def __init__(self, request: SettlementRequest) -> None:
        self._saga = TradeSaga(request)

    @workflow.run
    async def run(self, request: SettlementRequest) -> TradeView:
        return await self._saga.run()

    @workflow.query(name="status")
    def status(self) -> TradeView:
        return self._saga.view()

    @workflow.update(name="submit")
    async def submit(self, check: SubmitCheck) -> TradeView:
        """Wait until the trade is validated and screened (or ended); return its view."""
        await self._saga.screened()
        return self._saga.view()

    @submit.validator
    def _validate_submit(self, check: SubmitCheck) -> None:
        self._saga.check_submit(check)

    # Every acting message carries its sender's token; the validators refuse (nothing is
    # recorded) a message whose token fails or that the sender may not send. A refused
    # signal changes nothing and is counted in the view.

    @workflow.signal(name="approve")
    def approve_signal(self, message: ApprovalMessage) -> None:
        self._saga.approve_signal(message)

    @workflow.update(name="approve_update")
    def approve_update(self, message: ApprovalMessage) -> Decision:
        return self._saga.approve(message)

    @approve_update.validator
    def _validate_approve(self, message: ApprovalMessage) -> None:
        self._saga.check_approve(message)

    @workflow.signal(name="cancel")
    async def cancel_signal(self, message: CancelMessage) -> None:
        await self._saga.cancel(message, signal=True)

    @workflow.update(name="cancel_update")
    async def cancel_update(self, message: CancelMessage) -> Decision:
        return await self._saga.cancel(message)

    @cancel_update.validator
    def _validate_cancel(self, message: CancelMessage) -> None:
        self._saga.check_cancel(message)

    @workflow.update(name="affirm")
    async def affirm(self, message: AffirmMessage) -> Decision:
        """Consent, as the token's subject, to the debits of its accounts."""
        return await self._saga.affirm(message)

    @affirm.validator
    def _validate_affirm(self, message: AffirmMessage) -> None:
        self._saga.check_affirm(message)
