"""The CI dependency rule (tests/_deps.py, tests/conftest.py): a dependency CI provides skips locally
and fails under CI=true, and a CI run fails on any skip that is not a GPU or benchmark skip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

CASES = textwrap.dedent(
    """
    import pytest
    from _deps import TEST_EXTRA, needs, require

    def test_missing_package():
        require("no_such_package_ci21")

    @needs("the widget compiler is not on PATH", "the CI machine's widgets")
    def test_missing_tool():
        pass

    @needs(None, "the CI machine's widgets")
    def test_present_tool():
        pass

    def test_gpu_skip():
        pytest.skip("needs a CUDA GPU and a CUDA build of torch")

    @pytest.mark.gpu
    def test_marked_gpu_skip():
        pytest.skip("whatever a GPU test says")

    def test_other_skip():
        pytest.skip("something else is missing")
    """
)


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\nmarkers = gpu: needs a CUDA GPU\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    # The suite's conftest as a plugin, over a folder of its own.
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-rA", "-q",
           "test_cases.py"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.integration
def test_missing_dependencies_skip_locally(tmp_path):
    proc = _run(tmp_path, None)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "1 passed, 5 skipped" in out.splitlines()[-1], out[-3000:]
    assert "'no_such_package_ci21' is not importable" in out and "pip install -e '.[test]'" in out
    assert "the widget compiler is not on PATH (provided by: the CI machine's widgets)" in out
    assert "skips not allowed under CI=true" not in out


@pytest.mark.integration
def test_under_ci_missing_dependencies_fail_and_so_do_unexpected_skips(tmp_path):
    proc = _run(tmp_path, "true")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert "1 failed, 1 passed, 3 skipped, 1 error" in out.splitlines()[-1], out[-3000:]
    assert "FAILED test_cases.py::test_missing_package - Failed: CI=true and a CI dependency is missing" in out
    assert "ERROR test_cases.py::test_missing_tool - Failed: CI=true and a CI dependency is missing" in out
    section = out[out.index("skips not allowed under CI=true"):]
    assert "test_cases.py::test_other_skip: something else is missing" in section
    assert "test_gpu_skip" not in section and "test_marked_gpu_skip" not in section
