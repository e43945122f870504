"""The ``fla`` backend: flash-linear-attention's Triton kernels for wkv5, wkv6 and wkv7, on CUDA GPUs.

Optional: registered always, available only where ``fla`` (the ``flash-linear-attention`` or
``fla-core`` distribution) imports and a CUDA GPU is present; otherwise ``unavailable_reason()`` says
which is missing. Nothing of fla (or triton) is imported until a kernel runs or availability is asked
on a machine with a GPU. It lets rwkv_zoo models run fla's kernels and our benchmarks compare against
fla through the same interface.

Kernels, and the conventions converted (checked against fla 0.6.0's source: ``fla/ops/rwkv6/chunk.py``,
``fused_recurrent.py``, ``fla/ops/rwkv7/chunk.py``, ``fused_recurrent.py`` and
``fla/ops/generalized_delta_rule/dplr/naive.py``, ``fused_recurrent.py``; and fla's ``layers/rwkv7.py``):

- ``wkv6`` chunk / recurrent -> ``chunk_rwkv6`` / ``fused_recurrent_rwkv6(r, k, v, w, u, ...)``. fla
  computes ``o_t = scale * r_t^T (S_{t-1} + diag(u) k_t v_t^T)``, ``S_t = diag(exp(w_t)) S_{t-1} + k_t
  v_t^T`` with ``w`` the log decay ``[B, T, H, K]``, ``u`` ``[H, K]``, state ``[B, H, K, V]``: our
  layout and decay convention exactly, **except** ``scale``, which defaults to ``1/sqrt(K)`` in fla
  and is passed as 1 here.
- ``wkv5`` -> the same fla kernels with the constant decay ``w`` ``[H, N]`` broadcast to ``[B, T, H, N]``
  (RWKV-5.2 is RWKV-6 with a decay that does not depend on the token); autograd sums its gradient back.
- ``wkv7`` chunk -> ``chunk_rwkv7`` (fla's DPLR delta rule): ``S_t = (diag(exp(w_t)) + b_t a_t^T)
  S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T r_t``, state ``[B, H, K, V]``, ``w`` log decay: ours
  with ``a -> a``, ``b -> b`` (fla's own RWKV-7 layer passes ``a = -kk``, ``b = kk * a`` as our model
  does), ``scale = 1`` passed explicitly. Older fla named the log decay ``log_w`` (and used ``w`` for
  the raw decay): the parameter is picked by name from the function's signature.
- ``wkv7`` recurrent -> ``fused_recurrent_rwkv7``: forward only (its backward raises in fla), so it
  declares ``supports_backward=False`` and training calls fall back, explained, to another backend.
- ``wkv4``: fla has no RWKV-4 kernel.

The state goes in as ``initial_state`` (fp32, ``[B, H, K, V]``) and comes back as fla's fp32 final
state; ``y`` comes back in the input dtype.

Capabilities: CUDA; bf16 and fp16 inputs (the decay ``w`` and the bonus ``u`` stay fp32, as the model
makes them); head sizes 16 … 256 (fla's blocks are at least 16 wide for ``tl.dot``, and its DPLR kernels
assert K <= 256). fp32 inputs are refused unless ``RWKV_ZOO_FLA_FP32=1``: fla's ``tl.dot`` calls use
Triton's default precision, TF32 on GPUs that have it (about 1e-3 relative error), which misses the
fp32 gate (1e-5) that every rwkv_zoo backend is held to; the variable opts in, for benchmarks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
from collections.abc import Callable

import torch
from torch import Tensor

from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.hookspecs import hookimpl

# Above reference (0): on a GPU fla's kernels beat plain PyTorch. Below rwkv_zoo's own triton backend (5 on a
# GPU), which CI checks against the reference: with both installed, ours runs unless fla is chosen explicitly.
PRIORITY = 3
DISTRIBUTIONS = ("flash-linear-attention", "fla-core")
MIN_HEAD_SIZE, MAX_HEAD_SIZE = 16, 256
FP32_ENV = "RWKV_ZOO_FLA_FP32"


def fla_version() -> str | None:
    """The installed fla distribution and version (``"fla-core 0.6.0"``), or None."""
    for dist in DISTRIBUTIONS:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the fla backend cannot run here (cheapest test first), or None. Computed once per process."""
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install flash-linear-attention)"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        ops = _fla_ops()
    except Exception as exc:  # a broken triton or fla install: say so instead of failing in a kernel
        return f"{fla_version() or 'fla'} fails to import its RWKV ops: {type(exc).__name__}: {exc}"
    try:
        rwkv7_decay_keyword(ops["chunk_rwkv7"])
        rwkv7_decay_keyword(ops["fused_recurrent_rwkv7"])
    except TypeError as exc:
        return str(exc)
    return None


def _fla_ops() -> dict[str, Callable]:
    rwkv6 = importlib.import_module("fla.ops.rwkv6")
    rwkv7 = importlib.import_module("fla.ops.rwkv7")
    return {
        "chunk_rwkv6": rwkv6.chunk_rwkv6,
        "fused_recurrent_rwkv6": rwkv6.fused_recurrent_rwkv6,
        "chunk_rwkv7": rwkv7.chunk_rwkv7,
        "fused_recurrent_rwkv7": rwkv7.fused_recurrent_rwkv7,
    }


# ---------------------------------------------------------------------------------------------------
# Conventions (pure functions: unit-tested on the CPU without fla)


def rwkv7_decay_keyword(fn: Callable) -> str:
    """The keyword under which ``fn`` (an fla rwkv7 op) takes the **log** decay: ``w`` in current fla
    (0.6.0 read), ``log_w`` in older releases, where ``w`` meant the raw decay ``-exp(w)`` was taken of."""
    params = inspect.signature(fn).parameters
    if "log_w" in params:
        return "log_w"
    if "w" in params:
        return "w"
    raise TypeError(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', fn)} has no log-decay "
                    f"parameter (w or log_w): an fla version this adapter does not know")


def rwkv6_args(op: str, r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, ...]:
    """``(r, k, v, w, u)`` as fla's rwkv6 ops take them: for ``wkv5`` the constant log decay ``[H, N]``
    is broadcast over batch and time to ``[B, T, H, N]``; every layout is already fla's."""
    if op == "wkv5":
        w = w.expand(r.shape)
    return r, k, v, w, u


def _capabilities(call) -> list[str]:
    out = []
    if not MIN_HEAD_SIZE <= call.N <= MAX_HEAD_SIZE:
        out.append(f"needs head size N in {MIN_HEAD_SIZE}..{MAX_HEAD_SIZE} (fla's kernel blocks), got N={call.N}")
    if call.dtype == torch.float32 and os.environ.get(FP32_ENV, "") != "1":
        out.append(f"multiplies float32 in TF32 (about 1e-3 relative error, above the fp32 gate); "
                   f"set {FP32_ENV}=1 to use it for float32 anyway")
    return out


# ---------------------------------------------------------------------------------------------------
# Kernels


def _make_kernels(ops: Callable[[], dict[str, Callable]]) -> dict[str, Callable]:
    """Kernel functions over the fla ops that ``ops()`` returns (fla's, or a stand-in in tests)."""

    def rwkv6_kernel(op: str, fla_name: str):
        def kernel(r, k, v, w, u, state):
            fn = ops()[fla_name]
            y, s = fn(*rwkv6_args(op, r, k, v, w, u), scale=1.0, initial_state=state, output_final_state=True)
            return y, s

        kernel.__name__ = f"{op}_fla_{fla_name}"
        return kernel

    def rwkv7_kernel(fla_name: str):
        def kernel(r, w, k, v, a, b, state):
            fn = ops()[fla_name]
            decay = {rwkv7_decay_keyword(fn): w}
            y, s = fn(r=r, k=k, v=v, a=a, b=b, **decay, scale=1.0, initial_state=state, output_final_state=True)
            return y, s

        kernel.__name__ = f"wkv7_fla_{fla_name}"
        return kernel

    return {
        ("wkv5", "chunk"): rwkv6_kernel("wkv5", "chunk_rwkv6"),
        ("wkv5", "recurrent"): rwkv6_kernel("wkv5", "fused_recurrent_rwkv6"),
        ("wkv6", "chunk"): rwkv6_kernel("wkv6", "chunk_rwkv6"),
        ("wkv6", "recurrent"): rwkv6_kernel("wkv6", "fused_recurrent_rwkv6"),
        ("wkv7", "chunk"): rwkv7_kernel("chunk_rwkv7"),
        ("wkv7", "recurrent"): rwkv7_kernel("fused_recurrent_rwkv7"),
    }


def make_backend(
    *,
    name: str = "fla",
    devices: tuple[str, ...] = ("cuda",),
    availability: Callable[[], str | None] | None = unavailable_reason,
    ops: Callable[[], dict[str, Callable]] = _fla_ops,
    priority: int = PRIORITY,
) -> Backend:
    """The fla backend. ``devices``, ``availability`` and ``ops`` are parameters so tests can run the
    adapter's conversions on the CPU over a stand-in for fla; users never pass them."""
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    fns = _make_kernels(ops)
    kernels = [
        Kernel(op, mode, fn, devices=devices, dtypes=dtypes, check=_capabilities,
               supports_backward=(op, mode) != ("wkv7", "recurrent"))
        for (op, mode), fn in fns.items()
    ]
    return Backend(
        name=name,
        kernels=kernels,
        priority=priority,
        description="flash-linear-attention's Triton kernels (chunk_rwkv6/7, fused_recurrent_rwkv6/7); CUDA",
        availability=availability,
    )


@hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@hookimpl
def rwkv_zoo_update_env_info(info):
    why = unavailable_reason()  # imports fla only where it is installed and a GPU is present
    status = f"unavailable, {why}" if why else "available"
    info["fla backend"] = f"{fla_version() or 'flash-linear-attention'}: {status}"
