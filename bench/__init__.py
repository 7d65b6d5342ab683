"""`steerprune bench`: offline latency of a bundle's models against the full model and their FLOP bound.

Modules: `timing` (one process per variant per round, rounds interleaved), `report` (machine record, summary, table,
plot, JSON), `run` (`run_bench` for a bundle, `run_synthetic` for a random-weight timm model), `cli`.
"""
__all__: list[str] = []
