"""v8 (RWKV-8 rc00): logits equal to an independent token loop written here from the formulas of RWKV-LM's
``rwkv_v8_rc00_demo.py`` (the only public definition; it needs CUDA, and the ``rwkv`` package has no
RWKV-8), plus detection from the keys, save/load, training and memory mapping (parallel == decode:
tests/models/test_models.py and test_paths.py, which run every version).

The oracle reads the official key dict of the file the test wrote, runs one token at a time in float64
in the style of the package's RNN path (vectors, ``W @ x`` with the stored [out, in] matrices, the WKV
state as [H, N_v, N_k]) and shares no code with rwkv_zoo's modules.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_v7a import mapping_of, rel

import rwkv_zoo
from rwkv_zoo.checkpoint import candidates

TOL = 1e-5  # our fp32 model against the float64 oracle, relative
DIMS = {"n_layer": 3, "n_embd": 128, "vocab_size": 300, "head_size": 64}


def random_model(seed: int = 1, **dims) -> torch.nn.Module:
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v8", **(dims or DIMS)), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.blocks:  # a gate around 1, so the channel-mix output matters
            block.ffn.enn.weight.copy_(1 + 0.5 * torch.randn(block.ffn.enn.weight.shape, generator=g))
    return model


def rc00_oracle(z: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] for ``tokens`` from the official keys, one token at a time, float64."""
    z = {k: v.double().squeeze() for k, v in z.items()}
    L = 1 + max(int(k.split(".")[1]) for k in z if k.startswith("blocks."))
    H, N = z["blocks.0.att.r_k"].shape
    C = H * N

    def ln(x, p):
        return F.layer_norm(x, (C,), z[p + ".weight"], z[p + ".bias"], eps=1e-5)

    att_x = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    ffn_x = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    S = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(L)]  # [H, value, key]
    out = []
    for tok in tokens:
        x = ln(z["emb.weight"][tok], "blocks.0.ln0")
        v_first = None
        for i in range(L):
            a_, f_ = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            xx = ln(x, f"blocks.{i}.ln1")
            d, att_x[i] = att_x[i] - xx, xx
            xr, xw, xk, xv, xa, xg = (xx + d * z[a_ + "x_" + m] for m in "rwkvag")
            r = z[a_ + "receptance.weight"] @ xr
            k = z[a_ + "key.weight"] @ xk
            v = z[a_ + "value.weight"] @ xv
            w = z[a_ + "w0"] + torch.tanh(xw @ z[a_ + "w1"]) @ z[a_ + "w2"]
            a = torch.sigmoid(z[a_ + "a0"] + (xa @ z[a_ + "a1"]) @ z[a_ + "a2"])
            g = torch.sigmoid(xg @ z[a_ + "g1"]) @ z[a_ + "g2"]
            kk = F.normalize((k * z[a_ + "k_k"]).view(H, N), dim=-1).view(C)
            k = k * (1 + (a - 1) * z[a_ + "k_a"])
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(z[a_ + "v0"] + (xv @ z[a_ + "v1"]) @ z[a_ + "v2"])
            decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(w))
            S[i] = (S[i] * decay.view(H, 1, N) + S[i] @ ((-kk).view(H, N, 1) @ (kk * a).view(H, 1, N))
                    + v.view(H, N, 1) @ k.view(H, 1, N))
            y = (S[i] @ r.view(H, N, 1)).view(1, C)
            y = F.group_norm(y, H, z[a_ + "ln_x.weight"], z[a_ + "ln_x.bias"], eps=64e-5).view(C)
            y = y + ((r * k * z[a_ + "r_k"].view(C)).view(H, N).sum(-1, keepdim=True) * v.view(H, N)).view(C)
            x = x + z[a_ + "output.weight"] @ (y * g)
            xx = ln(x, f"blocks.{i}.ln2")
            d, ffn_x[i] = ffn_x[i] - xx, xx
            kf = torch.relu(z[f_ + "key.weight"] @ (xx + d * z[f_ + "x_k"])) ** 2
            x = x + (z[f_ + "value.weight"] @ kf) * z[f_ + "enn.weight"][tok]
        out.append(z["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(out)


@pytest.fixture(scope="module")
def pth(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("v8") / "v8.pth"
    rwkv_zoo.save(random_model(), path)  # the official layout
    return path


def test_logits_match_the_rc00_formulas(pth):
    z = torch.load(pth, weights_only=True)
    ours = rwkv_zoo.load(pth)
    from rwkv_zoo import fused

    assert fused.select(ours, fused.StepCall("cpu", torch.float32, 1, 1)).backend is None  # no step knows it
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 300, (40,), generator=g).tolist()  # > 16: our chunked kernels
    decode = torch.randint(0, 300, (8,), generator=g).tolist()  # T = 1: the recurrent ones, state carried
    want = rc00_oracle(z, prompt + decode)
    with torch.no_grad():
        logits, state = ours(torch.tensor([prompt]))
        assert rel(logits[0], want[:40]) <= TOL
        for j, tok in enumerate(decode):
            out, state = ours(torch.tensor([[tok]]), state)
            assert rel(out[0, -1], want[40 + j]) <= TOL, j
    # the gate matters: without it the same file's logits are far off
    z_no_gate = {k: (torch.ones_like(v) if k.endswith("enn.weight") else v) for k, v in z.items()}
    assert rel(rc00_oracle(z_no_gate, prompt[:8]), want[:8]) > 0.05


def test_official_keys_and_detection(pth, tmp_path):
    sd = rwkv_zoo.build("v8", **DIMS, device="meta").state_dict()
    v7 = set(rwkv_zoo.build("v7", **DIMS, device="meta").state_dict())
    assert set(sd) - v7 == {f"blocks.{i}.ffn.enn.weight" for i in range(3)}
    assert all(tuple(sd[f"blocks.{i}.ffn.enn.weight"].shape) == (300, 128) for i in range(3))
    shapes = {k: tuple(v.shape) for k, v in torch.load(pth, mmap=True, weights_only=True).items()}
    assert {name for name, _ in candidates(shapes)[0]} == {"v7", "v8"}
    model = rwkv_zoo.load(pth)
    assert model.version == "v8"
    for suffix in (".pth", ".safetensors"):
        rwkv_zoo.save(model, tmp_path / f"again{suffix}")
        again = rwkv_zoo.load(tmp_path / f"again{suffix}")
        assert again.version == "v8"
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
    # a file without layer 0's unused v0/v1/v2 (the demo overwrites them) loads too
    z = torch.load(pth, weights_only=True)
    for n in ("v0", "v1", "v2"):
        del z[f"blocks.0.att.{n}"]
    torch.save(z, tmp_path / "no_v0.pth")
    assert rwkv_zoo.load(tmp_path / "no_v0.pth").version == "v8"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_enn_tables_stay_memory_mapped(pth):
    model = rwkv_zoo.load(pth)
    ptrs = [b.ffn.enn.weight.data_ptr() for b in model.blocks]
    assert all(mapping_of(p) == str(pth.resolve()) for p in ptrs)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 20)))
    assert [b.ffn.enn.weight.data_ptr() for b in model.blocks] == ptrs


def test_tiny_model_trains():
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v8", size="tiny"), seed=0)
    toks = torch.randint(0, 256, (2, 33))
    logits, _ = model(toks)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks.roll(-1, 1).flatten()).backward()
    unused = set(model.unused_parameters())
    assert unused == {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None or p.grad.abs().sum() == 0, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
    groups = {n: g for g in rwkv_zoo.param_groups(model, weight_decay=0.1) for n in g["names"]}
    assert groups["blocks.1.att.w0"]["lr_scale"] == 2.0 and groups["blocks.1.ffn.enn.weight"]["weight_decay"] == 0.1


def test_official_init_starts_as_x070():
    model = rwkv_zoo.build("v8", size="tiny")
    assert all(torch.all(b.ffn.enn.weight == 1) for b in model.blocks)
    with torch.no_grad():
        for b in model.blocks:
            b.ffn.value.weight.normal_(0, 0.1)
    plain = rwkv_zoo.build("v7", size="tiny")
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()}, strict=True)
    toks = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert rel(model(toks)[0], plain(toks)[0]) <= 1e-6


def test_meta_build_of_the_release():
    model = rwkv_zoo.build("v8-rc00", device="meta")
    assert model.size_name == "pile-0.1B" and model.config.vocab_size == 50304
    assert model.num_parameters() == 631_289_856
