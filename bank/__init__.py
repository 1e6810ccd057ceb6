"""The bank's core-ledger service: a peer system that dvp settles cash legs on over HTTP.

It is not part of the engine: the engine reaches it only through ``adapters.http``.
Run it with ``dvp bank serve`` or ``python -m bank serve``; see ``bank.service``.
"""

from .service import BankConfig, create_app, load_bank_config, parse_bank_config, serve

__all__ = ["BankConfig", "create_app", "load_bank_config", "parse_bank_config", "serve"]
