"""The IPU port: memory planner, PopTorch pipeline, sparse-matmul custom op, CPU simulation, and
the op-coverage check (``opcheck``: what PopTorch 3.4 could lower, traced on CPU).

Importing this package (or ``planner``, ``hardware``, ``simulate``, ``ops``, ``opcheck``) never
imports poptorch; only ``pipeline.import_poptorch`` does, on the IPU path.
"""
