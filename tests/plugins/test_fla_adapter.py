"""The ``fla`` adapter (``rwkv_zoo.backends.fla``) on a machine without fla or a GPU.

fla's Triton kernels need a GPU driver (they fail under ``TRITON_INTERPRET=1``), so here the adapter's
conversions run over a **stand-in**: the recurrences fla documents and implements (read in fla 0.6.0:
``fla/ops/rwkv6/recurrent_naive.py``, ``fla/ops/generalized_delta_rule/dplr/naive.py`` and the fused
recurrent kernels), written here as plain PyTorch loops with fla's signatures, layouts and defaults
(``scale=None`` meaning ``1/sqrt(K)``). The conformance suite then compares the adapter over the
stand-in with our fp64 reference: a wrong scale, decay convention, argument order, layout or a missing
broadcast fails it (the last test shows that it does). The real kernels are checked in the GPU script.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.backends import fla as fla_backend
from rwkv_zoo.dispatch import KernelCall, get_backends
from rwkv_zoo.testing import check_backend, registered_plugin

# --- a stand-in for fla's four RWKV ops (fp32 loops; same signatures, layouts and defaults) ---------


def _check_layout(r, k, v, initial_state):
    B, T, H, K = r.shape
    assert k.shape == r.shape and v.shape[:3] == (B, T, H), "fla takes [B, T, H, K] inputs"
    assert initial_state is None or (
        initial_state.shape == (B, H, K, v.shape[-1]) and initial_state.dtype == torch.float32
    ), "fla takes an fp32 initial state [B, H, K, V]"
    return K


def _rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, **_):
    K = _check_layout(r, k, v, initial_state)
    assert w.shape == r.shape, "fla's rwkv6 takes a per-token log decay [B, T, H, K]"
    assert u.shape == r.shape[2:], "fla's rwkv6 takes u [H, K]"
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(r.shape[0], r.shape[2], K, v.shape[-1]) if initial_state is None else initial_state
    out = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None].float() * v[:, t, :, None, :].float()
        out.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t].float(), S + u.float()[..., None] * kv))
        S = S * w[:, t].float().exp()[..., None] + kv
    return torch.stack(out, 1).to(v.dtype), (S if output_final_state else None)


def _dplr(r, k, v, a, b, log_w, scale, initial_state, output_final_state):
    K = _check_layout(r, k, v, initial_state)
    assert a.shape == b.shape == log_w.shape == r.shape
    scale = K**-0.5 if scale is None else scale
    S = torch.zeros(r.shape[0], r.shape[2], K, v.shape[-1]) if initial_state is None else initial_state
    out = []
    for t in range(r.shape[1]):
        aS = torch.einsum("bhk,bhkv->bhv", a[:, t].float(), S)
        S = (log_w[:, t].float().exp()[..., None] * S + b[:, t].float()[..., None] * aS[:, :, None, :]
             + k[:, t, :, :, None].float() * v[:, t, :, None, :].float())
        out.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t].float(), S))
    return torch.stack(out, 1).to(v.dtype), (S if output_final_state else None)


def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla 0.6.0's signature: ``w`` is the log decay."""
    return _dplr(r, k, v, a, b, w, scale, initial_state, output_final_state)


def fused_recurrent_rwkv7(r, w, k, v, a, b, scale=None, initial_state=None, output_final_state=True,
                          cu_seqlens=None):
    """fla 0.6.0's signature; note ``scale=None`` (1/sqrt(K)) here, unlike chunk_rwkv7."""
    return _dplr(r, k, v, a, b, w, scale, initial_state, output_final_state)


def old_chunk_rwkv7(r, k, v, a, b, w=None, log_w=None, scale=1.0, initial_state=None, output_final_state=True,
                    cu_seqlens=None, head_first=False):
    """An older fla signature: other argument order, ``w`` the raw decay, ``log_w`` the log decay."""
    if log_w is None:
        log_w = -torch.exp(w)
    return _dplr(r, k, v, a, b, log_w, scale, initial_state, output_final_state)


STAND_IN = {
    "chunk_rwkv6": _rwkv6,
    "fused_recurrent_rwkv6": _rwkv6,
    "chunk_rwkv7": chunk_rwkv7,
    "fused_recurrent_rwkv7": fused_recurrent_rwkv7,
}


def _plugin(name: str, ops: dict):
    class StandIn:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(fla_backend.make_backend(name=name, devices=("cpu",), availability=lambda: None,
                                              ops=lambda: ops, priority=-50))

    return registered_plugin(StandIn(), f"{name}-plugin")


@pytest.fixture
def fp32_allowed(monkeypatch):
    monkeypatch.setenv(fla_backend.FP32_ENV, "1")


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_adapter_conversions_conform_over_the_stand_in(fp32_allowed):
    """The adapter over this file's stand-in of fla 0.6.0 (not fla itself) matches the reference."""
    with _plugin("fla-stand-in", STAND_IN):
        report = check_backend("fla-stand-in", dtypes=(torch.float32, torch.bfloat16), Ts=(1, 17, 33))
    assert report.ok, str(report)
    ran = {(r.op, r.mode) for r in report.results if not r.skipped}
    assert ran == {(op, mode) for op in ("wkv5", "wkv6", "wkv7") for mode in ("chunk", "recurrent")}
    rec7 = [r for r in report.results if (r.op, r.mode) == ("wkv7", "recurrent")]
    assert all("forward only" in r.message for r in rec7)  # fla's fused_recurrent_rwkv7 has no backward


@pytest.mark.kernel
def test_adapter_over_a_stand_in_of_the_older_log_w_signature(fp32_allowed):
    """The adapter finds ``log_w`` in a stand-in with the older signature; real older fla is not run."""
    with _plugin("fla-old", {**STAND_IN, "chunk_rwkv7": old_chunk_rwkv7}):
        assert check_backend("fla-old", ops=["wkv7"], modes=["chunk"], Ts=(1, 17)).ok


@pytest.mark.kernel
@pytest.mark.parametrize("mistake", ["a-b-swapped", "default-scale"])
def test_conformance_over_the_stand_in_catches_convention_mistakes(fp32_allowed, mistake):
    """A deliberately wrong stand-in fails the conformance check: the stand-in tests can fail."""
    def swapped(r, w, k, v, a, b, **kw):
        return chunk_rwkv7(r, w, k, v, b, a, **kw)

    def default_scale(r, w, k, v, a, b, scale=1.0, **kw):
        return fused_recurrent_rwkv7(r, w, k, v, a, b, scale=None, **kw)

    ops = {**STAND_IN, "chunk_rwkv7": swapped} if mistake == "a-b-swapped" else {
        **STAND_IN, "fused_recurrent_rwkv7": default_scale}
    with _plugin("fla-wrong", ops):
        report = check_backend("fla-wrong", ops=["wkv7"], Ts=(17,), raise_on_fail=False)
    assert not report.ok and report.failures


def test_registered_and_unavailable_here_with_its_reason():
    """Registration, and the reason it gives on this machine (no fla or no GPU); no kernel runs."""
    fla = {b["name"]: b for b in rwkv_zoo.list_backends()}["fla"]
    assert fla["provider"] == "rwkv_zoo.backends.fla" and fla["distribution"].startswith("rwkv-zoo ")
    assert set(fla["ops"]) == {"wkv5", "wkv6", "wkv7"}
    if importlib.util.find_spec("fla") is None:
        assert not fla["available"]
        assert fla["reason"].startswith("flash-linear-attention is not installed")
    elif not torch.cuda.is_available():
        assert fla["reason"].startswith("needs a CUDA GPU")
    text = str(rwkv_zoo.explain(rwkv_zoo.build("v7-tiny", device="meta"), (1, 64)))
    if not fla["available"]:
        assert f"not fla: {fla['reason']}" in text


def test_reason_without_a_gpu(monkeypatch):
    fla_backend.unavailable_reason.cache_clear()
    try:
        monkeypatch.setattr(fla_backend.importlib.util, "find_spec", lambda name: object())
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert fla_backend.unavailable_reason() == "needs a CUDA GPU (torch.cuda.is_available() is False)"
    finally:
        fla_backend.unavailable_reason.cache_clear()


def test_capabilities_say_what_they_refuse(monkeypatch):
    monkeypatch.delenv(fla_backend.FP32_ENV, raising=False)
    kernel = fla_backend.make_backend(availability=lambda: None).kernel("wkv6", "chunk")

    def reasons(**kw):
        call = dict(op="wkv6", mode="chunk", device="cuda", dtype=torch.bfloat16, B=1, T=64, H=2, N=64)
        return kernel.reasons(KernelCall(**{**call, **kw}))

    assert reasons() == []
    assert reasons(device="cpu") == ["runs on cuda, not cpu"]
    assert "needs head size N in 16..256" in reasons(N=8)[0]
    assert "TF32" in reasons(dtype=torch.float32)[0] and fla_backend.FP32_ENV in reasons(dtype=torch.float32)[0]
    monkeypatch.setenv(fla_backend.FP32_ENV, "1")
    assert reasons(dtype=torch.float32) == []
    assert "takes bfloat16, float16, float32 inputs, not float64" in reasons(dtype=torch.float64)[0]
    rec7 = fla_backend.make_backend().kernel("wkv7", "recurrent")
    assert rec7 is not None and not rec7.supports_backward
    assert get_backends()["fla"].kernel("wkv4", "chunk") is None  # fla has no RWKV-4 kernel


def test_decay_keyword_and_wkv5_broadcast():
    """The signature probe and the argument conversion, on stand-in functions and plain tensors."""
    assert fla_backend.rwkv7_decay_keyword(chunk_rwkv7) == "w"
    assert fla_backend.rwkv7_decay_keyword(old_chunk_rwkv7) == "log_w"
    with pytest.raises(TypeError, match="no log-decay parameter"):
        fla_backend.rwkv7_decay_keyword(lambda r, k, v, g: None)
    r = torch.randn(2, 5, 3, 16)
    w = -torch.rand(3, 16)
    _, _, _, w5, _ = fla_backend.rwkv6_args("wkv5", r, r, r, w, w)
    assert w5.shape == r.shape and torch.equal(w5[1, 4], w)
    _, _, _, w6, _ = fla_backend.rwkv6_args("wkv6", r, r, r, r, w)
    assert w6 is r


# --- the real kernels: where fla and a CUDA GPU are present (tox -e gpu) ----------------------------

needs_fla = pytest.mark.skipif(fla_backend.unavailable_reason() is not None,
                               reason=f"fla backend: {fla_backend.unavailable_reason()}")


@pytest.mark.gpu
@pytest.mark.kernel
@needs_fla
def test_real_fla_kernels_conform_in_bf16_and_fp16():
    report = check_backend("fla", dtypes=(torch.bfloat16, torch.float16), device="cuda", N=64, raise_on_fail=False)
    print(report.summary())
    assert report.ok, str(report)


@pytest.mark.gpu
@pytest.mark.kernel
@needs_fla
def test_real_fla_kernels_in_fp32_are_measured(monkeypatch):
    """fp32 runs in TF32 inside fla: measured and printed (the reason fp32 is opt-in), never NaN."""
    monkeypatch.setenv(fla_backend.FP32_ENV, "1")
    report = check_backend("fla", dtypes=(torch.float32,), device="cuda", N=64, raise_on_fail=False)
    print(report.summary())
    assert all("NaN" not in r.message and "raised" not in r.message for r in report.results), str(report)
