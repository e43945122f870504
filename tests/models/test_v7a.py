"""v7a (RWKV-7 DeepEmbed): logits equal to the ``rwkv`` package under RWKV_DE_VERSION=1, detection from
the keys, save/load, training, a hybrid, and the DeepEmbed tables staying memory-mapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.checkpoint import CheckpointError, candidates
from rwkv_zoo.versions import v7a

WORKER = Path(__file__).with_name("deepembed_compat_worker.py")
TOL = 1e-5  # fp32, relative, as for the other versions against the package
DIMS = {"n_layer": 3, "n_embd": 128, "vocab_size": 300, "head_size": 64, "dim_s_lora": 32}  # the package: R = 32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def random_model(seed: int = 1, **dims) -> torch.nn.Module:
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7a", **(dims or DIMS)), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.blocks:  # a factor around 1, as a trained model's, so the ffn output matters
            block.ffn.s0.copy_(1 + 0.3 * torch.randn(block.ffn.s0.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def pth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v7a") / "v7a.pth"
    rwkv_zoo.save(random_model(), path)  # the official layout
    return path


@pytest.mark.integration
def test_logits_match_the_package_with_deepembed(pth):
    pytest.importorskip("rwkv", reason="BlinkDL's rwkv package is a test dependency (pip install -e .[test])")
    env = {k: v for k, v in os.environ.items() if k not in ("RWKV_V7_ON", "RWKV_DE_VERSION")}
    proc = subprocess.run([sys.executable, str(WORKER), str(pth), str(DIMS["vocab_size"])],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["version"] == "v7a"
    assert result["prompt"] <= TOL, result
    assert len(result["decode"]) == 8 and max(result["decode"]) <= TOL, result


def test_official_keys_and_shapes():
    model = rwkv_zoo.build("v7a", **DIMS, device="meta")
    sd = model.state_dict()
    V, C, F, R = 300, 128, 512, 32
    want = {"s_emb.weight": (V, R * R), "s_emb_x.weight": (R * R, C), "s0": (1, 1, F), "s1": (C, R), "s2": (R, F),
            "x_k": (1, 1, C), "key.weight": (F, C), "value.weight": (C, F)}
    for layer in range(3):
        got = {k.removeprefix(f"blocks.{layer}.ffn."): tuple(v.shape) for k, v in sd.items()
               if k.startswith(f"blocks.{layer}.ffn.")}
        assert got == want
    v7_keys = set(rwkv_zoo.build("v7", **{k: v for k, v in DIMS.items() if k != "dim_s_lora"},
                                 device="meta").state_dict())
    new = ("s_emb.weight", "s_emb_x.weight", "s0", "s1", "s2")
    assert set(sd) - v7_keys == {f"blocks.{i}.ffn.{n}" for i in range(3) for n in new}


def test_load_detects_v7a_and_round_trips(pth, tmp_path):
    shapes = {k: tuple(v.shape) for k, v in torch.load(pth, mmap=True, weights_only=True).items()}
    assert {name for name, _ in candidates(shapes)[0]} == {"v7", "v7a"}  # a v7a file has every v7 key too
    model = rwkv_zoo.load(pth)
    assert model.version == "v7a" and model.config.dim_s_lora == 32
    from rwkv_zoo import fused

    assert fused.select(model, fused.StepCall("cpu", torch.float32, 1, 1)).backend is None  # no step knows it
    ref = random_model()
    toks = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        want, _ = ref(toks)
        assert rel(model(toks)[0], want) == 0.0
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / f"again{suffix}"
        rwkv_zoo.save(model, out)
        again = rwkv_zoo.load(out)
        assert again.version == "v7a"
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k


def test_a_flat_s0_loads_and_a_bad_rank_is_named(pth, tmp_path):
    tensors = torch.load(pth, weights_only=True)
    tensors["blocks.1.ffn.s0"] = tensors["blocks.1.ffn.s0"].flatten()  # the package squeezes: it reads either
    torch.save(tensors, tmp_path / "flat.pth")
    assert rwkv_zoo.load(tmp_path / "flat.pth").blocks[1].ffn.s0.shape == (1, 1, 512)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    shapes["blocks.0.ffn.s1"] = (128, 16)
    with pytest.raises(CheckpointError, match="rank 16"):
        v7a.detect(shapes)


def mapping_of(ptr: int) -> str | None:
    """The file that backs address ``ptr`` in this process (Linux /proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) == 6 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_deepembed_tables_stay_memory_mapped(pth):
    model = rwkv_zoo.load(pth)  # mmap=True is the default
    tables = [b.ffn.s_emb.weight for b in model.blocks]
    ptrs = [t.data_ptr() for t in tables]
    assert all(mapping_of(p) == str(pth.resolve()) for p in ptrs)  # the parameter *is* the file's pages
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 30)))
        model(torch.randint(0, 300, (2, 1)))
    # forward gathered rows and neither copied nor replaced the tables
    assert [b.ffn.s_emb.weight.data_ptr() for b in model.blocks] == ptrs
    assert all(mapping_of(p) == str(pth.resolve()) for p in ptrs)


def test_tiny_model_trains():
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7a", size="tiny"), seed=0)
    toks = torch.randint(0, 256, (2, 33))  # > 16: the chunked kernels
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"}
                             for g in rwkv_zoo.param_groups(model, weight_decay=0.01)], lr=1e-3)
    losses = []
    for step in range(4):
        logits, _ = model(toks)
        assert torch.isfinite(logits).all()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            unused = set(model.unused_parameters())  # layer 0's v0/v1/v2: it makes v_first
            assert unused == {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
            for name, p in model.named_parameters():
                if name in unused:
                    assert p.grad is None or p.grad.abs().sum() == 0, name
                    continue
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
            # only the rows of the tokens seen get a gradient
            seen = torch.zeros(256, dtype=torch.bool)
            seen[toks.unique()] = True
            g = model.blocks[1].ffn.s_emb.weight.grad
            assert g[~seen].abs().sum() == 0 and g[seen].abs().sum(1).gt(0).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_official_init_starts_as_x070():
    """The DeepEmbed factor starts at exactly 1: a fresh v7a computes what v7 computes with the shared keys."""
    model = rwkv_zoo.build("v7a", size="tiny")
    with torch.no_grad():  # the x070 init zeroes ffn.value; random shared weights make the ffn count
        for b in model.blocks:
            b.ffn.value.weight.normal_(0, 0.1)
            b.att.output.weight.normal_(0, 0.1)
    plain = rwkv_zoo.build("v7", size="tiny")
    sd = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(sd, strict=True)
    toks = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert rel(model(toks)[0], plain(toks)[0]) <= 1e-6
    ffn = model.blocks[0].ffn
    assert torch.all(ffn.s0 == 1) and ffn.s2.abs().sum() == 0 and ffn.s1.abs().sum() > 0
    assert torch.equal(ffn.s_emb.weight[7].view(8, 8), torch.eye(8))


def test_a_deepembed_channel_mix_in_a_hybrid():
    """Layer 0 is plain v7: the v7a channel-mix of layer 1 still gets ln0(emb) from the context."""
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny", layers="v7,v7/v7a", dim_s_lora=8), seed=6).eval()
    assert type(model.blocks[1].ffn).__name__ == "V7aChannelMix" and model.blocks[1].ffn.s1.shape[1] == 8
    toks = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full, _ = model(toks)
        state, steps = None, []
        for t in range(12):
            out, state = model(toks[:, t : t + 1], state)
            steps.append(out)
        model.blocks[1].ffn.s_emb.weight.mul_(2)  # the table matters for the output
        other, _ = model(toks)
    assert rel(torch.cat(steps, 1), full) <= 1e-5 and rel(other, full) > 1e-4


def test_meta_build_of_the_release():
    model = rwkv_zoo.build("v7a-g1d-0.1B", device="meta")
    assert model.num_parameters() == 1_007_339_520  # 2.01 GB in fp16, as the released files
    assert model.blocks[0].ffn.s_emb.weight.shape == (65536, 1024)
