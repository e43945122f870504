"""flash-linear-attention RWKV-6/7 folders: written here from official weights by a forward mapping
of fla's documented names (independent of plugins/formats/fla.py), then loaded with rwkv_zoo.load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import rwkv_zoo
from rwkv_zoo.checkpoint import CheckpointError, get_formats


def tiny(version, seed=1):
    return rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=seed).eval()


def logits(model, toks):
    with torch.no_grad():
        return model(toks)[0]


def flat(t):
    return t.reshape(-1).clone()


def common_to_fla(sd, L):
    out = {"model.embeddings.weight": sd["emb.weight"], "lm_head.weight": sd["head.weight"],
           "model.norm.weight": sd["ln_out.weight"], "model.norm.bias": sd["ln_out.bias"]}
    for p in ("weight", "bias"):
        out[f"model.layers.0.pre_norm.{p}"] = sd[f"blocks.0.ln0.{p}"]
        for i in range(L):
            out[f"model.layers.{i}.attn_norm.{p}"] = sd[f"blocks.{i}.ln1.{p}"]
            out[f"model.layers.{i}.ffn_norm.{p}"] = sd[f"blocks.{i}.ln2.{p}"]
            out[f"model.layers.{i}.attn.g_norm.{p}"] = sd[f"blocks.{i}.att.ln_x.{p}"]
    return out


def v6_to_fla(sd, L, C):
    """As fla's utils/convert_from_rwkv6.py does it (remote-code v6 keys are the official ones)."""
    out = common_to_fla(sd, L)
    for i in range(L):
        a, f, o = f"model.layers.{i}.attn.", f"model.layers.{i}.ffn.", f"blocks.{i}."
        out[a + "x_proj.0.mu"] = flat(sd[o + "att.time_maa_x"])
        ww, wk, wv, wr, wg = sd[o + "att.time_maa_w1"].view(C, 5, -1).unbind(-2)
        out[a + "x_proj.0.linear.weight"] = torch.cat((wr, ww, wk, wv, wg), -1).t().contiguous()
        ww, wk, wv, wr, wg = sd[o + "att.time_maa_w2"].unbind(0)
        out[a + "x_proj.2.weight"] = torch.cat((wr, ww, wk, wv, wg), 0).t().contiguous()
        out[a + "x_bias"] = torch.stack([flat(sd[o + f"att.time_maa_{n}"]) for n in "rwkvg"])
        out[a + "r_proj.linear.weight"] = sd[o + "att.receptance.weight"]
        out[a + "k_proj.linear.weight"] = sd[o + "att.key.weight"]
        out[a + "v_proj.linear.weight"] = sd[o + "att.value.weight"]
        out[a + "g_proj.linear.weight"] = sd[o + "att.gate.weight"]
        out[a + "w_proj.linear.lora.0.weight"] = sd[o + "att.time_decay_w1"].t().contiguous()
        out[a + "w_proj.linear.lora.2.weight"] = sd[o + "att.time_decay_w2"].t().contiguous()
        out[a + "w_proj.linear.lora.2.bias"] = flat(sd[o + "att.time_decay"])
        out[a + "bonus"] = sd[o + "att.time_faaaa"]
        out[a + "o_proj.weight"] = sd[o + "att.output.weight"]
        out[f + "key.linear.weight"] = sd[o + "ffn.key.weight"]
        out[f + "key.mu"] = flat(sd[o + "ffn.time_maa_k"])
        out[f + "receptance.linear.weight"] = sd[o + "ffn.receptance.weight"]
        out[f + "receptance.mu"] = flat(sd[o + "ffn.time_maa_r"])
        out[f + "value.weight"] = sd[o + "ffn.value.weight"]
    return out


def v7_to_fla(sd, L, fused_mix=False):
    """As fla's utils/convert_from_rwkv7.py names things: x{r,w,k,v,a,g} (1,1,C), k_k/k_a/ffn.x_k (C),
    LoRA triplets n1 -> n_lora.lora.0.weight^T, n2 -> lora.2.weight^T, n0 -> lora.2.bias; no v_lora in
    layer 0. ``fused_mix``: the Feb-Apr 2025 fla layout, one (6, C) ``x_x``."""
    out = common_to_fla(sd, L)
    for i in range(L):
        a, f, o = f"model.layers.{i}.attn.", f"model.layers.{i}.ffn.", f"blocks.{i}."
        if fused_mix:
            out[a + "x_x"] = torch.stack([flat(sd[o + f"att.x_{n}"]) for n in "rwkvag"])
        else:
            for n in "rwkvag":
                out[a + f"x_{n}"] = sd[o + f"att.x_{n}"]
        out[a + "k_k"] = flat(sd[o + "att.k_k"])
        out[a + "k_a"] = flat(sd[o + "att.k_a"])
        out[a + "r_k"] = sd[o + "att.r_k"]
        for off, fla in (("receptance", "r"), ("key", "k"), ("value", "v"), ("output", "o")):
            out[a + f"{fla}_proj.weight"] = sd[o + f"att.{off}.weight"]
        for n in "wavg":
            if n == "v" and i == 0:
                continue
            out[a + f"{n}_lora.lora.0.weight"] = sd[o + f"att.{n}1"].t().contiguous()
            out[a + f"{n}_lora.lora.2.weight"] = sd[o + f"att.{n}2"].t().contiguous()
            if n != "g":
                out[a + f"{n}_lora.lora.2.bias"] = flat(sd[o + f"att.{n}0"])
        out[f + "x_k"] = flat(sd[o + "ffn.x_k"])
        out[f + "key.weight"] = sd[o + "ffn.key.weight"]
        out[f + "value.weight"] = sd[o + "ffn.value.weight"]
    return out


def write_fla_folder(model, folder, *, fused_mix=False, drop=(), config_extra=None):
    c, sd = model.config, model.state_dict()
    fla = v6_to_fla(sd, c.n_layer, c.n_embd) if model.version == "v6" else v7_to_fla(sd, c.n_layer, fused_mix)
    for k in drop:
        del fla[k]
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in fla.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    mt = "rwkv6" if model.version == "v6" else "rwkv7"
    cfg = {"model_type": mt, "architectures": [f"{mt.upper()}ForCausalLM"], "attn_mode": "chunk",
           "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "vocab_size": c.vocab_size,
           "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": 1e-5,
           "tie_word_embeddings": False, "attn": None, "fuse_norm": True}
    cfg.update(config_extra or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    return fla


def assert_loads_exactly(folder, model, toks):
    loaded = rwkv_zoo.load(folder)
    assert loaded.checkpoint_format == "fla" and loaded.version == model.version
    assert loaded.config == model.config
    got, unused = loaded.state_dict(), set(model.unused_parameters())
    for k, v in model.state_dict().items():
        if k in unused and k.startswith("blocks.0."):
            continue  # fla has no layer-0 v_lora: load() fills it, and nothing reads it
        assert torch.equal(got[k], v), k
    assert torch.equal(logits(loaded, toks), logits(model, toks))
    return loaded


@pytest.mark.parametrize("version", ["v6", "v7"])
def test_fla_folder_loads_exactly(tmp_path, version):
    model = tiny(version, seed=4)
    fla = write_fla_folder(model, tmp_path / "fla")
    if version == "v7":
        assert "model.layers.0.attn.v_lora.lora.0.weight" not in fla
        assert "model.layers.1.attn.v_lora.lora.2.bias" in fla
    assert_loads_exactly(tmp_path / "fla", model, torch.randint(0, 256, (2, 21)))
    shapes, meta = get_formats()["fla"].read_shapes(tmp_path / "fla")  # headers only, same converter
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if version == "v7":
        expected = {k: s for k, s in expected.items() if not k.startswith(("blocks.0.att.v0", "blocks.0.att.v1",
                                                                           "blocks.0.att.v2"))}
    assert {k: s for k, (s, _) in shapes.items()} == expected
    assert meta["fla_model_type"] == ("rwkv6" if version == "v6" else "rwkv7")


def test_fla_v7_older_layouts(tmp_path):
    """Feb-Apr 2025 fla: the six mixes fused in x_x (6, C); Jan 2025: k_k/k_a/x_k as (1, 1, C)."""
    model = tiny("v7", seed=6)
    toks = torch.randint(0, 256, (1, 12))
    write_fla_folder(model, tmp_path / "fused", fused_mix=True)
    assert_loads_exactly(tmp_path / "fused", model, toks)
    fla = write_fla_folder(model, tmp_path / "jan")
    for k in [k for k in fla if k.endswith(("attn.k_k", "attn.k_a", "ffn.x_k"))]:
        fla[k] = fla[k].reshape(1, 1, -1)
    save_file({k: v.contiguous() for k, v in fla.items()}, str(tmp_path / "jan" / "model.safetensors"))
    assert_loads_exactly(tmp_path / "jan", model, toks)


def test_fla_tied_head_and_biasless_norms(tmp_path):
    model = tiny("v7", seed=8)
    with torch.no_grad():
        model.head.weight.copy_(model.emb.weight)
        for name, p in model.named_parameters():
            if name.endswith(".bias") and (".ln" in name or name.startswith("ln_out")) and "ln_x" not in name:
                p.zero_()
    biases = [k for k in v7_to_fla(model.state_dict(), 2) if k.endswith("norm.bias") and "g_norm" not in k]
    write_fla_folder(model, tmp_path / "fla", drop=["lm_head.weight", *biases],
                     config_extra={"tie_word_embeddings": True, "norm_bias": False})
    assert_loads_exactly(tmp_path / "fla", model, torch.randint(0, 256, (1, 7)))


def test_fla_and_remote_code_rwkv6_are_told_apart(tmp_path):
    model = tiny("v6", seed=2)
    write_fla_folder(model, tmp_path / "fla")
    remote = {}  # the RWKV org's remote-code v6 layout: official names under rwkv.*, att/ffn spelt out
    for k, v in model.state_dict().items():
        k = k.replace("emb.", "embeddings.").replace("blocks.0.ln0.", "blocks.0.pre_ln.")
        k = k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        remote[k if k == "head.weight" else "rwkv." + k] = v.contiguous()
    (tmp_path / "remote").mkdir()
    save_file(remote, str(tmp_path / "remote" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "remote" / "config.json").write_text(json.dumps(
        {"model_type": "rwkv6", "architectures": ["Rwkv6ForCausalLM"], "head_size": 16, "hidden_size": 64}))
    assert rwkv_zoo.load(tmp_path / "fla").checkpoint_format == "fla"
    assert rwkv_zoo.load(tmp_path / "remote").checkpoint_format == "hf"


def test_fla_bad_folders_say_why(tmp_path):
    model = tiny("v7", seed=3)
    write_fla_folder(model, tmp_path / "hybrid", config_extra={"attn": {"layers": [1], "num_heads": 4}})
    with pytest.raises(CheckpointError, match="hybrid"):
        rwkv_zoo.load(tmp_path / "hybrid")
    write_fla_folder(model, tmp_path / "missing", drop=["model.layers.1.attn.k_a"])
    with pytest.raises(CheckpointError, match=r"missing fla key model\.layers\.1\.attn\.k_a"):
        rwkv_zoo.load(tmp_path / "missing")
    write_fla_folder(model, tmp_path / "nopre", drop=["model.layers.0.pre_norm.weight", "model.layers.0.pre_norm.bias"])
    with pytest.raises(CheckpointError, match="norm_first=False"):
        rwkv_zoo.load(tmp_path / "nopre")
    fla = write_fla_folder(model, tmp_path / "extra")
    fla["model.layers.0.attn.g_lora.lora.2.bias"] = torch.zeros(64)
    save_file({k: v.contiguous() for k, v in fla.items()}, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.0\.attn\.g_lora\.lora\.2\.bias"):
        rwkv_zoo.load(tmp_path / "extra")


# ---------------------------------------------------------------------------------------------------
# The test's forward mapping against fla's own arithmetic (fla/layers/rwkv6.py, rwkv7.py, written out
# here): the fla tensors compute what the official ones do, so the mapping above is the right one.


def test_v6_fla_mixing_arithmetic_matches_official():
    model = tiny("v6", seed=9)
    sd, C = model.state_dict(), model.config.n_embd
    fla = v6_to_fla(sd, 2, C)
    a, o = "model.layers.1.attn.", "blocks.1.att."
    g = torch.Generator().manual_seed(0)
    x, prev = torch.randn(3, 5, C, generator=g), torch.randn(3, 5, C, generator=g)
    delta = prev - x  # fla token_shift: shifted - x
    # fla: x_proj[0] = LerpLinear (mu, linear), x_proj[1] = tanh, x_proj[2].weight viewed (C, 5, D)
    h = (x + delta * fla[a + "x_proj.0.mu"]) @ fla[a + "x_proj.0.linear.weight"].t()
    D = fla[a + "x_proj.0.linear.weight"].shape[0] // 5
    mix = torch.einsum("btnr,hnr->btnh", torch.tanh(h.view(3, 5, 5, D)), fla[a + "x_proj.2.weight"].view(C, 5, D))
    r, w, k, v, gg = (mix + fla[a + "x_bias"]).unbind(-2)
    lora = fla[a + "w_proj.linear.lora.2.bias"] + torch.tanh(
        (x + delta * w) @ fla[a + "w_proj.linear.lora.0.weight"].t()) @ fla[a + "w_proj.linear.lora.2.weight"].t()
    fla_out = {"r": r, "w": w, "k": k, "v": v, "g": gg, "decay": -torch.exp(lora)}
    # official (SPEC §5.4): rows of the shared LoRA in the order w, k, v, r, g
    hh = torch.tanh((x + delta * sd[o + "time_maa_x"]) @ sd[o + "time_maa_w1"]).view(3, 5, 5, -1)
    for n, name in enumerate("wkvrg"):
        m = hh[:, :, n] @ sd[o + "time_maa_w2"][n]
        torch.testing.assert_close(fla_out[name], sd[o + f"time_maa_{name}"].view(-1) + m, rtol=1e-5, atol=1e-6)
    xw = x + delta * (sd[o + "time_maa_w"].view(-1) + hh[:, :, 0] @ sd[o + "time_maa_w2"][0])
    d = sd[o + "time_decay"].view(-1) + torch.tanh(xw @ sd[o + "time_decay_w1"]) @ sd[o + "time_decay_w2"]
    torch.testing.assert_close(fla_out["decay"].exp(), torch.exp(-torch.exp(d)), rtol=1e-5, atol=1e-6)


def test_v7_fla_lora_arithmetic_matches_official():
    model = tiny("v7", seed=10)
    sd = model.state_dict()
    fla = v7_to_fla(sd, 2)
    a, o = "model.layers.1.attn.", "blocks.1.att."
    xx = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))

    def lora(n, act):  # fla LoRA: Linear(lora.0) -> act -> Linear(lora.2, bias)
        y = act(xx @ fla[a + f"{n}_lora.lora.0.weight"].t()) @ fla[a + f"{n}_lora.lora.2.weight"].t()
        return y + fla.get(a + f"{n}_lora.lora.2.bias", 0)

    ident = lambda t: t  # noqa: E731
    # fla: w = -e^{-1/2} sigmoid(w_lora(x)); official: w0 + tanh(x w1) w2, then exp(-e^{-1/2} sigmoid(.))
    torch.testing.assert_close(-0.6065306597126334 * lora("w", torch.tanh).sigmoid(),
                               -0.6065306597126334 * torch.sigmoid(sd[o + "w0"].view(-1) + torch.tanh(
                                   xx @ sd[o + "w1"]) @ sd[o + "w2"]))
    torch.testing.assert_close(lora("a", ident).sigmoid(),
                               torch.sigmoid(sd[o + "a0"].view(-1) + (xx @ sd[o + "a1"]) @ sd[o + "a2"]))
    torch.testing.assert_close(lora("v", ident).sigmoid(),
                               torch.sigmoid(sd[o + "v0"].view(-1) + (xx @ sd[o + "v1"]) @ sd[o + "v2"]))
    torch.testing.assert_close(lora("g", torch.sigmoid), torch.sigmoid(xx @ sd[o + "g1"]) @ sd[o + "g2"])
