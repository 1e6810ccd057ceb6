"""Child processes dvp starts for a user, a demo, the bench or a test: the Temporal dev
server (``devserver``), the anvil EVM node (``anvil``), and the helpers they share."""
