"""Test-only code of instrumented-core, a separate distribution (``testing/pyproject.toml``)
that the production wheel neither contains nor registers: vLLM plugins that inject faults or
bring back the #36594 one-phase pause, the CPU data-parallel MoE plugin the vLLM tests and the
vLLM demo need on vLLM's CPU build, and an in-process OTLP receiver for tests."""
