"""``rwkv_zoo.pytest_plugin`` and the helpers it is made of: ``conformance_cases``, ``run_case``,
``registered_plugin`` and the ``rwkv_zoo_plugin`` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch

import rwkv_zoo
from rwkv_zoo import pluginmanager, pytest_plugin
from rwkv_zoo.backends.reference import make_backend
from rwkv_zoo.testing import conformance_cases, registered_plugin, run_case

ROOT = Path(__file__).resolve().parents[2]


class _Backend:
    """A plugin object registering a copy of the reference backend under another name."""

    def __init__(self, name: str) -> None:
        self.name = name

    @rwkv_zoo.hookimpl
    def rwkv_zoo_register_backends(self, register):
        b = make_backend()
        b.name, b.priority = self.name, -100
        register(b)


def _names() -> set[str]:
    return {b["name"] for b in rwkv_zoo.list_backends()}


def test_entry_point_is_declared():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert eps == {"rwkv_zoo.pytest_plugin": "rwkv_zoo.pytest_plugin"}


def test_registered_plugin_registers_for_the_block_only():
    plugin = _Backend("copy-a")
    with registered_plugin(plugin, "copy-a-plugin") as name:
        assert name == "copy-a-plugin" and "copy-a" in _names()
        with registered_plugin(plugin) as again:  # already registered: left as it is
            assert again == "copy-a-plugin"
        assert "copy-a" in _names()
    assert "copy-a" not in _names()
    assert "copy-a-plugin" not in {p["name"] for p in rwkv_zoo.list_plugins()}


def test_registered_plugin_unregisters_when_the_block_raises():
    with pytest.raises(RuntimeError, match="inside"), registered_plugin(_Backend("copy-b"), "copy-b-plugin"):
        raise RuntimeError("inside")
    assert "copy-b" not in _names()


def test_fixture_registers_for_one_test(rwkv_zoo_plugin):
    assert rwkv_zoo_plugin(_Backend("copy-c"), "copy-c-plugin") == "copy-c-plugin"
    assert "copy-c" in _names()
    assert pluginmanager.get_plugin_manager().has_plugin("copy-c-plugin")


def test_conformance_cases_cover_every_kernel_dtype_and_length():
    cases = conformance_cases("reference", dtypes=(torch.float32, torch.bfloat16), Ts=(1, 2))
    assert len(cases) == 4 * 2 * 2 * 2
    assert cases[0].id == "wkv4-recurrent-float32-T1"
    assert {c.id for c in conformance_cases("reference", ops=["wkv7"], modes=["chunk"], Ts=(63,))} == {
        "wkv7-chunk-float32-T63"}
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        conformance_cases("reference", modes=["fast"])


def test_run_case_skips_an_unavailable_backend_with_its_reason():
    class Absent(_Backend):
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            b = make_backend()
            b.name, b.availability = self.name, lambda: "libabsent is not installed"
            register(b)

    with registered_plugin(Absent("absent"), "absent-plugin"):
        case = conformance_cases("absent", ops=["wkv6"], modes=["chunk"], Ts=(3,))[0]
        result = run_case("absent", case)
    assert result.skipped and result.status == "skip" and result.message == "libabsent is not installed"


def test_option_errors_are_usage_errors():
    with pytest.raises(pytest.UsageError, match="'int8' is not a floating torch dtype"):
        pytest_plugin._dtypes("float32,int8")
    with pytest.raises(pytest.UsageError, match="lengths >= 1"):
        pytest_plugin._lengths("0,3")
    assert pytest_plugin._lengths("1, 7") == (1, 7)
    options = {"--rwkv-zoo-backend": ["nope"], "--rwkv-zoo-plugin": [], "--rwkv-zoo-dtypes": "float32",
               "--rwkv-zoo-T": None}
    config = SimpleNamespace(getoption=options.__getitem__)
    with pytest.raises(pytest.UsageError, match="unknown backend 'nope'; registered backends: .*reference"):
        pytest_plugin.pytest_collection_modifyitems(None, config, [])


def test_default_device_follows_the_kernels():
    gpu_only = rwkv_zoo.Backend("g", [rwkv_zoo.Kernel("wkv6", "chunk", print, devices=["cuda"])])
    assert pytest_plugin._default_device(gpu_only) == "cuda"
    assert pytest_plugin._default_device(make_backend()) == "cpu"


BROKEN = textwrap.dedent(
    """
    import torch, rwkv_zoo
    from rwkv_zoo.backends.reference.chunk import wkv6_chunk

    def off_by_one_percent(r, k, v, w, u, state):
        y, s = wkv6_chunk(r, k, v, w, u, state)
        return y * 1.01, s

    @rwkv_zoo.hookimpl
    def rwkv_zoo_register_backends(register):
        register(rwkv_zoo.Backend("sloppy", [rwkv_zoo.Kernel("wkv6", "chunk", off_by_one_percent,
                                                             dtypes=[torch.float32])], priority=-5))
    """
)


@pytest.mark.integration
def test_pytest_run_makes_one_item_per_case_and_reports_failures(tmp_path):
    (tmp_path / "sloppy_plugin.py").write_text(BROKEN)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "pytest", "-p", "rwkv_zoo.pytest_plugin", "-p", "no:cacheprovider", "-v", "-rs",
           "--rwkv-zoo-backend", "reference", "--rwkv-zoo-backend", "sloppy", "--rwkv-zoo-plugin", "sloppy_plugin",
           "--rwkv-zoo-T", "1,17", "-k", "wkv6 and chunk"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert "rwkv-zoo-conformance[reference]::wkv6-chunk-float32-T17 PASSED" in out
    assert "rwkv-zoo-conformance[reference]::wkv6-chunk-bfloat16-T1 PASSED" in out
    assert "rwkv-zoo-conformance[sloppy]::wkv6-chunk-float32-T17 FAILED" in out
    assert "rwkv-zoo-conformance[sloppy]::wkv6-chunk-bfloat16-T1 SKIPPED" in out
    assert "takes float32 inputs, not bfloat16" in out
    assert "backend 'sloppy' fails wkv6-chunk-float32-T17 on cpu: y error 1.00e-02 > 1e-05" in out
    assert "conformance of backend 'reference' on cpu" in out and "conformance of backend 'sloppy' on cpu" in out
    assert "2 failed, 4 passed, 2 skipped" in out.splitlines()[-1]
