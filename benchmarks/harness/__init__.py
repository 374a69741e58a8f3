"""Library of the benchmark scripts: engines, spec-decode metrics, methods, reports, server load.

The scripts beside this package (``benchmarks/throughput.py``, ``serve_load.py``, ...) are thin
command lines over these modules; the test suite reads spec-decode counters through
:mod:`benchmarks.harness.metrics` too.
"""
