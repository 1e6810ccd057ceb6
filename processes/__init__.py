"""Child processes dvp starts for a user, a demo, the bench or a test, and the helpers they share.

``children`` (``Child``: one child process, its log, readiness, stop, and its death with
the process that started it) and ``ports`` (a free port, whether one is in use, who
listens on it) are the helpers; ``devserver`` (the Temporal dev server), ``anvil`` (the
EVM node), ``workers`` (a dvp worker) and ``bank`` (the bank's service) are the children.
"""
