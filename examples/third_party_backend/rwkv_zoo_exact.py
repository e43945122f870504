"""rwkv-zoo-exact: an rwkv_zoo backend that runs every WKV op in float64, whatever the input dtype.

What it is for. A bf16 or fp32 model run rounds in two places: the matrix multiplications around the
WKV, and the WKV kernel itself (a long recurrence, or a chunked sum with decays). With
``rwkv_zoo.use_backend("exact")`` the kernel's share is taken out: the recurrence is computed in
float64 from the very inputs the model gives it, and the output is rounded once, to the input dtype.
So the difference between a run on ``exact`` and a run on another backend is that backend's kernel
error, measured on a real model and real inputs (the conformance suite measures it on random ones),
and a loss spike or a drift that stays with ``exact`` does not come from the kernel. It also makes a
slow but trustworthy stand-in for a kernel under suspicion, on any machine.

How. Each kernel casts its inputs and the state to float64, calls the public op of rwkv_zoo with
``backend="reference"`` (whose kernels compute in float64 for float64 inputs: ``chunk`` is the exact
matrix form, ``recurrent`` the literal per-step formulas), and casts back: ``y`` to the input dtype,
the state to float32 (float64 for float64 inputs), as the op contract says. Autograd runs through
the casts, so gradients reach every input and the initial state in their own dtypes.

Capabilities, declared as they are: every op (wkv4 … wkv7) in both modes, any head size and length,
backward and initial state; CPU and CUDA only (Apple's MPS has no float64); every floating dtype.
Priority -10: on a CPU its chunk kernels take 2-2.5x the time of ``reference``'s float32 ones (wkv6
and wkv7 forward, B=1, T=512, H=12, N=64, one thread), so it never wins a call by itself; choose it
explicitly (``use_backend("exact")``, ``build(..., backend="exact")`` or ``RWKV_ZOO_BACKEND=exact``).
"""

from __future__ import annotations

import importlib.metadata

import torch

import rwkv_zoo
from rwkv_zoo import Backend, Kernel

__all__ = ["BACKEND_NAME", "PRIORITY", "make_backend"]

BACKEND_NAME = "exact"
PRIORITY = -10  # never chosen by priority over reference (0); only when asked for
DEVICES = ("cpu", "cuda")  # float64 tensors work there; MPS has none


def _version() -> str:
    try:
        return importlib.metadata.version("rwkv-zoo-exact")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree, not installed
        return "unknown"


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exact_kernel(op: str, mode: str):
    """A kernel function for ``op``: the reference ``mode`` kernel in float64, results cast back."""
    front = getattr(rwkv_zoo, op)

    if op == "wkv4":

        def wkv4_exact(w, u, k, v, state):
            y, (a, b, p) = front(w.double(), u.double(), k.double(), v.double(),
                                 tuple(s.double() for s in state), mode=mode, backend="reference")
            sdt = _state_dtype(k.dtype)
            return y.to(k.dtype), (a.to(sdt), b.to(sdt), p.to(sdt))

        return wkv4_exact

    def wkv_exact(*args):
        # wkv5/6: (r, k, v, w, u, state); wkv7: (r, w, k, v, a, b, state). r comes first in both.
        *inputs, state = args
        dtype = inputs[0].dtype
        y, s = front(*(x.double() for x in inputs), state.double(), mode=mode, backend="reference")
        return y.to(dtype), s.to(_state_dtype(dtype))

    wkv_exact.__name__ = f"{op}_exact"
    return wkv_exact


def make_backend() -> Backend:
    """The ``exact`` backend: every op in both modes, computed in float64."""
    kernels = [
        Kernel(op, mode, _exact_kernel(op, mode), devices=DEVICES)
        for op in ("wkv4", "wkv5", "wkv6", "wkv7")
        for mode in ("recurrent", "chunk")
    ]
    return Backend(
        name=BACKEND_NAME,
        kernels=kernels,
        priority=PRIORITY,
        description="float64 arithmetic for every op whatever the input dtype (numerics oracle); slow, explicit only",
    )


@rwkv_zoo.hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@rwkv_zoo.hookimpl
def rwkv_zoo_update_env_info(info):
    info["exact backend"] = (f"rwkv-zoo-exact {_version()}: float64 WKV on {'/'.join(DEVICES)}; "
                             f"choose it with rwkv_zoo.use_backend({BACKEND_NAME!r})")
