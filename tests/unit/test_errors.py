"""Every command survives a user's mistakes: one line naming the problem, the right exit status, and
dtype/device names read the same way by build, load, explain and the command line."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import errors
from rwkv_zoo.cli import _helpers, main, make_parser
from rwkv_zoo.errors import (
    BackendError,
    CheckpointError,
    RWKVZooError,
    StateMismatchError,
    UnknownNameError,
    UsageError,
    parse_device,
    parse_dtype,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    return rwkv_zoo.build("v7-tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """One of each bad file a user meets, next to a good checkpoint of each format."""
    d = tmp_path_factory.mktemp("files")
    (d / "text.pth").write_text("hello world\nthese are notes, not weights\n")
    (d / "one.pth").write_bytes(b"x")
    (d / "empty.pth").write_bytes(b"")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "folder").mkdir()
    rwkv_zoo.save(tiny, d / "good.pth")
    rwkv_zoo.save(tiny, d / "good.safetensors")
    for name in ("good.pth", "good.safetensors"):
        data = (d / name).read_bytes()
        (d / f"cut_{name}").write_bytes(data[: len(data) // 2])
    torch.save(tiny, d / "module.pth")  # a whole nn.Module: objects, not a state dict
    return d


def one_line_error(capsys, argv, status: int) -> str:
    """Run the CLI; assert the exit status and a single stderr line with no traceback; return that line."""
    rc = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == status, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"rwkv-zoo {argv[0]}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# the error family


def test_every_user_error_is_one_family_and_keeps_its_builtin_base():
    for cls in (CheckpointError, StateMismatchError, UnknownNameError, errors.ConfigError):
        assert issubclass(cls, RWKVZooError) and issubclass(cls, ValueError)
    assert issubclass(BackendError, RWKVZooError) and issubclass(BackendError, RuntimeError)
    assert issubclass(UsageError, RWKVZooError) and UsageError.exit_code == 2 and RWKVZooError.exit_code == 1
    # The names the rest of the library always exported are the same classes.
    assert rwkv_zoo.CheckpointError is CheckpointError and rwkv_zoo.StateMismatchError is StateMismatchError
    assert rwkv_zoo.BackendError is BackendError and _helpers.UsageError is UsageError


# ---------------------------------------------------------------------------------------------------
# dtype and device names (Python API)


@pytest.mark.parametrize(("name", "dtype"), [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("BF16", torch.bfloat16),
    ("fp32", torch.float32), ("float32", torch.float32), ("float", torch.float32),
    ("fp16", torch.float16), ("half", torch.float16), ("float16", torch.float16),
    ("fp64", torch.float64), ("double", torch.float64),
    (torch.bfloat16, torch.bfloat16), (None, None),
])
def test_parse_dtype_names(name, dtype):
    assert parse_dtype(name) is dtype


@pytest.mark.parametrize("bad", ["bf61", "int8", "", torch.int64, 16])
def test_parse_dtype_refuses_with_the_list(bad):
    with pytest.raises(UnknownNameError, match=r"dtype.*dtypes: fp32/float32.*bf16/bfloat16.*half"):
        parse_dtype(bad)


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "meta", "mps", torch.device("cpu")])
def test_parse_device_names(name):
    assert parse_device(name) == torch.device(name)


def test_parse_device_refuses_with_the_list():
    with pytest.raises(UnknownNameError, match=r"unknown device 'tpu'; devices: cpu, cuda, cuda:N, mps"):
        parse_device("tpu")


def test_build_load_explain_take_the_same_names(tmp_path, tiny):
    assert rwkv_zoo.build("v7-tiny", dtype="bf16", device="meta").dtype == torch.bfloat16
    assert rwkv_zoo.build("v7-tiny", dtype="torch.float16", device=torch.device("meta")).dtype == torch.float16
    rwkv_zoo.save(tiny, tmp_path / "m.safetensors")
    assert rwkv_zoo.load(tmp_path / "m.safetensors", dtype="fp32").dtype == torch.float32
    assert rwkv_zoo.load(tmp_path / "m.safetensors", dtype="bfloat16", device="cpu").dtype == torch.bfloat16
    plan = rwkv_zoo.build("v7-tiny", device="meta")
    ex = rwkv_zoo.explain(plan, (1, 4), dtype="bf16", device="cuda:1")
    assert all(sel.call.dtype == torch.bfloat16 and sel.call.device == "cuda" for _, sel in ex.selections)
    for call in (lambda: rwkv_zoo.build("v7-tiny", dtype="bf61"), lambda: rwkv_zoo.build("v7-tiny", device="tpu"),
                 lambda: rwkv_zoo.load(tmp_path / "m.safetensors", dtype="int8"),
                 lambda: rwkv_zoo.explain(plan, (1, 4), device="tpu")):
        with pytest.raises(UnknownNameError):
            call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_building():
    with pytest.raises(UnknownNameError, match=r"device 'cuda' cannot be used: .*use device='cpu'"):
        rwkv_zoo.build("v7-tiny", device="cuda")


def test_every_cli_dtype_and_device_flag_uses_the_shared_parser():
    seen = 0
    for sub in make_parser()._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if "--dtype" in action.option_strings:
                assert action.type is _helpers.dtype_arg and action.choices is None, sub.prog
                seen += 1
            if "--device" in action.option_strings:
                assert action.type is _helpers.device_arg and action.choices is None, sub.prog
    assert seen >= 4  # convert, generate/chat/eval, lm-eval, explain


def test_explain_cli_takes_every_dtype_name_and_refuses_unknown_devices(capsys):
    for name in ("bf16", "bfloat16", "torch.bfloat16"):
        assert main(["explain", "v7-tiny", "--T", "4", "--dtype", name]) == 0
        assert "bfloat16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["explain", "v7-tiny", "--device", "tpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage: rwkv-zoo explain" in err and "unknown device 'tpu'" in err


def test_a_wrong_subcommand_flag_prints_that_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "x.pth", "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage: rwkv-zoo inspect" in err and "unrecognized arguments: --bogus" in err


# ---------------------------------------------------------------------------------------------------
# bad files


@pytest.mark.parametrize(("name", "says"), [
    ("text.pth", r"text\.pth: not a PyTorch checkpoint: a text file starting with 'hello world'"),
    ("one.pth", r"one\.pth: not a PyTorch checkpoint: a text file starting with 'x'"),
    ("empty.pth", r"empty\.pth: not a PyTorch checkpoint: an empty file \(0 bytes\)"),
    ("empty.safetensors", r"empty\.safetensors: not a safetensors file \(an empty file"),
    ("cut_good.pth", r"cut_good\.pth: truncated checkpoint .*download or save it again"),
    ("cut_good.safetensors", r"cut_good\.safetensors: truncated safetensors file \(.* bytes, its header promises"),
    ("folder", r"folder is a folder that no checkpoint format recognises"),
    ("missing.pth", r"no such file or directory: .*missing\.pth"),
    ("module.pth", r"module\.pth: refused to unpickle it: it holds Python objects other than tensors, .*"
                   r"torch\.save\(model\.state_dict\(\), path\)"),
])
def test_inspect_of_a_bad_file_is_one_line_and_exits_1(capsys, files, name, says):
    line = one_line_error(capsys, ["inspect", files / name], 1)
    assert re.search(says, line), line
    assert "weights_only" not in line  # never torch's advice to turn the safe loader off


def test_load_of_a_bad_file_raises_checkpoint_error(files):
    for name in ("text.pth", "one.pth", "empty.pth", "cut_good.pth", "cut_good.safetensors", "folder"):
        with pytest.raises(CheckpointError, match=re.escape(str(files / name))):
            rwkv_zoo.load(files / name)


def test_save_names_the_missing_folder_not_a_temporary_file(tmp_path, tiny, files, capsys):
    with pytest.raises(CheckpointError, match=r"cannot save to .*nodir/x\.pth: the folder .*nodir does not exist"):
        rwkv_zoo.save(tiny, tmp_path / "nodir" / "x.pth")
    with pytest.raises(CheckpointError, match=r"it is a folder"):
        rwkv_zoo.save(tiny, files / "folder")
    line = one_line_error(capsys, ["convert", files / "good.pth", tmp_path / "nodir" / "x.safetensors"], 1)
    assert "nodir does not exist; create it first" in line and ".tmp" not in line


# ---------------------------------------------------------------------------------------------------
# how main() reports


def test_debug_shows_the_traceback(capsys, files, monkeypatch):
    assert main(["--debug", "inspect", str(files / "text.pth")]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["inspect", str(files / "text.pth"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("RWKV_ZOO_DEBUG", "1")
    assert main(["inspect", str(files / "text.pth")]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more(capsys, monkeypatch):
    from rwkv_zoo.cli import info

    def broken():
        raise KeyError("boom")

    monkeypatch.setattr(info, "env_info", broken)
    line = one_line_error(capsys, ["info"], 1)
    assert "KeyError: 'boom'" in line and "--debug" in line


def test_os_errors_name_the_path(capsys, monkeypatch, tmp_path):
    from rwkv_zoo.cli import info

    def denied():
        raise PermissionError(13, "Permission denied", str(tmp_path / "secret"))

    monkeypatch.setattr(info, "env_info", denied)
    assert one_line_error(capsys, ["info"], 1).endswith(f"{tmp_path / 'secret'}: Permission denied")


def test_a_usage_error_exits_2(capsys):
    line = one_line_error(capsys, ["explain", "v9-tiny"], 2)
    assert "unknown version 'v9-tiny'; versions: " in line


def test_the_real_process_prints_one_line(files):
    env = {**os.environ, "RWKV_ZOO_NO_AUTOLOAD": "1"}
    env.pop("RWKV_ZOO_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "rwkv_zoo", "inspect", str(files / "text.pth")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "not a PyTorch checkpoint" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# docs say what the code does


def _readme_backends() -> dict[str, set[int]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- backends-table -->")[1].split("<!-- /backends-table -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = {int(n) for n in re.findall(r"-?\d+", cells[1])}
    return rows


def test_readme_backend_table_matches_the_backends_command(capsys):
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rule = lines[0], lines[1]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[a:b].strip() for a, b in spans]
    shown = {}
    for line in lines[2:]:
        row = dict(zip(names, (line[a:b].strip() for a, b in spans), strict=True))
        if row["provider"].startswith("rwkv_zoo.backends."):  # ours; an installed third party's is not documented
            shown[row["backend"]] = int(row["priority"])
    readme = _readme_backends()
    assert set(readme) == set(shown)
    for name, priority in shown.items():
        assert priority in readme[name], f"README gives {name} priority {readme[name]}, `rwkv-zoo backends` {priority}"


def test_docs_cite_nothing_outside_the_repository():
    outside = re.compile(r"PERF\.md|SPEC\.md|SPEC §|DESIGN\.md|\.\./shared|/work/shared")
    paths = [ROOT / "README.md", ROOT / "PLUGINS.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md")),
             *sorted(p for p in (ROOT / "examples").rglob("*") if p.suffix in (".md", ".py"))]
    for path in paths:
        text = path.read_text()
        assert not outside.search(text), f"{path.relative_to(ROOT)} cites {outside.search(text).group()}"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links must resolve
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def test_dtype_arg_reports_through_argparse():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dtype 'bf61'"):
        _helpers.dtype_arg("bf61")
    assert pickle.loads(pickle.dumps(CheckpointError("x"))).args == ("x",)
