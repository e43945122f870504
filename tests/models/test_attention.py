"""The attention baseline (plugins/attention.py, version ``attn``): one pass = token by token = split, across
the window boundary; the window bounds what a layer sees; checkpoints, training, chunked training with the
state carried, generation, state size and explain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rwkv_zoo
from rwkv_zoo.state import RWKVState
from rwkv_zoo.train import TrainConfig, Trainer
from rwkv_zoo.train.ablate import state_size
from rwkv_zoo.train.infctx import chunked_backward

W = 8  # a window well below the test lengths, so every test crosses the boundary


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def small(seed=0, **kw):
    opts = {"n_layer": 2, "n_embd": 64, "head_size": 16, "vocab_size": 97, "window": W, **kw}
    return rwkv_zoo.randomize_(rwkv_zoo.build("attn", **opts), seed=seed).eval()


def toks(B, T, V=97, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shift", [False, True])
def test_parallel_equals_token_by_token_equals_split_across_the_window(shift):
    model = small(token_shift=shift)
    x = toks(2, 3 * W + 5)
    T = x.shape[1]
    with torch.no_grad():
        full, full_state = model(x)
        state, steps = None, []
        for t in range(T):
            out, state = model(x[:, t : t + 1], state)
            steps.append(out)
        # chunks shorter than, equal to and longer than the window, the first one from the zero state
        split_state, parts, prev = RWKVState.zeros(model, 2), [], 0
        for cut in (3, 3 + W, 3 + 2 * W + 3, T):
            out, split_state = model(x[:, prev:cut], split_state)
            parts.append(out)
            prev = cut
    assert rel(torch.cat(steps, 1), full) <= 1e-5
    assert rel(torch.cat(parts, 1), full) <= 1e-5
    for final in (state, split_state):
        for a, b in zip(final.layers, full_state.layers, strict=True):
            k, v, pos = a.wkv
            assert k.shape == (2, 4, W, 16) and k.dtype == torch.float32  # fixed size: W keys per layer
            assert pos.tolist() == [T, T]
            assert rel(k, b.wkv[0]) <= 1e-5 and rel(v, b.wkv[1]) <= 1e-5


def test_sequences_of_different_lengths_share_a_batch():
    """States of sequences that saw different numbers of tokens (some fewer than W) continue together in
    one batch as each would alone: positions and filled buffer slots are per sequence."""
    model = small(seed=1)
    a, b = toks(1, 3, seed=1), toks(1, W + 6, seed=2)
    nxt = toks(2, 5, seed=3)
    with torch.no_grad():
        _, sa = model(a)
        _, sb = model(b)
        both, _ = model(nxt, RWKVState.concat([sa, sb]))
        alone_a, _ = model(torch.cat([a, nxt[:1]], 1))
        alone_b, _ = model(torch.cat([b, nxt[1:]], 1))
    assert rel(both[0], alone_a[0, -5:]) <= 1e-5
    assert rel(both[1], alone_b[0, -5:]) <= 1e-5


def test_a_token_outside_the_window_has_no_influence():
    """One layer: position t sees tokens t-W+1 .. t; changing token t-W changes nothing at t, changing
    t-W+1 does. The same holds when the tail is decoded from a carried state."""
    model = small(seed=2, n_layer=1)
    x = toks(1, 2 * W + 4, seed=4)
    t = x.shape[1] - 1
    far, near = x.clone(), x.clone()
    far[0, t - W] = (x[0, t - W] + 1) % 97
    near[0, t - W + 1] = (x[0, t - W + 1] + 1) % 97
    with torch.no_grad():
        ref = model(x)[0][0, t]
        assert torch.allclose(model(far)[0][0, t], ref, rtol=0, atol=1e-6)
        assert not torch.allclose(model(near)[0][0, t], ref, rtol=0, atol=1e-3)
        _, st = model(far[:, :t])
        assert rel(model(far[:, t:], st)[0][0, -1], ref) <= 1e-5  # another path: equal to rounding
    # with two layers the receptive field is 2 (W - 1) + 1 tokens: token t-W now matters
    deep = small(seed=2)
    with torch.no_grad():
        assert not torch.allclose(deep(far)[0][0, t], deep(x)[0][0, t], rtol=0, atol=1e-3)


def test_save_and_load_round_trip(tmp_path):
    model = small(seed=3, rope_theta=500.0)
    x = toks(1, 2 * W)
    with torch.no_grad():
        ref = model(x)[0]
    rwkv_zoo.save(model, tmp_path / "m.safetensors")  # the metadata keeps window, head size and base
    back = rwkv_zoo.load(tmp_path / "m.safetensors")
    assert back.version == "attn" and back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(x)[0], ref)
    # a .pth has keys only: detect() claims it, the shared preset's head size and the default window apply
    tiny = rwkv_zoo.randomize_(rwkv_zoo.build("attn-tiny"), seed=3).eval()
    rwkv_zoo.save(tiny, tmp_path / "t.pth")
    again = rwkv_zoo.load(tmp_path / "t.pth")
    assert again.version == "attn" and again.config == tiny.config
    with torch.no_grad():
        assert torch.equal(again(x)[0], tiny(x)[0])


def test_trains_through_the_trainer(tmp_path):
    cfg = TrainConfig(model="attn", model_options={"n_layer": 2, "n_embd": 64, "head_size": 16, "window": 16},
                      data={"task": "copying", "length": 4}, steps=60, batch_size=16, lr=1e-2, warmup_steps=2,
                      progress=False, eval_batches=1, out_dir=str(tmp_path), save_every=0, threads=1)
    trainer = Trainer(cfg)
    result = trainer.fit()
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # copying is easy for attention
    assert result.final["acc"] >= 0.8, result.final
    assert result.identity.startswith("attn")
    groups = rwkv_zoo.param_groups(trainer.module, weight_decay=0.1)
    assert {g["lr_scale"] for g in groups} == {1.0}
    decayed = {n for g in groups if g["weight_decay"] for n in g["names"]}
    assert "blocks.0.att.query.weight" in decayed and "blocks.0.ln1.weight" not in decayed


@pytest.mark.parametrize("chunk_len", [5, W + 3])
def test_chunked_training_with_the_state_carried_gives_the_full_gradient(chunk_len):
    model = small(seed=4).train()
    x, y = toks(2, 3 * W + 1, seed=5), toks(2, 3 * W + 1, seed=6)

    def loss_fn(logits, tgt):
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")

    model.zero_grad(set_to_none=True)
    loss_fn(model(x)[0], y).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    chunked_backward(model, x, y, chunk_len, loss_fn)
    for n, p in model.named_parameters():
        assert rel(p.grad, want[n]) <= 1e-4, n


def test_generates_and_explains():
    model = small(seed=5)
    out = rwkv_zoo.generate(model, [1, 2, 3], max_new_tokens=2 * W, temperature=0)
    assert len(out.tokens) == 2 * W and all(0 <= t < 97 for t in out.tokens)
    text = str(rwkv_zoo.explain(model, (1, 40)))
    assert "calls no WKV kernel" in text and "scaled_dot_product_attention" in text, text
    assert "no layer calls a dispatched kernel" in text, text


def test_state_saves_and_loads(tmp_path):
    model = small(seed=7)
    x = toks(1, W + 3)
    with torch.no_grad():
        _, st = model(x[:, :-1])
        st.save(tmp_path / "s.safetensors")
        back = RWKVState.load(tmp_path / "s.safetensors", model)
        assert back.layers[0].wkv[2].tolist() == [W + 2]
        assert torch.equal(model(x[:, -1:], back)[0], model(x[:, -1:], st)[0])


def test_state_size_counts_the_window():
    model = small()
    L, C = 2, 64
    assert state_size(model) == L * (2 * W * C + 2 * C + 1)  # keys, values, two shifts, the position
    st = model.zero_state(3)
    nbytes = sum(t.numel() * t.element_size() for ls in st.layers for t in ls.tensors())
    assert nbytes == 3 * L * (2 * W * C * 4 + 2 * C * 4 + 8)


def test_attention_layers_join_a_hybrid():
    m = rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny", layers="attn,v7", window=W), seed=6).eval()
    x = toks(1, 2 * W + 3, V=256)
    with torch.no_grad():
        full, _ = m(x)
        state, steps = None, []
        for t in range(x.shape[1]):
            out, state = m(x[:, t : t + 1], state)
            steps.append(out)
    assert rel(torch.cat(steps, 1), full) <= 1e-5


def test_bf16_model_keeps_an_fp32_buffer():
    model = small().to(torch.bfloat16)
    _, st = model(toks(1, 5))
    assert st.layers[0].wkv[0].dtype == torch.float32 and st.layers[0].att_shift.dtype == torch.bfloat16


@pytest.mark.parametrize(("opts", "match"), [({"window": 0}, "window must be a positive int"),
                                             ({"head_size": 15, "n_embd": 60}, "head_size must be even"),
                                             ({"token_shift": 1}, "token_shift must be true or false")])
def test_bad_config_is_one_clear_error(opts, match):
    with pytest.raises(ValueError, match=match):
        rwkv_zoo.build("attn", n_layer=1, **{"n_embd": 64, **opts})


@pytest.mark.parametrize("C", [32, 256])
def test_fresh_projections_are_fan_in_scaled_at_every_width(C):
    # GPT-2's constant 0.02 left q.k ~0.1 at the ablation widths, so attention stayed uniform for hundreds
    # of steps: every projection's std is 1/sqrt(fan_in), the two into the residual also / sqrt(2 L).
    torch.manual_seed(0)
    m = rwkv_zoo.build("attn", n_layer=2, n_embd=C, head_size=16, vocab_size=97, token_shift=True)
    att, ffn = m.blocks[1].att, m.blocks[1].ffn
    for w, want in ((att.query.weight, C**-0.5), (att.key.weight, C**-0.5), (ffn.key.weight, C**-0.5),
                    (att.output.weight, C**-0.5 / 2), (ffn.value.weight, (4 * C) ** -0.5 / 2)):
        assert float(w.detach().std()) == pytest.approx(want, rel=0.1)
    # the shift mixes span "all previous token" to "almost none" in the first layer
    mix = m.blocks[0].att.x_k.flatten()
    assert float(mix[0]) == 1.0 and float(mix[-1]) < 0.1
    assert rel(m.blocks[0].att.x_q, m.blocks[0].att.x_k) == 0
