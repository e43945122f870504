"""The prepared GPU script (``tests/gpu/bench_kernels.py``) runs end to end, on the CPU.

A GPU session gets minutes, not hours: a bug in the script must show here, not there. ``--smoke`` runs
every step (conformance, the comparisons against ``reference``, refusals with their reasons, the table,
the launch-setting sweep) in Triton's interpreter at a tiny shape; its timings mean nothing and are not
checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _deps import require

require("triton")  # in the test extra; before the imports below, which need it

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "bench_kernels.py"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=900)


def test_dry_run_prints_the_plan():
    run = _run("--dry-run")
    assert run.returncode == 0, run.stderr
    assert "S-std (8, 4096, 64, 64)" in run.stdout and "wkv7 triton/chunk" in run.stdout


def test_smoke_runs_every_step():
    run = _run("--smoke", "--sweep")
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert "conformance of backend 'triton'" in out and "CORRECTNESS FAILURES" not in out
    diffs = re.findall(r"(wkv\d) triton/(\w+): worst relative difference .* ([0-9.e+-]+)$", out, re.M)
    assert len(diffs) == 7 and all(float(e) <= 1e-5 for *_, e in diffs), out
    table = [line.split() for line in out.splitlines() if line.startswith(("tiny ", "Decode-B "))]
    triton_rows = [r for r in table if r[2].startswith("triton/")]
    assert len(triton_rows) == 2 * 7  # every triton row of RUNS at both shapes, timed
    assert all(float(r[3]) > 0 for r in triton_rows)
    assert all(r[3] == "n/a" for r in table if r[2].startswith("cuda/"))  # refused, with the reason below
    assert re.search(r"^  - tiny wkv7 cuda/recurrent fwd: \S", out, re.M), out  # the refusal says why
    sweep = [line.split() for line in out.splitlines() if re.match(r"wkv\d\s+(chunk|recurrent)\s+\S+=", line)]
    assert len(sweep) >= 10 and all(re.fullmatch(r"[0-9.]+", r[-3]) for r in sweep), out  # timed, no error
