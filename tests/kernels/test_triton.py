"""The ``triton`` backend, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``).

Conformance against the fp64 reference recurrence (``rwkv_zoo.testing.check_backend``) for every op
and mode the backend has, fp32 (gate 1e-5) and bf16/fp16 (5e-3; 8e-3 on wkv7 gradients), outputs,
final state and every gradient, the initial state included; plus availability, capabilities and
dispatch. The interpreter is slow, so shapes are tiny (B=2, H=1-2, N=16; N=32-128 for the chunk
kernels' split heads) and each dtype runs a few lengths across the 64-token boundary. Skipped where
Triton is not installed (an optional extra).
"""

from __future__ import annotations

import os

# Before Triton is imported anywhere: the kernels are defined for the interpreter when first used.
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util

import pytest
import torch
from _deps import require

require("triton")  # in the test extra; before the imports below, which need it

import rwkv_zoo  # noqa: E402
from rwkv_zoo import dispatch  # noqa: E402
from rwkv_zoo.backends import triton as tb  # noqa: E402
from rwkv_zoo.backends.reference import recurrent  # noqa: E402
from rwkv_zoo.dispatch import BackendError, KernelCall  # noqa: E402
from rwkv_zoo.testing import check_backend, evaluate, make_inputs, rel_err  # noqa: E402

pytestmark = pytest.mark.kernel

OPS = ("wkv4", "wkv5", "wkv6", "wkv7")


def _check(op, dtypes, Ts, H=2):
    report = check_backend("triton", ops=(op,), dtypes=dtypes, Ts=Ts, B=2, H=H, N=16)
    ran = [r for r in report.results if not r.skipped]
    modes = set(tb.make_backend().ops()[op])  # every mode the backend declares for this op runs
    assert {r.mode for r in ran} == modes
    assert len(ran) == len(dtypes) * len(Ts) * len(modes), str(report)
    assert not any("forward only" in r.message for r in ran)
    return report


@pytest.mark.parametrize("op", OPS)
def test_conformance_fp32(op):
    # One token, within a chunk, a multiple of 64, just past it, and past two.
    Ts = (1, 15, 64, 65, 130) if op in ("wkv6", "wkv7") else (1, 65, 130)
    report = _check(op, (torch.float32,), Ts)
    assert max(report.max_errors().values()) <= 1e-5, str(report)


@pytest.mark.parametrize("op", OPS)
def test_conformance_bf16(op):
    _check(op, (torch.bfloat16,), (15, 65), H=1)


def test_conformance_fp16():
    _check("wkv6", (torch.float16,), (65,), H=1)


@pytest.mark.parametrize(("op", "N", "T", "scale"), [("wkv6", 32, 40, 10.0), ("wkv5", 32, 40, 1.0),
                                                     ("wkv6", 64, 20, 1.0), ("wkv6", 128, 17, 1.0)])
def test_chunk_split_heads(op, N, T, scale):
    # Above N=16 the chunk kernels split a head (chunk.BLOCKS): value-column blocks in the forward, key
    # blocks in the backward (dv summed from their shares), decay tiles 16 keys at a time. The standard
    # conformance runs at N=16, where nothing splits; this covers the split path, at N=128 too.
    from rwkv_zoo.backends.triton.chunk import blocks

    bl = blocks(N)
    assert bl.bk < N and N % bl.bk == 0 and N % bl.bv == 0
    gen = torch.Generator().manual_seed(N + T)
    inputs = make_inputs(op, 1, T, 2, N, generator=gen, decay_scale=scale)
    upstream = {"y": torch.randn(1, T, 2, N, generator=gen, dtype=torch.float64),
                "state": torch.randn(1, 2, N, N, generator=gen, dtype=torch.float64)}
    ref = evaluate(getattr(recurrent, f"{op}_recurrent"), op, inputs, upstream)

    def run(r, k, v, w, u, s):
        return rwkv_zoo.ops.OP_FUNCTIONS[op](r, k, v, w, u, s, backend="triton", mode="chunk")

    got = evaluate(run, op, [x.float() for x in inputs], {n: t.float() for n, t in upstream.items()})
    for name, t in ref.items():
        assert rel_err(got[name], t) <= 1e-5, name


@pytest.mark.parametrize("op", ["wkv5", "wkv6"])
@pytest.mark.parametrize("scale", [10.0, 0.1])
def test_strong_and_weak_decay(op, scale):
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(op, 1, 40, 2, 16, generator=gen, decay_scale=scale)
    upstream = {"y": torch.randn(1, 40, 2, 16, generator=gen, dtype=torch.float64),
                "state": torch.randn(1, 2, 16, 16, generator=gen, dtype=torch.float64)}
    ref = evaluate(getattr(recurrent, f"{op}_recurrent"), op, inputs, upstream)
    for mode in ("recurrent", "chunk"):

        def run(r, k, v, w, u, s, mode=mode):
            return rwkv_zoo.ops.OP_FUNCTIONS[op](r, k, v, w, u, s, backend="triton", mode=mode)

        got = evaluate(run, op, [x.float() for x in inputs], {n: t.float() for n, t in upstream.items()})
        for name, t in ref.items():
            assert rel_err(got[name], t) <= 1e-5, (mode, name)


@pytest.mark.parametrize("op", ["wkv6", "wkv7"])
def test_recurrent_backward_keeps_one_state_per_checkpoint_block(op):
    # What autograd holds between forward and backward: the inputs and one [K, V] state per CKPT steps
    # (ceil(T / CKPT) per head), not one per step; the backward recomputes the rest block by block.
    from rwkv_zoo.backends.triton.recurrent import CKPT

    B, T, H, N = 1, 2 * CKPT + 3, 2, 16
    gen = torch.Generator().manual_seed(0)
    inputs = [x.float().requires_grad_() for x in make_inputs(op, B, T, H, N, generator=gen)]
    y, _ = rwkv_zoo.ops.OP_FUNCTIONS[op](*inputs, backend="triton", mode="recurrent")
    states = [t for t in y.grad_fn.saved_tensors if t.dim() == 5]
    assert [tuple(t.shape) for t in states] == [(B, H, 3, N, N)]


def test_wkv4_chunk_is_the_recurrent_kernel_and_takes_long_sequences():
    # wkv4 has no matrix state, so its chunk kernel is the recurrent one; a training-length call picks it
    # (no fallback) and its backward has no length limit: T=300 against the fp64 reference, every gradient.
    b = dispatch.get_backends()["triton"]
    assert b.kernel("wkv4", "chunk").fn is b.kernel("wkv4", "recurrent").fn
    sel = dispatch.select(KernelCall("wkv4", "chunk", "cpu", torch.float32, 8, 100_000, 1, 768, True, True), "triton")
    assert (sel.backend, sel.mode) == ("triton", "chunk")
    gen = torch.Generator().manual_seed(4)
    B, T, C = 1, 300, 16
    inputs = make_inputs("wkv4", B, T, 1, C, generator=gen)
    upstream = {"y": torch.randn(B, T, C, generator=gen, dtype=torch.float64),
                **{n: torch.randn(B, C, generator=gen, dtype=torch.float64) for n in ("a", "b", "p")}}
    ref = evaluate(recurrent.wkv4_recurrent, "wkv4", inputs, upstream)

    def run(w, u, k, v, s):
        return rwkv_zoo.ops.wkv4(w, u, k, v, s, backend="triton", mode="chunk")

    cast = [tuple(x.float() for x in a) if isinstance(a, tuple) else a.float() for a in inputs]
    got = evaluate(run, "wkv4", cast, {n: t.float() for n, t in upstream.items()})
    for name, t in ref.items():
        if t is not None:
            assert rel_err(got[name], t) <= 1e-5, name


def test_registered_and_available_under_the_interpreter():
    backends = dispatch.get_backends()
    assert "triton" in backends
    b = backends["triton"]
    assert b.unavailable_reason() is None
    assert b.ops() == {"wkv4": ["recurrent", "chunk"], "wkv5": ["recurrent", "chunk"], "wkv6": ["recurrent", "chunk"],
                       "wkv7": ["recurrent", "chunk"]}
    assert b.kernel("wkv6", "recurrent").head_sizes == (16, 32, 64, 128)


def test_unavailable_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tb.unavailable_reason() == (
        "no CUDA GPU, and TRITON_INTERPRET=1 is not set (Triton's interpreter runs the kernels on the CPU)")
    # The environment is read at every call.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unavailable_reason() is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    tb._import_error.cache_clear()
    try:
        assert tb.unavailable_reason().startswith("triton is not installed")
    finally:
        monkeypatch.undo()
        tb._import_error.cache_clear()
    assert tb.unavailable_reason() is None


def test_capability_reasons(monkeypatch):
    b = dispatch.get_backends()["triton"]
    # The recurrent backward keeps checkpoints, not every step's state: no length limit on gradients.
    for op in ("wkv5", "wkv6", "wkv7"):
        assert not b.reasons(KernelCall(op, "recurrent", "cpu", torch.float32, 2, 32768, 4, 64, True, True))
    assert not b.reasons(KernelCall("wkv6", "recurrent", "cpu", torch.float32, 2, 4096, 4, 64, False, True))
    assert not b.reasons(KernelCall("wkv4", "recurrent", "cpu", torch.float32, 2, 4096, 1, 100, True, True))
    assert any("head size" in r for r in b.reasons(KernelCall("wkv7", "recurrent", "cpu", torch.float32,
                                                                1, 8, 1, 24)))
    assert any("float64" in r for r in b.reasons(KernelCall("wkv7", "recurrent", "cpu", torch.float64,
                                                              1, 8, 1, 16)))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("TRITON_INTERPRET=1" in r for r in b.kernel("wkv6", "recurrent").reasons(
        KernelCall("wkv6", "recurrent", "cpu", torch.float32, 1, 8, 1, 16)))


def test_chunk_falls_back_and_says_so():
    # wkv7 chunk takes head sizes up to 128 (in blocks of value columns); 256 fits neither wkv7 kernel,
    # and an explicit choice of triton says so instead of running elsewhere.
    sel = dispatch.select(KernelCall("wkv7", "chunk", "cpu", torch.float32, 1, 100, 1, 128, True), "triton")
    assert sel.mode == "chunk" and sel.backend == "triton"
    with pytest.raises(BackendError, match="head size"):
        dispatch.select(KernelCall("wkv7", "chunk", "cpu", torch.float32, 1, 100, 1, 256), "triton")
    # wkv5/6 have chunk kernels with a backward and no length limit, for head sizes up to 256 (split
    # over programs and key blocks); 256 has no recurrent kernel, so short calls run chunked and say why.
    for op in ("wkv5", "wkv6"):
        for N in (16, 128, 256):
            sel = dispatch.select(KernelCall(op, "chunk", "cpu", torch.float32, 1, 4096, 1, N, True), "triton")
            assert sel.mode == "chunk", (op, N)
    sel = dispatch.select(KernelCall("wkv6", "recurrent", "cpu", torch.float32, 1, 8, 1, 256, True), "triton")
    assert sel.mode == "chunk" and "head size" in sel.mode_reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine triton outranks reference")
def test_interpreter_is_never_chosen_automatically_on_cpu():
    for mode in ("recurrent", "chunk"):
        sel = dispatch.select(KernelCall("wkv6", mode, "cpu", torch.float32, 1, 8, 1, 16))
        assert sel.backend != "triton"
