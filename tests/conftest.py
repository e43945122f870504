"""Suite-wide settings: hermetic plugins (built-ins only; third-party entry points are not loaded), and
under CI=true no skip but GPU and benchmark ones (tests/_deps.py)."""

from __future__ import annotations

import os
import re
import signal

import _deps
import pytest

# Before rwkv_zoo loads its plugins: installed third-party plugins must not change what tests see.
os.environ.setdefault("RWKV_ZOO_NO_AUTOLOAD", "1")
os.environ.pop("RWKV_ZOO_BACKEND", None)
os.environ.pop("RWKV_ZOO_DISABLE_PLUGINS", None)

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


# --- CI: a dependency CI provides is never silently skipped (issue 21) -----------------------------

# Skips that CI (a CPU machine that does not time benchmarks) is expected to report. Anything else
# skipped under CI=true means an install step or a tool is missing, and fails the run.
ALLOWED_CI_SKIPS = re.compile(
    r"needs a CUDA GPU"  # the GPU kernel tests; the fla adapter's real kernels
    r"|the cuda backend needs "  # cuda.unavailable_reason() on a machine without a GPU
    r"|^fla backend: "  # fla is a GPU-only package that CI does not install
    r"|^llama\.cpp comparison: "  # llama-cpp-python compiles llama.cpp (~15 min): not in CI's test extra
    r"|this machine has a GPU|on a GPU machine"  # CPU-only checks, on a GPU machine
    r"|benchmark"  # pytest-benchmark's --benchmark-skip (addopts)
)
_ci_skips: list[tuple[str, str]] = []


def pytest_configure(config):
    # A shell that starts the suite in the background (`nohup ... &`, some CI runners) hands it SIGINT
    # ignored, and every child inherits that: the Ctrl-C tests (chat, training stop) would then time out
    # for a reason outside the code. Python's own handler here also makes exec'd children start at default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "ci_dependency(reason, install): skip, or under CI=true fail, when reason "
                                       "is not None (tests/_deps.py)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("ci_dependency"):
        reason, install = mark.args
        if reason is not None:
            _deps.missing(reason, install)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _note_skip(report, gpu_or_benchmark: bool) -> None:
    reason = _skip_reason(report)
    if not gpu_or_benchmark and not ALLOWED_CI_SKIPS.search(reason):
        _ci_skips.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _note_skip(report, "gpu" in report.keywords or "benchmark" in report.keywords)


def pytest_collectreport(report):
    if report.skipped:
        _note_skip(report, False)


def pytest_terminal_summary(terminalreporter):
    if _deps.CI and _ci_skips:
        terminalreporter.section("skips not allowed under CI=true", sep="=", red=True, bold=True)
        for nodeid, reason in _ci_skips:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line("only GPU and benchmark skips may happen in CI (ALLOWED_CI_SKIPS, tests/conftest.py)")


def pytest_sessionfinish(session):
    if _deps.CI and _ci_skips and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
