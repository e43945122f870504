"""ruff stays clean (the configuration and the reasons for each ignored rule are in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from _deps import TEST_EXTRA, needs

ROOT = Path(__file__).resolve().parents[2]


@needs(None if shutil.which("ruff") else "ruff is not on PATH", TEST_EXTRA)
def test_ruff_is_clean():
    proc = subprocess.run(["ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
