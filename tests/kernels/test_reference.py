"""The reference backend's chunked kernels against its recurrences, the literal per-step oracle.

Every comparison covers the output, the final state (``a, b, p`` for wkv4) and the gradient of every
input including the initial state, under random upstream gradients on ``y`` and on the final state.
Errors are relative, ``||x - ref|| / ||ref||``: fp64 chunk vs fp64 recurrent <= 1e-10 (same maths,
different order), fp32 chunk vs fp64 recurrent <= 1e-5 (PERF.md), bf16 inputs <= 5e-3.
"""

from __future__ import annotations

import re

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import dispatch
from rwkv_zoo.backends.reference import chunk, recurrent
from rwkv_zoo.testing import arg_names, cast_inputs, evaluate, make_inputs, rel_err

pytestmark = pytest.mark.kernel

OPS = ("wkv4", "wkv5", "wkv6", "wkv7")
CHUNK = {"wkv4": chunk.wkv4_chunk, "wkv5": chunk.wkv5_chunk, "wkv6": chunk.wkv6_chunk, "wkv7": chunk.wkv7_chunk}
RECURRENT = {
    "wkv4": recurrent.wkv4_recurrent,
    "wkv5": recurrent.wkv5_recurrent,
    "wkv6": recurrent.wkv6_recurrent,
    "wkv7": recurrent.wkv7_recurrent,
}
STATE_NAMES = {op: ("a", "b", "p") if op == "wkv4" else ("state",) for op in OPS}
B, H, N = 2, 2, 8
TS = (1, 15, 63, 64, 65, 300)
# Log-decay scales: 1 = PERF.md's distribution, 10 = strong decay, 0.1 = weak decay. v7's official
# parameterization bounds its decay to (0.545, 1), so it has only the one.
SCALES = {"wkv4": (1.0, 10.0, 0.1), "wkv5": (1.0, 10.0, 0.1), "wkv6": (1.0, 10.0, 0.1), "wkv7": (1.0,)}
CASES = [(op, T, s) for op in OPS for T in TS for s in SCALES[op]]


def _oracle(op: str, T: int, scale: float = 1.0, seed: int = 0, zero_state: bool = False):
    """fp64 inputs, random upstream gradients, and the fp64 recurrent results with gradients."""
    gen = torch.Generator().manual_seed(seed + 1000 * T + OPS.index(op))
    inputs = make_inputs(op, B, T, H, N, generator=gen, decay_scale=scale)
    if zero_state:
        inputs[-1] = (
            rwkv_zoo.ops.zero_state4(B, H * N, "cpu", torch.float64) if op == "wkv4"
            else torch.zeros_like(inputs[-1])
        )
    shapes = evaluate(RECURRENT[op], op, inputs, None, grad=False)
    upstream = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in shapes.items()}
    return inputs, upstream, evaluate(RECURRENT[op], op, inputs, upstream)


def _to(inputs: list, dtype: torch.dtype) -> list:
    return [tuple(s.to(dtype) for s in x) if isinstance(x, tuple) else x.to(dtype) for x in inputs]


def _assert_close(got: dict, ref: dict, tol: float, what: str) -> dict[str, float]:
    missing = [n for n in ref if got.get(n) is None]
    assert not missing, f"{what}: no result/gradient for {missing}"
    errs = {n: rel_err(got[n], ref[n]) for n in ref}
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad}"
    return errs


@pytest.mark.parametrize(("op", "T", "scale"), CASES, ids=[f"{o}-T{t}-decay{s:g}" for o, t, s in CASES])
def test_chunk_matches_recurrent(op, T, scale):
    inputs, upstream, ref = _oracle(op, T, scale)
    assert set(ref) == {"y", *STATE_NAMES[op]} | {f"d{n}" for n in arg_names(op)}
    got = evaluate(CHUNK[op], op, inputs, upstream)
    _assert_close(got, ref, 1e-10, f"{op} chunk fp64")
    got32 = evaluate(CHUNK[op], op, _to(inputs, torch.float32), upstream)
    _assert_close(got32, ref, 1e-5, f"{op} chunk fp32 vs fp64 oracle")
    assert got32["y"].dtype == torch.float32
    assert all(got32[n].dtype == torch.float32 for n in ("a", "b", "p") if n in got32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("L", [1, 3, 16])
@pytest.mark.parametrize("segment", ["one chunk per segment", "default segments"])
def test_any_chunk_length_and_segmentation(op, L, segment, monkeypatch):
    """The chunk length and the segment size change the order of the sums, never the result."""
    for name in ("CHUNK_LEN", "CHUNK_LEN4", "CHUNK_LEN7"):
        monkeypatch.setattr(chunk, name, L)
    if segment == "one chunk per segment":
        monkeypatch.setattr(chunk, "SEGMENT_ELEMENTS", 1)
    inputs, upstream, ref = _oracle(op, 37)
    _assert_close(evaluate(CHUNK[op], op, inputs, upstream), ref, 1e-10, f"{op} L={L} {segment}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_initial_state(op, dtype):
    """The zero state, including v4's p = -1e30: finite values and gradients, equal to the recurrence."""
    inputs, upstream, ref = _oracle(op, 40, zero_state=True)
    got = evaluate(CHUNK[op], op, _to(inputs, dtype), upstream)
    assert all(torch.isfinite(t).all() for t in got.values() if t is not None)
    _assert_close(got, ref, 1e-10 if dtype == torch.float64 else 1e-5, f"{op} zero state")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("log_decay", [-1e4, -80.0, 0.0])
def test_extreme_decay_stays_finite(op, log_decay):
    """Decay that underflows at once, decay near the fp32 exp limit, and no decay at all."""
    inputs, upstream, ref = _oracle(op, 37)
    w_index = arg_names(op).index("w")
    inputs[w_index] = torch.full_like(inputs[w_index], log_decay)
    if op == "wkv4":
        inputs[2] = inputs[2] * 30  # large keys: exponents far apart
    ref = evaluate(RECURRENT[op], op, inputs, upstream)
    got32 = evaluate(CHUNK[op], op, _to(inputs, torch.float32), upstream)
    for n, t in got32.items():
        assert t is not None and torch.isfinite(t).all(), f"{op} w={log_decay}: {n} is not finite"
    _assert_close(evaluate(CHUNK[op], op, inputs, upstream), ref, 1e-10, f"{op} w={log_decay} fp64")


def _front_end(op: str, mode: str, with_state: bool):
    fn = getattr(rwkv_zoo, op)

    def run(*args):
        return fn(*args[:-1], args[-1] if with_state else None, mode=mode, backend="reference")

    return run


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("with_state", [True, False])
def test_front_end_chunk_matches_recurrent(op, with_state):
    T = 40
    inputs, upstream, _ = _oracle(op, T)
    args = cast_inputs(op, inputs, torch.float32, "cpu")
    got = evaluate(_front_end(op, "chunk", with_state), op, args, upstream)
    ref = evaluate(_front_end(op, "recurrent", with_state), op, args, upstream)
    if not with_state:  # the state argument was not used: no gradient for it
        state_grads = {f"d{n}" for n in STATE_NAMES[op]}
        assert all(got[n] is None and ref[n] is None for n in state_grads)
        got = {n: t for n, t in got.items() if n not in state_grads}
        ref = {n: t for n, t in ref.items() if n not in state_grads}
    _assert_close(got, ref, 1e-5, f"{op} front-end chunk vs recurrent")
    # The front-end's chunk mode runs this module's kernel.
    call = dispatch.KernelCall(op, "chunk", "cpu", torch.float32, B, T, 1 if op == "wkv4" else H,
                               H * N if op == "wkv4" else N, True, with_state)
    assert dispatch.select(call, "reference", mode_fixed=True).kernel.fn is CHUNK[op]


@pytest.mark.parametrize("op", OPS)
def test_bf16_inputs_in_chunk_mode(op):
    """bf16 activations (fp32 decay and state): within 5e-3 of the fp64 oracle on y and the state."""
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(op, B, 65, H, N, generator=gen)
    args = cast_inputs(op, inputs, torch.bfloat16, "cpu")
    rounded = _to(args, torch.float64)  # the oracle sees exactly the rounded inputs
    ref = evaluate(RECURRENT[op], op, rounded, None, grad=False)
    got = evaluate(_front_end(op, "chunk", True), op, args, None, grad=False)
    assert got["y"].dtype == torch.bfloat16
    state_names = [n for n in got if n != "y"]
    assert all(got[n].dtype == torch.float32 for n in state_names)
    _assert_close(got, ref, 5e-3, f"{op} bf16 chunk")


def _shape_error_cases():
    r = torch.randn(B, 5, H, N)
    w6, u = torch.randn(B, 5, H, N), torch.randn(H, N)
    state = torch.randn(B, H, N, N)
    k4 = torch.randn(B, 5, H * N)
    w4 = torch.randn(H * N)
    s4 = (torch.zeros(B, H * N), torch.zeros(B, H * N), torch.zeros(B, H * N))
    return [
        ("wkv6 w per head", lambda: rwkv_zoo.wkv6(r, r, r, u, u, mode="chunk"), "w must have shape [B, T, H, N]"),
        ("wkv5 w per token", lambda: rwkv_zoo.wkv5(r, r, r, w6, u, mode="chunk"), "w must have shape [H, N]"),
        ("wkv6 u per token", lambda: rwkv_zoo.wkv6(r, r, r, w6, w6, mode="chunk"), "u must have shape [H, N]"),
        ("wkv6 state V", lambda: rwkv_zoo.wkv6(r, r, r, w6, u, state[..., :-1], mode="chunk"),
         "state must have shape [B, H, K, V]"),
        ("wkv7 state batch", lambda: rwkv_zoo.wkv7(r, w6, r, r, r, r, state[:1], mode="chunk"),
         "state must have shape [B, H, K, V]"),
        ("wkv7 a", lambda: rwkv_zoo.wkv7(r, w6, r, r, r[:, :4], r, mode="chunk"), "a must have shape [B, T, H, N]"),
        ("wkv6 k rank", lambda: rwkv_zoo.wkv6(r, r[..., 0], r, w6, u, mode="chunk"), "k must have shape [B, T, H, N]"),
        ("wkv6 r rank", lambda: rwkv_zoo.wkv6(r[..., 0], r, r, w6, u, mode="chunk"), "r must be [B, T, H, N]"),
        ("wkv4 w", lambda: rwkv_zoo.wkv4(w4[:-1], w4, k4, k4, mode="chunk"), "w must have shape [C]"),
        ("wkv4 state tuple", lambda: rwkv_zoo.wkv4(w4, w4, k4, k4, s4[:2], mode="chunk"), "tuple (a, b, p)"),
        ("wkv4 state p", lambda: rwkv_zoo.wkv4(w4, w4, k4, k4, (*s4[:2], s4[2][:1]), mode="chunk"),
         "state p must have shape [B, C]"),
    ]


@pytest.mark.parametrize(("fn", "message"), [c[1:] for c in _shape_error_cases()],
                         ids=[c[0] for c in _shape_error_cases()])
def test_wrong_shapes_raise_helpful_errors(fn, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        fn()
    assert "got" in str(info.value) or "tuple" in str(info.value)  # says what it received
