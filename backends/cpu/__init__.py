"""The ``cpu`` backend: WKV recurrences in C++ for the CPU, for inference (prefill and decode) and training.

Kernels (built at first use by ``rwkv_zoo.backends.cpu.kernels`` with the system compiler, called
through ``ctypes``): the literal recurrence of each op, one OpenMP task per (batch, head) (wkv4: per
sequence and block of channels), the fp32 [K, V] state of a head in L1 while it walks t, loops
vectorized by the compiler. Calls without gradients run ``csrc/cpu_wkv.cpp``; on a CPU at inference
sizes the sequential recurrence does much less work than the chunked matrix form (whose pairwise-decay
tensors cost more than the model's GEMMs for wkv4), so ``chunk`` calls run the same loop. Calls that
need gradients run ``csrc/cpu_wkv_train.cpp`` through autograd functions (``train.py``): the same
forward, storing the state every 16 tokens, and a C++ backward that recomputes the states in between
and gives every gradient, the initial state's included. Accuracy is that of fp32 arithmetic on the
literal formulas (about 1e-7 to 1e-6 relative to the fp64 reference; ``rwkv_zoo.testing.check_backend``).

Capabilities: CPU tensors, fp32 inputs, any T, B, H and head size, with or without gradients.
Priority 2: above ``reference`` for the calls it can run. The kernels are built for the CPU's instruction
set (portable C++ on any CPU, AVX2, AVX-512, VNNI, BF16; ``RWKV_ZOO_CPU_ISA`` overrides, see ``kernels``).
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
from rwkv_zoo.backends.cpu import train
from rwkv_zoo.hookspecs import hookimpl

PRIORITY = 2


def unavailable_reason() -> str | None:
    return cpu_kernels.load_wkv()[1]


def _c(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _lib():
    return cpu_kernels.load_wkv()[0]


def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    if train.needs_grad(w, u, k, v, *state):
        return train.wkv4(w, u, k, v, state)
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
    if train.needs_grad(r, k, v, w, u, state):
        return train.wkv5(r, k, v, w, u, state)
    return _wkv56(r, k, v, w, u, state, per_token=False)


def wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    if train.needs_grad(r, k, v, w, u, state):
        return train.wkv6(r, k, v, w, u, state)
    return _wkv56(r, k, v, w, u, state, per_token=True)


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    if train.needs_grad(r, w, k, v, a, b, state):
        return train.wkv7(r, w, k, v, a, b, state)
    B, T, H, N = r.shape
    ins = [_c(t) for t in (r, w.float(), k, v, a, b, state)]
    y = torch.empty_like(ins[0])
    sT = torch.empty_like(ins[-1])
    _lib().rz_wkv7(*(t.data_ptr() for t in ins), y.data_ptr(), sT.data_ptr(), B, T, H, N, torch.get_num_threads())
    return y, sT


def _train_check(call) -> list[str]:
    why = train.unavailable_reason() if call.requires_grad else None
    return [f"its training kernels cannot run: {why}"] if why else []


def make_backend() -> Backend:
    from rwkv_zoo.backends.cpu import fused

    common = dict(devices=("cpu",), dtypes=(torch.float32,))
    fns = {"wkv4": wkv4, "wkv5": wkv5, "wkv6": wkv6, "wkv7": wkv7}
    trained = ("wkv4", "wkv5", "wkv6", "wkv7")  # with a C++ backward (train.py)
    kernels = [
        Kernel(op, mode, fn, supports_backward=op in trained, check=_train_check if op in trained else None, **common)
        for op, fn in fns.items()
        for mode in ("recurrent", "chunk")
    ]
    return Backend(
        name="cpu",
        kernels=kernels,
        priority=PRIORITY,
        description="C++ WKV recurrences (forward and backward) and a fused whole-model step for CPU inference "
        "(fp32; built on first use)",
        availability=unavailable_reason,
        steps=[fused.STEP],
        layer_ops={"shift_mix": train.shift_mix, "relu_sq": train.relu_sq, "tanh": train.tanh,
                   "channel_mix": train.channel_mix, "ddlerp": train.ddlerp,
                   "head_group_norm": train.head_group_norm},
    )


@hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@hookimpl
def rwkv_zoo_update_env_info(info):
    why = unavailable_reason()
    info["cpu backend"] = why or "available (C++ kernels built)"
    info["cpu kernels isa"] = cpu_kernels.describe_isa()
