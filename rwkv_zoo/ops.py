"""WKV op front-ends: validate, build the ``KernelCall``, dispatch, run.

``call(op, *args, state=None, mode=None, backend=None)`` runs any registered op (``rwkv_zoo.opspec``):
the arguments are checked against its ``OpSpec``, and so is what the kernel returns. ``wkv4`` …
``wkv7`` are that call with their explicit signatures.

Every op takes an optional initial state and returns ``(y, final_state)``, with gradients through
both. Decay enters in **log space**: ``w`` is the log of the per-step multiplicative decay (<= 0),
in fp32. The WKV state is fp32 whatever the input dtype (fp64 when the inputs are fp64, so the
reference can serve as an oracle). Matrix states are ``[B, H, K, V]``: key index first.

Shapes: ``B`` batch, ``T`` time, ``H`` heads, ``N`` head size (K = V = N), ``C`` channels.

- ``wkv4(w, u, k, v, state)``: RWKV-4. ``w`` [C] log decay (``-exp(time_decay)``), ``u`` [C] bonus
  (``time_first``, added in the exponent), ``k``, ``v`` [B, T, C]; state ``(a, b, p)`` each [B, C]:
  numerator and denominator scaled by ``exp(-p)``, and the running maximum exponent ``p``.
- ``wkv5(r, k, v, w, u, state)``: RWKV-5.2. ``r``, ``k``, ``v`` [B, T, H, N]; ``w`` [H, N] log decay
  (``-exp(time_decay)``), ``u`` [H, N] bonus (``time_faaaa``); state [B, H, N, N].
- ``wkv6(r, k, v, w, u, state)``: RWKV-6. As wkv5 but ``w`` [B, T, H, N] per token.
- ``wkv7(r, w, k, v, a, b, state)``: RWKV-7. All of ``r, w, k, v, a, b`` [B, T, H, N]; ``a`` and ``b``
  are the kernel's low-rank vectors (``-kappa_hat`` and ``kappa_hat * a_t`` in the model); state [B, H, N, N].

Recurrences (per head; ``S`` is [K, V]):
- wkv5/6: ``y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1})``, ``S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T``.
- wkv7: ``S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T r_t``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo import dispatch, opspec
from rwkv_zoo.backend import KernelCall, Selection
from rwkv_zoo.dispatch import BackendError
from rwkv_zoo.opspec import OpSpec, state_dtype

__all__ = ["OP_FUNCTIONS", "V4_P_INIT", "call", "state_dtype", "wkv4", "wkv5", "wkv6", "wkv7", "zero_state4"]

WKV4State = tuple[Tensor, Tensor, Tensor]

# Initial running maximum of the v4 state: "minus infinity" that stays finite in fp32 arithmetic.
V4_P_INIT = -1e30


def _needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, tuple):
            if any(x.requires_grad for x in t):
                return True
        elif t is not None and t.requires_grad:
            return True
    return False


def _dispatch(op, mode, x: Tensor, B, T, H, N, grad, has_state, backend) -> Selection:
    if torch.compiler.is_compiling():
        # Dispatch is plain Python over plugins, context variables and caches: torch.compile steps
        # around it (a graph break per op call) and traces the chosen kernel, so a whole compiled
        # model still works. Wrapped lazily: torch.compiler.disable imports torch._dynamo (seconds).
        return _select_eagerly()(op, mode, x.device.type, x.dtype, B, T, H, N, grad, has_state, backend)
    return _select(op, mode, x.device.type, x.dtype, B, T, H, N, grad, has_state, backend)


def _select(op, mode, device, dtype, B, T, H, N, grad, has_state, backend) -> Selection:
    fixed = mode is not None
    if mode is None:
        mode = dispatch.auto_mode(T)[0]
    call = KernelCall(op, mode, device, dtype, B, T, H, N, grad, has_state)
    return dispatch.select(call, backend, mode_fixed=fixed)


@functools.cache
def _select_eagerly():
    return torch.compiler.disable(_select)


_get_op_eagerly: Any = None  # torch.compiler.disable(opspec.get_op), made on first compiled use


def _spec(op: str) -> OpSpec:
    global _get_op_eagerly
    if not torch.compiler.is_compiling():
        return opspec.get_op(op)
    # The registry is plugin state behind a generation check: looked up outside the compiled graph.
    # A plain global rather than functools.cache, which dynamo warns about when it traces through it.
    if _get_op_eagerly is None:
        _get_op_eagerly = torch.compiler.disable(opspec.get_op)
    return _get_op_eagerly(op)


def _bad_output(sel: Selection, what: str) -> BackendError:
    backend = dispatch.get_backends().get(sel.backend)  # only on this error path
    provider = backend.provider if backend is not None else "?"
    return BackendError(
        f"backend {sel.backend!r} (plugin {provider!r}) broke the {sel.call.op} contract in {sel.mode} mode: "
        f"{what}. Its result was not used. Choose another backend (rwkv_zoo.use_backend, backend=) or block "
        f"the plugin with RWKV_ZOO_DISABLE_PLUGINS={provider}."
    )


def _checked(sel: Selection, spec: OpSpec, out, dims: dict[str, int], dtype: torch.dtype):
    """``out`` = ``(y, state)`` from a kernel, after a cheap check of the spec's shapes and dtypes.

    A kernel that returns the wrong shape or dtype raises ``BackendError`` naming its backend and plugin,
    instead of corrupting the model run downstream.
    """
    problems = spec.output_problems(out, dims, dtype)
    if problems:
        raise _bad_output(sel, problems[0])
    y, state = out
    return y, (tuple(state) if spec.tuple_state else state)


def call(op: str, *args: Any, state: Any = None, mode: str | None = None, backend: str | None = None):
    """Run registered op ``op`` on ``args`` (its arguments in call order, without the state).

    Checks the arguments against the op's ``OpSpec`` (shapes, dtypes, T >= 1, the state's shape), starts
    from the spec's initial state when ``state`` is None, dispatches (``mode``: ``"recurrent"``,
    ``"chunk"`` or None for automatic; ``backend``: an explicit choice), runs the chosen kernel and checks
    what it returns. Returns ``(y, final_state)``; gradients flow through every input and the state.
    An unknown op raises ``ValueError`` listing the registered ones.
    """
    spec = _spec(op)
    dims = spec.bind(args)
    lead = args[spec.lead]
    init, has_state = spec.prepare_state(state, dims, lead)
    H, N = spec.kernel_dims(dims)
    grad = _needs_grad(*(t for a, t in zip(spec.args, args, strict=True) if a.grad), init)
    sel = _dispatch(op, mode, lead, dims["B"], dims["T"], H, N, grad, has_state, backend)
    return _checked(sel, spec, sel.kernel.fn(*args, init), dims, lead.dtype)


def zero_state4(B: int, C: int, device, dtype=torch.float32) -> WKV4State:
    a = torch.zeros(B, C, device=device, dtype=dtype)
    return a, a.clone(), torch.full((B, C), V4_P_INIT, device=device, dtype=dtype)


def wkv4(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, WKV4State]:
    """RWKV-4 WKV. See the module docstring for shapes; returns ``y`` [B, T, C] and ``(a, b, p)``."""
    return call("wkv4", w, u, k, v, state=state, mode=mode, backend=backend)


def wkv5(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 WKV: ``w`` [H, N] log decay, constant in time. Returns ``y`` [B, T, H, N], state [B, H, N, N]."""
    return call("wkv5", r, k, v, w, u, state=state, mode=mode, backend=backend)


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV: ``w`` [B, T, H, N] log decay per token. Returns ``y`` [B, T, H, N], state [B, H, N, N]."""
    return call("wkv6", r, k, v, w, u, state=state, mode=mode, backend=backend)


def wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV (generalized delta rule). Returns ``y`` [B, T, H, N] and state [B, H, N, N] (key first)."""
    return call("wkv7", r, w, k, v, a, b, state=state, mode=mode, backend=backend)


# The built-in ops' front-ends by name; any registered op (a plugin's too) runs through ``call``.
OP_FUNCTIONS = {"wkv4": wkv4, "wkv5": wkv5, "wkv6": wkv6, "wkv7": wkv7}
