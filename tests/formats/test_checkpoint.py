"""rwkv_zoo.load / rwkv_zoo.save: detection, exact round trips, every kind of bad input, rescale."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from _deps import block_versions

import rwkv_zoo
from rwkv_zoo.checkpoint import CheckpointError, infer_model

VERSIONS = block_versions()  # every registered version, v7a and v8 included


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tiny(version, seed=1):
    return rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=seed).eval()


def logits(model, toks):
    with torch.no_grad():
        return model(toks)[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trips_are_exact(version, tmp_path):
    model = tiny(version)
    toks = torch.randint(0, 256, (1, 20))
    ref = logits(model, toks)
    torch.save(model.state_dict(), tmp_path / "official.pth")  # what a trainer writes
    a = rwkv_zoo.load(tmp_path / "official.pth")
    rwkv_zoo.save(a, tmp_path / "ours.safetensors")
    b = rwkv_zoo.load(tmp_path / "ours.safetensors")
    rwkv_zoo.save(b, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    assert (tmp_path / "back.pth").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert a.version == b.version == version
    assert a.config == b.config == model.config
    assert torch.equal(logits(a, toks), ref) and torch.equal(logits(b, toks), ref)


def test_lora_ranks_and_dims_come_from_shapes(tmp_path):
    model = rwkv_zoo.build("v7", n_layer=2, n_embd=128, vocab_size=77, head_size=32,
                           dim_w_lora=24, dim_a_lora=40, dim_v_lora=8, dim_g_lora=56, dim_ffn=320)
    version, kw = infer_model({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert version == "v7"
    assert kw == {"n_layer": 2, "n_embd": 128, "vocab_size": 77, "dim_ffn": 320, "head_size": 32,
                  "dim_w_lora": 24, "dim_a_lora": 40, "dim_v_lora": 8, "dim_g_lora": 56}
    v6 = rwkv_zoo.build("v6", n_layer=1, n_embd=64, vocab_size=10, head_size=16, dim_mix_lora=12, dim_decay_lora=20)
    _, kw = infer_model({k: tuple(v.shape) for k, v in v6.state_dict().items()})
    assert (kw["dim_mix_lora"], kw["dim_decay_lora"], kw["head_size"]) == (12, 20, 16)


def test_dtype_is_kept_or_converted(tmp_path):
    model = tiny("v6").to(torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    assert rwkv_zoo.load(tmp_path / "m.pth").dtype == torch.bfloat16
    assert rwkv_zoo.load(tmp_path / "m.pth", dtype=torch.float32).dtype == torch.float32


def test_v7_files_without_layer0_value_lora_load(tmp_path):
    sd = tiny("v7").state_dict()
    for k in ("v0", "v1", "v2"):
        del sd[f"blocks.0.att.{k}"]  # Nov-2024 x070 files (SPEC §6.1)
    torch.save(sd, tmp_path / "old.pth")
    model = rwkv_zoo.load(tmp_path / "old.pth")
    assert model.config.dim_v_lora == 8
    assert torch.isfinite(logits(model, torch.tensor([[1, 2, 3]]))).all()


# --- bad input -----------------------------------------------------------------------------------


def test_truncated_files(tmp_path):
    model = tiny("v5")
    torch.save(model.state_dict(), tmp_path / "m.pth")
    rwkv_zoo.save(model, tmp_path / "m.safetensors")
    for name in ("m.pth", "m.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            rwkv_zoo.load(tmp_path / f"cut-{name}")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_a_pickle_that_carries_code_is_refused_and_never_runs(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"emb.weight": _Evil()}, f)
    torch.save({"emb.weight": torch.zeros(2), "x": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused to unpickle.*could run code"):
            rwkv_zoo.load(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


def test_another_architecture_is_named(tmp_path):
    gpt = {"transformer.wte.weight": torch.zeros(10, 4), "transformer.h.0.attn.c_attn.weight": torch.zeros(4, 12)}
    torch.save(gpt, tmp_path / "gpt.pth")
    with pytest.raises(CheckpointError, match="not an RWKV language model.*transformer.wte.weight"):
        rwkv_zoo.load(tmp_path / "gpt.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint format"):
        (tmp_path / "notes.txt").write_text("hello")
        rwkv_zoo.load(tmp_path / "notes.txt")


def test_missing_extra_and_misshapen_keys_are_named(tmp_path):
    sd = tiny("v6").state_dict()
    del sd["blocks.1.att.gate.weight"]
    sd["blocks.1.att.bogus"] = torch.zeros(3)
    sd["blocks.0.ffn.receptance.weight"] = torch.zeros(64, 65)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        rwkv_zoo.load(tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing keys: blocks.1.att.gate.weight" in msg
    assert "unexpected keys: blocks.1.att.bogus" in msg
    assert "blocks.0.ffn.receptance.weight: expected shape [64, 64], found [64, 65]" in msg


def test_unsupported_dtype_is_named(tmp_path):
    sd = tiny("v4").state_dict()
    sd["blocks.0.att.key.weight"] = sd["blocks.0.att.key.weight"].to(torch.int8)
    torch.save(sd, tmp_path / "q.pth")
    with pytest.raises(CheckpointError, match="blocks.0.att.key.weight has dtype torch.int8.*not supported"):
        rwkv_zoo.load(tmp_path / "q.pth")


def test_v5_0_and_v5_1_are_recognised_and_refused(tmp_path):
    sd = tiny("v5").state_dict()
    for l in range(2):
        sd[f"blocks.{l}.att.time_decay"] = torch.zeros(4)
        sd[f"blocks.{l}.att.time_faaaa"] = torch.zeros(4)
    torch.save(sd, tmp_path / "v51.pth")
    with pytest.raises(CheckpointError, match=r"v5\.1 checkpoint.*only v5\.2"):
        rwkv_zoo.load(tmp_path / "v51.pth")
    for l in range(2):
        del sd[f"blocks.{l}.att.gate.weight"]
    torch.save(sd, tmp_path / "v50.pth")
    with pytest.raises(CheckpointError, match=r"v5\.0 checkpoint"):
        rwkv_zoo.load(tmp_path / "v50.pth")


def test_prerelease_v7_names_are_refused(tmp_path):
    sd = {k.replace("att.x_r", "att.xx_r"): v for k, v in tiny("v7").state_dict().items()}
    torch.save(sd, tmp_path / "pre.pth")
    with pytest.raises(CheckpointError, match="pre-release RWKV-7 naming"):
        rwkv_zoo.load(tmp_path / "pre.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_an_interrupted_save_leaves_the_old_file_intact(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"m{suffix}"
    rwkv_zoo.save(tiny("v5", seed=1), path)
    before = path.read_bytes()
    import safetensors.torch

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        rwkv_zoo.save(tiny("v5", seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# --- time_state and rescale ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v5", "v6", "v7"])
def test_official_time_state_is_the_initial_state(version, tmp_path):
    model = tiny(version)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(0)
    ts = {f"blocks.{i}.att.time_state": torch.randn(4, 16, 16, generator=g) for i in range(2)}
    torch.save({**sd, **ts}, tmp_path / "tuned.pth")
    tuned = rwkv_zoo.load(tmp_path / "tuned.pth")
    state = rwkv_zoo.RWKVState.from_time_state(model, ts)
    # official [H, value, key] -> ours [B, H, key, value]
    assert torch.equal(state.layers[1].wkv[0, 2], ts["blocks.1.att.time_state"][2].T)
    toks = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        expected, _ = model(toks, rwkv_zoo.RWKVState.concat([state, state]))
    torch.testing.assert_close(logits(tuned, toks), expected, rtol=0, atol=0)
    exported = tuned.initial_state.to_time_state()
    for k, v in ts.items():
        assert torch.equal(exported[k], v)


def test_rescale_is_explicit_reversible_and_saved_unrescaled(tmp_path):
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v6", n_layer=7, n_embd=64, vocab_size=50, head_size=16,
                                               dim_mix_lora=8, dim_decay_lora=8), seed=0).eval()
    toks = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))  # not order-dependent
    ref = logits(model, toks)
    w6 = model.blocks[6].att.output.weight.clone()
    model.set_rescale(3)  # layers 3-5 halved, layer 6 quartered
    assert model.rescale_every == 3
    torch.testing.assert_close(model.blocks[6].att.output.weight, w6 / 4)
    torch.testing.assert_close(logits(model, toks), ref, rtol=1e-4, atol=1e-4)  # LN eps differs only
    model.eval()
    model.train()
    assert model.rescale_every == 3  # never tied to train/eval mode
    rwkv_zoo.save(model, tmp_path / "m.pth")
    assert torch.equal(torch.load(tmp_path / "m.pth", weights_only=True)["blocks.6.att.output.weight"], w6)
    model.set_rescale(0)
    torch.testing.assert_close(model.blocks[6].att.output.weight, w6)
