"""What a user starts settlements with: the Python client library, and the ``dvp`` CLI (``starter.cli``).

from starter import SettlementClient, dvp_instruction

async with await SettlementClient.connect() as client:
    await client.submit(dvp_instruction("T1", "bob", "alice", "100", "9950.00"))
    view = await client.wait("T1")
"""

from .batch import BatchClient, ParsedBatch, parse_batch, parse_batch_text
from .client import SettlementClient, parse_instruction
from .instructions import dvp_instruction

__all__ = [
    "BatchClient",
    "ParsedBatch",
    "SettlementClient",
    "dvp_instruction",
    "parse_batch",
    "parse_batch_text",
    "parse_instruction",
]
