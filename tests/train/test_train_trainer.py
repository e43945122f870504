"""Trainer: schedule, official groups, resume = uninterrupted, atomic checkpoints, bf16, data kinds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from binidx_writer import write_binidx

from rwkv_zoo.cli import main
from rwkv_zoo.data.synthetic import IGNORE
from rwkv_zoo.train import TrainConfig, Trainer, lr_at

TASK = {"task": "mqar", "num_pairs": 4, "num_keys": 8, "num_values": 8}


def cfg(**kw) -> TrainConfig:
    base = dict(model="v6-tiny", data=TASK, steps=6, batch_size=4, warmup_steps=2, progress=False, eval_batches=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_schedule_is_warmup_then_cosine_or_exponential():
    c = TrainConfig(lr=1e-3, lr_final=1e-5, warmup_steps=10, steps=110)
    assert lr_at(c, 0) == pytest.approx(1e-3 * 0.01)
    assert lr_at(c, 5) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(c, 10) == pytest.approx(1e-3)
    assert lr_at(c, 60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(c, 110) == pytest.approx(1e-5)
    c.schedule = "exponential"
    assert lr_at(c, 60) == pytest.approx(math.sqrt(1e-3 * 1e-5))
    c.schedule = "constant"
    assert lr_at(c, 100) == 1e-3
    with pytest.raises(ValueError, match="schedule='linear'"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(ValueError, match="unknown train option.*lrr"):
        TrainConfig.from_dict({"lrr": 1})


def test_optimizer_uses_the_official_groups_and_lr_multipliers():
    t = Trainer(cfg(lr=1e-3, warmup_steps=0, weight_decay=0.1))
    t.train_step()
    by_name = {n: g for g in t.optimizer.param_groups for n in g["names"]}
    assert by_name["blocks.0.att.time_decay"]["lr"] == pytest.approx(2e-3)  # v6: time_decay 2x
    assert by_name["blocks.0.att.time_decay_w1"]["lr"] == pytest.approx(1e-3)
    assert by_name["blocks.0.att.key.weight"]["weight_decay"] == 0.1
    assert by_name["blocks.0.att.time_faaaa"]["weight_decay"] == 0.0
    v7 = Trainer(cfg(model="v7-tiny"))
    names = {n for g in v7.optimizer.param_groups for n in g["names"]}
    assert "blocks.0.att.v0" not in names and "blocks.1.att.v0" in names  # unused in layer 0: frozen


def test_direct_fused_adamw_step_equals_optimizer_step_bit_for_bit():
    """The trainer's direct ``_fused_adamw_`` call (after the first step) gives what ``AdamW.step()``
    gives: v4's groups (1x, 2x, 3x rates, and the matrices with weight decay)."""
    runs = []
    for direct in (True, False):
        t = Trainer(cfg(model="v4-tiny", lr=3e-3, warmup_steps=0, weight_decay=0.1, steps=5))
        assert t._direct_adamw and len(t.optimizer.param_groups) == 4  # + the decayed matrices
        t._direct_adamw = direct
        calls = []
        step = t.optimizer.step
        t.optimizer.step = lambda *a, _s=step, _c=calls, **k: (_c.append(1), _s(*a, **k))[1]
        hooked = []  # Optimizer.step's hooks run on the direct path too (rwkv_zoo.fused counts steps in one)
        t.optimizer.register_step_post_hook(lambda opt, args, kwargs, _h=hooked: _h.append(1))
        t.fit()
        assert len(calls) == (1 if direct else 5)  # the first step creates the state
        assert len(hooked) == 5
        runs.append(t)
    fast, slow = runs
    assert [h["loss"] for h in fast.history] == [h["loss"] for h in slow.history]
    for (name, a), b in zip(fast.module.named_parameters(), slow.module.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert a.grad is None
        if name in fast.optimizer.state:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(fast.optimizer.state[a][key], slow.optimizer.state[b][key]), (name, key)


def test_resume_continues_the_same_loss_curve(tmp_path):
    uninterrupted = Trainer(cfg(steps=7, model="v7-tiny"))
    full = uninterrupted.fit()
    first = Trainer(cfg(steps=7, model="v7-tiny", out_dir=str(tmp_path), save_every=3))
    first.fit(steps=4)  # checkpoints after steps 3 and 4
    resumed = Trainer(cfg(steps=7, model="v7-tiny", out_dir=str(tmp_path), resume=True))
    assert resumed.step == 4
    rest = resumed.fit()
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in full.history]
    assert [h["lr"] for h in rest.history] == [h["lr"] for h in full.history]
    assert rest.final == full.final
    for name, value in uninterrupted.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


def test_checkpoints_are_atomic_folders_readable_with_weights_only(tmp_path):
    t = Trainer(cfg(out_dir=str(tmp_path), save_every=2, keep_checkpoints=2))
    t.fit()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    state = torch.load(ckpts / "step-00000006" / "trainer.pt", weights_only=True)
    assert state["step"] == 6 and len(state["history"]) == 6
    from safetensors import safe_open

    with safe_open(str(ckpts / "step-00000006" / "model.safetensors"), "pt") as f:
        assert f.metadata()["version"] == "v6"
        assert "blocks.1.att.time_decay" in f.keys()  # noqa: SIM118
    assert not list(ckpts.glob(".tmp-*"))


def test_eval_reports_accuracy_per_number_of_pairs():
    # Trained long enough that some answers are right: a miscount of a zero accuracy would go unseen.
    t = Trainer(cfg(data={**TASK, "num_pairs": [2, 4]}, steps=20, lr=3e-3, eval_batches=4))
    result = t.fit()
    assert set(result.final) == {"loss", "acc", "acc@pairs=2", "acc@pairs=4"}
    # Recounted here from the eval batches: the share of answer positions (targets not IGNORE) whose
    # argmax is the target.
    t.module.eval()

    @torch.no_grad()
    def recount(task):
        correct = count = 0
        for i in range(t.config.eval_batches):
            inputs, targets = task.batch(t.config.seed, i, t.config.eval_batch_size or t.config.batch_size,
                                         split="eval")
            logits, _ = t.module(inputs)
            answers = targets != IGNORE
            correct += int(((logits.argmax(-1) == targets) & answers).sum())
            count += int(answers.sum())
        assert 0 < correct < count
        return correct / count

    assert result.final["acc"] == pytest.approx(recount(t.data), abs=1e-12)
    for label, variant in t.data.eval_variants().items():
        assert result.final[f"acc@{label}"] == pytest.approx(recount(variant), abs=1e-12), label


def test_bf16_autocast_and_checkpointing_and_infctx_train():
    variants = ({"bf16": True}, {"grad_checkpointing": True}, {"chunk_len": 5},
                {"chunk_len": 5, "truncated_bptt": True})
    for opts in variants:
        r = Trainer(cfg(model="v7-tiny", steps=2, **opts)).fit()
        assert all(math.isfinite(h["loss"]) for h in r.history), opts
    a = Trainer(cfg(steps=3)).fit()
    b = Trainer(cfg(steps=3, chunk_len=5)).fit()  # infctx: the same gradient, so the same curve
    assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-4)


def test_language_model_data_reports_bits_per_byte(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = Trainer(cfg(data={"text": str(text), "eval_fraction": 0.2}, ctx_len=16, steps=3)).fit()
    assert r.final["bpb"] == pytest.approx(r.final["loss"] / math.log(2))
    prefix = write_binidx(tmp_path / "corpus", [list(range(i, i + 50)) for i in range(0, 200, 7)])
    r = Trainer(cfg(data={"binidx": str(prefix), "vocab_size": 256}, ctx_len=16, steps=2, chunk_len=8)).fit()
    assert set(r.final) == {"loss"} and r.tokens == 2 * 4 * 16
    with pytest.raises(ValueError, match="vocabulary has 256"):
        Trainer(cfg(data={"binidx": str(prefix), "vocab_size": 1000}, ctx_len=16))


def test_train_command(tmp_path, capsys):
    conf = tmp_path / "run.toml"
    conf.write_text('[train]\nmodel = "v5-tiny"\nsteps = 2\nbatch_size = 4\ndata = {task = "copying", length = 6}\n')
    rc = main(["train", str(conf), "--quiet", "--out-dir", str(tmp_path / "out"), "--set", "eval_batches=1"])
    out = capsys.readouterr().out
    assert rc == 0 and "training v5-tiny" in out and "done:" in out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["tokens"] == 2 * 4 * 12 and result["config"]["data"]["task"] == "copying"
    assert (tmp_path / "out" / "checkpoints" / "latest").exists()
    rc = main(["train", "--set", "steps=-1", "--quiet"])
    assert rc == 2 and "steps must be >= 0" in capsys.readouterr().err
    rc = main(["train", "--model", "v9", "--quiet"])
    assert rc == 2 and "unknown version 'v9'" in capsys.readouterr().err
