"""CI runs what the README tells people to run, and installs the example plugin it tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == block[1], "the last line of .ci/run must be the README's quick start test command"
    assert "pip install torch==2.13.0 && " in ci[-1]
    assert ci[-1].index("pip install -e examples/third_party_backend") < ci[-1].index("python -m pytest")


def test_tox_plugins_env_installs_the_example():
    tox = (ROOT / "tox.ini").read_text()
    env = tox[tox.index("[testenv:plugins]"):]
    assert "pip install -e examples/third_party_backend" in env and "tests/plugins" in env
