"""The IPU port: memory planner, PopTorch pipeline, sparse-matmul custom op, CPU simulation.

Importing this package (or ``planner``, ``hardware``, ``simulate``, ``ops``) never imports
poptorch; only ``pipeline.import_poptorch`` does, on the IPU path.
"""
