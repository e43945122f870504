"""The triton backend's chunk-mode wkv7 kernel (``backends/triton/chunk7.py``), in Triton's interpreter.

Against the fp64 reference recurrence: y, final state and the gradients of r, w, k, v, a, b and the
initial state, with a random initial state and random upstream gradients on both y and the final
state. Decay: the official parameterization (w in (-0.61, 0)), scaled x10 and x100 (strong: up to
-61 per step, so a 16-token chunk decays by e^-976 and any factored exp(+G) would overflow) and
x0.1 (weak). Lengths cross the 16-token chunk boundary. Tiny shapes (B=2, H<=2, N=16) keep the
interpreter fast. The generic conformance cases (T in 1..130) are in ``test_triton.py``.
"""

from __future__ import annotations

import os

# Before Triton is imported anywhere: the kernels are defined for the interpreter when first used.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from _deps import require

require("triton")  # in the test extra; before the imports below, which need it

from rwkv_zoo.backends.reference.recurrent import wkv7_recurrent  # noqa: E402
from rwkv_zoo.backends.triton.chunk7 import CHUNK, wkv7_chunk  # noqa: E402
from rwkv_zoo.testing import evaluate, make_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.kernel

NAMES = ("y", "state", "dr", "dw", "dk", "dv", "da", "db", "dstate")


def _case(B, T, H, N, scale, seed=0):
    """fp64 inputs (w scaled by ``scale``, random initial state) and upstream gradients for y and state."""
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs("wkv7", B, T, H, N, generator=gen)
    inputs[1] = inputs[1] * scale
    upstream = {"y": torch.randn(B, T, H, N, generator=gen, dtype=torch.float64),
                "state": torch.randn(B, H, N, N, generator=gen, dtype=torch.float64)}
    return inputs, upstream


def _errors(inputs, upstream, dtype):
    """Relative errors of the chunk kernel run in ``dtype`` (w and the state fp32, as the models pass
    them) against the fp64 recurrence on the same rounded inputs."""
    args = [x.float() if i in (1, 6) else x.to(dtype) for i, x in enumerate(inputs)]
    ref = evaluate(wkv7_recurrent, "wkv7", [x.double() for x in args], upstream)
    got = evaluate(wkv7_chunk, "wkv7", args, {n: t.float() for n, t in upstream.items()})
    assert got["y"].dtype == dtype and got["state"].dtype == torch.float32
    for n in NAMES:
        assert got[n] is not None and torch.isfinite(got[n]).all(), n
    return {n: rel_err(got[n], ref[n]) for n in NAMES}


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0, 0.1])
def test_wkv7_chunk_fp32_against_fp64_reference(scale):
    # 40 tokens: two whole chunks and a partial one.
    errs = _errors(*_case(2, 40, 2, 16, scale), torch.float32)
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("T", [1, CHUNK - 1, CHUNK, CHUNK + 1])
def test_wkv7_chunk_fp32_chunk_edges(T):
    errs = _errors(*_case(2, T, 1, 16, 1.0, seed=T), torch.float32)
    assert max(errs.values()) <= 1e-5, errs


def test_wkv7_chunk_fp32_head_size_32():
    errs = _errors(*_case(1, 20, 2, 32, 1.0, seed=5), torch.float32)
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_wkv7_chunk_low_precision(dtype, scale):
    # PERF.md gates for v7: y and state 5e-3, gradients 8e-3.
    errs = _errors(*_case(2, 33, 1, 16, scale, seed=2), dtype)
    assert max(errs["y"], errs["state"]) <= 5e-3, errs
    assert max(v for n, v in errs.items() if n.startswith("d")) <= 8e-3, errs


def test_wkv7_chunk_forward_without_grad_matches_and_upstream_may_be_missing():
    inputs, _ = _case(2, 21, 2, 16, 1.0, seed=9)
    args = [x.float() for x in inputs]
    with torch.no_grad():  # no per-chunk state is stored on this path
        y0, s0 = wkv7_chunk(*args)
    leaves = [x.clone().requires_grad_() for x in args]
    y, s = wkv7_chunk(*leaves)
    assert torch.equal(y0, y) and torch.equal(s0, s)
    # Only the final state feeds the loss (y's upstream gradient is None), then only y.
    ref_leaves = [x.double().requires_grad_() for x in args]
    ref_y, ref_s = wkv7_recurrent(*ref_leaves)
    for out, ref_out in ((s, ref_s), (y, ref_y)):
        got = torch.autograd.grad(out.sum(), leaves, retain_graph=True)
        want = torch.autograd.grad(ref_out.sum(), ref_leaves, retain_graph=True, allow_unused=True)
        for g, w, x in zip(got, want, ref_leaves, strict=True):  # the state does not depend on r
            assert rel_err(g, torch.zeros_like(x) if w is None else w) <= 1e-5


def test_wkv7_chunk_every_output_element_is_written(monkeypatch):
    # Poison the buffers the wrapper allocates: an element a kernel leaves unwritten shows as NaN.
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: empty_like(*a, **k).fill_(float("nan")))
    inputs, upstream = _case(2, 19, 2, 16, 1.0, seed=4)
    got = evaluate(wkv7_chunk, "wkv7", [x.float() for x in inputs], {n: t.float() for n, t in upstream.items()})
    for n in NAMES:
        assert torch.isfinite(got[n]).all(), n


@pytest.mark.parametrize("N, bv, dtype", [(32, 16, torch.float32), (64, 16, torch.float32), (32, 16, torch.bfloat16)])
def test_wkv7_chunk_value_columns_split_over_programs(N, bv, dtype, monkeypatch):
    # chunk7.BV splits a head's value columns over programs; the backward then sums each block's share
    # of the key-side gradients. The same gates as the whole-head kernel, decay x10 included.
    from rwkv_zoo.backends.triton import chunk7

    monkeypatch.setattr(chunk7, "BV", bv)
    errs = _errors(*_case(2, 37, 1, N, 10.0, seed=N), dtype)
    if dtype == torch.float32:
        assert max(errs.values()) <= 1e-5, errs
    else:
        assert max(errs["y"], errs["state"]) <= 5e-3, errs
        assert max(v for n, v in errs.items() if n.startswith("d")) <= 8e-3, errs


def test_wkv7_chunk_head_size_128():
    # N=128 runs in blocks of 16 value columns (chunk7.MAX_BV): eight programs per head.
    errs = _errors(*_case(1, 20, 1, 128, 1.0, seed=7), torch.float32)
    assert max(errs.values()) <= 1e-5, errs


def test_wkv7_chunk_value_split_rule(monkeypatch):
    # Heads are split over programs only while every program still gets an SM of its own.
    from types import SimpleNamespace

    from rwkv_zoo.backends.triton import chunk7

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    gpu = torch.device("cuda")
    assert chunk7._bv(64, 8 * 64, gpu) == 64  # S-std: 512 programs already fill 132 SMs
    assert chunk7._bv(64, 8 * 8, gpu) == 32  # S-small: 64 programs -> 128
    assert chunk7._bv(64, 16, gpu) == 16  # never below 16 columns (tl.dot's smallest tile)
    assert chunk7._bv(128, 8, gpu) == 16  # N=128 always in blocks of 16 (MAX_BV)
    assert chunk7._bv(64, 2, torch.device("cpu")) == 64  # the interpreter: whole heads
    # The same rule splits the wkv6 chunk forward's value blocks (chunk.py), from its own widest block.
    assert chunk7.one_wave_columns(64, 33, gpu) == 16 and chunk7.one_wave_columns(64, 67, gpu) == 64
    monkeypatch.setattr(chunk7, "BV", 32)
    assert chunk7._bv(64, 8 * 64, gpu) == 32 and chunk7._bv(16, 1, gpu) == 16  # an explicit choice wins
