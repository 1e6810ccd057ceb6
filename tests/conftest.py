"""Shared fixtures. Each area keeps its fixtures in a module of its own."""

pytest_plugins = [
    "tests._fixtures_auth",
    "tests._fixtures_ledger",
    "tests._fixtures_temporal",
    "tests._fixtures_settlement",
    "tests._fixtures_evm",
]
