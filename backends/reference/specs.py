"""The built-in ops ``wkv4`` … ``wkv7``, declared once as ``OpSpec`` and registered through
``rwkv_zoo_register_ops``.

Each spec names its literal recurrence (``recurrent.py``, the oracle) and its chunked form (``chunk.py``),
which the ``reference`` backend serves as its kernels. This is its own built-in plugin, apart from the
``reference`` backend, so that blocking that backend (``RWKV_ZOO_DISABLE_PLUGINS``) leaves the ops in
place for every other backend.

The random inputs follow the distributions that stress the numerics (PERF.md): v5/v6 log decay
``logsigmoid(randn)``, v7 decay in (0.545, 1) with ``a = -kappa_hat``, ``b = kappa_hat * sigmoid(randn)``,
v4 ``w = -exp(randn)``. ``decay_scale`` multiplies the log decay (10: strong, 0.1: weak); v7 keeps its
official parameterization, which bounds the decay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.opspec import OpArg, OpSpec, StatePart

from .chunk import wkv4_chunk, wkv5_chunk, wkv6_chunk, wkv7_chunk
from .recurrent import wkv4_recurrent, wkv5_recurrent, wkv6_recurrent, wkv7_recurrent

# Initial running maximum of the v4 state: "minus infinity" that stays finite in fp32 arithmetic.
V4_P_INIT = -1e30

BTHN = ("B", "T", "H", "N")
MATRIX_STATE = (StatePart("state", ("B", "H", "K", "V")),)
KEY_FIRST = {"K": "N", "V": "N"}  # the matrix state is [B, H, K, V] with K = V = N


def _randn(g, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _wkv4_inputs(B, T, H, N, dtype, device, generator, decay_scale):
    g, C = generator, H * N
    w = -torch.exp(_randn(g, C)) * decay_scale
    # A valid state: any numerator, a positive denominator, a finite running maximum.
    state = (_randn(g, B, C), 0.5 + torch.rand(B, C, generator=g, dtype=torch.float64), _randn(g, B, C))
    return WKV4.cast_inputs([w, _randn(g, C), _randn(g, B, T, C), _randn(g, B, T, C), state], dtype, device)


def _wkv56_inputs(spec: OpSpec, B, T, H, N, dtype, device, g, decay_scale):
    w = F.logsigmoid(_randn(g, H, N) if spec is WKV5 else _randn(g, B, T, H, N)) * decay_scale
    values = [_randn(g, B, T, H, N), _randn(g, B, T, H, N), _randn(g, B, T, H, N), w, _randn(g, H, N),
              _randn(g, B, H, N, N)]
    return spec.cast_inputs(values, dtype, device)


def _wkv5_inputs(B, T, H, N, dtype, device, generator, decay_scale):
    return _wkv56_inputs(WKV5, B, T, H, N, dtype, device, generator, decay_scale)


def _wkv6_inputs(B, T, H, N, dtype, device, generator, decay_scale):
    return _wkv56_inputs(WKV6, B, T, H, N, dtype, device, generator, decay_scale)


def _wkv7_inputs(B, T, H, N, dtype, device, generator, decay_scale):
    g = generator
    w = -math.exp(-0.5) * torch.sigmoid(_randn(g, B, T, H, N))
    kappa_hat = F.normalize(_randn(g, B, T, H, N), dim=-1)
    a, b = -kappa_hat, kappa_hat * torch.sigmoid(_randn(g, B, T, H, N))
    values = [_randn(g, B, T, H, N), w, _randn(g, B, T, H, N), _randn(g, B, T, H, N), a, b, _randn(g, B, H, N, N)]
    return WKV7.cast_inputs(values, dtype, device)


WKV4 = OpSpec(
    name="wkv4",
    doc="RWKV-4 WKV: per channel, numerator and denominator scaled by exp(-p), p the running maximum exponent.",
    args=(
        OpArg("w", ("C",), "fp32", doc="log decay (-exp(time_decay))"),
        OpArg("u", ("C",), "fp32", doc="bonus of the current token, added in the exponent (time_first)"),
        OpArg("k", ("B", "T", "C")),
        OpArg("v", ("B", "T", "C")),
    ),
    output=("B", "T", "C"),
    state=(StatePart("a", ("B", "C")), StatePart("b", ("B", "C")), StatePart("p", ("B", "C"), V4_P_INIT)),
    recurrent=wkv4_recurrent,
    chunk=wkv4_chunk,
    make_inputs=_wkv4_inputs,
    channelwise=True,
)

_R, _K, _V = OpArg("r", BTHN), OpArg("k", BTHN), OpArg("v", BTHN)
_U = OpArg("u", ("H", "N"), "fp32", doc="bonus of the current token (time_faaaa)")

WKV5 = OpSpec(
    name="wkv5",
    doc="RWKV-5.2 WKV: S_t = diag(exp(w)) S_{t-1} + k_t v_t^T, y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1}).",
    args=(_R, _K, _V, OpArg("w", ("H", "N"), "fp32", doc="log decay, constant in time"), _U),
    output=BTHN,
    state=MATRIX_STATE,
    recurrent=wkv5_recurrent,
    chunk=wkv5_chunk,
    make_inputs=_wkv5_inputs,
    aliases=KEY_FIRST,
)

WKV6 = OpSpec(
    name="wkv6",
    doc="RWKV-6 WKV: as wkv5 with a log decay w_t per token.",
    args=(_R, _K, _V, OpArg("w", BTHN, "fp32", doc="log decay per token"), _U),
    output=BTHN,
    state=MATRIX_STATE,
    recurrent=wkv6_recurrent,
    chunk=wkv6_chunk,
    make_inputs=_wkv6_inputs,
    aliases=KEY_FIRST,
)

# bf16/fp16 gradients of the delta rule go through a^T S products of rounded inputs: 8e-3 (PERF.md).
_LOW_GRAD = {("bfloat16", "grad"): 8e-3, ("float16", "grad"): 8e-3}

WKV7 = OpSpec(
    name="wkv7",
    doc="RWKV-7 WKV (generalized delta rule): S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T, "
        "y_t = S_t^T r_t.",
    args=(
        _R,
        OpArg("w", BTHN, "fp32", doc="log decay per token"),
        _K,
        _V,
        OpArg("a", BTHN, "float", doc="-kappa_hat in the model"),
        OpArg("b", BTHN, "float", doc="kappa_hat * a_t in the model"),
    ),
    output=BTHN,
    state=MATRIX_STATE,
    recurrent=wkv7_recurrent,
    chunk=wkv7_chunk,
    make_inputs=_wkv7_inputs,
    aliases=KEY_FIRST,
    tolerances=_LOW_GRAD,
)

SPECS = (WKV4, WKV5, WKV6, WKV7)


@hookimpl
def rwkv_zoo_register_ops(register):
    for spec in SPECS:
        register(spec)
