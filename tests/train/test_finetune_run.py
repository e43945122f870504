"""Train, then use: a run folder, a checkpoint folder and a checkpoint's model.safetensors load as models
(``rwkv_zoo.load`` and every CLI command taking MODEL); ``rwkv-zoo export`` writes the official layout;
``--init-from`` starts from any format; checkpoint files get the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.checkpoint import official_tensors
from rwkv_zoo.cli import main as cli_main
from rwkv_zoo.errors import CheckpointError
from rwkv_zoo.train import TrainConfig, Trainer

TASK = {"task": "mqar", "num_pairs": 2, "num_keys": 8, "num_values": 8}


def _cfg(**kw) -> TrainConfig:
    base = {"model": "v6-tiny", "data": TASK, "steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_batches": 1,
            "progress": False}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    before = os.umask(0o027)  # an unusual umask, so the check cannot pass by accident of the default
    try:
        trainer = Trainer(_cfg(out_dir=str(out)))
        result = trainer.fit()
    finally:
        os.umask(before)
    return out, trainer, result


def test_run_folder_checkpoint_folder_and_file_load_as_the_trained_model(run):
    out, trainer, result = run
    step = out / "checkpoints" / "step-00000002"
    assert result.checkpoint == str(step)
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        trainer.module.eval()
        want, _ = trainer.module(x)
        for path in (out, step, step / "model.safetensors"):
            got, _ = rwkv_zoo.load(path)(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_checkpoint_files_get_the_umask_permissions(run):
    out = run[0]
    files = [p for p in (out / "checkpoints").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "trainer.pt", "latest"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p  # 0666 less umask 027


def test_cli_commands_take_a_run(run, tmp_path, capsys):
    out = run[0]
    step_file = out / "checkpoints" / "step-00000002" / "model.safetensors"
    assert cli_main(["generate", str(step_file), "--prompt", "ab", "--max-new-tokens", "3", "--temperature", "0",
                     "--tokenizer", "bytes"]) == 0
    assert cli_main(["inspect", str(out)]) == 0
    assert "v6" in capsys.readouterr().out
    # export: the official layout (the official key set, .pth), loadable, same weights
    assert cli_main(["export", str(out), str(tmp_path / "out.pth")]) == 0
    sd = torch.load(tmp_path / "out.pth", weights_only=True)
    trained = official_tensors(rwkv_zoo.load(out))
    assert set(sd) == set(trained)
    assert all(torch.equal(sd[k], trained[k]) for k in sd)
    assert cli_main(["export", str(out), str(tmp_path / "out.bin")]) == 2  # neither .pth nor .safetensors


def test_an_unfinished_run_is_refused_with_its_reason(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="without a finished checkpoint"):
        rwkv_zoo.load(tmp_path)


@pytest.mark.parametrize("fmt", [".pth", ".safetensors", "run"])
def test_init_from_every_format(fmt, run, tmp_path):
    out, trainer, _ = run
    if fmt == "run":
        src = out
    else:
        src = tmp_path / f"m{fmt}"
        rwkv_zoo.save(rwkv_zoo.load(out), src)
    t = Trainer(_cfg(init_from=str(src), model="v7-tiny", steps=1))  # init_from wins over model
    assert t.module.version == "v6"
    start = official_tensors(t.module)
    want = official_tensors(trainer.module)
    assert all(torch.equal(start[k], want[k]) for k in want)
    t.fit()  # full tuning: the weights move
    assert any(not torch.equal(official_tensors(t.module)[k], want[k]) for k in want)


def test_full_tuning_refuses_a_state_tuned_start(run, tmp_path):
    model = rwkv_zoo.load(run[0])
    model.initial_state = rwkv_zoo.RWKVState.zeros(model, 1)
    rwkv_zoo.save(model, tmp_path / "m.pth")
    path = tmp_path / "tuned.pth"
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    sd.update(model.initial_state.to_time_state())
    torch.save(sd, path)
    with pytest.raises(ValueError, match="use --tune state"):
        Trainer(_cfg(init_from=str(path)))


def test_train_help_gives_every_flag_a_sentence_and_its_default():
    import argparse

    from rwkv_zoo.cli import make_parser

    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
    assert {"--init-from", "--tune", "--sft"} <= {o for a in flags for o in a.option_strings}
    for action in flags:
        text = action.help or ""
        name = action.option_strings or [action.dest]
        assert "(default: " in text, name
        assert len(text.split("(default: ")[0].split()) >= 3, name  # a sentence, not a bare field name
    tune = next(a for a in flags if "--tune" in a.option_strings)
    assert set(tune.choices) >= {"full", "state"}
