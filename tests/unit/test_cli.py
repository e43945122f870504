"""The ``rwkv-zoo`` command line: every subcommand in-process, error exits, ``python -m rwkv_zoo``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import formatting
from rwkv_zoo.backends import cpu as cpu_backend
from rwkv_zoo.cli import info as cli_info
from rwkv_zoo.cli import main

# Inference calls on the CPU go to the C++ ``cpu`` backend where it builds (priority 2), else to reference.
CPU_DEFAULT = "cpu" if cpu_backend.unavailable_reason() is None else "reference"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


class Plugin:
    """A runtime plugin with the hooks the CLI reports on; each argument is optional."""

    def __init__(self, backend=None, env=None, fail=False):
        self.backend, self.env, self.fail = backend, env, fail

    @rwkv_zoo.hookimpl
    def rwkv_zoo_register_backends(self, register):
        if self.fail:
            raise RuntimeError("boom: this plugin is broken")
        if self.backend is not None:
            register(self.backend)

    @rwkv_zoo.hookimpl
    def rwkv_zoo_update_env_info(self, info):
        info.update(self.env or {})


def cuda_only_backend(name: str = "cudaonly", available: bool = True) -> rwkv_zoo.Backend:
    def fn(*args):
        raise AssertionError("never runs in these tests")

    kernels = [rwkv_zoo.Kernel(op, mode, fn, devices=["cuda"]) for op in ("wkv6", "wkv7")
               for mode in ("chunk", "recurrent")]
    return rwkv_zoo.Backend(name, kernels, priority=5, description="test backend",
                            availability=None if available else (lambda: "needs the moon to be full"))


# ---------------------------------------------------------------------------------------------------
# table helper


def test_table_aligns_columns():
    text = formatting.table(["a", "num", "c"], [["xx", 1, "end"], ["y", 123, None]], "<><")
    lines = text.splitlines()
    assert lines[0] == "a   num  c"
    assert lines[1] == "--  ---  ---"
    assert lines[2] == "xx    1  end"
    assert lines[3] == "y   123"  # no trailing blanks


def test_human_count():
    assert formatting.human_count(1_527_668_736) == "1.528B"
    assert formatting.human_count(191_084_544) == "191.1M"
    assert formatting.human_count(1_599_873_024) == "1.600B"
    assert formatting.human_count(999) == "999"


def test_no_command_prints_help(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2
    assert "explain" in out and "demo" in out


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert rwkv_zoo.__version__ in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# info, backends, plugins


def test_info(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    assert f"rwkv_zoo           {rwkv_zoo.__version__}" in out
    assert torch.__version__ in out
    assert "cuda available" in out
    assert "cpu threads" in out
    assert "reference backend  always available" in out  # from the reference plugin's env-info hook
    assert "versions" in out and "v4, v5, v6, v7" in out
    assert "backends" in out and "plugins" in out


def test_info_shows_plugin_env_lines(capsys):
    with rwkv_zoo.plugin(Plugin(env={"my-accelerator": "gizmo 3000, firmware 1.2"}), name="env-test"):
        rc, out, _ = run(capsys, "info")
    assert rc == 0
    assert "my-accelerator" in out and "gizmo 3000, firmware 1.2" in out


def test_backends(capsys):
    rc, out, _ = run(capsys, "backends")
    assert rc == 0
    header, _, *rows = out.splitlines()
    assert header.split() == ["backend", "provider", "priority", "ops:", "modes", "status"]
    ref = next(r for r in rows if r.startswith("reference "))
    assert "rwkv_zoo.backends.reference" in ref
    assert "wkv4,wkv5,wkv6,wkv7: recurrent+chunk" in ref
    assert ref.endswith("available")


def test_backends_show_unavailable_reason(capsys):
    with rwkv_zoo.plugin(Plugin(backend=cuda_only_backend("sleepy", available=False)), name="sleepy-test"):
        rc, out, _ = run(capsys, "backends")
    assert rc == 0
    row = next(r for r in out.splitlines() if r.startswith("sleepy "))
    assert "sleepy-test" in row
    assert "unavailable: needs the moon to be full" in row
    # sorted by priority: the priority-5 test backend comes before reference (0)
    assert out.index("sleepy ") < out.index("reference ")


def test_plugins(capsys):
    rc, out, _ = run(capsys, "plugins")
    assert rc == 0
    for name in ("rwkv_zoo.versions.v4", "rwkv_zoo.versions.v7", "rwkv_zoo.backends.reference"):
        row = next(r for r in out.splitlines() if r.startswith(name + " "))
        assert "builtin" in row and row.endswith("ok")
    assert "register_backends, update_env_info" in out


def test_plugins_show_errors(capsys):
    with rwkv_zoo.plugin(Plugin(fail=True), name="broken-test"):
        rc, out, _ = run(capsys, "plugins")
    assert rc == 0
    row = next(r for r in out.splitlines() if r.startswith("broken-test "))
    assert "runtime" in row
    assert "ERROR RuntimeError: boom: this plugin is broken" in row


# ---------------------------------------------------------------------------------------------------
# models


def test_models_lists_every_model(capsys):
    rc, out, _ = run(capsys, "models")
    assert rc == 0
    for name in rwkv_zoo.list_models():
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    row = next(r for r in out.splitlines() if r.startswith("v7-1.5B "))
    assert row.split()[1:8] == ["24", "2048", "65536", "64", "1.528B", "1.528B", "world-1.5B,"]
    v4 = next(r for r in out.splitlines() if r.startswith("v4-tiny "))
    assert v4.split()[4] == "-"  # v4 has no heads


def test_models_pattern_and_released(capsys):
    rc, out, _ = run(capsys, "models", "v6-*", "--released")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines()[2:] if line.startswith("v")]
    assert names == rwkv_zoo.list_models("v6-*", released_only=True)
    assert "v6-tiny" not in names and "v6-1.5B" in names
    assert not any(n.startswith("v7") for n in names)


def test_models_no_match(capsys):
    rc, _, err = run(capsys, "models", "v99-*")
    assert rc == 1
    assert "no models" in err


# ---------------------------------------------------------------------------------------------------
# explain


def test_explain_default(capsys):
    rc, out, err = run(capsys, "explain", "v6-1.5B")
    assert rc == 0, err
    assert out.startswith("v6-1.5B: input [B=1, T=1024]")
    assert "layers 0-23 (24):" in out
    assert "wkv6 [chunk] cpu float32 B=1 T=1024 H=32 N=64" in out
    assert f"-> {CPU_DEFAULT}" in out


def test_explain_options(capsys):
    rc, out, err = run(capsys, "explain", "v7-tiny", "--T", "8", "--batch", "3", "--dtype", "bfloat16",
                       "--device", "cuda", "--train", "--state")
    assert rc == 0, err
    assert "wkv7 [recurrent] cuda bfloat16 B=3 T=8 H=4 N=16, grad, with state" in out
    assert "T=8 <= 16" in out


def test_explain_forced_backend(capsys):
    rc, out, _ = run(capsys, "explain", "v5-tiny", "--backend", "reference")
    assert rc == 0
    assert "-> reference (backend= argument: chosen explicitly)" in out


def test_explain_picks_higher_priority_backend(capsys):
    with rwkv_zoo.plugin(Plugin(backend=cuda_only_backend()), name="cuda-test"):
        rc, out, _ = run(capsys, "explain", "v6-tiny", "--device", "cuda")
        assert rc == 0
        assert "-> cudaonly (priority" in out
        rc, out, _ = run(capsys, "explain", "v6-tiny")  # on the CPU it cannot
        assert rc == 0
        assert f"-> {CPU_DEFAULT}" in out and "not cudaonly: runs on cuda, not cpu" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "v9-tiny"], "unknown version 'v9-tiny'"),
        (["explain", "v6-huge"], "unknown size 'huge' for v6"),
        (["explain", "v6-tiny", "--backend", "nosuch"], "unknown backend 'nosuch'"),
        (["explain", "v6-tiny", "--T", "0"], "--T and --batch must be >= 1"),
    ],
)
def test_explain_errors_exit_2_without_traceback(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("rwkv-zoo explain: error: ")
    assert message in err
    assert "Traceback" not in err


def test_explain_backend_that_cannot_run_exits_2(capsys):
    with rwkv_zoo.plugin(Plugin(backend=cuda_only_backend()), name="cuda-test"):
        rc, out, err = run(capsys, "explain", "v6-tiny", "--backend", "cudaonly")
    assert rc == 2
    assert out == ""
    assert "backend 'cudaonly' (chosen by backend= argument) cannot run" in err
    assert "runs on cuda, not cpu" in err
    assert "Traceback" not in err


def test_explain_bad_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "v6-tiny", "--dtype", "int8"])
    assert exc.value.code == 2
    assert "unknown dtype 'int8'; dtypes: fp32/float32" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# demo


def test_demo_tiny(capsys):
    threads = torch.get_num_threads()
    rc, out, err = run(capsys, "demo", "--size", "tiny", "--T", "20", "--versions", "v4,v7", "--seed", "3")
    assert rc == 0, out + err
    assert torch.get_num_threads() == threads  # restored
    assert "v4-tiny: 2 layers x 64" in out and "v7-tiny: 2 layers x 64" in out
    assert "v5-tiny" not in out
    assert out.count("PASS  ") + out.count("PASS\n") == 4  # recurrent and split, per version
    assert f"{CPU_DEFAULT}/chunk" in out and f"{CPU_DEFAULT}/recurrent" in out
    assert "20 x [1, 1]" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS: v4, v7")


@pytest.mark.slow
def test_demo_default_settings(capsys):
    rc, out, err = run(capsys, "demo")
    assert rc == 0, out + err
    for v in ("v4", "v5", "v6", "v7"):
        assert f"{v}-small: 4 layers x 128" in out
    assert "FAIL" not in out


def test_demo_fail_exits_nonzero(capsys, monkeypatch):
    monkeypatch.setattr(cli_info, "DEMO_TOLERANCE", 0.0)
    rc, out, _ = run(capsys, "demo", "--size", "tiny", "--T", "8", "--versions", "v6")
    assert rc == 1
    assert "FAIL" in out
    assert out.rstrip().splitlines()[-1].startswith("FAIL: v6")


def test_demo_runs_every_registered_version_and_skips_those_without_the_size(capsys):
    """No version list in the CLI: a plugin's version is demoed, or skipped with a reason."""
    spec = rwkv_zoo.registry.get_version("v4")
    sizeless = dataclasses.replace(spec, name="v4nosize", sizes=[p for p in spec.sizes if p.name != "tiny"])

    class Versions:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_versions(self, register):
            register(sizeless)

    with rwkv_zoo.plugin(Versions()):
        rc, out, err = run(capsys, "demo", "--size", "tiny", "--T", "4")
        assert rc == 0, out + err
        assert "skipped v4nosize: it has no 'tiny' size preset" in out
        ran = [v for v in rwkv_zoo.list_versions() if v != "v4nosize"]
        assert out.rstrip().splitlines()[-1].startswith(f"PASS: {', '.join(ran)} (")
        for v in ran:
            assert f"{v}-tiny: " in out
        rc, out, err = run(capsys, "demo", "--size", "tiny", "--versions", "v4nosize")
        assert rc == 2 and "none of them has a 'tiny' size preset" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--versions", "v4,v9"], "unknown version(s) v9"),
        (["demo", "--T", "1"], "--T must be >= 2"),
        (["demo", "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_demo_usage_errors(capsys, argv, message):
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err


def test_rel_errors():
    b = torch.ones(1, 4, 3)
    a = b.clone()
    a[0, 2] += 0.3
    whole, worst = cli_info.rel_errors(a, b)
    assert whole == pytest.approx((3 * 0.09) ** 0.5 / 12**0.5)
    assert worst == pytest.approx((3 * 0.09) ** 0.5 / 3**0.5)


# ---------------------------------------------------------------------------------------------------
# python -m rwkv_zoo


@pytest.mark.integration
def test_python_m_rwkv_zoo_info():
    env = {**os.environ, "RWKV_ZOO_NO_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "rwkv_zoo", "info"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"rwkv_zoo           {rwkv_zoo.__version__}" in proc.stdout
    assert "reference backend" in proc.stdout
