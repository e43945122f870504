"""L2Wrap's gradient, and infctx: chunked training with the state carried = the full-sequence gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rwkv_zoo
from rwkv_zoo.train import chunked_backward, enable_gradient_checkpointing, l2wrap, l2wrap_scale


def test_l2wrap_keeps_the_loss_and_adds_the_official_gradient():
    torch.manual_seed(0)
    B, T, V = 2, 5, 7
    logits = torch.randn(B, T, V, requires_grad=True)
    target = torch.randint(0, V, (B, T))
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    out = l2wrap(ce, logits, l2wrap_scale(B, T))
    assert torch.equal(out, ce)
    (g_wrap,) = torch.autograd.grad(out, logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), target.flatten()), logits)
    top, idx = logits.detach().max(-1, keepdim=True)
    official = torch.zeros_like(logits).scatter_(-1, idx, top * 1e-4 / (B * T))
    torch.testing.assert_close(g_wrap, g_ce + official, rtol=0, atol=1e-9)
    # ... which is the gradient of 1e-4 * mean(max_logit^2) / 2 added to the loss
    penalty = 1e-4 * (logits.max(-1).values ** 2).mean() / 2
    (g_pen,) = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), target.flatten()) + penalty, logits)
    torch.testing.assert_close(g_wrap, g_pen, rtol=1e-6, atol=1e-9)


def test_l2wrap_follows_the_gradient_scale():
    """Scaling the loss (loss scaler, accumulation, rank averaging) scales the extra term too (the
    official L2Wrap ignores grad_output)."""
    logits = torch.randn(3, 4, 5, requires_grad=True)
    zero = torch.zeros(())  # only the L2Wrap term is left
    (g1,) = torch.autograd.grad(l2wrap(zero, logits, 0.5), logits)
    (g8,) = torch.autograd.grad(8.0 * l2wrap(zero, logits, 0.5), logits)
    torch.testing.assert_close(g8, 8 * g1)
    assert int((g1 != 0).sum()) == 12  # one logit per position


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _loss_fn(count, B, T):
    def fn(logits, tgt):
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction="sum") / count
        return l2wrap(loss, logits, l2wrap_scale(B, T))

    return fn


MODELS = [("v4", {}), ("v5", {}), ("v6", {}), ("v7", {}), ("v6", {"layers": "v7,v4/v5"})]


@pytest.mark.parametrize(("version", "opts"), MODELS, ids=[f"{v}{'-hybrid' if o else ''}" for v, o in MODELS])
def test_chunked_gradient_through_the_state_equals_the_full_sequence_gradient(version, opts):
    model = rwkv_zoo.build(version, size="tiny", **opts)
    rwkv_zoo.randomize_(model, seed=1)
    g = torch.Generator().manual_seed(2)
    B, T = 2, 37
    x = torch.randint(0, 256, (B, T), generator=g)
    y = torch.randint(0, 256, (B, T), generator=g)
    fn = _loss_fn(B * T, B, T)
    loss_full, state_full = chunked_backward(model, x, y, None, fn)
    full = _grads(model)
    model.zero_grad()
    loss_chunked, state_chunked = chunked_backward(model, x, y, 16, fn)  # chunks 16 + 16 + 5
    chunked = _grads(model)
    assert abs(loss_full - loss_chunked) <= 1e-5 * abs(loss_full)
    assert set(full) == set(chunked)
    worst = max(_rel(chunked[n], full[n]) for n in full)
    assert worst < 2e-4, worst  # fp32 rounding of a different summation order
    for a, b in zip(state_full.layers[-1].tensors(), state_chunked.layers[-1].tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Truncated BPTT is a different (biased) gradient.
    model.zero_grad()
    chunked_backward(model, x, y, 16, fn, truncated=True)
    truncated = _grads(model)
    assert max(_rel(truncated[n], full[n]) for n in full) > 1e-2


def test_chunked_gradient_reaches_an_initial_state_that_requires_grad():
    model = rwkv_zoo.build("v7", size="tiny")
    rwkv_zoo.randomize_(model, seed=3)
    x = torch.randint(0, 256, (1, 30))
    init = rwkv_zoo.RWKVState.zeros(model, 1)
    for ls in init.layers:
        ls.wkv.normal_()
        ls.wkv.requires_grad_(True)
    fn = _loss_fn(30, 1, 30)
    chunked_backward(model, x, x, None, fn, state=init)
    whole = init.layers[0].wkv.grad.clone()
    init.layers[0].wkv.grad = None
    chunked_backward(model, x, x, 8, fn, state=init)
    assert _rel(init.layers[0].wkv.grad, whole) < 1e-4


def test_gradient_checkpointing_gives_the_same_gradient():
    model = rwkv_zoo.build("v7", size="tiny")  # v7 shares v_first across blocks: the tricky case
    rwkv_zoo.randomize_(model, seed=4)
    x = torch.randint(0, 256, (2, 20))
    logits, _ = model(x)
    logits.square().mean().backward()
    ref = _grads(model)
    model.zero_grad()
    enable_gradient_checkpointing(model)
    logits2, _ = model(x)
    torch.testing.assert_close(logits2, logits)
    logits2.square().mean().backward()
    got = _grads(model)
    assert set(got) == set(ref)
    assert max(_rel(got[n], ref[n]) for n in ref) < 1e-6
