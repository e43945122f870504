"""The example third-party distribution ``examples/third_party_backend`` (rwkv-zoo-exact), installed.

What a kernel author's users see, end to end, in fresh processes with entry-point autoload on (the
suite itself runs with ``RWKV_ZOO_NO_AUTOLOAD=1``): discovery through the entry point, ``rwkv-zoo
backends`` / ``plugins`` naming the providing distribution, ``use_backend("exact")`` running a model,
``explain`` saying why, its conformance run passing, and with ``RWKV_ZOO_DISABLE_PLUGINS=exact`` the
same model running on the next backend while ``explain`` and ``rwkv-zoo plugins`` say the plugin is
blocked; and, in one pytest subprocess, the example's own tests and its conformance matrix through
the pytest plugin (``pytest --rwkv-zoo-backend exact``; a smaller matrix than ``tox -e plugins``, which
runs every dtype and length). The pytest plugin itself is tested in test_pytest_plugin.py.

Needs ``pip install -e examples/third_party_backend`` (CI and ``tox -e plugins`` do it); skipped
without it, except under CI, where a missing install is a failure.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _deps import EXAMPLE_PLUGIN, missing

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIST = "rwkv-zoo-exact"

try:
    VERSION = importlib.metadata.version(DIST)
except importlib.metadata.PackageNotFoundError:
    VERSION = None


@pytest.fixture(autouse=True)
def _installed():
    if VERSION is None:
        missing(f"{DIST} is not installed", EXAMPLE_PLUGIN)


PROBE = textwrap.dedent(
    """
    import contextlib, io, json, torch, rwkv_zoo
    from rwkv_zoo import cli

    def run_cli(*argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli.main(list(argv))
        return rc, out.getvalue()

    model = rwkv_zoo.randomize_(rwkv_zoo.build("v6-tiny"), seed=0).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    result = {"plugins": {p["name"]: p for p in rwkv_zoo.list_plugins()},
              "backends": {b["name"]: b for b in rwkv_zoo.list_backends()},
              "cli_backends": run_cli("backends"), "cli_plugins": run_cli("plugins")}
    with torch.no_grad():
        logits, _ = model(tokens)
        result["default_explain"] = str(rwkv_zoo.explain(model, tokens))
        try:
            with rwkv_zoo.use_backend("exact"):
                result["exact_explain"] = str(rwkv_zoo.explain(model, tokens))
                exact, _ = model(tokens)
            result["rel_diff"] = float((exact - logits).norm() / logits.norm())
        except Exception as exc:
            result["exact_error"] = f"{type(exc).__name__}: {exc}"
    result["finite"] = bool(torch.isfinite(logits).all())
    result["cpu_available"] = result["backends"].get("cpu", {}).get("available", False)
    if "exact" in result["backends"]:
        from rwkv_zoo.testing import check_backend
        report = check_backend("exact", dtypes=(torch.float32, torch.bfloat16), Ts=(1, 15, 65), raise_on_fail=False)
        result["conformance"] = {"ok": report.ok, "ran": sum(not r.skipped for r in report.results),
                                 "worst": {"/".join(k): v for k, v in report.max_errors().items()},
                                 "text": str(report)}
    print(json.dumps(result))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env.pop("RWKV_ZOO_NO_AUTOLOAD", None)  # the point: load third-party plugins as a user's process does
    env.pop("RWKV_ZOO_BACKEND", None)
    if "RWKV_ZOO_DISABLE_PLUGINS" not in extra:
        env.pop("RWKV_ZOO_DISABLE_PLUGINS", None)
    return env


def _probe(**extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=_env(**extra),
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_discovered_listed_chosen_and_explained():
    out = _probe()
    plugin = out["plugins"]["exact"]
    assert plugin["source"] == "entrypoint" and plugin["error"] is None and not plugin["disabled"]
    assert plugin["distribution"] == f"{DIST} {VERSION}"
    assert plugin["hooks"] == ["rwkv_zoo_register_backends", "rwkv_zoo_update_env_info"]

    backend = out["backends"]["exact"]
    assert backend["available"] and backend["provider"] == "exact"
    assert backend["distribution"] == f"{DIST} {VERSION}"
    rc, text = out["cli_backends"]
    row = next(line for line in text.splitlines() if line.startswith("exact "))
    assert rc == 0 and f"exact ({DIST} {VERSION})" in row and row.endswith("available")
    rc, text = out["cli_plugins"]
    row = next(line for line in text.splitlines() if line.startswith("exact "))
    assert rc == 0 and "entrypoint" in row and f"{DIST} {VERSION}" in row and row.endswith("ok")

    # Chosen explicitly, and explain says so; left to priority, the C++ cpu backend (2, where it builds) or
    # reference (0) wins over exact (-10).
    assert "-> exact (use_backend(): chosen explicitly)" in out["exact_explain"]
    chosen = next(line for line in out["default_explain"].splitlines() if "->" in line)
    name, prio = ("cpu", 2) if out["cpu_available"] else ("reference", 0)
    assert f"-> {name} (priority: highest priority ({prio}) of those that can run it; also able:" in chosen
    assert "exact" in chosen.split("also able:")[1]
    assert "exact_error" not in out and out["rel_diff"] < 1e-5 and out["finite"]

    # Its conformance run (the example's tox env also runs the whole matrix through the pytest plugin).
    conformance = out["conformance"]
    assert conformance["ok"] and conformance["ran"] == 4 * 2 * 2 * 3, conformance["text"]
    assert max(v for k, v in conformance["worst"].items() if k.endswith("float32")) < 1e-6


def test_blocked_plugin_runs_the_model_on_the_next_backend_and_says_so():
    out = _probe(RWKV_ZOO_DISABLE_PLUGINS="exact")
    assert out["plugins"]["exact"]["disabled"] and "exact" not in out["backends"]
    assert out["finite"]  # the model ran, on cpu or reference
    name = "cpu" if out["cpu_available"] else "reference"
    chosen = next(line for line in out["default_explain"].splitlines() if "->" in line)
    assert f"-> {name} (priority" in chosen and "also able: exact" not in chosen
    blocked = f"plugin exact ({DIST} {VERSION}) is blocked by RWKV_ZOO_DISABLE_PLUGINS"
    assert f"not considered: {blocked}" in out["default_explain"]
    # An explicit choice of a blocked backend raises (never a silent fallback), naming the block.
    assert out["exact_error"].startswith("ValueError: unknown backend 'exact' (from use_backend())")
    assert blocked in out["exact_error"]
    rc, text = out["cli_plugins"]
    row = next(line for line in text.splitlines() if line.startswith("exact "))
    assert rc == 0 and row.endswith("blocked (RWKV_ZOO_DISABLE_PLUGINS)")


# The example's own suite plus 4 ops x 2 modes x 2 dtypes x 3 lengths of conformance items.
EXAMPLE_TESTS = 6
MATRIX = ["--rwkv-zoo-dtypes", "float32,bfloat16", "--rwkv-zoo-T", "1,15,65"]


def test_example_tests_and_conformance_matrix_pass_through_the_pytest_plugin():
    # What a kernel author runs; in a subprocess because it is another rootdir (the example's own
    # pyproject and conftest) and loads plugins through entry points, as tox -e plugins does.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "rwkv_zoo.pytest_plugin",
           "examples/third_party_backend/tests", "--rwkv-zoo-plugin", "rwkv_zoo_exact",
           "--rwkv-zoo-backend", "exact", *MATRIX]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
    out = proc.stdout
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    # Only passes, and exactly as many as expected: a run that collects nothing, or skips, fails here.
    assert re.fullmatch(r"=* ?(\d+) passed in [\d.]+s( \(\S+\))? ?=*", summary), out[-4000:]
    assert int(re.search(r"(\d+) passed", summary).group(1)) == EXAMPLE_TESTS + 4 * 2 * 2 * 3, out[-4000:]
    assert "conformance of backend 'exact' on cpu" in out  # the plugin's per-backend report
