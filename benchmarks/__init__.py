"""Benchmarks of instrumented_core: hot-path overhead, detection latency, pause latency
(fixed vs adaptive cadence), scale and exporter-down behaviour.

Run ``python -m benchmarks`` (``--quick`` for a run under 60 s) from the repository root. Each
figure is printed as one JSON object per line with at least ``name``, ``baseline``,
``instrumented`` (or ``value``), ``unit`` and, where there is a baseline, ``ratio``. Every
ratio is taken against a baseline measured in the same run: these machines are noisy.
"""
