"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from tests.helpers import require_vllm


@pytest.fixture(autouse=True, scope="session")
def _flight_dumps_in_a_temporary_directory(tmp_path_factory):
    """Ranks started by a test without its own flight dump directory (vLLM engines read the
    environment) write their hang dumps here, not next to a spans file in the checkout."""
    key = "INSTRUMENTED_CORE_FLIGHT_DIR"
    saved = os.environ.get(key)
    os.environ.setdefault(key, str(tmp_path_factory.mktemp("flight")))
    yield
    if saved is None:
        os.environ.pop(key, None)


@pytest.fixture(autouse=True, scope="module")
def no_leftover_processes():
    """Module scope: a module may share one cluster between its tests, never beyond."""
    yield
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = multiprocessing.active_children()
    for p in leftover:
        p.kill()
    assert not leftover, f"test left processes behind: {leftover}"


@pytest.fixture(autouse=True)
def _vllm_tests_need_vllm(request):
    """A test marked ``vllm`` fails in its setup, with the fix, when vLLM is missing; the
    other tests (the fake-vLLM contract tests included) still run. No test module imports
    vLLM at import time, so collection never breaks on a machine without it."""
    if request.node.get_closest_marker("vllm") is not None:
        require_vllm()
