"""Activities of the settlement itself (not of any ledger): the compliance screen."""

from __future__ import annotations

from temporalio import activity

from domain import Config, ScreenRequest, ScreenResult


class SettlementActivities:
    """Policy checks that read the worker's configuration."""

    def __init__(self, config: Config) -> None:
        self._sanctioned = {p.casefold() for p in config.compliance.sanctioned}
        self._operators = list(config.roles.operators)

    @activity.defn(name="settlement.screen")
    async def screen(self, request: ScreenRequest) -> ScreenResult:
        """Screen the trade's parties (accounts and owners) against the sanctions list."""
        hits = [p for p in request.parties if p.casefold() in self._sanctioned]
        return ScreenResult(hits=hits, operators=self._operators)
