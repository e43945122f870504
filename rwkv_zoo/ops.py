"""WKV op front-ends: validate, build the ``KernelCall``, dispatch, run.

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

import torch
from torch import Tensor

from rwkv_zoo import dispatch
from rwkv_zoo.dispatch import BackendError, KernelCall, Selection

WKV4State = tuple[Tensor, Tensor, Tensor]

# Initial running maximum of the v4 state: "minus infinity" that stays finite in fp32 arithmetic.
V4_P_INIT = -1e30


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...], what: str) -> None:
    _check_float(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


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


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bad_output(sel: Selection, what: str) -> BackendError:
    backend = dispatch.get_backends().get(sel.backend)  # only on this error path
    provider = backend.provider if backend is not None else "?"
    return BackendError(
        f"backend {sel.backend!r} (plugin {provider!r}) broke the {sel.call.op} contract in {sel.mode} mode: "
        f"{what}. Its result was not used. Choose another backend (rwkv_zoo.use_backend, backend=) or block "
        f"the plugin with RWKV_ZOO_DISABLE_PLUGINS={provider}."
    )


def _check_tensor(sel: Selection, what: str, t, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(t, Tensor):
        raise _bad_output(sel, f"{what} is a {type(t).__name__}, not a tensor")
    if t.shape != shape:
        raise _bad_output(sel, f"{what} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype != dtype:
        raise _bad_output(sel, f"{what} is {_name(t.dtype)}, expected {_name(dtype)}")


def _checked(sel: Selection, out, y_shape: tuple[int, ...], dtype: torch.dtype, state_shape: tuple[int, ...],
             n_state: int = 0):
    """``out`` = ``(y, state)`` from a kernel, after a cheap check of the contract's shapes and dtypes.

    A kernel that returns the wrong shape or dtype raises ``BackendError`` naming its backend and plugin,
    instead of corrupting the model run downstream. ``n_state`` is 3 for wkv4's ``(a, b, p)``, else 0.
    """
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _bad_output(sel, f"it returned a {type(out).__name__}, not a pair (y, final_state)")
    y, state = out
    _check_tensor(sel, "y", y, y_shape, dtype)
    sdt = state_dtype(dtype)
    if n_state:
        if not isinstance(state, (tuple, list)) or len(state) != n_state:
            raise _bad_output(sel, f"the final state must be a tuple of {n_state} tensors, got {type(state).__name__}")
        for name, s in zip("abp", state, strict=True):
            _check_tensor(sel, f"final state {name}", s, state_shape, sdt)
        return y, tuple(state)
    _check_tensor(sel, "final state", state, state_shape, sdt)
    return y, state


def zero_state4(B: int, C: int, device, dtype=torch.float32) -> WKV4State:
    a = torch.zeros(B, C, device=device, dtype=dtype)
    return a, a.clone(), torch.full((B, C), V4_P_INIT, device=device, dtype=dtype)


def wkv4(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: WKV4State | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, WKV4State]:
    """RWKV-4 WKV. See the module docstring for shapes; returns ``y`` [B, T, C] and ``(a, b, p)``."""
    _check_float("k", k)
    if k.dim() != 3:
        raise ValueError(f"k must be [B, T, C], got shape {list(k.shape)}")
    B, T, C = k.shape
    if T < 1:
        raise ValueError("wkv4 needs T >= 1")
    _check_shape("v", v, (B, T, C), "[B, T, C]")
    _check_shape("w", w, (C,), "[C]")
    _check_shape("u", u, (C,), "[C]")
    has_state = state is not None
    sdt = state_dtype(k.dtype)
    if state is None:
        state = zero_state4(B, C, k.device, sdt)
    else:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError("the wkv4 state must be a tuple (a, b, p) of [B, C] tensors")
        for name, s in zip(("a", "b", "p"), state, strict=True):
            _check_shape(f"state {name}", s, (B, C), "[B, C]")
        state = tuple(s.to(sdt) for s in state)
    sel = _dispatch("wkv4", mode, k, B, T, 1, C, _needs_grad(w, u, k, v, state), has_state, backend)
    return _checked(sel, sel.kernel.fn(w, u, k, v, state), (B, T, C), k.dtype, (B, C), 3)


def _check_heads(r: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int]:
    _check_float("r", r)
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N], got shape {list(r.shape)}")
    B, T, H, N = r.shape
    if T < 1:
        raise ValueError("WKV ops need T >= 1")
    _check_shape("k", k, (B, T, H, N), "[B, T, H, N]")
    _check_shape("v", v, (B, T, H, N), "[B, T, H, N]")
    if k.dtype != r.dtype or v.dtype != r.dtype:
        raise TypeError(f"r, k, v must share a dtype, got {r.dtype}, {k.dtype}, {v.dtype}")
    return B, T, H, N


def _matrix_state(state: Tensor | None, B: int, H: int, N: int, like: Tensor) -> tuple[Tensor, bool]:
    sdt = state_dtype(like.dtype)
    if state is None:
        return torch.zeros(B, H, N, N, device=like.device, dtype=sdt), False
    _check_shape("state", state, (B, H, N, N), "[B, H, K, V]")
    return state.to(sdt), True


def wkv5(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-5.2 WKV: ``w`` [H, N] log decay, constant in time. Returns ``y`` [B, T, H, N], state [B, H, N, N]."""
    B, T, H, N = _check_heads(r, k, v)
    _check_shape("w", w, (H, N), "[H, N]")
    _check_shape("u", u, (H, N), "[H, N]")
    state, has_state = _matrix_state(state, B, H, N, r)
    sel = _dispatch("wkv5", mode, r, B, T, H, N, _needs_grad(r, k, v, w, u, state), has_state, backend)
    return _checked(sel, sel.kernel.fn(r, k, v, w, u, state), (B, T, H, N), r.dtype, (B, H, N, N))


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-6 WKV: ``w`` [B, T, H, N] log decay per token. Returns ``y`` [B, T, H, N], state [B, H, N, N]."""
    B, T, H, N = _check_heads(r, k, v)
    _check_shape("w", w, (B, T, H, N), "[B, T, H, N]")
    _check_shape("u", u, (H, N), "[H, N]")
    state, has_state = _matrix_state(state, B, H, N, r)
    sel = _dispatch("wkv6", mode, r, B, T, H, N, _needs_grad(r, k, v, w, u, state), has_state, backend)
    return _checked(sel, sel.kernel.fn(r, k, v, w, u, state), (B, T, H, N), r.dtype, (B, H, N, N))


def wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None, *,
    mode: str | None = None, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV (generalized delta rule). Returns ``y`` [B, T, H, N] and state [B, H, N, N] (key first)."""
    B, T, H, N = _check_heads(r, k, v)
    for name, t in (("w", w), ("a", a), ("b", b)):
        _check_shape(name, t, (B, T, H, N), "[B, T, H, N]")
    state, has_state = _matrix_state(state, B, H, N, r)
    sel = _dispatch("wkv7", mode, r, B, T, H, N, _needs_grad(r, w, k, v, a, b, state), has_state, backend)
    return _checked(sel, sel.kernel.fn(r, w, k, v, a, b, state), (B, T, H, N), r.dtype, (B, H, N, N))


OP_FUNCTIONS = {"wkv4": wkv4, "wkv5": wkv5, "wkv6": wkv6, "wkv7": wkv7}
