"""Activities of the settlement itself (not of any ledger): the compliance screen."""

from __future__ import annotations

from collections.abc import Callable

from temporalio import activity

from domain import Config, ScreenRequest, ScreenResult


class SettlementActivities:
    """Policy checks that read the worker's configuration.

    ``party_tag`` maps a party to what the ``DvpParties`` search attribute shows of it
    (``connection.party_tagger``: a keyed hash); None shows the names.
    """

    def __init__(self, config: Config, party_tag: Callable[[str], str] | None = None) -> None:
        self._sanctioned = {p.casefold() for p in config.compliance.sanctioned}
        self._operators = list(config.roles.operators)
        self._party_tag = party_tag

    @activity.defn(name="settlement.screen")
    async def screen(self, request: ScreenRequest) -> ScreenResult:
        """Screen the trade's parties (accounts and owners) against the sanctions list."""
        hits = [p for p in request.parties if p.casefold() in self._sanctioned]
        tag = self._party_tag
        tags = None if tag is None else {p: tag(p) for p in request.parties}
        return ScreenResult(hits=hits, operators=self._operators, party_tags=tags)
