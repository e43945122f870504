"""torchrun on the CPU (gloo): DDP and FSDP2 give the losses of one process on the same global batch,
and checkpoints written under one resume under the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rwkv_zoo.train import TrainConfig, Trainer

ARGS = ["--model", "v7-tiny", "--task", "mqar", "--set", "data={task='mqar', num_pairs=4, num_keys=8, num_values=8}",
        "--steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--set", "eval_batches=1", "--quiet", "--json"]


def torchrun(*args: str) -> dict:
    env = {**os.environ, "RWKV_ZOO_NO_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "rwkv_zoo.train", *ARGS, "--threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # only rank 0 reports
    return json.loads(lines[0])


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_and_fsdp2_match_one_process_and_resume_each_others_checkpoints(tmp_path):
    # The same story in one process: 2 steps planned and done, then resumed to 4 (--override steps: the
    # learning rate goes on from where the 2-step schedule left it).
    def config(**kw):
        return TrainConfig(model="v7-tiny", data={"task": "mqar", "num_pairs": 4, "num_keys": 8, "num_values": 8},
                           batch_size=4, warmup_steps=1, eval_batches=1, progress=False,
                           out_dir=str(tmp_path / "single"), **kw)

    Trainer(config(steps=2)).fit()
    single = Trainer(config(steps=4, resume=True, override=["steps"])).fit()
    ref = [h["loss"] for h in single.history]

    out = str(tmp_path / "run")
    ddp = torchrun("--distributed", "ddp", "--steps", "2", "--out-dir", out)
    assert [h["loss"] for h in ddp["history"]] == pytest.approx(ref[:2], rel=1e-5)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors").exists()

    # continues the DDP run, planned for 2 steps, to 4
    fsdp = torchrun("--distributed", "fsdp", "--out-dir", out, "--resume", "--override", "steps")
    assert [h["loss"] for h in fsdp["history"]] == pytest.approx(ref, rel=1e-5)
    assert fsdp["final"]["loss"] == pytest.approx(single.final["loss"], rel=1e-4)

    # the FSDP2 checkpoint (gathered to full tensors) loads in a single process
    back = Trainer(TrainConfig(model="v7-tiny", data={"task": "mqar", "num_pairs": 4, "num_keys": 8, "num_values": 8},
                               steps=4, batch_size=4, warmup_steps=1, progress=False, out_dir=out, resume=True))
    assert back.step == 4 and len(back.history) == 4
