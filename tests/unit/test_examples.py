"""Every numbered example script runs to completion (new ``examples/NN_*.py`` files are picked up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("[0-9]*.py"))


def test_examples_exist():
    assert EXAMPLES, "no examples/[0-9]*.py found"


@pytest.mark.integration
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path):
    env = {**os.environ, "RWKV_ZOO_NO_AUTOLOAD": "1"}
    env.pop("RWKV_ZOO_BACKEND", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"
