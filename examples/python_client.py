"""Submit a DvP from Python, approve it as the notary, and wait for it to settle.

Needs a running server and worker (`dvp server` and `dvp worker`) and the accounts of
examples/seed.json (`dvp ledger seed examples/seed.json`).
"""

import asyncio
import json
from pathlib import Path

from starter.client import SettlementClient


async def main() -> None:
    dvp = await SettlementClient.connect()
    instruction = json.loads((Path(__file__).parent / "dvp-trade.json").read_text())
    view = await dvp.submit(instruction)
    print("submitted:", view.trade_id, view.status.value)
    await dvp.approve(view.trade_id, "notary")
    final = await dvp.wait(view.trade_id)
    print("final:", final.status.value, final.reason)
    for event in final.timeline:
        print(f"  {event.at:%H:%M:%S.%f}  {event.event}  {event.detail}")


if __name__ == "__main__":
    asyncio.run(main())
