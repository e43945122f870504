"""``--to hf`` for RWKV-5/6/7: v5/v6 in the RWKV org's remote-code layout (what llama.cpp's converter
reads for RWKV-6), v7 in the fla-hub layout (what fla and llama.cpp read); each folder read back by
rwkv_zoo's own readers gives identical logits, and carries the config fields those readers need."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import rwkv_zoo
from rwkv_zoo.checkpoint import CheckpointError
from rwkv_zoo.cli import main
from rwkv_zoo.tokenizers import WORLD_VOCAB_FILE


def tiny(version, seed=1):
    return rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=seed).eval()


def stored(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def assert_same_logits(a, b):
    toks = torch.randint(0, a.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(toks)[0], b(toks)[0])


@pytest.mark.parametrize("version", ["v5", "v6"])
def test_remote_code_layout_round_trip(tmp_path, version):
    model = tiny(version)
    rwkv_zoo.save(model, tmp_path / "hf", format="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    c = model.config
    assert cfg["architectures"] == [f"Rwkv{version[1]}ForCausalLM"] and cfg["model_type"] == f"rwkv{version[1]}"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["head_size"]) == (
        c.n_embd, c.n_layer, c.vocab_size, c.head_size)
    assert cfg["intermediate_size"] == c.dim_ffn and cfg["attention_hidden_size"] == c.n_embd
    assert cfg["layer_norm_epsilon"] == 1e-5 and cfg["rescale_every"] == 0
    keys = stored(tmp_path / "hf")
    sd = model.state_dict()
    assert torch.equal(keys["rwkv.blocks.0.pre_ln.weight"], sd["blocks.0.ln0.weight"])
    assert torch.equal(keys["rwkv.blocks.1.attention.time_decay"], sd["blocks.1.att.time_decay"])  # raw, as stored
    assert torch.equal(keys["rwkv.blocks.1.feed_forward.time_maa_k" if version == "v6" else
                           "rwkv.blocks.1.feed_forward.time_mix_key"],
                       sd["blocks.1.ffn.time_maa_k" if version == "v6" else "blocks.1.ffn.time_mix_k"])
    assert not (tmp_path / "hf" / WORLD_VOCAB_FILE).exists()  # a 256-token test model has no World vocabulary
    loaded = rwkv_zoo.load(tmp_path / "hf")
    assert loaded.checkpoint_format == "hf" and loaded.config == c
    assert_same_logits(loaded, model)


def test_v7_fla_hub_layout_round_trip(tmp_path, capsys):
    model = tiny("v7", seed=3)
    rwkv_zoo.save(model, tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "(hf, float32" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    c = model.config
    assert cfg["architectures"] == ["RWKV7ForCausalLM"] and cfg["model_type"] == "rwkv7"
    assert {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "head_dim", "num_heads", "intermediate_size",
                                "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim",
                                "vocab_size")} == {
        "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "head_dim": c.head_size,
        "num_heads": c.n_embd // c.head_size, "intermediate_size": c.dim_ffn, "decay_low_rank_dim": c.dim_w_lora,
        "a_low_rank_dim": c.dim_a_lora, "v_low_rank_dim": c.dim_v_lora, "gate_low_rank_dim": c.dim_g_lora,
        "vocab_size": c.vocab_size}
    assert cfg["norm_eps"] == 1e-5 and cfg["norm_first"] and cfg["hidden_act"] == "sqrelu" and not cfg["attn"]
    keys, sd = stored(tmp_path / "hf"), model.state_dict()
    # llama.cpp stacks the six (1, 1, C) mixes into its (6, 1, 1, C) tensor: they must keep that shape
    assert keys["model.layers.1.attn.x_a"].shape == (1, 1, c.n_embd)
    assert torch.equal(keys["model.layers.1.attn.w_lora.lora.0.weight"], sd["blocks.1.att.w1"].T)
    assert torch.equal(keys["model.layers.1.attn.a_lora.lora.2.bias"], sd["blocks.1.att.a0"].reshape(-1))
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in keys and "model.layers.1.attn.v_lora.lora.0.weight" in keys
    loaded = rwkv_zoo.load(tmp_path / "hf")
    assert loaded.checkpoint_format == "fla" and loaded.config == c
    assert_same_logits(loaded, model)
    # --to fla is the same writer; v6 in fla's layout is read only
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "fla"), "--to", "fla"]) == 0
    assert stored(tmp_path / "fla").keys() == keys.keys()
    with pytest.raises(CheckpointError, match="fla folders for RWKV-7 only"):
        rwkv_zoo.save(tiny("v6"), tmp_path / "v6fla", format="fla")


def test_world_model_folder_carries_the_vocabulary(tmp_path):
    model = rwkv_zoo.build("v7", n_layer=1, n_embd=32, head_size=16, vocab_size=65536)
    rwkv_zoo.save(model, tmp_path / "hf", format="hf")
    # llama.cpp's converter asserts this file next to the weights of a World model
    assert (tmp_path / "hf" / WORLD_VOCAB_FILE).read_text(encoding="utf-8").startswith("1 ")
