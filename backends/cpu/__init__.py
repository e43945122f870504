"""The ``cpu`` backend: forward-only WKV recurrences in C++ for inference on the CPU (prefill and decode).

Kernels (``csrc/cpu_wkv.cpp``, built at first use by ``rwkv_zoo.backends.cpu.kernels`` with the system
compiler, called through ``ctypes``): the literal recurrence of each op, one OpenMP task per (batch,
head), the fp32 [K, V] state of a head in L1 while it walks t, loops vectorized by the compiler. It
serves both modes: on a CPU at inference sizes the sequential recurrence does much less work than the
chunked matrix form (whose pairwise-decay tensors cost more than the model's GEMMs for wkv4), so
``chunk`` calls without gradients run the same loop. Accuracy is that of fp32 arithmetic on the
literal formulas (≤ 1e-6 relative to the fp64 reference; ``rwkv_zoo.testing.check_backend``).

Capabilities: CPU tensors, fp32 inputs, any T, B, H and head size; no backward (``supports_backward``
is false, so dispatch gives training calls to a backend with gradients and says why). Priority 2: above
``reference`` for the calls it can run. The kernels are built for the CPU's instruction set (portable
C++ on any CPU, AVX2, AVX-512, VNNI, BF16; ``RWKV_ZOO_CPU_ISA`` overrides, see ``kernels``).
Unavailable (with the reason) where they cannot be built: no C++ compiler, an ``RWKV_ZOO_CPU_ISA``
this CPU cannot run, or ``RWKV_ZOO_CPU_KERNELS=0``.

It also provides a fused step (``fused.py``): every layer, the final norm and the head of a v4-v7
model in one C++ call, which ``rwkv_zoo.fused`` chooses for inference without gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.backends.cpu import kernels as cpu_kernels
from rwkv_zoo.hookspecs import hookimpl

PRIORITY = 2


def unavailable_reason() -> str | None:
    return cpu_kernels.load_wkv()[1]


def _c(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _lib():
    return cpu_kernels.load_wkv()[0]


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    B, T, C = k.shape
    w, u, k, v = _c(w.float()), _c(u.float()), _c(k), _c(v)
    a0, b0, p0 = (_c(s) for s in state)
    y = torch.empty_like(k)
    aT, bT, pT = torch.empty_like(a0), torch.empty_like(b0), torch.empty_like(p0)
    ptr = [t.data_ptr() for t in (w, u, k, v, a0, b0, p0, y, aT, bT, pT)]
    _lib().rz_wkv4(*ptr, B, T, C, torch.get_num_threads())
    return y, (aT, bT, pT)


def _wkv56(r, k, v, w, u, state, per_token: bool):
    B, T, H, N = r.shape
    r, k, v, w, u, s0 = _c(r), _c(k), _c(v), _c(w.float()), _c(u.float()), _c(state)
    y = torch.empty_like(r)
    sT = torch.empty_like(s0)
    _lib().rz_wkv6(r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), int(per_token), u.data_ptr(),
                   s0.data_ptr(), y.data_ptr(), sT.data_ptr(), B, T, H, N, torch.get_num_threads())
    return y, sT


def wkv5(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _wkv56(r, k, v, w, u, state, per_token=False)


def wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    return _wkv56(r, k, v, w, u, state, per_token=True)


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    B, T, H, N = r.shape
    ins = [_c(t) for t in (r, w.float(), k, v, a, b, state)]
    y = torch.empty_like(ins[0])
    sT = torch.empty_like(ins[-1])
    _lib().rz_wkv7(*(t.data_ptr() for t in ins), y.data_ptr(), sT.data_ptr(), B, T, H, N, torch.get_num_threads())
    return y, sT


def make_backend() -> Backend:
    from rwkv_zoo.backends.cpu import fused

    common = dict(devices=("cpu",), dtypes=(torch.float32,), supports_backward=False)
    fns = {"wkv4": wkv4, "wkv5": wkv5, "wkv6": wkv6, "wkv7": wkv7}
    kernels = [Kernel(op, mode, fn, **common) for op, fn in fns.items() for mode in ("recurrent", "chunk")]
    return Backend(
        name="cpu",
        kernels=kernels,
        priority=PRIORITY,
        description="C++ WKV recurrences and a fused whole-model step for CPU inference (forward only, fp32; "
        "built on first use)",
        availability=unavailable_reason,
        steps=[fused.STEP],
    )


@hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@hookimpl
def rwkv_zoo_update_env_info(info):
    why = unavailable_reason()
    info["cpu backend"] = why or "available (C++ kernels built)"
    info["cpu kernels isa"] = cpu_kernels.describe_isa()
