"""The ``cpu`` backend: C++ WKV recurrences against the fp64 reference (training kernels in more depth:
test_cpu_train.py)."""

from __future__ import annotations

import pytest
import torch
from _deps import CXX, needs

import rwkv_zoo
from rwkv_zoo import dispatch
from rwkv_zoo.backends import cpu as cpu_backend
from rwkv_zoo.backends.cpu import train as cpu_train
from rwkv_zoo.dispatch import BackendError, KernelCall
from rwkv_zoo.testing import check_backend

pytestmark = [
    pytest.mark.kernel,
    needs(cpu_backend.unavailable_reason(), CXX),
]


class _NaNOutputs:
    """``torch`` as the cpu backend's wrappers see it, except that the output buffers they allocate
    for the C++ kernels (``torch.empty_like``, ``torch.empty``) start as NaN: an element a kernel leaves
    unwritten fails the conformance check's NaN test instead of passing with whatever memory held."""

    def __init__(self) -> None:
        self.buffers = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty_like(self, *args, **kwargs):
        self.buffers += 1
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))

    def empty(self, *args, **kwargs):
        self.buffers += 1
        return torch.empty(*args, **kwargs).fill_(float("nan"))


@pytest.mark.parametrize("N", [16, 64])
def test_conformance_forward_into_nan_poisoned_outputs(N, monkeypatch):
    # Random initial state, odd T, NaN in every output buffer before each call; fp32 gate 1e-5 (PERF.md).
    poisoned = _NaNOutputs()
    monkeypatch.setattr(cpu_backend, "torch", poisoned)
    monkeypatch.setattr(cpu_train, "torch", poisoned)
    # T = 17 crosses a checkpoint of the training kernels; N = 64 keeps to short T (the fp64 oracle's
    # gradients at N = 64 dominate the time, and test_cpu_train.py covers longer T there).
    report = check_backend("cpu", dtypes=(torch.float32,), Ts=(1, 15, 65) if N == 16 else (1, 17), B=2, H=2, N=N)
    assert poisoned.buffers >= 2 * 4 * 3, "the wrappers no longer allocate through torch.empty_like"
    ran = [r for r in report.results if not r.skipped]
    assert len(ran) == 4 * 2 * (3 if N == 16 else 2), str(report)
    # Every op runs its training kernels (train.py), so every gradient is compared too.
    assert not any("forward only" in r.message for r in ran), str(report)
    assert all({"dstate", "dp"} & set(r.errors) for r in ran), str(report)
    assert max(report.max_errors().values()) <= 1e-6, str(report)


def test_strong_and_weak_decay_match_reference():
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 2, 40, 2, 32
    for scale in (0.1, 10.0):
        r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
        w = torch.nn.functional.logsigmoid(torch.randn(B, T, H, N, generator=g)) * scale
        u, s0 = torch.randn(H, N, generator=g), torch.randn(B, H, N, N, generator=g)
        ref_y, ref_s = rwkv_zoo.wkv6(r.double(), k.double(), v.double(), w.double(), u.double(), s0.double(),
                                     backend="reference", mode="recurrent")
        y, s = rwkv_zoo.wkv6(r, k, v, w, u, s0, backend="cpu")
        assert float((y.double() - ref_y).norm() / ref_y.norm()) < 1e-6
        assert float((s.double() - ref_s).norm() / ref_s.norm()) < 1e-6


def test_serves_inference_calls_and_gives_training_calls_away():
    infer = KernelCall("wkv7", "chunk", "cpu", torch.float32, 1, 512, 12, 64)
    assert dispatch.select(infer).backend == "cpu"
    # Gradient calls on fp32 CPU tensors run the training kernels (test_cpu_train.py); others go elsewhere.
    train = KernelCall("wkv4", "chunk", "cpu", torch.float32, 1, 512, 1, 768, requires_grad=True)
    assert dispatch.select(train).backend == "cpu"
    fp64 = KernelCall("wkv7", "chunk", "cpu", torch.float64, 1, 512, 12, 64, requires_grad=True)
    sel = dispatch.select(fp64)
    assert sel.backend != "cpu"
    assert any("float64" in " ".join(why) for name, why in sel.rejected if name == "cpu")
    with pytest.raises(BackendError, match="float64"):
        dispatch.select(fp64, "cpu")
    bf16 = KernelCall("wkv6", "chunk", "cpu", torch.bfloat16, 1, 64, 4, 64)
    assert dispatch.select(bf16).backend != "cpu"


def test_model_prefill_on_cpu_backend_equals_reference():
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v4-tiny"), seed=2).eval()
    tokens = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens)
        model.backend = "reference"
        ref, _ = model(tokens)
    assert float((ours - ref).norm() / ref.norm()) < 1e-5
