"""Submit a DvP from Python as the venue (an operator), approve it as the notary, wait for it to settle.

Needs a running server and worker (`dvp server` and `dvp worker`) and the accounts of
examples/seed.json (`dvp ledger seed examples/seed.json`). Each actor acts with its own
signed token; here they come from the local development issuer of the embedded
default configuration (as `dvp auth token ops` would print them). A deployment's
tokens come from its identity provider instead.
"""

import asyncio
import json
from pathlib import Path

from domain import load_config
from identity import TokenIssuer
from starter.client import SettlementClient


async def main() -> None:
    config = load_config()
    issuer = TokenIssuer.from_config(config.auth)
    dvp = await SettlementClient.connect(config, token=issuer.issue("ops"))
    instruction = json.loads((Path(__file__).parent / "dvp-trade.json").read_text())
    view = await dvp.submit(instruction)
    print("submitted:", view.trade_id, view.status.value, "by", view.submitted_by)
    await dvp.approve(view.trade_id, "notary", token=issuer.issue("notary"))
    final = await dvp.wait(view.trade_id)
    print("final:", final.status.value, final.reason)
    for event in final.timeline:
        print(f"  {event.at:%H:%M:%S.%f}  {event.event}  {event.detail}")


if __name__ == "__main__":
    asyncio.run(main())
