"""Backend conformance: the checks any WKV backend (ours or a third party's) must pass.

``check_backend(name)`` runs every ``(op, mode)`` kernel the backend registers, for every registered op
(``rwkv_zoo.opspec``: the built-in ``wkv4`` … ``wkv7`` and any a plugin adds), through the public
front-end ``rwkv_zoo.ops.call(op, ..., mode=mode, backend=name)``, on random inputs with a random
non-zero initial state, and compares with the op's literal recurrence (``OpSpec.recurrent``, the
per-step formulas of SPEC.md for the built-ins) run in fp64 on the same inputs. Compared: the output
``y``, the final state and the gradient of every input, the initial state included, under random
upstream gradients on ``y`` and on the final state. The error is relative, ``||x - ref|| / ||ref||`` (PERF.md).

Besides the error it checks what a caller relies on: ``y`` has the input's shape and dtype, the
state is fp32 (fp64 for fp64 inputs) with the right shape, nothing is NaN or Inf, every input gets
a gradient, and the kernel leaves its inputs untouched. (Kernels allocate their own outputs, so
"poisoning" outputs beforehand does not apply; an unwritten element shows up as garbage or NaN.)

Inputs come from each spec's generator (``OpSpec.make_inputs``), in the distributions that stress the
op's numerics (PERF.md; the built-ins' are in ``rwkv_zoo.backends.reference.specs``). For bf16/fp16
the low-precision tensors are rounded first and the oracle sees the rounded values, so the error
measures the kernel rather than the input rounding; arguments with the "fp32" dtype rule (the decay
``w``, the bonus ``u``) are parameters and stay fp32, the initial state is fp32.

Gates (relative error, PERF.md "Accuracy gates"): fp64 1e-10; fp32 1e-5; bf16/fp16 5e-3, unless the
op's spec overrides one (``OpSpec.tolerances``: wkv7's bf16/fp16 gradients 8e-3).

Usage::

    from rwkv_zoo.testing import check_backend
    report = check_backend("my-backend", dtypes=(torch.float32, torch.bfloat16), device="cuda")
    print(report)

The same matrix as one pytest item per case (``rwkv_zoo.pytest_plugin``, installed with rwkv-zoo)::

    pytest --rwkv-zoo-backend my-backend --rwkv-zoo-dtypes float32,bfloat16 --rwkv-zoo-device cuda

``conformance_cases`` lists the cases and ``run_case`` runs one; ``registered_plugin(obj)`` registers
a plugin for a ``with`` block (the pytest fixture ``rwkv_zoo_plugin`` does it for one test).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from rwkv_zoo import dispatch, pluginmanager
from rwkv_zoo import ops as _ops
from rwkv_zoo.backend import MODES, Kernel
from rwkv_zoo.opspec import get_op, get_ops

__all__ = [
    "DEFAULT_TS",
    "Case",
    "CaseResult",
    "ConformanceReport",
    "arg_names",
    "cast_inputs",
    "check_backend",
    "conformance_cases",
    "default_gate",
    "evaluate",
    "make_inputs",
    "registered_plugin",
    "rel_err",
    "run_case",
]

# Odd lengths around the chunk sizes: one token, partial chunks, exactly and just past a multiple of 64.
DEFAULT_TS: tuple[int, ...] = (1, 15, 63, 64, 65)



def arg_names(op: str) -> tuple[str, ...]:
    """The op's input names in call order, then its state names (``a, b, p`` for wkv4, else ``state``)."""
    spec = get_op(op)
    return spec.arg_names + spec.state_names


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp64; the absolute norm when ``ref`` is exactly zero; NaN never passes."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    diff = (x - ref).norm().item()
    den = ref.norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / den if den > 0 else diff


def default_gate(op: str, dtype: torch.dtype, quantity: str) -> float:
    """The relative-error gate of PERF.md for ``quantity`` ("y", "state" or "grad") of ``op`` in ``dtype``,
    with the op spec's overrides."""
    return get_op(op).gate(dtype, quantity)


# ---------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(
    op: str, B: int, T: int, H: int, N: int, *, generator: torch.Generator | None = None,
    decay_scale: float = 1.0,
) -> list:
    """Random fp64 CPU inputs for ``op`` in call order, the initial state last (a tuple for wkv4).

    Drawn by the op spec's generator. ``H * N`` is the channel count C for a channelwise op (wkv4).
    ``decay_scale`` multiplies the log decay (10: strong, 0.1: weak); v7 keeps its official
    parameterization, which bounds the decay to (0.545, 1).
    """
    return get_op(op).random_inputs(B, T, H, N, generator=generator, decay_scale=decay_scale)


def cast_inputs(op: str, inputs: list, dtype: torch.dtype, device) -> list:
    """``make_inputs`` output for a run in ``dtype`` on ``device``.

    Everything in ``dtype`` except, for bf16/fp16, the arguments with the "fp32" dtype rule (the
    parameters ``w``, ``u``), which stay fp32; the state is fp32 (fp64 for fp64), as the front-ends
    would make it.
    """
    return get_op(op).cast_inputs(inputs, dtype, device)


def _flat(args: list) -> list[Tensor]:
    flat: list[Tensor] = []
    for a in args:
        flat.extend(a if isinstance(a, tuple) else [a])
    return flat


# ---------------------------------------------------------------------------------------------------
# Running one call with gradients


def evaluate(fn: Callable, op: str, args: list, upstream: dict[str, Tensor] | None, *, grad: bool = True) -> dict:
    """Run ``fn(*args)`` and return its results by name: ``y``, the state (``state`` or ``a, b, p``)
    and, with ``grad``, ``d<name>`` for every input (None where autograd gave no gradient).

    The loss for the gradients is ``sum(y * upstream["y"]) + sum(state_i * upstream[state_i])``,
    in fp64. ``args`` are not modified: fresh leaves are made from them.
    """
    spec = get_op(op)
    names = spec.arg_names + spec.state_names
    leaves = [x.detach().clone().requires_grad_(grad) for x in _flat(args)]
    it = iter(leaves)
    call_args = [tuple(next(it) for _ in a) if isinstance(a, tuple) else next(it) for a in args]
    if grad:
        y, state = fn(*call_args)
    else:
        with torch.no_grad():
            y, state = fn(*call_args)
    states = tuple(state) if isinstance(state, (tuple, list)) else (state,)
    out: dict = {"y": y}
    state_names = spec.state_names
    if len(states) != len(state_names):
        raise TypeError(f"{op} returned a state of {len(states)} tensors, expected {len(state_names)}")
    out.update(zip(state_names, states, strict=True))
    if grad:
        assert upstream is not None
        loss = sum(
            (out[n].double() * upstream[n].to(out[n].device)).sum() for n in ("y", *state_names)
            if out[n].requires_grad
        )
        if isinstance(loss, Tensor) and loss.requires_grad:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        else:
            grads = (None,) * len(leaves)
        out.update({f"d{n}": gr for n, gr in zip(names, grads, strict=True)})
    return out


# ---------------------------------------------------------------------------------------------------
# Report


@dataclass
class CaseResult:
    """One ``(op, mode, dtype, T)`` case: the relative error per compared tensor and the verdict."""

    op: str
    mode: str
    dtype: torch.dtype
    T: int
    errors: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    message: str = ""
    skipped: bool = False

    @property
    def worst(self) -> tuple[str, float]:
        if not self.errors:
            return "", 0.0
        name = max(self.errors, key=lambda n: self.errors[n])
        return name, self.errors[name]

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("ok" if self.passed else "FAIL")


@dataclass
class ConformanceReport:
    """Every case run by ``check_backend``; ``ok`` when at least one ran and none failed."""

    backend: str
    device: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.skipped and not r.passed]

    @property
    def ok(self) -> bool:
        ran = [r for r in self.results if not r.skipped]
        return bool(ran) and not self.failures

    def max_errors(self) -> dict[tuple[str, str, str], float]:
        """The largest error per ``(op, mode, dtype)`` over the lengths and tensors that ran."""
        out: dict[tuple[str, str, str], float] = {}
        for r in self.results:
            if r.skipped or not r.errors:
                continue
            key = (r.op, r.mode, _dtype_name(r.dtype))
            out[key] = max(out.get(key, 0.0), r.worst[1])
        return out

    def summary(self) -> str:
        """One line per ``(op, mode, dtype)``: cases passed, skipped, and the worst error with its tensor."""
        groups: dict[tuple[str, str, str], list[CaseResult]] = {}
        for r in self.results:
            groups.setdefault((r.op, r.mode, _dtype_name(r.dtype)), []).append(r)
        rows = [("op", "mode", "dtype", "passed", "worst error")]
        for (op, mode, dt), results in groups.items():
            ran = [r for r in results if not r.skipped]
            worst = max((r.worst for r in ran if r.errors), key=lambda w: w[1], default=("", 0.0))
            passed = f"{sum(r.passed for r in ran)}/{len(ran)}" + (
                f" ({len(results) - len(ran)} skipped)" if len(ran) < len(results) else "")
            rows.append((op, mode, dt, passed, f"{worst[1]:.2e} ({worst[0]})" if worst[0] else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [f"conformance of backend {self.backend!r} on {self.device}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"conformance of backend {self.backend!r} on {self.device}: "
        ran = [r for r in self.results if not r.skipped]
        head += f"{len(ran) - len(self.failures)}/{len(ran)} cases passed"
        if not ran:
            head += " (nothing ran)"
        rows = [("op", "mode", "dtype", "T", "worst error", "status", "note")]
        for r in self.results:
            name, err = r.worst
            worst = f"{err:.2e} ({name})" if name else "-"
            rows.append((r.op, r.mode, _dtype_name(r.dtype), str(r.T), worst, r.status, r.message))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = [head]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:6], widths, strict=True)) + "  " + row[6])
        return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------
# The check


def _pick_N(kernel: Kernel, N: int) -> int:
    if kernel.head_sizes is None or N in kernel.head_sizes:
        return N
    return min(kernel.head_sizes)


def _call_variants(call: dispatch.KernelCall) -> list[dispatch.KernelCall]:
    """The call with gradients and a state first, then without what the kernel may not support."""
    return [
        call,
        replace(call, requires_grad=False),
        replace(call, has_state=False),
        replace(call, requires_grad=False, has_state=False),
    ]


def _check_case(
    backend: str, op: str, mode: str, dtype: torch.dtype, T: int, B: int, H: int, N: int,
    device: str, seed: int, rtol: float | None, oracle_cache: dict,
) -> CaseResult:
    result = CaseResult(op, mode, dtype, T)
    spec = get_op(op)
    b = dispatch.get_backends()[backend]
    kernel = b.kernel(op, mode)
    assert kernel is not None
    N = _pick_N(kernel, N)
    dims = spec.conformance_dims(B, T, H, N)
    # A channelwise op (wkv4) is one group of C = H * N channels in the capability check.
    call = dispatch.KernelCall(op, mode, torch.device(device).type, dtype, B, T, *spec.kernel_dims(dims), True, True)
    chosen = None
    first_reasons: list[str] = []
    for i, c in enumerate(_call_variants(call)):
        why = b.reasons(c)
        if not why:
            chosen = c
            break
        if i == 0:
            first_reasons = why
    if chosen is None:
        result.skipped = True
        result.message = "; ".join(first_reasons)
        return result
    grad, has_state = chosen.requires_grad, chosen.has_state
    notes = []
    if not grad:
        notes.append("forward only (no backward)")
    if not has_state:
        notes.append("zero initial state (takes no state)")

    # Inputs: fresh per (op, T, dtype, state?), shared by every mode so the oracle runs once.
    key = (op, T, dtype, N, has_state, seed, B, H)
    if key not in oracle_cache:
        # The op's place among the registered ops (the built-ins wkv4..wkv7 are 0..3) varies the seed.
        gen = torch.Generator().manual_seed(
            seed + 7919 * list(get_ops()).index(op) + 104729 * T + (0 if has_state else 1)
        )
        inputs = spec.random_inputs(B, T, H, N, generator=gen)
        if not has_state:
            inputs[-1] = spec.initial_state(dims, "cpu", torch.float64)
        # The oracle sees exactly what the kernel sees: the inputs rounded to the run dtype.
        rounded = [
            tuple(s.double() for s in x) if isinstance(x, tuple) else x.double()
            for x in spec.cast_inputs(inputs, dtype, "cpu")
        ]
        oracle_fn = spec.recurrent
        ref_plain = evaluate(oracle_fn, op, rounded, None, grad=False)
        upstream = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64)
                    for n, t in ref_plain.items()}
        ref = evaluate(oracle_fn, op, rounded, upstream)
        oracle_cache[key] = (inputs, upstream, ref)
    inputs, upstream, ref = oracle_cache[key]

    args = spec.cast_inputs(inputs, dtype, device)
    originals = [x.clone() for x in _flat(args)]
    front = functools.partial(_ops.call, op)

    def run(*a):
        state = a[-1] if has_state else None
        return front(*a[:-1], state=state, mode=mode, backend=backend)

    try:
        got = evaluate(run, op, args, upstream, grad=grad)
    except Exception as exc:  # a conformance failure, not a crash of the suite
        result.message = f"raised {type(exc).__name__}: {exc}"
        return result

    problems = []
    if any(not torch.equal(x, o) for x, o in zip(_flat(args), originals, strict=True)):
        problems.append("modified its inputs in place")
    y = got["y"]
    sdt = _ops.state_dtype(dtype)
    y_shape = spec.shape_of(spec.output, dims)
    if tuple(y.shape) != y_shape:
        problems.append(f"y has shape {list(y.shape)}, expected {list(y_shape)}")
    if y.dtype != dtype:
        problems.append(f"y is {_dtype_name(y.dtype)}, expected {_dtype_name(dtype)} (the input dtype)")
    state_names = spec.state_names
    no_grad_args = {f"d{a.name}" for a in spec.args if not a.grad}
    for n in state_names:
        s, s_ref = got[n], ref[n]
        if tuple(s.shape) != tuple(s_ref.shape):
            problems.append(f"state {n} has shape {list(s.shape)}, expected {list(s_ref.shape)}")
        if s.dtype != sdt:
            problems.append(f"state {n} is {_dtype_name(s.dtype)}, expected {_dtype_name(sdt)}")
    for n, t in got.items():
        if t is None:
            if grad and n not in no_grad_args and (has_state or n not in {f"d{s}" for s in state_names}):
                problems.append(f"no gradient for {n[1:]}")
            continue
        if not torch.isfinite(t).all():
            problems.append(f"{n} has NaN/Inf")

    for n, t in got.items():
        if t is None or (not has_state and n in {f"d{s}" for s in state_names}):
            continue
        if tuple(t.shape) != tuple(ref[n].shape):
            if n.startswith("d"):
                problems.append(f"{n} has shape {list(t.shape)}, expected {list(ref[n].shape)}")
            continue
        result.errors[n] = rel_err(t, ref[n])
    for n, err in result.errors.items():
        quantity = "grad" if n.startswith("d") else ("y" if n == "y" else "state")
        gate = rtol if rtol is not None else spec.gate(dtype, quantity)
        if not err <= gate:
            problems.append(f"{n} error {err:.2e} > {gate:.0e}")
    result.passed = not problems
    result.message = "; ".join(problems + notes)
    return result


@dataclass(frozen=True)
class Case:
    """One conformance case: an ``(op, mode)`` kernel run in ``dtype`` over ``T`` tokens."""

    op: str
    mode: str
    dtype: torch.dtype
    T: int

    @property
    def id(self) -> str:
        """A short name for reports and test ids: ``wkv6-chunk-float32-T63``."""
        return f"{self.op}-{self.mode}-{_dtype_name(self.dtype)}-T{self.T}"


def conformance_cases(
    name: str,
    *,
    ops: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    Ts: Sequence[int] = DEFAULT_TS,
) -> list[Case]:
    """Every case of backend ``name``'s matrix: each ``(op, mode)`` kernel it registers (restricted to
    ``ops`` / ``modes``, which default to every registered op and both modes) × ``dtypes`` × ``Ts``.
    Cases its capabilities reject are still listed: running them reports them as skipped, with the reason."""
    backends = dispatch.get_backends()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; registered backends: {', '.join(sorted(backends))}")
    backend = backends[name]
    wanted_ops = tuple(ops) if ops is not None else tuple(get_ops())
    wanted_modes = tuple(modes) if modes is not None else MODES
    for op in wanted_ops:
        get_op(op)  # an unknown op raises, listing the registered ones
    for mode in wanted_modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")
    return [
        Case(op, mode, dtype, T)
        for op in wanted_ops
        for mode in wanted_modes
        if backend.kernel(op, mode) is not None
        for dtype in dtypes
        for T in Ts
    ]


def run_case(
    name: str,
    case: Case,
    *,
    device: str = "cpu",
    seed: int = 42,
    B: int = 2,
    H: int = 2,
    N: int = 16,
    rtol: float | None = None,
    cache: dict | None = None,
) -> CaseResult:
    """Run one case of backend ``name`` against the fp64 reference recurrence (see the module docstring).

    ``cache`` (any dict, shared between calls with the same ``seed``, ``B``, ``H``) keeps the inputs and
    the oracle's results, so the other mode and other backends reuse them. Never raises for a kernel that
    fails: the ``CaseResult`` says what went wrong.
    """
    backend = dispatch.get_backends()[name]
    why = backend.unavailable_reason()
    if why:
        return CaseResult(case.op, case.mode, case.dtype, case.T, skipped=True, message=why)
    return _check_case(name, case.op, case.mode, case.dtype, case.T, B, H, N, device, seed, rtol,
                       cache if cache is not None else {})


def check_backend(
    name: str,
    *,
    ops: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    Ts: Sequence[int] = DEFAULT_TS,
    device: str = "cpu",
    seed: int = 42,
    B: int = 2,
    H: int = 2,
    N: int = 16,
    rtol: float | None = None,
    raise_on_fail: bool = True,
) -> ConformanceReport:
    """Check backend ``name`` against the fp64 reference recurrence; see the module docstring.

    Runs each ``(op, mode)`` kernel the backend has (restricted to ``ops`` / ``modes``) for every
    dtype and length whose call its capabilities accept; others are listed as skipped with the
    reason. Kernels without a backward are checked forward only; kernels that take no state get a
    zero state. ``N`` is the head size (a kernel that declares head sizes gets one it accepts);
    wkv4 runs with ``C = H * N`` channels. ``rtol`` overrides every gate.

    Returns a ``ConformanceReport``; raises ``AssertionError`` listing the failures when
    ``raise_on_fail`` and the report is not ``ok`` (a failure, or nothing ran at all).
    """
    cases = conformance_cases(name, ops=ops, modes=modes, dtypes=dtypes, Ts=Ts)
    report = ConformanceReport(name, device)
    cache: dict = {}
    for case in cases:
        report.results.append(
            run_case(name, case, device=device, seed=seed, B=B, H=H, N=N, rtol=rtol, cache=cache)
        )
    if raise_on_fail and not report.ok:
        if report.failures:
            lines = [f"backend {name!r} fails {len(report.failures)} conformance case(s):"]
            lines += [f"  {r.op} [{r.mode}] {_dtype_name(r.dtype)} T={r.T}: {r.message}" for r in report.failures]
        else:
            lines = [f"backend {name!r}: no conformance case could run"]
            lines += sorted({f"  {r.op} [{r.mode}] {_dtype_name(r.dtype)}: {r.message}" for r in report.results})
        raise AssertionError("\n".join(lines) + "\n\n" + str(report))
    return report


# ---------------------------------------------------------------------------------------------------
# Registering a plugin for a test


@contextlib.contextmanager
def registered_plugin(obj, name: str | None = None) -> Iterator[str]:
    """``with registered_plugin(MyPlugin()):`` registers a plugin (module or object) for the block.

    Yields the plugin's name and unregisters it afterwards, also when the block raises. A plugin that
    is already registered (a module also loaded through its entry point, say) is left as it is and
    its existing name is yielded, so the same test passes with and without the package installed.
    The pytest fixture ``rwkv_zoo_plugin`` (``rwkv_zoo.pytest_plugin``) does the same for one test.
    """
    pm = pluginmanager.get_plugin_manager()
    if pm.is_registered(obj):
        yield pm.get_name(obj)
        return
    with pluginmanager.plugin(obj, name) as registered:
        yield registered
