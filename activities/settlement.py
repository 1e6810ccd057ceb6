"""Activities of the settlement itself (not of any ledger): admission and the compliance screen.

Both read the settlement worker's own configuration, and both run as local
activities of the trade's workflow, so their answers are recorded in its history:
a replay takes the routing and the submitter the trade ran with, whatever the
worker's configuration or keys are by then.
"""

from __future__ import annotations

from collections.abc import Callable

from temporalio import activity

from domain import (
    Admission,
    AdmitRequest,
    AuthError,
    CheckAccountsBatch,
    CheckAccountsRequest,
    CheckAccountsResult,
    Config,
    Routing,
    ScreenRequest,
    ScreenResult,
    start_of_day,
)
from identity import Verifier


class SettlementActivities:
    """Policy checks that read the worker's configuration (and its keys).

    ``party_tag`` maps a party to what the ``DvpParties`` search attribute shows of it
    (``connection.party_tagger``: a keyed hash); None shows the names.
    """

    def __init__(
        self,
        config: Config,
        verifier: Verifier | None = None,
        party_tag: Callable[[str], str] | None = None,
        check_accounts: Callable[[CheckAccountsBatch], CheckAccountsResult] | None = None,
    ) -> None:
        self._config = config
        self._verifier = verifier
        self._sanctioned = {p.casefold() for p in config.compliance.sanctioned}
        self._operators = list(config.roles.operators)
        self._party_tag = party_tag
        self._check_accounts = check_accounts  # the local ledgers' (LedgerActivities.check_accounts_local)

    @activity.defn(name="settlement.admit")
    async def admit(self, request: AdmitRequest) -> Admission:
        """Verify the submitter's token at the workflow's time; the routing of the requested ledgers.

        ``ledgers`` empty: every configured ledger (a netting batch learns its ledgers later).
        With ``settle_on``, also when that day starts in the settlement calendar's time zone.
        """
        return self._admission(request)

    @activity.defn(name="settlement.admit_checked")
    def admit_checked(self, request: AdmitRequest) -> Admission:
        """``admit``; then, if the token is accepted, the request's account checks on the local ledgers.

        One local activity for a trade's admission and the local half of its first step,
        which are otherwise two in a row (each a marker in the history and a round
        through the worker). A thread's activity, as the ledgers' calls are. A ledger
        that fails is not retried here: the answer says which ledgers were checked, and
        the trade checks the others itself.
        """
        admission = self._admission(request)
        local = [name for name in admission.routing.local_ledgers if name in request.checks]
        if admission.refused or self._check_accounts is None or not local:
            return admission
        batch = CheckAccountsBatch(
            items=[CheckAccountsRequest(checks=request.checks[name], ledger=name) for name in local]
        )
        try:
            checked = self._check_accounts(batch)
        except Exception as exc:  # the trade's own check_accounts call retries it
            activity.logger.warning("account checks with the admission failed, checked again: %s", exc)
            return admission
        return admission.model_copy(update={"checked": checked, "checked_ledgers": local})

    def _admission(self, request: AdmitRequest) -> Admission:
        subject, roles, refused = "", [], ""
        if self._verifier is None:
            refused = "this worker has no keys to verify tokens with"
        else:
            try:
                principal = self._verifier.verify(request.token, request.now)
                subject, roles = principal.subject, list(principal.roles)
            except AuthError as exc:
                refused = str(exc)
        settles_from = None
        if request.settle_on is not None:
            settles_from = start_of_day(request.settle_on, self._config.settlement.time_zone)
        return Admission(
            subject=subject,
            roles=roles,
            refused=refused,
            routing=self.routing(request),
            settles_from=settles_from,
        )

    def routing(self, request: AdmitRequest) -> Routing:
        config = self._config
        wanted = request.ledgers or sorted(config.ledgers)
        known = [name for name in wanted if name in config.ledgers]
        local = set(config.local_ledgers())
        return Routing(
            settlement_queue=config.settlement_queue(),
            ledger_queues={name: config.ledger_queue(name) for name in known},
            local_ledgers=[name for name in known if name in local],
            unknown_ledgers=[name for name in wanted if name not in config.ledgers],
            settlement=config.settlement,
            precisions={asset: config.precision(asset) for asset in request.assets},
            operators=self._operators,
            operator_roles=list(config.roles.operator_roles),
            chain_blocks=chain_blocks(config, known),
        )

    def all(self) -> list[Callable[..., object]]:
        """Every activity of this class, to register with a worker."""
        return [self.admit, self.admit_checked, self.screen]

    @activity.defn(name="settlement.screen")
    async def screen(self, request: ScreenRequest) -> ScreenResult:
        """Screen the trade's parties (accounts and owners) against the sanctions list."""
        hits = [p for p in request.parties if p.casefold() in self._sanctioned]
        tag = self._party_tag
        tags = None if tag is None else {p: tag(p) for p in request.parties}
        return ScreenResult(hits=hits, operators=self._operators, party_tags=tags)


def chain_blocks(config: Config, ledgers: list[str]) -> dict[str, int]:
    """Of ``ledgers``, those on a chain -> the blocks each takes to call a write final."""

    def blocks(name: str) -> int:
        confirmations = config.ledgers[name].options().get("confirmations", 1)
        if isinstance(confirmations, str):  # a node's safe or finalized tag: deeper than any count
            return 10**9 + (confirmations == "finalized")
        return int(confirmations)

    return {name: blocks(name) for name in ledgers if config.ledgers[name].kind == "evm"}
