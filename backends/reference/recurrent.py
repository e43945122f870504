"""Recurrent WKV kernels: the literal per-step formulas of SPEC.md, one token at a time.

These are the numerical oracle: no algebra beyond the spec, autograd for gradients, and they run
in fp64 when given fp64 inputs. Arithmetic is fp32 for every other input dtype; ``y`` comes back in
the input dtype and the state in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_zoo.opspec import state_dtype


def wkv4_recurrent(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state):
    cd = state_dtype(k.dtype)
    a, b, p = (s.to(cd) for s in state)
    w, u, kk, vv = w.to(cd), u.to(cd), k.to(cd), v.to(cd)
    ys = []
    for t in range(k.shape[1]):
        kt, vt = kk[:, t], vv[:, t]
        # Output: the current token gets the bonus u instead of a decay (SPEC §3.4).
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        ys.append((e1 * a + e2 * vt) / (e1 * b + e2))
        # Update: decay the past by exp(w), add the current token without bonus.
        q = torch.maximum(p + w, kt)
        e1, e2 = torch.exp(p + w - q), torch.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    return torch.stack(ys, 1).to(k.dtype), (a, b, p)


def wkv6_recurrent(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    cd = state_dtype(r.dtype)
    r, kk, vv, w, u = (x.to(cd) for x in (r, k, v, w, u))
    S = state.to(cd)  # [B, H, K, V]
    decay = torch.exp(w)  # [B, T, H, K]
    ys = []
    for t in range(r.shape[1]):
        kv = kk[:, t, :, :, None] * vv[:, t, :, None, :]  # [B, H, K, V]
        # Read out before the update, with the bonus u on the current token (SPEC §4.4, §5.4).
        ys.append(torch.einsum("bhk,bhkv->bhv", r[:, t], u[None, :, :, None] * kv + S))
        S = decay[:, t, :, :, None] * S + kv
    return torch.stack(ys, 1).to(k.dtype), S


def wkv5_recurrent(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor):
    B, T = r.shape[:2]
    return wkv6_recurrent(r, k, v, w.expand(B, T, *w.shape), u, state)


def wkv7_recurrent(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
    cd = state_dtype(r.dtype)
    r, w, kk, vv, a, b = (x.to(cd) for x in (r, w, k, v, a, b))
    S = state.to(cd)  # [B, H, K, V]
    decay = torch.exp(w)
    ys = []
    for t in range(r.shape[1]):
        # All three terms use the previous state: compute a^T S first (SPEC §6.4 step 8).
        sa = torch.einsum("bhk,bhkv->bhv", a[:, t], S)
        S = (
            decay[:, t, :, :, None] * S
            + b[:, t, :, :, None] * sa[:, :, None, :]
            + kk[:, t, :, :, None] * vv[:, t, :, None, :]
        )
        # Read out after the update (no bonus in v7).
        ys.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S))
    return torch.stack(ys, 1).to(k.dtype), S
