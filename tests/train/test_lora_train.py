"""rwkv-zoo train --init-from FILE --tune lora: base frozen, checkpoints with the merged model and the adapter
in peft's format, run folder loads as the tuned model, resume = uninterrupted, rwkv-zoo merge agrees."""

from __future__ import annotations

import json

import torch

import rwkv_zoo
from rwkv_zoo.cli import main
from rwkv_zoo.train import TrainConfig, Trainer
from tests._deps import require

require("peft")

TASK = '{task = "copying", length = 4, num_symbols = 8}'


def _train(tmp_path, out: str, steps: int, *extra: str) -> int:
    return main(["train", "--init-from", str(tmp_path / "base.pth"), "--tune", "lora", "--lora-r", "4",
                 "--lora-targets", "att.key,att.value,ffn.key", "--lora-mixes", "--steps", str(steps),
                 "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1", "--out-dir", str(tmp_path / out),
                 "--save-every", "2", "--quiet", "--set", f"data={TASK}", "--set", "eval_batches=1", *extra])


def test_tune_lora_end_to_end(tmp_path, capsys):
    base = rwkv_zoo.randomize_(rwkv_zoo.build("v6-tiny", init=False), 0)
    rwkv_zoo.save(base, tmp_path / "base.pth")
    assert _train(tmp_path, "run", 4) == 0, capsys.readouterr().err

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000004"
    adapter = ckpt / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert set(cfg["target_modules"]) == {"att.key", "att.value", "ffn.key"}
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "rwkv_zoo_params.safetensors").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    # The run folder is the tuned (merged) model; merging the adapter into the base gives the same weights.
    tuned = rwkv_zoo.load(run)
    assert main(["merge", str(tmp_path / "base.pth"), str(adapter), str(tmp_path / "merged.pth")]) == 0
    merged = rwkv_zoo.load(tmp_path / "merged.pth")
    x = torch.randint(0, 16, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = tuned(x)[0], merged(x)[0], base.eval()(x)[0]
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c).abs().max().item() > 1e-3  # it learned something
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    untouched = [k for k in base_sd if k.endswith(("att.receptance.weight", "att.output.weight", "head.weight"))]
    assert untouched and all(torch.equal(tuned_sd[k], base_sd[k]) for k in untouched)  # frozen, not targeted
    assert not torch.equal(tuned_sd["blocks.0.att.time_maa_k"], base_sd["blocks.0.att.time_maa_k"])  # --lora-mixes

    # Stopped after 2 of the 4 steps, then resumed (the adapter read back from adapter/): the same model.
    def config(**kw) -> TrainConfig:
        return TrainConfig.from_dict(dict(
            init_from=str(tmp_path / "base.pth"), tune="lora", lora_r=4, lora_targets="att.key,att.value,ffn.key",
            lora_mixes=True, steps=4, batch_size=2, lr=1e-2, warmup_steps=1, out_dir=str(tmp_path / "split"),
            save_every=2, progress=False, eval_batches=1, data={"task": "copying", "length": 4, "num_symbols": 8},
            **kw))

    Trainer(config()).fit(steps=2)
    Trainer(config(resume=True)).fit()
    resumed = rwkv_zoo.load(tmp_path / "split")
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)

    assert main(["train", "--init-from", str(tmp_path / "base.pth"), "--tune", "lora", "--lora-targets",
                 "att.nope", "--steps", "1", "--quiet"]) == 2
    assert "att.nope" in capsys.readouterr().err
