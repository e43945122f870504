"""State tuning (``--tune state``): only the initial WKV state trains, the weights stay bit-identical, and
the run's ``time_state.pth`` / exported file is what BlinkDL's ``rwkv`` package loads (logits equal ours,
fp32, <= 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _deps import require

import rwkv_zoo
from rwkv_zoo.cli import main as cli_main
from rwkv_zoo.train import TrainConfig, Trainer
from rwkv_zoo.train.tuning import get_mode, mode_names, register_mode

WORKER = Path(__file__).with_name("finetune_official_worker.py")
TOL = 1e-5
DIMS = {"n_layer": 2, "n_embd": 128, "head_size": 64, "vocab_size": 300}  # the package's head size is 64
TASK = {"task": "mqar", "num_pairs": 2, "num_keys": 8, "num_values": 8}


def _base(version: str, tmp: Path) -> Path:
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, **DIMS), seed=1)
    path = tmp / f"{version}-base.pth"
    rwkv_zoo.save(model, path)
    return path


def _state_tune(init: Path, out: Path, steps: int = 3) -> Trainer:
    cfg = TrainConfig(init_from=str(init), tune="state", data=TASK, steps=steps, batch_size=2, lr=0.05,
                      warmup_steps=0, eval_batches=1, out_dir=str(out), progress=False)
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def tuned_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    runs = {}
    for version in ("v5", "v6", "v7"):
        base = _base(version, tmp)
        trainer = _state_tune(base, tmp / f"{version}-run")
        runs[version] = (base, tmp / f"{version}-run", trainer)
    return runs


@pytest.mark.parametrize("version", ["v5", "v6", "v7"])
def test_only_the_state_trains(version, tuned_runs):
    base, run, trainer = tuned_runs[version]
    # the weights in the final checkpoint are the starting file's, bit for bit
    start = torch.load(base, weights_only=True)
    tuned = rwkv_zoo.checkpoint.official_tensors(rwkv_zoo.load(run))
    assert set(tuned) == set(start)
    for k, v in start.items():
        assert torch.equal(tuned[k], v), k
    # only time_state was given to the optimizer, and it moved away from the zero start
    trained = [n for g in trainer.optimizer.param_groups for n in g["names"]]
    assert trained == [f"blocks.{i}.att.time_state" for i in range(DIMS["n_layer"])]
    ts = torch.load(run / "time_state.pth", weights_only=True)
    assert sorted(ts) == trained
    H, N = DIMS["n_embd"] // DIMS["head_size"], DIMS["head_size"]
    for t in ts.values():
        assert t.shape == (H, N, N) and t.dtype == torch.float32
        assert t.abs().max() > 0
    # the RWKVState file and the run folder give the same start, in our [B, H, K, V] layout
    model = rwkv_zoo.load(run)
    state = rwkv_zoo.RWKVState.load(run / "state.safetensors", model)
    for i, ls in enumerate(state.layers):
        assert torch.equal(ls.wkv[0], ts[f"blocks.{i}.att.time_state"].transpose(-1, -2))
        assert torch.equal(model.initial_state.layers[i].wkv, ls.wkv)
    # training used that start: the trainer's evaluation forward equals the loaded model's
    x = torch.randint(0, DIMS["vocab_size"], (2, 12))
    with torch.no_grad():
        trainer.module.eval()
        ours, _ = trainer._forward(x, None)
        theirs, _ = model(x)
        plain, _ = trainer.plain_model()(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain, theirs, rtol=0, atol=0)


def test_official_package_reads_the_tuned_state(tuned_runs, tmp_path):
    """``rwkv-zoo export RUN OUT.pth`` merges time_state into the official file; the package's logits
    (v5/v6 reading the keys themselves, v7 handed the state) equal ours."""
    require("rwkv")
    items = {}
    for version, (_, run, _) in tuned_runs.items():
        out = tmp_path / f"{version}-export.pth"
        assert cli_main(["export", str(run), str(out)]) == 0
        keys = set(torch.load(out, weights_only=True))
        assert {f"blocks.{i}.att.time_state" for i in range(DIMS["n_layer"])} <= keys
        items[version] = out
    env = {**os.environ, "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}
    proc = subprocess.run([sys.executable, str(WORKER), *(f"{v}={p}" for v, p in items.items())],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, version, payload = line.split(" ", 2)
            results[version] = json.loads(payload)
    assert sorted(results) == ["v5", "v6", "v7"]
    for version, r in results.items():
        worst = max(r["prompt"], r["prompt_modules"], r["prompt_train"], *r["decode"])
        assert worst <= TOL, (version, r)


def test_state_tuning_refuses_v4(tmp_path):
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v4", n_layer=1, n_embd=32, vocab_size=64), seed=0)
    rwkv_zoo.save(model, tmp_path / "v4.pth")
    with pytest.raises(ValueError, match="state tuning needs a matrix state"):
        Trainer(TrainConfig(init_from=str(tmp_path / "v4.pth"), tune="state", data=TASK, steps=1,
                            progress=False))


def test_modes_come_from_the_registry():
    assert {"full", "state"} <= set(mode_names())
    assert get_mode("state").name == "state"
    with pytest.raises(ValueError, match="unknown tuning mode 'nope'"):
        get_mode("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_mode(get_mode("full"))
    with pytest.raises(ValueError, match="tune='nope'"):
        TrainConfig(tune="nope").validate()
