"""The vLLM wrappers on a fake ``DPEngineCoreProc`` and fake worker modules (no vLLM needed).

What a user relies on: a real step reads as "inside step" while it runs (and not after, even
when it raises), an engine built before ``instrument()`` is still observed, request counts are
read from the scheduler, and a worker publishes its call and the outermost model collective,
never for single-rank groups, with the originals' results and exceptions passed through.
"""

from __future__ import annotations

import logging
import types

import pytest
from prometheus_client import CollectorRegistry

from instrumented_core.telemetry import names as n
from instrumented_core.telemetry import worker_board as wb
from instrumented_core.telemetry.metrics import RankMetrics
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.vllm_support import contract, worker_hooks
from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor, observer_of
from tests.helpers import new_instrumentor

LABELS = {n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "m"}


class _Scheduler:
    def __init__(self) -> None:
        self.running, self.waiting = [1, 2], [3]

    def get_request_counts(self):
        return len(self.running), len(self.waiting)


def _fake_vllm():
    """A fake vLLM 0.32 whose engine records what the probe saw from inside its step."""
    import enum

    class EngineCoreRequestType(enum.Enum):
        START_DP_WAVE = b"\x02"

    seen: dict = {}

    class EngineCore:
        def __init__(self) -> None:
            self.step_fn = self.step  # bound once, as EngineCore.__init__ does

        def step(self):
            obs = observer_of(self)
            seen["inside_step"] = obs.probe.hot.inside_since[n.COLLECTIVE_STEP] > 0
            if seen.get("raise"):
                raise RuntimeError("worker died")
            return {}, True

        def step_with_batch_queue(self):
            return None, False

    body = {name: (lambda self, *a, **k: None)
            for name in contract.ENGINE_METHODS + contract.ENGINE_REQUIRED_ONLY
            if name not in ("step", "step_with_batch_queue")}
    engine_cls = type("DPEngineCoreProc", (EngineCore,), body)

    def sync_dp_state(*args, **kwargs):
        return False, False

    pc_cls = type("ParallelConfig", (), {"has_unfinished_dp": staticmethod(lambda g, u: u),
                                         "sync_dp_state": staticmethod(sync_dp_state)})
    modules = {
        "vllm": types.SimpleNamespace(__version__="0.32.0"),
        "vllm.v1.engine.core": types.SimpleNamespace(DPEngineCoreProc=engine_cls),
        "vllm.v1.engine": types.SimpleNamespace(EngineCoreRequestType=EngineCoreRequestType),
        "vllm.config": types.SimpleNamespace(ParallelConfig=pc_cls),
    }
    return modules.__getitem__, engine_cls, seen


def _engine(engine_cls):
    engine = engine_cls()
    for name in contract.ENGINE_ATTRIBUTES:
        setattr(engine, name, 0)
    engine.pending_pause = engine.ignore_start_dp_wave = engine.engines_running = False
    engine.dp_sync_interval, engine.dp_size = 16, 2
    engine.scheduler = _Scheduler()
    return engine


@pytest.fixture
def instrumentor():
    registry = CollectorRegistry()

    def probe_factory(engine, info):
        return TelemetryProbe(0, 2, RankMetrics(registry, 0, "m", info)), None

    with new_instrumentor() as inst:
        inst.registry = registry
        inst.factory = probe_factory
        yield inst


def _start(inst, engine):
    """What the wrapped ``run_busy_loop`` does when the engine's loop starts."""
    return inst._start_engine(engine)


def test_a_real_step_reads_inside_step_while_it_runs_and_not_after(instrumentor):
    loader, engine_cls, seen = _fake_vllm()
    engine = _engine(engine_cls)  # built BEFORE instrument(): step_fn holds the original
    instrumentor.instrument(import_module=loader, probe_factory=instrumentor.factory)
    assert instrumentor.is_instrumented_by_opentelemetry, instrumentor.contract_error
    obs = _start(instrumentor, engine)
    assert engine.step_fn() == ({}, True)  # the original's result, through the rebound step_fn
    assert seen["inside_step"] is True
    hot = obs.probe.hot
    assert hot.inside_since[n.COLLECTIVE_STEP] == 0.0
    assert hot.wait_seconds[n.COLLECTIVE_STEP] > 0
    seen["raise"] = True
    with pytest.raises(RuntimeError, match="worker died"):
        engine.step_fn()
    assert hot.inside_since[n.COLLECTIVE_STEP] == 0.0  # an exception leaves no stale "inside"


def test_requests_in_flight_are_read_from_the_scheduler_at_scrape_time(instrumentor):
    loader, engine_cls, _ = _fake_vllm()
    instrumentor.instrument(import_module=loader, probe_factory=instrumentor.factory)
    engine = _engine(engine_cls)
    _start(instrumentor, engine)
    reg = instrumentor.registry
    assert reg.get_sample_value(n.REQUESTS_RUNNING, LABELS) == 2
    assert reg.get_sample_value(n.REQUESTS_WAITING, LABELS) == 1
    engine.scheduler.waiting = []
    assert reg.get_sample_value(n.REQUESTS_WAITING, LABELS) == 0
    del engine.scheduler  # an engine that cannot say: NaN, and the scrape still works
    value = reg.get_sample_value(n.REQUESTS_RUNNING, LABELS)
    assert value != value


def test_uninstrument_puts_the_step_methods_back(instrumentor):
    loader, engine_cls, _ = _fake_vllm()
    instrumentor.instrument(import_module=loader, probe_factory=instrumentor.factory)
    assert "step" in engine_cls.__dict__
    instrumentor.uninstrument()
    assert "step" not in engine_cls.__dict__ and "step_with_batch_queue" not in engine_cls.__dict__


# ----------------------------------------------------------------------------------------------
# worker hooks
# ----------------------------------------------------------------------------------------------


class _Group:
    """A fake GroupCoordinator: ``dispatch`` is built on ``all_gatherv``, as vLLM's is."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.seen: list = []

    def all_gatherv(self, x, dim=0, sizes=None):
        self.seen.append(wb.read_board()[0].collective if wb.read_board() else None)
        return [x, x]

    def dispatch(self, x):
        return self.all_gatherv(x)

    def all_reduce(self, x):
        raise RuntimeError("gloo timeout")


class _WorkerProc:
    rank = 1

    def _execute_worker_rpc(self, rpc_request):
        method, args, kwargs, _ = rpc_request
        return getattr(self, method)(*args, **kwargs)

    def execute_model(self, group, x):
        return group.dispatch(x)

    def load_weights(self, group, x):
        return group.all_reduce(x)


@pytest.fixture
def fake_worker_modules(tmp_path, monkeypatch):
    monkeypatch.setenv(wb.ENV_BOARD_DIR, str(tmp_path))
    group_cls = type("GroupCoordinator", (_Group,), {})
    proc_cls = type("WorkerProc", (_WorkerProc,), {})
    dp_utils = types.SimpleNamespace(__name__="dp_utils", _run_ar=lambda *a: "reduced")
    modules = {
        "vllm.v1.executor.multiproc_executor": types.SimpleNamespace(WorkerProc=proc_cls),
        "vllm.distributed.parallel_state": types.SimpleNamespace(GroupCoordinator=group_cls),
        "vllm.v1.worker.dp_utils": dp_utils,
    }

    def loader(name):
        if name not in modules:
            raise ImportError(name)
        return modules[name]

    worker_hooks.uninstall()
    yield loader, proc_cls, group_cls, dp_utils
    worker_hooks.uninstall()


def test_a_worker_publishes_its_call_and_the_outermost_model_collective(fake_worker_modules):
    loader, proc_cls, group_cls, dp_utils = fake_worker_modules
    wrapped = worker_hooks.install(import_module=loader)
    assert any(w.endswith("_execute_worker_rpc") for w in wrapped)
    group, proc = group_cls(2), proc_cls()
    assert proc._execute_worker_rpc(("execute_model", (group, 7), {}, None)) == [7, 7]
    assert group.seen == ["dispatch"]  # nested all_gatherv counted as the outer dispatch
    (pos,) = wb.read_board()
    assert (pos.worker, pos.call, pos.calls, pos.collectives) == (1, "", 1, 1)
    assert dp_utils._run_ar(1, 2) == "reduced"  # outside any call it still passes through
    assert wb.read_board()[0].collectives == 2


def test_single_rank_groups_and_failing_collectives_leave_a_clean_board(fake_worker_modules):
    loader, proc_cls, group_cls, _ = fake_worker_modules
    worker_hooks.install(import_module=loader)
    proc = proc_cls()
    proc._execute_worker_rpc(("execute_model", (group_cls(1), 3), {}, None))
    assert wb.read_board()[0].collectives == 0  # TP=1-style groups are not collectives
    with pytest.raises(RuntimeError, match="gloo timeout"):
        proc._execute_worker_rpc(("load_weights", (group_cls(2), 3), {}, None))
    (pos,) = wb.read_board()
    assert (pos.call, pos.collective, pos.calls, pos.collectives) == ("", "", 2, 1)


def test_worker_hooks_uninstall_restores_every_original(fake_worker_modules):
    loader, proc_cls, group_cls, dp_utils = fake_worker_modules
    originals = (proc_cls.__dict__.get("_execute_worker_rpc"), dp_utils._run_ar)
    worker_hooks.install(import_module=loader)
    assert worker_hooks.installed()
    worker_hooks.uninstall()
    assert "_execute_worker_rpc" not in proc_cls.__dict__ and originals[0] is None
    assert dp_utils._run_ar is originals[1]
    assert "all_gatherv" not in group_cls.__dict__
    assert wb.read_board() == []


def test_without_the_rpc_entry_point_nothing_is_wrapped():
    def loader(name):
        raise ImportError(name)

    worker_hooks.uninstall()
    assert worker_hooks.install(import_module=loader) == []
    assert not worker_hooks.installed()


# ----------------------------------------------------------------------------------------------
# contract check against a fake vLLM (moved from the real-engine module: needs no vLLM)
# ----------------------------------------------------------------------------------------------


def _fake_vllm_api(version: str = "0.32.0", drop: str | None = None, flavour: str = "static"):
    """A fake vLLM with just the names the instrumentor wraps; ``drop`` removes one."""
    import enum

    class EngineCoreRequestType(enum.Enum):
        START_DP_WAVE = b"\x02"

    from instrumented_core.vllm_support import contract

    body = {name: (lambda self, *a, **k: None)
            for name in contract.ENGINE_METHODS + contract.ENGINE_REQUIRED_ONLY}
    body.pop(drop, None)
    engine_cls = type("DPEngineCoreProc", (), body)

    def sync_dp_state(*args, **kwargs):
        return False, False

    pc_body = {"has_unfinished_dp": staticmethod(lambda g, u: u),
               "sync_dp_state": staticmethod(sync_dp_state) if flavour == "static"
               else sync_dp_state}
    pc_cls = type("ParallelConfig", (), pc_body)
    modules = {
        "vllm": types.SimpleNamespace(__version__=version),
        "vllm.v1.engine.core": types.SimpleNamespace(DPEngineCoreProc=engine_cls),
        "vllm.v1.engine": types.SimpleNamespace(EngineCoreRequestType=EngineCoreRequestType),
        "vllm.config": types.SimpleNamespace(ParallelConfig=pc_cls),
    }

    def import_module(name):
        if name not in modules:
            raise ImportError(f"No module named {name!r}")
        return modules[name]

    return import_module, engine_cls, pc_cls


@pytest.fixture
def fresh_instrumentor():
    with new_instrumentor() as inst:
        yield inst


def test_contract_check_fails_cleanly_against_a_fake_vllm_missing_a_method(
        fresh_instrumentor, caplog):
    loader, engine_cls, pc_cls = _fake_vllm_api(drop="_has_global_unfinished_reqs")
    original = dict(engine_cls.__dict__), dict(pc_cls.__dict__)
    with caplog.at_level(logging.ERROR, logger="instrumented_core.vllm_support.instrumentor"):
        fresh_instrumentor.instrument(import_module=loader)
    assert not fresh_instrumentor.is_instrumented_by_opentelemetry
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "DPEngineCoreProc._has_global_unfinished_reqs" in message
    assert "OFF" in message
    assert (dict(engine_cls.__dict__), dict(pc_cls.__dict__)) == original  # nothing wrapped


def test_an_unchecked_version_stays_off_when_told_and_033_method_flavour_is_accepted(
        fresh_instrumentor, caplog, monkeypatch):
    monkeypatch.setenv("INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION", "off")
    loader, _, _ = _fake_vllm_api(version="0.34.0")
    with caplog.at_level(logging.ERROR):
        fresh_instrumentor.instrument(import_module=loader)
    assert not fresh_instrumentor.is_instrumented_by_opentelemetry
    assert "0.34.0" in fresh_instrumentor.contract_error
    loader, engine_cls, pc_cls = _fake_vllm_api(version="0.33.0", flavour="method")
    raw = pc_cls.__dict__["sync_dp_state"]
    fresh_instrumentor.instrument(import_module=loader)
    assert fresh_instrumentor.is_instrumented_by_opentelemetry
    assert fresh_instrumentor._api.sync_flavour == "method"
    assert pc_cls.__dict__["sync_dp_state"] is not raw
    fresh_instrumentor.uninstrument()
    assert pc_cls.__dict__["sync_dp_state"] is raw
    assert "barrier" in engine_cls.__dict__  # own methods restored, not deleted
    fresh_instrumentor.instrument(import_module=loader)  # re-instrument works
    assert fresh_instrumentor.is_instrumented_by_opentelemetry


def test_plugin_is_registered_under_vllm_general_plugins_and_opentelemetry_instrumentor():
    from importlib.metadata import entry_points

    general = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert general["instrumented_core"] == "instrumented_core.vllm_support.plugin:register"
    otel = {ep.name: ep for ep in entry_points(group="opentelemetry_instrumentor")}

    assert otel["vllm_dp"].load() is VllmDpInstrumentor
