"""``dvp bench``: settled trades/s and latency against the engine's ceiling and a naive saga.

Not part of the product: nothing outside this package imports it. ``bench.runner``
runs the measurement, ``bench.workflows`` holds the reference workflows, ``bench.worker``
their worker, ``bench.netting`` the netting batch's measurement. The method and the
latest figures are in ``docs/performance.md``.
"""
