"""A user's mistakes with ``train`` are refused with one line naming the thing; kills at any point (in a
save too) and signals resume to the loss of an uninterrupted run."""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from rwkv_zoo.cli import main
from rwkv_zoo.train import TrainConfig, Trainer, lr_at
from rwkv_zoo.train import trainer as trainer_module
from rwkv_zoo.train.trainer import ResumeError, TrainingInterrupted

TASK = {"task": "mqar", "num_pairs": 2, "num_keys": 8, "num_values": 8}
BASE = dict(model="v6-tiny", data=TASK, steps=6, batch_size=2, warmup_steps=2, progress=False, eval_batches=1)


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **kw})


@pytest.fixture(scope="module")
def reference() -> dict:
    """The uninterrupted run every interrupted one must reproduce."""
    r = Trainer(cfg()).fit()
    return {"losses": [h["loss"] for h in r.history], "final": r.final}


def finish(out: str, **kw) -> dict:
    r = Trainer(cfg(out_dir=out, resume=True, **kw)).fit()
    return {"losses": [h["loss"] for h in r.history], "final": r.final}


def assert_same(got: dict, want: dict) -> None:
    assert got["losses"] == pytest.approx(want["losses"], abs=1e-6, rel=0)
    assert got["final"]["loss"] == pytest.approx(want["final"]["loss"], abs=1e-6, rel=0)


def one_line_naming(message: str, *names: str) -> None:
    assert "\n" not in message.strip(), message
    for n in names:
        assert n in message, (n, message)


# -- resume with other settings ------------------------------------------------------------------------
def test_resume_with_another_model_or_settings_lists_each_difference(tmp_path):
    out = str(tmp_path)
    Trainer(cfg(out_dir=out, steps=3)).fit()
    with pytest.raises(ResumeError) as e:
        Trainer(cfg(out_dir=out, steps=3, resume=True, model="v7-tiny"))
    one_line_naming(str(e.value), "another model", "version 'v6' -> 'v7'", "--overwrite")
    with pytest.raises(ResumeError) as e:
        Trainer(cfg(out_dir=out, steps=5, batch_size=4, seed=1, resume=True))
    one_line_naming(str(e.value), "steps 3 -> 5", "batch_size 2 -> 4", "seed 0 -> 1",
                    "--override steps,batch_size,seed")
    with pytest.raises(ResumeError, match="steps=2 is below the 3 steps"):
        Trainer(cfg(out_dir=out, steps=2, resume=True, override=["steps"]))
    # what does not change the computation may change
    assert Trainer(cfg(out_dir=out, steps=3, resume=True, eval_batches=2, keep_checkpoints=3)).step == 3


def test_override_steps_continues_the_schedule_from_where_it_was(tmp_path):
    """Resumed at step 4 of 8 with 12 steps: the rate at step 4 is the one the 8-step run had there (no
    jump, no second warmup), then it decays smoothly to lr_final at the new end."""
    out = str(tmp_path)
    eight = cfg(out_dir=out, steps=8, warmup_steps=2, lr=1e-3, lr_final=1e-4)
    Trainer(eight).fit(steps=4)
    t = Trainer(cfg(out_dir=out, steps=12, warmup_steps=2, lr=1e-3, lr_final=1e-4, resume=True, override="steps"))
    assert t.overridden == {"steps": (8, 12)} and t.lr_anchor == (4, pytest.approx(lr_at(eight, 4)))
    r = t.fit()
    lrs = [h["lr"] for h in r.history]
    assert lrs[:4] == [lr_at(eight, s) for s in range(4)]  # the first part kept its own schedule
    assert lrs[4] == pytest.approx(lr_at(eight, 4))  # continuous at the resume step
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))  # decreasing from step 3: no jump, no ramp
    # the cosine from the resume point: half-way through the remaining 8 steps it is the mean of both ends
    assert lrs[8] == pytest.approx(1e-4 + 0.5 * (lr_at(eight, 4) - 1e-4))
    assert lrs[-1] > 1e-4 and lrs[-1] == pytest.approx(1e-4 + 0.5 * (lr_at(eight, 4) - 1e-4)
                                                       * (1 + math.cos(math.pi * 7 / 8)))
    # a later resume without a change keeps the anchor (the checkpoint carries it)
    again = Trainer(cfg(out_dir=out, steps=12, warmup_steps=2, lr=1e-3, lr_final=1e-4, resume=True))
    assert again.lr_anchor == t.lr_anchor


# -- out_dir, checkpoints by default, stale temp folders -----------------------------------------------
def test_an_existing_run_is_not_reused_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    Trainer(cfg(out_dir=str(out), steps=4)).fit()
    with pytest.raises(ResumeError) as e:
        Trainer(cfg(out_dir=str(out), steps=2))
    one_line_naming(str(e.value), str(out), "--resume", "--overwrite")
    Trainer(cfg(out_dir=str(out), steps=2, overwrite=True)).fit()
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000001", "step-00000002"]
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ResumeError, match="not empty and holds no training run"):
        Trainer(cfg(out_dir=str(tmp_path / "mine"), overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").exists()
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        Trainer(cfg(out_dir=str(out), resume=True, overwrite=True))


def test_checkpoints_come_every_tenth_of_the_run_by_default():
    assert cfg(steps=400).checkpoint_interval() == 40
    assert cfg(steps=5).checkpoint_interval() == 1
    assert cfg(steps=10**6).checkpoint_interval() == 1000
    assert cfg(steps=400, save_every=0).checkpoint_interval() == 0


def test_a_kill_inside_a_save_resumes_exactly_and_is_cleaned_up(tmp_path, monkeypatch, reference):
    """A save raises at each of its file operations in turn (as a kill there would stop it); the
    next start removes the debris, finds the newest complete checkpoint and ends where the reference does."""
    real_save, real_replace = torch.save, os.replace
    points = [("torch.save", torch, "save", real_save), ("os.replace", os, "replace", real_replace)]
    for label, mod, attr, real in points:
        for nth in (1, 2, 3):
            out = str(tmp_path / f"{label}-{nth}")
            calls = []

            def failing(*a, _real=real, _nth=nth, _calls=calls, **k):
                _calls.append(1)
                if len(_calls) == _nth:
                    raise OSError("killed")
                return _real(*a, **k)

            monkeypatch.setattr(mod, attr, failing)
            with pytest.raises(OSError, match="killed"):
                Trainer(cfg(out_dir=out, save_every=1)).fit()
            monkeypatch.setattr(mod, attr, real)
            assert_same(finish(out), reference)
            ckpts = tmp_path / f"{label}-{nth}" / "checkpoints"
            assert not list(ckpts.glob(".tmp-*")) and not list(ckpts.glob(".latest-*"))
            assert (ckpts / "latest").read_text().strip() == "step-00000006"


def _fork_and_kill(out: str, delay: float | None, kill_in_save: bool = False) -> None:
    pid = os.fork()
    if pid == 0:  # the child trains until killed
        try:
            if kill_in_save:
                real = torch.save

                def save_then_die(obj, f, *a, **k):
                    real(obj, f, *a, **k)
                    if "trainer.pt" in str(f) and "00000003" in str(f):
                        os.kill(os.getpid(), signal.SIGKILL)

                torch.save = save_then_die
            Trainer(cfg(out_dir=out, save_every=1)).fit()
        finally:
            os._exit(0)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or delay is not None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_points_resumes_to_the_uninterrupted_loss(tmp_path, reference):
    # Forked rather than spawned: a new interpreter spends seconds importing torch before step 0.
    t0 = time.perf_counter()
    Trainer(cfg(out_dir=str(tmp_path / "timing"), save_every=1)).fit()
    run_s = time.perf_counter() - t0
    for seed in range(4):
        out = str(tmp_path / f"kill-{seed}")
        _fork_and_kill(out, random.Random(seed).uniform(0.1, 1.0) * run_s)
        assert_same(finish(out), reference)
    out = str(tmp_path / "kill-in-save")
    _fork_and_kill(out, None, kill_in_save=True)  # dies between the save's two files of step 3
    assert list((tmp_path / "kill-in-save" / "checkpoints").glob(".tmp-*"))
    assert_same(finish(out), reference)


def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, reference):
    out = str(tmp_path)
    t = Trainer(cfg(out_dir=out, save_every=0))
    real_step = t.train_step

    def step_then_signal():
        rec = real_step()
        if t.step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives mid-run; the step still finishes
        return rec

    t.train_step = step_then_signal
    with pytest.raises(TrainingInterrupted) as e:
        t.fit()
    assert e.value.step == 2 and e.value.checkpoint.endswith("step-00000002")
    one_line_naming(str(e.value), "SIGINT", "after step 2", "resume")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_same(finish(out), reference)


def test_a_second_signal_stops_at_once(tmp_path):
    t = Trainer(cfg(out_dir=str(tmp_path), save_every=0))
    real_step = t.train_step

    def step_then_two_signals():
        rec = real_step()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return rec

    t.train_step = step_then_two_signals
    with pytest.raises(KeyboardInterrupt) as e:
        t.fit()
    assert not isinstance(e.value, TrainingInterrupted)
    assert not (tmp_path / "checkpoints").exists()


def test_cli_sigterm_saves_and_exits_with_a_message(tmp_path, reference):
    out = str(tmp_path / "run")
    env = {**os.environ, "RWKV_ZOO_NO_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "rwkv_zoo", "train", "--model", "v6-tiny", "--set",
            "data={task='mqar', num_pairs=2, num_keys=8, num_values=8}", "--steps", "400", "--batch-size", "2",
            "--warmup-steps", "2", "--set", "eval_batches=1", "--threads", "1", "--out-dir", out, "--save-every", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().startswith("training v6-tiny")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("rwkv-zoo train: stopped by SIGTERM after step ") and "checkpoint" in line
    step = int(line.split("after step ")[1].split(":")[0])
    assert 0 < step < 400 and (tmp_path / "run" / "checkpoints" / f"step-{step:08d}").is_dir()


# -- flags ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--set", "lr=abc"], ["lr", "a number", "'abc'"]),
        (["--set", "betas=[0.9]"], ["betas", "2 numbers"]),
        (["--set", "l2wrap=3"], ["l2wrap", "true or false", "3"]),
        (["--task", "mqar", "--ctx-len", "16"], ["ctx_len=16", "'mqar'", "--ctx-len"]),
        (["--override", "steps"], ["override=steps", "--resume"]),
        (["--resume", "--override", "threads"], ["threads", "cannot be overridden"]),
    ],
)
def test_cli_flag_mistakes_are_one_line_usage_errors(argv, names, capsys):
    rc = main(["train", "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    one_line_naming(err, "rwkv-zoo train: error:", *names)


def test_cli_refuses_a_used_out_dir_and_changed_settings(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["train", "--quiet", "--model", "v6-tiny", "--set", "data={task='mqar', num_pairs=2}",
              "--batch-size", "2", "--set", "eval_batches=1", "--out-dir", out]
    assert main([*common, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--steps", "2"]) == 2
    one_line_naming(capsys.readouterr().err, out, "--resume", "--overwrite")
    assert main([*common, "--steps", "3", "--resume"]) == 2
    one_line_naming(capsys.readouterr().err, "steps 2 -> 3", "--override steps")
    assert main([*common, "--steps", "3", "--resume", "--override", "steps"]) == 0
    out_text = capsys.readouterr().out
    assert "note: steps 2 -> 3 (--override); the learning rate goes on from" in out_text
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    assert main(["train", str(bad)]) == 2
    one_line_naming(capsys.readouterr().err, "bad.toml", "not valid TOML")


def test_trainer_names_the_field_of_a_wrong_type():
    with pytest.raises(ValueError, match=r"^train option lr must be a number, got 'abc'$"):
        Trainer(cfg(lr="abc"))
    c = cfg(lr=1, betas=[0.9, 0.99])
    c.validate()
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.betas == (0.9, 0.99)
    assert trainer_module._checked("save_every", None, int | None) is None
