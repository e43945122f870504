"""``rwkv-zoo convert`` and ``rwkv-zoo inspect``."""

from __future__ import annotations

import torch

import rwkv_zoo
from rwkv_zoo.cli import main


def test_convert_and_inspect(tmp_path, capsys):
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), seed=0).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors"), "--dtype", "bf16",
                 "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "-> " in out and "bfloat16" in out and "100.0%" in err
    loaded = rwkv_zoo.load(tmp_path / "m.safetensors")
    assert loaded.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k

    assert main(["inspect", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "safetensors; header only" in out and "v7" in out and "bfloat16" in out
    assert f"{model.num_parameters():,}" in out and "dim_g_lora" in out

    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    assert main(["inspect", str(tmp_path / "back.pth")]) == 0
    assert "official-pth; memory-mapped" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 1  # a failure while running, not a usage error
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["convert", str(tmp_path / "junk.pth"), str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert "truncated checkpoint" in err and "Traceback" not in err
