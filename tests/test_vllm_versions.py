"""Every vLLM release with the two-phase pause (0.21 to 0.33): the contract, the state vLLM
changes under us, and the released source itself.

Fast layer (a fake vLLM written in vLLM's own shapes, no vLLM needed): the contract decides by
what a release has, never by its version string alone; a version nobody checked activates with
one warning or stays off with one error, as configured; an inactive rank still says so on its
endpoint; 0.21-0.29's fixed 32-step cadence is reported as such; 0.33's ``engine_paused``
rejections are counted; a fault-tolerance retry (new group, step counter reset) keeps the
counters and re-derives the phase; elastic EP's resized group is what ``vllm_dp_size`` shows.

Network layer (``-m network``: downloads each release's wheel once into
``~/.cache/instrumented_core/wheels``; no network is a failure that names the command, never a
skip): for every line 0.21-0.33, the wheel's own source has what ``versions.KNOWN_LINES`` says,
the contract resolves against the release's own classes and code objects and every wrapper
fits its signatures; then the release's own modules are imported on CPU in a subprocess and two
real ``DPEngineCoreProc`` ranks on a real Gloo pair pause, reach consensus, ignore a late
``START_DP_WAVE``, (0.33) reject a request with ``engine_paused`` and resume, observed by the
real instrumentor. 0.20 is the control: no two-phase pause, and the contract says so.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import threading
import types
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from instrumented_core.telemetry import TelemetryConfig
from instrumented_core.telemetry import names as n
from instrumented_core.telemetry.metrics import RankMetrics, plugin_active
from instrumented_core.telemetry.probe import TelemetryProbe
from instrumented_core.vllm_support import contract, release_source, sync_capture, versions
from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor, observer_of, status_of
from instrumented_core.vllm_support.versions import CADENCE_FIXED, CADENCE_INTERVAL

LOGGER = "instrumented_core.vllm_support.instrumentor"

# ----------------------------------------------------------------------------------------------
# a fake vLLM, written as vLLM writes these methods (the contract reads their code objects)
# ----------------------------------------------------------------------------------------------

_SUPPORT = '''
import enum
import types


class Vec(list):
    def tolist(self):
        return list(self)


class Group:
    """A DP group seen from one rank: ``peers`` is what the other ranks add to a SUM."""

    def __init__(self, size, peers_unfinished=0, peers_pausing=None, fail=0):
        self._size = size
        self.peers = [peers_unfinished, size - 1 if peers_pausing is None else peers_pausing]
        self.fail = fail  # the next ``fail`` all-reduces raise (a Gloo timeout)

    def size(self):
        return self._size

    def reduce(self, tensor):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("Gloo timed out waiting for the peer")
        for i, v in enumerate(self.peers):
            tensor[i] += v
        return tensor


def _all_reduce(tensor, op=None, group=None):
    group.reduce(tensor)


torch = types.SimpleNamespace(distributed=types.SimpleNamespace(all_reduce=_all_reduce))


def cpu_all_reduce_(tensor, group, timeout=None):
    return group.reduce(tensor)


class EngineCoreRequestType(enum.Enum):
    ADD = b"\\x00"
    START_DP_WAVE = b"\\x02"
'''

_FT = '''
def fault_tolerant_wrapper(busy_loop_func):
    def run_with_fault_tolerance(self):
        while True:
            try:
                busy_loop_func(self)
            except SystemExit:
                raise
            except Exception as exc:
                if not self.enable_fault_tolerance:
                    raise
                self.retry(exc)  # the sentinel: a new dp_group, step_counter = 0
                continue

    return run_with_fault_tolerance
'''

_PC_STATIC = '''
class ParallelConfig:
    data_parallel_master_ip, data_parallel_master_port = "127.0.0.1", 29500

    @staticmethod
    def has_unfinished_dp(dp_group, has_unfinished):
        tensor = Vec([int(has_unfinished), 0])
        torch.distributed.all_reduce(tensor, group=dp_group)
        return tensor[0] > 0

    @staticmethod
    def sync_dp_state(dp_group, has_unfinished, pending_pause):
        tensor = Vec([int(has_unfinished), int(pending_pause)])
        torch.distributed.all_reduce(tensor, group=dp_group)
        dp_size = dp_group.size()
        pause_count = tensor[1]
        return tensor[0] > 0 or pause_count % dp_size != 0, pause_count == dp_size
'''

_PC_METHOD = '''
class ParallelConfig:
    data_parallel_master_ip, data_parallel_master_port = "127.0.0.1", 29500
    cpu_distributed_timeout = None

    @staticmethod
    def has_unfinished_dp(dp_group, has_unfinished):
        tensor = Vec([int(has_unfinished), 0])
        cpu_all_reduce_(tensor, dp_group)
        return tensor[0] > 0

    def sync_dp_state(self, dp_group, has_unfinished, pending_pause):
        tensor = Vec([int(has_unfinished), int(pending_pause)])
        cpu_all_reduce_(tensor, dp_group, timeout=self.cpu_distributed_timeout)
        dp_size = dp_group.size()
        pause_count = tensor[1]
        return tensor[0] > 0 or pause_count % dp_size != 0, pause_count == dp_size
'''

_PC_NONE = '''
class ParallelConfig:
    @staticmethod
    def has_unfinished_dp(dp_group, has_unfinished):
        return has_unfinished
'''

_ENGINE = '''
class EngineCore:
    def step(self):
        return {}, True

    def step_with_batch_queue(self):
        return None, False

    def resume_scheduler(self):
        self.scheduler_state = "unpaused"

    def is_scheduler_paused(self):
        return self.scheduler_state != "unpaused"

    def execute_dummy_batch(self):
        self.dummy_batches += 1

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, unique_reply_rank=None):
        return []


class EngineCoreProc(EngineCore):
    @@LOOP_DECORATOR@@
    def run_busy_loop(self):
        while self.script:
            self.script.pop(0)(self)
        raise SystemExit

    def _handle_client_request(self, request_type, request):
        if request_type == EngineCoreRequestType.ADD:
            req, request_wave = request
            @@REJECT_CALL@@
            self.added.append(req)

    def pause_scheduler(self, mode="abort", clear_cache=True):
        self.scheduler_state = mode
        if self._pause_complete():
            return None
        return "future"

    def _pause_complete(self):
        return True
@@PAUSE_GENERATION@@

class DPEngineCoreProc(EngineCoreProc):
    def __init__(self, rank=0, dp_size=2, group=None):
        self.step_counter = 0
        self.current_wave = 0
        self.engines_running = False
        self.pending_pause = False
        self.ignore_start_dp_wave = False
        self.dp_rank = self.engine_index = rank
        self.dp_size = dp_size
        self.dp_group = group if group is not None else Group(dp_size)
        self.vllm_config = types.SimpleNamespace(parallel_config=ParallelConfig())
        self.scheduler = types.SimpleNamespace(get_request_counts=lambda: (0, 0))
        self.scheduler_state = "unpaused"
        self.reject_new_requests = False
        self.enable_fault_tolerance = False
        self.script, self.added, self.rejected, self.dummy_batches = [], [], [], 0
        self.step_fn = self.step
        @@INIT_CADENCE@@

    @@DP_PAUSE_COMPLETE@@

    def resume_scheduler(self):
        if self.pending_pause or (self.engines_running and self.ignore_start_dp_wave):
            raise RuntimeError("resume_scheduler called while pause is still in flight")
        if self.engines_running:
            return
        super().resume_scheduler()
        self.ignore_start_dp_wave = False
        if ParallelConfig.has_unfinished_dp(self.dp_group, False):
            self.engines_running = True

    def barrier(self):
        return None

    def _handle_client_request(self, request_type, request):
        if request_type == EngineCoreRequestType.START_DP_WAVE:
            if self.ignore_start_dp_wave:
                return
            new_wave, exclude_eng_index = request
            if exclude_eng_index != self.engine_index and new_wave >= self.current_wave:
                self.current_wave = new_wave
                if not self.engines_running:
                    self.engines_running = True
        else:
            super()._handle_client_request(request_type, request)

    @@LOOP_DECORATOR@@
    def run_busy_loop(self):
        while self.script:
            self.script.pop(0)(self)
        raise SystemExit

    def one_step(self):
        """What the busy loop does each idle step: a dummy batch, then the checkpoint."""
        self.execute_dummy_batch()
        self.engines_running = self._has_global_unfinished_reqs(False)
        if not self.engines_running:
            self.current_wave += 1
            self.step_counter = 0

    def retry(self, exc):
        self.dp_group = self.next_group
        self.step_counter = 0

    @@HAS_GLOBAL@@
'''

_DP_PAUSE_COMPLETE = '''def _pause_complete(self):
        self.pending_pause = True
        self.engines_running = True
        return False'''

_SYNC_CALL = {
    "static": "ParallelConfig.sync_dp_state(",
    "method": "self.vllm_config.parallel_config.sync_dp_state(",
}

_HAS_GLOBAL = {
    CADENCE_FIXED: '''def _has_global_unfinished_reqs(self, local_unfinished):
        self.step_counter += 1
        if self.step_counter % 32 != 0:
            return True
        has_unfinished, pause_consensus = @@SYNC_CALL@@
            self.dp_group, has_unfinished=local_unfinished, pending_pause=self.pending_pause)
        if pause_consensus:
            self.ignore_start_dp_wave = True
            self.pending_pause = False
        return has_unfinished''',
    CADENCE_INTERVAL: '''def _has_global_unfinished_reqs(self, local_unfinished):
        self.step_counter += 1
        if self.step_counter != 1 and self.step_counter % self.dp_sync_interval != 0:
            return True
        has_unfinished, pause_consensus = @@SYNC_CALL@@
            self.dp_group, has_unfinished=local_unfinished, pending_pause=self.pending_pause)
        if pause_consensus:
            self.ignore_start_dp_wave = True
            self.pending_pause = False
        return has_unfinished''',
    "one-phase": '''def _has_global_unfinished_reqs(self, local_unfinished):
        self.step_counter += 1
        if self.step_counter % 32 != 0:
            return True
        return ParallelConfig.has_unfinished_dp(self.dp_group, local_unfinished)''',
}

_PAUSE_GENERATION = '''
    def pause_generation(self, mode="abort", clear_cache=True):
        future = self.pause_scheduler(mode, clear_cache)
        self.reject_new_requests = mode != "keep"
        return future

    def _reject_add_while_paused(self, request):
        if not self.reject_new_requests:
            return False
        self.rejected.append(request)  # vLLM: RequestError(code="engine_paused", ...)
        return True
'''

_counter = iter(range(10**6))


def fake_vllm(version: str, shape: versions.ReleaseLine | None, drop: tuple[str, ...] = ()):
    """A fake vLLM ``version`` with a release line's shape (``shape=None``: 0.20's one-phase
    pause), as one module registered in ``sys.modules`` (the contract imports the config
    module by name to find ``cpu_all_reduce_``). Returns ``(loader, module)``."""
    one_phase = shape is None
    line = shape or versions.ReleaseLine(CADENCE_FIXED, "static", "pause_scheduler", False, False)
    has_global = _HAS_GLOBAL["one-phase" if one_phase else line.cadence].replace(
        "@@SYNC_CALL@@", _SYNC_CALL[line.sync_flavour])
    rejects = line.rejects_paused
    engine = (_ENGINE
              .replace("@@LOOP_DECORATOR@@", "@fault_tolerant_wrapper"
                       if line.fault_tolerant_loop else "")
              .replace("@@REJECT_CALL@@", "if self._reject_add_while_paused(req):\n"
                       "                return" if rejects else "pass")
              .replace("@@PAUSE_GENERATION@@", _PAUSE_GENERATION
                       if line.pause_entry == "pause_generation" else "")
              .replace("@@INIT_CADENCE@@", "self.dp_sync_interval = 4"
                       if line.cadence == CADENCE_INTERVAL and not one_phase else "pass")
              .replace("@@DP_PAUSE_COMPLETE@@", "" if one_phase else _DP_PAUSE_COMPLETE)
              .replace("@@HAS_GLOBAL@@", has_global))
    pc = _PC_NONE if one_phase else _PC_METHOD if line.sync_flavour == "method" else _PC_STATIC
    source = _SUPPORT + _FT + pc + engine
    name = f"_fake_vllm_{next(_counter)}"
    module = types.ModuleType(name)
    exec(compile(textwrap.dedent(source), f"<fake vllm {version}>", "exec"), module.__dict__)
    for method in drop:
        for cls in ("EngineCore", "EngineCoreProc", "DPEngineCoreProc"):
            module.__dict__[cls].__dict__.get(method) and delattr(module.__dict__[cls], method)
    sys.modules[name] = module
    modules = {"vllm": types.SimpleNamespace(__version__=version),
               "vllm.v1.engine.core": module, "vllm.v1.engine": module, "vllm.config": module}

    def loader(mod: str):
        if mod not in modules:
            raise ImportError(f"No module named {mod!r}")
        return modules[mod]

    return loader, module


SHAPE = {f"{a}.{b}": line for (a, b), line in versions.KNOWN_LINES.items()}


@pytest.fixture
def inst():
    """A fresh instrumentor singleton; a registry per engine (by rank) in ``inst.registries``."""
    saved = VllmDpInstrumentor._instance
    VllmDpInstrumentor._instance = None
    instrumentor = VllmDpInstrumentor()
    instrumentor.registries = {}

    def factory(engine, info):
        registry = CollectorRegistry()
        instrumentor.registries[int(engine.dp_rank)] = registry
        return TelemetryProbe(int(engine.dp_rank), int(engine.dp_size),
                              RankMetrics(registry, engine.dp_rank, "m", info)), None

    instrumentor.factory = factory
    try:
        yield instrumentor
    finally:
        instrumentor.remove_status_only()
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        VllmDpInstrumentor._instance = saved
        for name in [m for m in sys.modules if m.startswith("_fake_vllm_")]:
            del sys.modules[name]


def _value(inst, rank: int, name: str, **labels: str) -> float | None:
    return inst.registries[rank].get_sample_value(
        name, {n.LABEL_ENGINE: str(rank), n.LABEL_MODEL_NAME: "m", **labels})


def _errors(caplog, level=logging.ERROR):
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name.startswith("instrumented_core")]


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _config() -> TelemetryConfig:
    return TelemetryConfig(metrics_port_base=0, span_exporter="none", model_name="m")


# ----------------------------------------------------------------------------------------------
# the contract: by capability, and the rule for versions nobody checked
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", list(SHAPE), ids=lambda line: f"vllm-{line}")
def test_every_known_line_resolves_to_what_its_shape_has(inst, line):
    loader, _ = fake_vllm(f"{line}.0", SHAPE[line])
    api = contract.resolve(loader, env={})
    assert api.reason == "ok"
    assert api.capabilities() == {
        "cadence": SHAPE[line].cadence, "sync_flavour": SHAPE[line].sync_flavour,
        "pause_entry": SHAPE[line].pause_entry,
        "fault_tolerant_loop": SHAPE[line].fault_tolerant_loop,
        "rejects_paused": SHAPE[line].rejects_paused}
    assert api.reduce_hook is not None and api.reduce_hook[1] == (
        "cpu_all_reduce_" if SHAPE[line].sync_flavour == "method" else "all_reduce")


def test_the_cadence_comes_from_the_code_not_from_the_version_string():
    loader, _ = fake_vllm("0.32.0", SHAPE["0.25"])  # a 0.32 label on 0.25's code
    assert contract.resolve(loader, env={}).cadence == CADENCE_FIXED
    loader, _ = fake_vllm("0.25.0", SHAPE["0.32"])  # a backport of dp_sync_interval
    assert contract.resolve(loader, env={}).cadence == CADENCE_INTERVAL


def test_a_newer_version_whose_structure_holds_activates_with_one_warning(inst, caplog):
    loader, module = fake_vllm("0.34.0", SHAPE["0.33"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        inst.instrument(import_module=loader, telemetry_config=_config())
    assert inst.is_instrumented_by_opentelemetry
    [warning] = _errors(caplog, logging.WARNING)
    assert "0.34.0" in warning and versions.ENV_UNKNOWN_VERSION in warning
    assert not _errors(caplog)
    engine = module.DPEngineCoreProc(rank=0)
    obs = inst._start_engine(engine)
    try:
        sample = _scrape(obs.telemetry.metrics_url)
        key = (n.PLUGIN_ACTIVE, (("engine", "0"), ("model_name", "m"),
                                 ("reason", "unknown_version"), ("vllm_version", "0.34.0")))
        assert sample[key] == 1
    finally:
        obs.close()


@pytest.mark.parametrize("setting, says", [("off", "=off"), ("sometimes", "choose activate")])
def test_a_newer_version_stays_off_with_one_error_when_the_policy_is_not_activate(
        inst, caplog, monkeypatch, setting, says):
    monkeypatch.setenv(versions.ENV_UNKNOWN_VERSION, setting)
    loader, module = fake_vllm("0.34.0", SHAPE["0.33"])
    before = dict(module.DPEngineCoreProc.__dict__)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        inst.instrument(import_module=loader)
    assert not inst.is_instrumented_by_opentelemetry
    [error] = _errors(caplog)
    assert "0.34.0" in error and says in error and "OFF" in error
    assert inst.contract_reason == "unknown_version_off"
    assert dict(module.DPEngineCoreProc.__dict__) == before


def test_a_known_line_is_not_subject_to_the_unknown_version_policy(inst, monkeypatch):
    monkeypatch.setenv(versions.ENV_UNKNOWN_VERSION, "off")
    loader, _ = fake_vllm("0.33.0", SHAPE["0.33"])
    inst.instrument(import_module=loader)
    assert inst.is_instrumented_by_opentelemetry


@pytest.mark.parametrize("version, shape, drop, reason, names", [
    ("0.34.0", "0.33", ("_handle_client_request",), "contract_mismatch",
     "DPEngineCoreProc._handle_client_request"),
    ("0.27.0", "0.27", ("step_with_batch_queue",), "contract_mismatch",
     "DPEngineCoreProc.step_with_batch_queue"),
    ("0.20.2", None, (), "no_two_phase_pause", "vLLM 0.21 or later"),
], ids=["newer-missing-a-method", "known-missing-a-method", "before-two-phase"])
def test_a_structure_that_does_not_hold_is_off_with_one_error_naming_it(
        inst, caplog, version, shape, drop, reason, names):
    loader, _ = fake_vllm(version, SHAPE.get(shape or ""), drop)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        inst.instrument(import_module=loader)
    assert not inst.is_instrumented_by_opentelemetry
    [error] = _errors(caplog)
    assert names in error and version in error
    assert inst.contract_reason == reason


def test_a_pause_generation_that_bypasses_pause_scheduler_is_a_mismatch():
    loader, module = fake_vllm("0.34.0", SHAPE["0.33"])

    def pause_generation(self, mode="abort", clear_cache=True):
        self.scheduler_state = mode  # pauses without pause_scheduler: we would see nothing

    module.EngineCoreProc.pause_generation = pause_generation
    with pytest.raises(contract.ContractError, match="pause_generation calling pause_scheduler"):
        contract.resolve(loader, env={})


def test_the_plugin_reasons_are_one_bounded_set():
    assert contract.REASONS == n.PLUGIN_REASONS
    with pytest.raises(ValueError, match="not one of"):
        plugin_active(CollectorRegistry(), {n.LABEL_ENGINE: "0", n.LABEL_MODEL_NAME: "m"},
                      False, "rank 3 looked odd", "0.33.0")


# ----------------------------------------------------------------------------------------------
# an inactive rank still says so
# ----------------------------------------------------------------------------------------------


def test_an_inactive_rank_serves_plugin_active_0_and_the_reason_while_its_loop_runs(
        inst, caplog):
    loader, module = fake_vllm("0.34.0", SHAPE["0.33"], drop=("barrier",))
    cls = module.DPEngineCoreProc
    before = dict(cls.__dict__)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        inst.instrument(import_module=loader, telemetry_config=_config())
        assert inst.serve_status_when_inactive()  # what the plugin does after a failed contract
    changed = {k for k in cls.__dict__ if cls.__dict__[k] is not before.get(k)}
    assert changed == {"run_busy_loop"}  # one pass-through, nothing observed
    engine = cls(rank=3)
    seen: dict = {}

    def look(engine):
        from instrumented_core.doctor import run_doctor

        seen["url"] = status_of(engine).url
        seen["sample"] = _scrape(seen["url"])
        seen["doctor"] = run_doctor(targets=[seen["url"]])

    engine.script = [look]
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(SystemExit):
        engine.run_busy_loop()
    key = (n.PLUGIN_ACTIVE, (("engine", "3"), ("model_name", "m"),
                             ("reason", "contract_mismatch"), ("vllm_version", "0.34.0")))
    assert seen["sample"] == {key: 0.0}  # that series alone: nothing it cannot know
    # the doctor names the rank and why, never "not a vLLM DP endpoint"
    summary = seen["doctor"].verdict.summary
    assert summary.startswith("plugin off on rank 3 (") and summary.endswith(
        ": contract_mismatch (vLLM 0.34.0)"), summary
    with pytest.raises(urllib.error.URLError):
        _scrape(seen["url"])  # the loop ended: so did the endpoint
    assert status_of(engine) is None
    [error] = _errors(caplog)  # the contract error, once
    assert "DPEngineCoreProc.barrier" in error
    inst.remove_status_only()
    assert dict(cls.__dict__) == before


def test_an_engine_lacking_dp_sync_interval_on_an_interval_release_says_engine_mismatch(
        inst, caplog):
    loader, module = fake_vllm("0.32.0", SHAPE["0.32"])
    inst.instrument(import_module=loader, telemetry_config=_config())
    engine = module.DPEngineCoreProc(rank=1)
    del engine.dp_sync_interval
    with caplog.at_level(logging.INFO, logger=LOGGER):
        status = inst._start_engine(engine)
    try:
        assert observer_of(engine) is None
        [error] = _errors(caplog)
        assert "dp_sync_interval" in error and "0.32.0" in error
        sample = _scrape(status.url)
        assert sample[(n.PLUGIN_ACTIVE, (("engine", "1"), ("model_name", "m"),
                                         ("reason", "engine_mismatch"),
                                         ("vllm_version", "0.32.0")))] == 0
    finally:
        status.close()


def test_an_active_rank_says_ok_beside_its_series(inst):
    loader, module = fake_vllm("0.32.0", SHAPE["0.32"])
    inst.instrument(import_module=loader, telemetry_config=_config())
    obs = inst._start_engine(module.DPEngineCoreProc(rank=0))
    try:
        sample = _scrape(obs.telemetry.metrics_url)
        assert sample[(n.PLUGIN_ACTIVE, (("engine", "0"), ("model_name", "m"), ("reason", "ok"),
                                         ("vllm_version", "0.32.0")))] == 1
        assert (n.PHASE, (("engine", "0"), ("model_name", "m"))) in sample
    finally:
        obs.close()


# ----------------------------------------------------------------------------------------------
# the cadence, 0.33's rejections, and the state vLLM replaces mid-run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, interval, until_at_0, steps", [
    ("0.25", 32, 32, 32), ("0.30", 4, 1, 1)], ids=["fixed32", "dp_sync_interval"])
def test_the_cadence_shown_is_the_one_the_release_runs(inst, line, interval, until_at_0, steps):
    loader, module = fake_vllm(f"{line}.0", SHAPE[line])
    inst.instrument(import_module=loader, probe_factory=inst.factory)
    engine = module.DPEngineCoreProc(rank=0)
    obs = inst._start_engine(engine)
    assert _value(inst, 0, n.SYNC_INTERVAL) == interval
    assert _value(inst, 0, n.STEPS_UNTIL_SYNC) == until_at_0  # 0.21-0.29: no step-1 sync
    engine.pause_scheduler("keep")
    taken = 0
    while not engine.ignore_start_dp_wave:
        engine.one_step()
        taken += 1
    assert taken == steps and obs.phase.value == "paused"
    assert _value(inst, 0, n.SYNC_WAIT_COUNT) == 1
    assert _value(inst, 0, n.PAUSE_CONSENSUS_TOTAL) == 1


def test_engine_paused_rejections_are_counted_as_an_outcome(inst):
    loader, module = fake_vllm("0.33.0", SHAPE["0.33"])
    inst.instrument(import_module=loader, probe_factory=inst.factory)
    engine = module.DPEngineCoreProc(rank=0)
    inst._start_engine(engine)
    engine.pause_generation("abort")  # the user's pause, through pause_scheduler
    assert _value(inst, 0, n.PAUSE_REQUESTS_TOTAL, mode="abort") == 1
    for i in range(3):
        engine._handle_client_request(module.EngineCoreRequestType.ADD, (f"r{i}", 0))
    assert len(engine.rejected) == 3 and not engine.added
    assert _value(inst, 0, n.REQUESTS_REJECTED_TOTAL, reason="engine_paused") == 3
    engine.pause_generation("keep")  # keep queues new requests instead
    engine._handle_client_request(module.EngineCoreRequestType.ADD, ("r9", 0))
    assert engine.added == ["r9"]
    assert _value(inst, 0, n.REQUESTS_REJECTED_TOTAL, reason="engine_paused") == 3


def test_a_fault_tolerance_retry_keeps_counting_and_rederives_phase_and_position(inst, caplog):
    """0.27+ --enable-fault-tolerance: the sync all-reduce times out while a pause is pending;
    vLLM's fault_tolerant_wrapper re-enters the loop INSIDE our wrapper with a new DP group and
    step_counter 0. The same observer counts on, is not left "inside" the failed sync, sees
    the new group, and the pause completes on it."""
    loader, module = fake_vllm("0.30.0", SHAPE["0.30"])
    inst.instrument(import_module=loader, probe_factory=inst.factory)
    engine = module.DPEngineCoreProc(rank=0, group=module.Group(2, peers_pausing=0))
    engine.enable_fault_tolerance = True
    engine.next_group = module.Group(2, peers_pausing=1)  # the peer votes on the new group
    step = module.DPEngineCoreProc.one_step
    seen: dict = {}

    def request_pause(engine):
        seen["obs"] = observer_of(engine)
        engine.pause_scheduler("keep")

    def fail_next_sync(engine):
        engine.dp_group.fail = 1

    def after_retry(engine):
        obs = observer_of(engine)
        seen["after"] = (obs, engine.step_counter, obs.probe.hot.inside_since[n.COLLECTIVE_SYNC],
                         obs.phase.value, _value(inst, 0, n.STEPS_UNTIL_SYNC))

    # steps 1 (sync: no consensus), 2, 3, then step 4's sync times out -> retry, step 0 again
    engine.script = [request_pause, step, step, step, fail_next_sync, step, after_retry, step]
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(SystemExit):
        engine.run_busy_loop()
    obs, counter, inside, phase, until = seen["after"]
    assert obs is seen["obs"]  # one observer across the retry
    assert (counter, inside, phase, until) == (0, 0.0, "pending_pause", 1)
    assert obs.group_changes == 1
    assert any("new DP group" in r.getMessage() for r in caplog.records)
    assert _value(inst, 0, n.SYNC_WAIT_COUNT) == 2  # the failed round is not a round
    assert _value(inst, 0, n.PAUSE_CONSENSUS_TOTAL) == 1
    assert _value(inst, 0, n.PHASE) == n.PHASE_PAUSED
    assert _value(inst, 0, n.PAUSE_REQUESTS_TOTAL, mode="keep") == 1
    assert _value(inst, 0, n.SYNC_WAIT_SUM) > 0
    assert observer_of(engine) is None  # the loop ended (SystemExit): telemetry closed


def test_elastic_ep_resizing_the_group_is_what_vllm_dp_size_and_the_votes_follow(inst):
    """Elastic EP swaps ``dp_group`` (and resets step_counter) but leaves the engine's
    ``dp_size`` attribute as it was: the consensus vLLM reaches on the new group must read as
    consensus, and ``vllm_dp_size`` must show the new size, at scrape time."""
    loader, module = fake_vllm("0.33.0", SHAPE["0.33"])
    inst.instrument(import_module=loader, probe_factory=inst.factory)
    engine = module.DPEngineCoreProc(rank=1, dp_size=4, group=module.Group(4))
    obs = inst._start_engine(engine)
    assert _value(inst, 1, n.DP_SIZE) == 4
    engine.dp_group, engine.step_counter = module.Group(2), 0  # scaled down to 2 ranks
    assert engine.dp_size == 4 and _value(inst, 1, n.DP_SIZE) == 2
    engine.pause_generation("keep")
    engine.one_step()  # step 1 syncs: 2 votes of 2
    assert engine.ignore_start_dp_wave and obs.phase.value == "paused"
    assert _value(inst, 1, n.PAUSE_CONSENSUS_TOTAL) == 1


def test_a_rank_removed_by_elastic_ep_takes_its_endpoint_down(inst):
    loader, module = fake_vllm("0.33.0", SHAPE["0.33"])
    inst.instrument(import_module=loader, telemetry_config=_config())
    engine = module.DPEngineCoreProc(rank=2)
    seen: dict = {}

    def look(engine):
        seen["url"] = observer_of(engine).telemetry.metrics_url
        seen["before"] = _scrape(seen["url"])

    engine.script = [look]  # then the loop raises SystemExit, as vLLM's does for this rank
    with pytest.raises(SystemExit):
        engine.run_busy_loop()
    assert (n.PHASE, (("engine", "2"), ("model_name", "m"))) in seen["before"]
    with pytest.raises(urllib.error.URLError):
        _scrape(seen["url"])
    assert observer_of(engine) is None


def test_concurrent_sync_rounds_each_capture_their_own_votes_and_leave_nothing_behind():
    """Two engines in one process (the release probes run two ranks in threads): the shared
    pass-through records each thread's tensor for that thread alone, and the last one out puts
    the original all-reduce back."""
    both_inside = threading.Barrier(2, timeout=10)

    def all_reduce(tensor, group=None):
        both_inside.wait()
        tensor[1] += 1
        return tensor

    class Vec(list):
        def tolist(self):
            return list(self)

    namespace = types.SimpleNamespace(all_reduce=all_reduce)
    hook = (namespace, "all_reduce")
    captured: dict[int, list] = {0: [], 1: []}

    def rank(r: int) -> None:
        sync_capture._capture_begin(hook, captured[r])
        try:
            namespace.all_reduce(Vec([r, 1]))
        finally:
            sync_capture._capture_end(hook)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert captured == {0: [[0, 2]], 1: [[1, 2]]}
    assert namespace.all_reduce is all_reduce and not sync_capture._installed


# ----------------------------------------------------------------------------------------------
# the released wheels' own source (network: one download per line, then cached)
# ----------------------------------------------------------------------------------------------

LINES = [line for line in release_source.RELEASES if line != "0.20"]


def _expected(line: str) -> versions.ReleaseLine:
    return versions.KNOWN_LINES[versions.line_of(line)]


@pytest.mark.network
@pytest.mark.parametrize("line", LINES, ids=lambda line: f"vllm-{line}")
def test_the_released_source_has_what_the_versions_table_says(line):
    facts = release_source.read_release(line).facts()
    expected = _expected(line)
    assert facts.version == release_source.RELEASES[line][1]
    assert facts.line_entry() == expected
    assert facts.step_one_sync == expected.step_one_sync
    assert facts.sync_reduce == ("cpu_all_reduce_" if expected.sync_flavour == "method"
                                 else "torch.distributed.all_reduce")
    assert facts.batch_queue and facts.elastic_ep  # elastic EP in every line, not only 0.33
    assert facts.wave_start == ("engines" if line == "0.33" else "front end")
    required = contract.ENGINE_METHODS + contract.ENGINE_REQUIRED_ONLY
    assert [m for m in required if not facts.methods[m]] == []
    reads = set(contract.ENGINE_ATTRIBUTES) | (
        {contract.CADENCE_ATTRIBUTE} if expected.cadence == CADENCE_INTERVAL else set())
    assert reads - set(facts.assigned) == set()  # every attribute the observer reads is set
    assert facts.dp_sync_interval_field == (expected.cadence == CADENCE_INTERVAL)


@pytest.mark.network
def test_0_20_has_no_two_phase_pause_and_the_contract_says_so():
    release = release_source.read_release("0.20")
    assert not release.facts().two_phase
    with pytest.raises(contract.ContractError) as raised:
        contract.resolve(release.loader(), env={})
    assert raised.value.reason == "no_two_phase_pause"


@pytest.mark.network
@pytest.mark.parametrize("line", LINES, ids=lambda line: f"vllm-{line}")
def test_the_contract_resolves_on_the_release_classes_and_every_wrapper_fits(inst, line):
    """The release's own DPEngineCoreProc chain and ParallelConfig, rebuilt from its source
    (real code objects and signatures, its fault_tolerant_wrapper), under the real contract
    and the real wrappers."""
    loader = release_source.read_release(line).loader()
    api = contract.resolve(loader, env={})
    expected = _expected(line)
    assert api.reason == "ok"
    assert api.capabilities() == {
        "cadence": expected.cadence, "sync_flavour": expected.sync_flavour,
        "pause_entry": expected.pause_entry, "fault_tolerant_loop": expected.fault_tolerant_loop,
        "rejects_paused": expected.rejects_paused}
    originals = release_source.originals_of(api)
    inst.instrument(import_module=loader, probe_factory=inst.factory)
    assert inst.is_instrumented_by_opentelemetry, inst.contract_error
    assert release_source.installed_problems(inst, originals) == []
    wrapped = set(contract.ENGINE_METHODS) | {"sync_dp_state"} | (
        {"_reject_add_while_paused"} if expected.rejects_paused else set())
    assert set(originals) == wrapped


@pytest.mark.network
@pytest.mark.parametrize("line", LINES, ids=lambda line: f"vllm-{line}")
def test_the_release_imports_on_cpu_and_two_ranks_pause_through_its_own_code(line):
    result = release_source.probe_release(line)
    assert "error" not in result, {k: result.get(k) for k in ("error", "stderr", "stdout")}
    expected = _expected(line)
    assert result["version"] == release_source.RELEASES[line][1]
    assert set(result["empty_modules"]) <= set(release_source.OPTIONAL_IMPORTS)
    assert result["reason"] == "ok" and result["instrumented"]
    assert result["capabilities"]["cadence"] == expected.cadence
    assert result["capabilities"]["sync_flavour"] == expected.sync_flavour
    assert result["capabilities"]["pause_entry"] == expected.pause_entry
    assert result["capabilities"]["fault_tolerant_loop"] == expected.fault_tolerant_loop
    assert result["reduce_hook"] == ("cpu_all_reduce_" if expected.sync_flavour == "method"
                                     else "all_reduce")
    assert result["wrapper_problems"] == []
    assert result["restored"]  # uninstrument put every original back
    fixed = expected.cadence == CADENCE_FIXED
    for rank in result["ranks"]:
        assert rank["observed"]
        assert rank["phases"] == ["pending_pause", "paused", "running"]
        assert rank["steps_to_consensus"] == (32 if fixed else 1)
        assert rank["syncs"] == [[2, 2, True]]  # both votes, read from the reduced tensor
        assert not rank["engines_running"] and not rank["late_wave_woke_engine"]
        m = rank["metrics"]
        assert (m["pause_requests"], m["consensus"], m["sync_rounds"], m["resumes"]) == (1, 1, 1, 1)
        assert m["start_dp_wave_ignored"] == 1
        assert m["sync_interval"] == (32 if fixed else 4) and m["dp_size"] == 2
        assert m["inside_sync"] == 0 and m["resume_wait_seconds"] > 0
        if expected.rejects_paused:
            assert rank["rejected"] and rank["rejection_sent"] == 1
            assert m["rejected_engine_paused"] == 1
