"""Op specs: every WKV op (``wkv4`` … and whatever a plugin adds) declared once.

An ``OpSpec`` says what an op takes and returns: its arguments in call order with shape patterns over
symbolic dimensions (``("B", "T", "H", "N")``) and a dtype rule each, the output's pattern, the state
layout (one matrix, or a tuple of named tensors with their initial values), how the ``KernelCall``'s
``(H, N)`` are read from the arguments, the literal recurrence (the oracle), optionally the chunked
reference, a random-input generator and the conformance tolerances that differ from the defaults.

From that one declaration derive: the argument checks of ``rwkv_zoo.ops.call`` (and the ``wkv*``
front-ends), the checks of what a kernel returns, the ``reference`` backend's kernels and the conformance
suite of ``rwkv_zoo.testing``. Specs are registered through the ``rwkv_zoo_register_ops`` hook; the
built-in ones by the plugin ``rwkv_zoo.backends.reference.specs``.

This module is at the bottom of the dependency graph: it imports only torch and the plugin manager.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo import pluginmanager

__all__ = [
    "DTYPE_RULES",
    "OpArg",
    "OpSpec",
    "StatePart",
    "get_op",
    "get_ops",
    "list_ops",
    "state_dtype",
]

# "input": the activation dtype; every "input" argument must share it, and y comes back in it.
# "float": any floating dtype (kernels cast it); v7 passes a and b in fp32 under bf16 autocast.
# "fp32": a parameter a low-precision model keeps in fp32 (log decay, bonus); any floating dtype is
#         accepted, and the conformance suite gives it fp32 when the run is bf16/fp16.
DTYPE_RULES: tuple[str, ...] = ("input", "float", "fp32")
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

# Conformance gates (relative error) unless a spec overrides one (PERF.md "Accuracy gates").
_DEFAULT_GATES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The WKV state dtype for inputs of ``dtype``: fp64 for fp64 (so the oracle is exact), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt(pattern: Sequence[str]) -> str:
    return "[" + ", ".join(pattern) + "]"


def _check_float(name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def _check_shape(name: str, t: Any, shape: tuple[int, ...], what: str) -> None:
    _check_float(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


@dataclass(frozen=True)
class OpArg:
    """One positional argument of an op: name, shape pattern, dtype rule, whether it gets gradients."""

    name: str
    shape: tuple[str, ...]
    dtype: str = "input"
    grad: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_RULES:
            raise ValueError(f"argument {self.name!r}: dtype rule {self.dtype!r} is not one of {DTYPE_RULES}")


@dataclass(frozen=True)
class StatePart:
    """One tensor of an op's state (fp32, fp64 for fp64 inputs), with the value of the initial state."""

    name: str
    shape: tuple[str, ...]
    init: float = 0.0


@dataclass
class OpSpec:
    """The declaration of an op; see the module docstring.

    ``recurrent(*args, state) -> (y, final_state)`` is the literal per-step recurrence: the oracle of the
    conformance suite (run in fp64) and the ``reference`` backend's recurrent kernel. ``chunk``, with the
    same signature, is the chunked matrix form (the reference's chunk kernel; None: it has none).
    ``make_inputs(B, T, H, N, dtype, device, generator, decay_scale)`` returns random inputs in call order
    with an initial state last, in the distributions that stress the op's numerics (None: standard
    normal everywhere). For ``channelwise`` ops the channel count is ``C = H * N`` there.

    ``channelwise``: the op works per channel with no heads; its ``KernelCall`` has ``H = 1`` and
    ``N = C`` (wkv4), and kernels' ``head_sizes`` do not apply. Otherwise ``H`` and ``N`` are the
    dimensions of those names. ``aliases`` name a dimension by another (``{"K": "N", "V": "N"}``: a
    ``[B, H, K, V]`` state whose K and V are the head size). ``tolerances`` override conformance gates per
    ``(dtype name, quantity)``, quantity one of ``"y"``, ``"state"``, ``"grad"``.
    """

    name: str
    doc: str
    args: tuple[OpArg, ...]
    output: tuple[str, ...]
    state: tuple[StatePart, ...]
    recurrent: Callable[..., Any]
    chunk: Callable[..., Any] | None = None
    make_inputs: Callable[..., list] | None = None
    channelwise: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)
    tolerances: Mapping[tuple[str, str], float] = field(default_factory=dict)
    provider: str = field(default="", compare=False)  # the plugin that registered it (set on registration)

    def __post_init__(self) -> None:
        self.args = tuple(self.args)
        self.state = tuple(self.state)
        self.output = tuple(self.output)
        names = [a.name for a in self.args]
        if not self.name or not self.args or not self.state:
            raise ValueError("an OpSpec needs a name, at least one argument and a state")
        if len(set(names)) != len(names) or "state" in names:
            raise ValueError(f"op {self.name!r}: argument names must be unique and not 'state', got {names}")
        if not any(a.dtype == "input" for a in self.args):
            raise ValueError(f"op {self.name!r}: one argument must have the 'input' dtype rule (it sets y's dtype)")
        known = {self._base(d) for a in self.args for d in a.shape}
        needed = {"B", "T"} | ({"C"} if self.channelwise else {"H", "N"})
        used = {self._base(d) for d in self.output} | {self._base(d) for p in self.state for d in p.shape}
        if not needed | used <= known:
            raise ValueError(
                f"op {self.name!r}: dimensions {sorted(needed | used - known)} appear in no argument's shape"
            )
        # Worked out once: bind() runs on every op call (decode calls it per layer and token).
        lead = self.lead
        self._order = (lead, *(i for i in range(len(self.args)) if i != lead))
        self._bases = tuple(tuple(self._base(d) for d in a.shape) for a in self.args)
        self._inputs = tuple(i for i, a in enumerate(self.args) if a.dtype == "input")
        seen: set[str] = set()
        self._binds = {}  # per argument, in _order: does it fix a dimension no earlier one did?
        for i in self._order:
            self._binds[i] = not set(self._bases[i]) <= seen
            seen.update(self._bases[i])

    # -------------------------------------------------------------------------------------------
    # Names and dimensions

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.state)

    @property
    def tuple_state(self) -> bool:
        """Whether the state is a tuple of tensors (wkv4's ``(a, b, p)``) rather than one tensor."""
        return len(self.state) > 1

    @property
    def lead(self) -> int:
        """Index of the first ``"input"`` argument: its dtype and device are the call's."""
        return next(i for i, a in enumerate(self.args) if a.dtype == "input")

    def _base(self, dim: str) -> str:
        return self.aliases.get(dim, dim)

    def shape_of(self, pattern: Sequence[str], dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(dims[self._base(d)] for d in pattern)

    def kernel_dims(self, dims: Mapping[str, int]) -> tuple[int, int]:
        """``(H, N)`` of the ``KernelCall``: ``(1, C)`` for a channelwise op."""
        return (1, dims["C"]) if self.channelwise else (dims["H"], dims["N"])

    def conformance_dims(self, B: int, T: int, H: int, N: int) -> dict[str, int]:
        """The dimensions of a conformance run with ``H`` heads of size ``N`` (``C = H * N``)."""
        return {"B": B, "T": T, "H": H, "N": N, "C": H * N}

    # -------------------------------------------------------------------------------------------
    # Checks of the arguments and of what a kernel returns

    def bind(self, args: Sequence[Any]) -> dict[str, int]:
        """Check ``args`` (call order, no state) against the spec and return the dimensions they fix.

        Raises ``TypeError`` (not a floating tensor, dtypes that must agree do not) or ``ValueError``
        naming the argument, the expected pattern and sizes, and what it got.
        """
        if len(args) != len(self.args):
            raise TypeError(
                f"{self.name} takes {len(self.args)} arguments ({', '.join(self.arg_names)}) and state=, "
                f"got {len(args)}"
            )
        dims: dict[str, int] = {}
        for i in self._order:
            spec, t, bases = self.args[i], args[i], self._bases[i]
            if not isinstance(t, Tensor) or not t.is_floating_point():
                _check_float(spec.name, t)
            if not self._binds[i]:
                expected = tuple(map(dims.__getitem__, bases))
                if t.shape != expected:
                    _check_shape(spec.name, t, expected, _fmt(spec.shape))
                continue
            if t.dim() != len(spec.shape):
                raise ValueError(f"{spec.name} must be {_fmt(spec.shape)}, got shape {list(t.shape)}")
            for d, b, n in zip(spec.shape, bases, t.shape, strict=True):
                if b in dims and dims[b] != n:
                    raise ValueError(
                        f"{spec.name} must be {_fmt(spec.shape)} with {d} = {dims[b]}, got shape {list(t.shape)}"
                    )
                dims[b] = int(n)
        if dims["T"] < 1:
            raise ValueError(f"{self.name} needs T >= 1")
        dtype = args[self._inputs[0]].dtype
        if any(args[i].dtype != dtype for i in self._inputs):
            inputs = [(self.args[i].name, args[i]) for i in self._inputs]
            names, dtypes = ", ".join(n for n, _ in inputs), ", ".join(str(t.dtype) for _, t in inputs)
            raise TypeError(f"{names} must share a dtype, got {dtypes}")
        return dims

    def initial_state(self, dims: Mapping[str, int], device: Any, dtype: torch.dtype = torch.float32) -> Any:
        """The state before the first token: each part filled with its ``init``."""
        parts = tuple(
            torch.full(self.shape_of(p.shape, dims), p.init, device=device, dtype=dtype) for p in self.state
        )
        return parts if self.tuple_state else parts[0]

    def prepare_state(self, state: Any, dims: Mapping[str, int], like: Tensor) -> tuple[Any, bool]:
        """``(state in the state dtype, whether one was given)``: the initial state for None, else ``state``
        checked and converted."""
        sdt = state_dtype(like.dtype)
        if state is None:
            return self.initial_state(dims, like.device, sdt), False
        if self.tuple_state:
            if not isinstance(state, (tuple, list)) or len(state) != len(self.state):
                shapes = {_fmt(p.shape) for p in self.state}
                of = next(iter(shapes)) if len(shapes) == 1 else ", ".join(_fmt(p.shape) for p in self.state)
                names = ", ".join(self.state_names)
                raise ValueError(f"the {self.name} state must be a tuple ({names}) of {of} tensors")
            for p, s in zip(self.state, state, strict=True):
                _check_shape(f"state {p.name}", s, self.shape_of(p.shape, dims), _fmt(p.shape))
            return tuple(s.to(sdt) for s in state), True
        p = self.state[0]
        _check_shape("state", state, self.shape_of(p.shape, dims), _fmt(p.shape))
        return state.to(sdt), True

    def output_problems(self, out: Any, dims: Mapping[str, int], dtype: torch.dtype) -> list[str]:
        """What is wrong with a kernel's ``out`` = ``(y, final_state)`` for inputs of ``dtype`` (empty: nothing)."""
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            return [f"it returned a {type(out).__name__}, not a pair (y, final_state)"]
        y, state = out
        problems = _tensor_problems("y", y, self.shape_of(self.output, dims), dtype)
        sdt = state_dtype(dtype)
        if self.tuple_state:
            if not isinstance(state, (tuple, list)) or len(state) != len(self.state):
                got = type(state).__name__
                return [*problems, f"the final state must be a tuple of {len(self.state)} tensors, got {got}"]
            for p, s in zip(self.state, state, strict=True):
                problems += _tensor_problems(f"final state {p.name}", s, self.shape_of(p.shape, dims), sdt)
        else:
            problems += _tensor_problems("final state", state, self.shape_of(self.state[0].shape, dims), sdt)
        return problems

    # -------------------------------------------------------------------------------------------
    # Conformance

    def cast_inputs(self, inputs: Sequence[Any], dtype: torch.dtype, device: Any) -> list:
        """Inputs (state last) for a run in ``dtype`` on ``device``, following the dtype rules: "fp32"
        arguments stay fp32 for bf16/fp16 runs, the state is in the state dtype."""
        out = []
        for a, x in zip(self.args, inputs[:-1], strict=True):
            dt = torch.float32 if (dtype in LOW_PRECISION and a.dtype == "fp32") else dtype
            out.append(x.to(device=device, dtype=dt))
        sdt, state = state_dtype(dtype), inputs[-1]
        if isinstance(state, (tuple, list)):
            out.append(tuple(s.to(device=device, dtype=sdt) for s in state))
        else:
            out.append(state.to(device=device, dtype=sdt))
        return out

    def random_inputs(
        self, B: int, T: int, H: int, N: int, *, dtype: torch.dtype = torch.float64, device: Any = "cpu",
        generator: torch.Generator | None = None, decay_scale: float = 1.0,
    ) -> list:
        """Random inputs in call order, a non-zero initial state last (see ``make_inputs``)."""
        if self.make_inputs is not None:
            return self.make_inputs(B, T, H, N, dtype, device, generator, decay_scale)
        dims = self.conformance_dims(B, T, H, N)
        values: list[Any] = [
            torch.randn(self.shape_of(a.shape, dims), generator=generator, dtype=torch.float64) for a in self.args
        ]
        parts = tuple(
            torch.randn(self.shape_of(p.shape, dims), generator=generator, dtype=torch.float64) for p in self.state
        )
        values.append(parts if self.tuple_state else parts[0])
        return self.cast_inputs(values, dtype, device)

    def gate(self, dtype: torch.dtype, quantity: str) -> float:
        """The conformance gate (relative error) for ``quantity`` ("y", "state", "grad") in ``dtype``."""
        override = self.tolerances.get((_dtype_name(dtype), quantity))
        return override if override is not None else _DEFAULT_GATES.get(dtype, 1e-5)

    def describe(self) -> str:
        """One line: ``wkv6(r [B, T, H, N], …, state [B, H, K, V]) -> y [B, T, H, N]``."""
        args = ", ".join(f"{a.name} {_fmt(a.shape)}" for a in self.args)
        state = ", ".join(f"{p.name} {_fmt(p.shape)}" for p in self.state)
        state = f"({state})" if self.tuple_state else state
        return f"{self.name}({args}, state {state}) -> y {_fmt(self.output)}"


def _tensor_problems(what: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> list[str]:
    if not isinstance(t, Tensor):
        return [f"{what} is a {type(t).__name__}, not a tensor"]
    if tuple(t.shape) != shape:
        return [f"{what} has shape {list(t.shape)}, expected {list(shape)}"]
    if t.dtype != dtype:
        return [f"{what} is {_dtype_name(t.dtype)}, expected {_dtype_name(dtype)}"]
    return []


# ---------------------------------------------------------------------------------------------------
# Registry (collected through the register_ops hook, cached per plugin generation)

_ops = pluginmanager.NamedRegistry("rwkv_zoo_register_ops", OpSpec, "op")


def get_ops() -> dict[str, OpSpec]:
    """Every registered op by name, in registration order (the built-ins ``wkv4`` … ``wkv7`` first)."""
    return _ops.get()


def list_ops() -> list[str]:
    """The names of the registered ops."""
    return list(get_ops())


def get_op(name: str) -> OpSpec:
    """The spec of op ``name``; an unknown name raises ``ValueError`` listing the registered ops."""
    found = get_ops()
    spec = found.get(name)
    if spec is None:
        missing = pluginmanager.not_loaded()
        raise ValueError(
            f"unknown op {name!r}; ops are {', '.join(found) or 'none'}"
            + (f". Not loaded: {'; '.join(missing)}" if missing else "")
        )
    return spec
