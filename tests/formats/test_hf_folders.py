"""HF folders: transformers RWKV-4 (read/write, exact round trips, transformers' own logits) and the
RWKV org's remote-code v5/v6 folders (read), written here by a forward mapping of the documented names."""

from __future__ import annotations

import json

import pytest
import torch
from _deps import require
from safetensors.torch import load_file, save_file

import rwkv_zoo
from rwkv_zoo.checkpoint import CheckpointError, get_formats


def tiny(version, seed=1):
    return rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=seed).eval()


def logits(model, toks):
    with torch.no_grad():
        return model(toks)[0]


def rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


# The renames of transformers' convert_rwkv_checkpoint_to_hf.py (and the RWKV org's v5 script, which
# adds time_mix_g -> time_mix_gate), written out independently of plugins/formats/hf.py.
SUFFIXES = {".time_mix_k": ".time_mix_key", ".time_mix_v": ".time_mix_value",
            ".time_mix_r": ".time_mix_receptance", ".time_mix_g": ".time_mix_gate"}


def to_hf_name(name):
    if name == "head.weight":
        return name
    if name.startswith("emb."):
        name = "embeddings." + name[len("emb."):]
    if name.startswith("blocks.0.ln0."):
        name = "blocks.0.pre_ln." + name[len("blocks.0.ln0."):]
    parts = name.split(".")
    if parts[0] == "blocks":
        parts[2] = {"att": "attention", "ffn": "feed_forward"}.get(parts[2], parts[2])
    name = ".".join(parts)
    for old, new in SUFFIXES.items():
        if name.endswith(old):
            name = name[: -len(old)] + new
    return "rwkv." + name


def write_remote_code_folder(model, folder, model_type):
    folder.mkdir()
    sd = {to_hf_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    c = model.config
    cfg = {"architectures": [f"{model_type.capitalize()}ForCausalLM"], "model_type": model_type,
           "auto_map": {"AutoConfig": f"configuration_{model_type}.{model_type.capitalize()}Config"},
           "hidden_size": c.n_embd, "attention_hidden_size": c.n_embd, "head_size": c.head_size,
           "num_hidden_layers": c.n_layer, "vocab_size": c.vocab_size, "intermediate_size": None,
           "layer_norm_epsilon": 1e-5, "rescale_every": 6, "context_length": 4096}
    (folder / "config.json").write_text(json.dumps(cfg))
    return sd


def assert_same_model(loaded, model, toks):
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(logits(loaded, toks), logits(model, toks))


def test_official_to_hf_and_back_is_exact(tmp_path):
    model = tiny("v4")
    toks = torch.randint(0, 256, (2, 19))
    rwkv_zoo.save(model, tmp_path / "hf", format="hf")
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = {to_hf_name(k): v for k, v in model.state_dict().items()}
    assert set(stored) == set(expected)
    assert {"rwkv.embeddings.weight", "rwkv.blocks.0.pre_ln.bias", "rwkv.blocks.1.attention.time_mix_key",
            "rwkv.blocks.1.feed_forward.time_mix_receptance", "rwkv.ln_out.weight", "head.weight"} <= set(stored)
    for k, v in expected.items():
        assert torch.equal(stored[k], v), k  # raw time_decay / time_first, nothing transposed
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "rwkv" and cfg["architectures"] == ["RwkvForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 2, 256)
    assert (cfg["attention_hidden_size"], cfg["intermediate_size"], cfg["rescale_every"]) == (64, 256, 0)

    loaded = rwkv_zoo.load(tmp_path / "hf")
    assert loaded.checkpoint_format == "hf" and loaded.version == "v4"
    assert_same_model(loaded, model, toks)
    rwkv_zoo.save(loaded, tmp_path / "back.pth")  # official again
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    # a weight file inside the folder means the folder
    assert rwkv_zoo.load(tmp_path / "hf" / "model.safetensors").checkpoint_format == "hf"


def test_shapes_without_loading(tmp_path):
    model = tiny("v4").to(torch.bfloat16)
    rwkv_zoo.save(model, tmp_path / "hf", format="hf")
    shapes, meta = get_formats()["hf"].read_shapes(tmp_path / "hf")
    assert shapes == {k: (tuple(v.shape), torch.bfloat16) for k, v in model.state_dict().items()}
    assert meta["hf_model_type"] == "rwkv"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("kind", ["bin", "sharded-bin", "sharded-safetensors"])
def test_bin_and_sharded_folders(tmp_path, kind):
    model = tiny("v4", seed=3)
    rwkv_zoo.save(model, tmp_path / "hf", format="hf")
    folder = tmp_path / "hf"
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    if kind == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        names = sorted(sd)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        ext = "bin" if kind == "sharded-bin" else "safetensors"
        index = {"metadata": {}, "weight_map": {}}
        for i, part in enumerate(halves, 1):
            fname = f"model-{i:05d}-of-00002.{ext}"
            shard = {k: sd[k] for k in part}
            if ext == "bin":
                torch.save(shard, folder / fname)
            else:
                save_file(shard, str(folder / fname), metadata={"format": "pt"})
            index["weight_map"].update(dict.fromkeys(part, fname))
        index_name = "pytorch_model.bin.index.json" if ext == "bin" else "model.safetensors.index.json"
        (folder / index_name).write_text(json.dumps(index))
    assert_same_model(rwkv_zoo.load(folder), model, torch.randint(0, 256, (1, 9)))


@pytest.mark.parametrize("version,model_type", [("v5", "rwkv5"), ("v6", "rwkv6")])
def test_remote_code_v5_v6_folders(tmp_path, version, model_type):
    model = tiny(version, seed=5)
    sd = write_remote_code_folder(model, tmp_path / "repo", model_type)
    if version == "v5":
        assert "rwkv.blocks.1.attention.time_mix_gate" in sd and "rwkv.blocks.0.attention.time_faaaa" in sd
    else:
        assert "rwkv.blocks.1.attention.time_maa_w2" in sd and "rwkv.blocks.1.feed_forward.time_maa_k" in sd
    loaded = rwkv_zoo.load(tmp_path / "repo")
    assert loaded.checkpoint_format == "hf" and loaded.version == version  # not fla, though "rwkv6"
    assert_same_model(loaded, model, torch.randint(0, 256, (2, 13)))


@pytest.mark.parametrize("swap", ["renameat2", "two-renames"])
def test_writing_into_an_existing_folder_replaces_weights_keeps_the_rest(tmp_path, monkeypatch, swap):
    if swap == "two-renames":  # where the OS has no atomic exchange
        from rwkv_zoo.plugins.formats import _folders

        monkeypatch.setattr(_folders, "_exchange", lambda a, b: False)
    folder = tmp_path / "hf"
    old, new = tiny("v4", seed=1), tiny("v4", seed=2)
    rwkv_zoo.save(old, folder, format="hf")
    (folder / "tokenizer.json").write_text("{}")
    torch.save({"stale": torch.zeros(1)}, folder / "pytorch_model.bin")

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:  # an interrupted write leaves the old folder as it was
        m.setattr(safetensors.torch, "save_file", broken)
        with pytest.raises(OSError, match="disk full"):
            rwkv_zoo.save(new, folder, format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left behind
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "pytorch_model.bin",
                                                        "tokenizer.json"]
    assert torch.equal(load_file(str(folder / "model.safetensors"))["head.weight"], old.head.weight)

    rwkv_zoo.save(new, folder, format="hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_same_model(rwkv_zoo.load(folder), new, torch.randint(0, 256, (1, 5)))


def test_hf_write_refuses_what_transformers_cannot_hold(tmp_path):
    with pytest.raises(CheckpointError, match="a v8 model has none"):
        rwkv_zoo.save(tiny("v8"), tmp_path / "v8", format="hf")
    assert not (tmp_path / "v8").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        rwkv_zoo.save(tiny("v4"), tmp_path / "file", format="hf")


def test_folder_without_weights_says_what_it_found(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text(json.dumps({"model_type": "rwkv",
                                                                "architectures": ["RwkvForCausalLM"]}))
    (tmp_path / "repo" / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no weights .*found: README.md, config.json"):
        rwkv_zoo.load(tmp_path / "repo")


# ---------------------------------------------------------------------------------------------------
# transformers itself (test-only dependency)


def randomize_hf_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".time_mix_" in name:
                val = torch.rand(p.shape, generator=g)
            elif name.endswith(("time_decay", "time_first")):
                val = 0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                val = 0.1 * torch.randn(p.shape, generator=g)
            elif "ln" in name.split(".")[-2]:
                val = 1 + 0.1 * torch.randn(p.shape, generator=g)
            elif "embeddings" in name:
                val = torch.randn(p.shape, generator=g)
            else:
                val = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            p.copy_(val)
    return model


@pytest.mark.integration
def test_transformers_written_folder_gives_transformers_logits(tmp_path):
    transformers = require("transformers")
    # 7 layers, so that transformers' default rescale_every=6 matters: in eval mode it divides layer l's
    # attention.output / feed_forward.value by 2**(l // 6) in memory and halves the residual after
    # block 6 (exact up to the LayerNorm eps). The file holds un-rescaled weights (saved before any
    # eval forward); rwkv_zoo loads them as they are, and model.set_rescale(6) is the same transform.
    config = transformers.RwkvConfig(vocab_size=256, hidden_size=64, num_hidden_layers=7, context_length=64)
    assert config.rescale_every == 6
    randomize_hf_(transformers.RwkvForCausalLM(config), seed=7).save_pretrained(tmp_path / "hf")
    ours = rwkv_zoo.load(tmp_path / "hf")
    assert ours.checkpoint_format == "hf" and ours.config.n_layer == 7 and ours.rescale_every == 0
    toks = torch.randint(0, 256, (2, 24))
    for every in (0, 6):
        hf = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "hf", rescale_every=every).eval()
        ours.set_rescale(every)
        with torch.no_grad():
            assert rel(hf(toks).logits, ours(toks)[0]) <= 1e-5, every
            # decode with state, batch 1: transformers' one-token path broadcasts the [B, C] shift
            # state against [B, 1, C] (modeling_rwkv.py extract_key_value), which is wrong for B > 1
            out = hf(toks[:1, :20], use_cache=True)
            ref_step = hf(toks[:1, 20:21], state=out.state, use_cache=True).logits
            mine, state = ours(toks[:1, :20])
            mine_step, _ = ours(toks[:1, 20:21], state)
        assert rel(out.logits, mine) <= 1e-5, every
        assert rel(ref_step, mine_step) <= 1e-5, every


@pytest.mark.integration
def test_rwkv_zoo_written_folder_loads_in_transformers(tmp_path):
    transformers = require("transformers")
    model = tiny("v4", seed=11)
    rwkv_zoo.save(model, tmp_path / "hf", format="hf")
    hf = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    toks = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert rel(hf(toks).logits, logits(model, toks)) <= 1e-5
