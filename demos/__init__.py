"""The demos: the seed documents' scenarios, end to end, on a real Temporal server.

``dvp demo`` runs ``demos.settlement`` (two SQLite ledgers); ``dvp demo --cross-system``
runs ``demos.cross_system`` (bonds on a local EVM chain, cash at the bank's service).
"""
