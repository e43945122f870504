"""The cuda backend's kernel functions: the op contract of ``rwkv_zoo.ops`` on top of the custom ops.

Each function casts to what the kernels take (activations in one dtype, contiguous; decay, bonus and
state fp32), calls the forward custom op (asking it to save what the backward needs only when a
gradient will be taken) and returns ``(y, final_state)``. Autograd runs through the casts, so
gradients reach every input in its own dtype. Decode (T = 1) uses the same kernels: one block per
(batch, head) already spreads a batched decode step over B * H blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

_OPS = None


def _ops():
    """The custom-ops module, imported on the first kernel call (it defines the ops), not at plugin load.

    A module global rather than functools.cache, which torch.compile would warn about when tracing.
    """
    global _OPS
    if _OPS is None:
        from . import _ops as ops

        _OPS = ops
    return _OPS


def _c(x: Tensor, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def _save(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in tensors)


def wkv4_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    dt, f32 = k.dtype, torch.float32
    a0, b0, p0 = (_c(s, f32) for s in state)
    save = _save(w, u, k, v, a0, b0, p0)
    y, a, b, p, *_ = _ops().wkv4_fwd(_c(w, f32), _c(u, f32), _c(k, dt), _c(v, dt), a0, b0, p0, save)
    return y, (a, b, p)


def wkv6_recurrent(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    dt, f32 = r.dtype, torch.float32
    return _ops().wkv6_fwd(_c(r, dt), _c(k, dt), _c(v, dt), _c(w, f32), _c(u, f32), _c(state, f32))


def wkv5_recurrent(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    # The same kernel, reading the [H, N] decay with batch and time strides 0 (no [B, T, H, N] copy).
    return wkv6_recurrent(r, k, v, w, u, state)


def wkv7_recurrent(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    dt, f32 = r.dtype, torch.float32
    args = (_c(r, dt), _c(w, f32), _c(k, dt), _c(v, dt), _c(a, dt), _c(b, dt), _c(state, f32))
    y, sT, _, _ = _ops().wkv7_fwd(*args, _save(*args))
    return y, sT


def wkv7_chunk(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    """The chunked kernel: tensor-core forward, fp32 backward (csrc/wkv7_chunk.cuh: its decay assumption)."""
    dt, f32 = r.dtype, torch.float32
    args = (_c(r, dt), _c(w, f32), _c(k, dt), _c(v, dt), _c(a, dt), _c(b, dt), _c(state, f32))
    y, sT, _ = _ops().wkv7_chunk_fwd(*args, _save(*args))
    return y, sT
