"""The backend contract: what a kernel provider declares so dispatch can choose and explain.

A ``Backend`` is a name, a priority and a list of ``Kernel`` objects, one per ``(op, mode)`` it can run.
Each kernel declares its capabilities (devices, dtypes, head sizes, length limits, backward, state)
and ``reasons(call)`` turns a ``KernelCall`` it cannot run into sentences. ``unavailable_reason()``
says why the whole backend cannot run here (a package missing, no GPU, no compiler), or None.

Kernel functions take the op's arguments exactly as its ``OpSpec`` (``rwkv_zoo.opspec``) declares them,
with the state always given (the initial state when the caller passed none), and return
``(y, final_state)``. They must support autograd through every input, the initial state included, when
``supports_backward`` is true.

A kernel names its op by string and is not checked when it is made: a plugin may register an op and
kernels for it in one module, in any order. Dispatch checks a backend's ops against the registered ones
when it collects the backends (``Backend.check_ops``).

Also here, because backends and policy plugins are written against them: ``KernelCall`` (what a kernel is
asked to do), ``Choice`` (a policy's answer) and ``Selection`` (the outcome of dispatch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rwkv_zoo import opspec

MODES: tuple[str, ...] = ("recurrent", "chunk")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _channelwise(op: str) -> bool:
    spec = opspec.get_ops().get(op)
    return spec is not None and spec.channelwise


@dataclass(frozen=True)
class KernelCall:
    """What a kernel is asked to do; backends match their capabilities against it.

    ``N`` is the head size; for a channelwise op (``OpSpec.channelwise``, wkv4) ``H = 1`` and ``N = C``
    (one group of C channels).
    """

    op: str
    mode: str
    device: str
    dtype: torch.dtype
    B: int
    T: int
    H: int
    N: int
    requires_grad: bool = False
    has_state: bool = False

    def describe(self) -> str:
        dt = _dtype_name(self.dtype)
        shape = f"B={self.B} T={self.T} C={self.N}" if _channelwise(self.op) else (
            f"B={self.B} T={self.T} H={self.H} N={self.N}"
        )
        extra = (", grad" if self.requires_grad else "") + (", with state" if self.has_state else "")
        return f"{self.op} [{self.mode}] {self.device} {dt} {shape}{extra}"


@dataclass(frozen=True)
class Choice:
    """A policy plugin's answer: the backend it picks and why."""

    backend: str
    reason: str = ""


@dataclass
class Kernel:
    """One kernel: an ``(op, mode)`` pair, the function, and what it can run."""

    op: str
    mode: str
    fn: Callable[..., Any]
    devices: Sequence[str] | None = None  # device types ("cpu", "cuda", ...); None = any
    dtypes: Sequence[torch.dtype] | None = None  # input dtypes; None = any floating dtype
    head_sizes: Sequence[int] | None = None  # N for wkv5-7; None = any
    max_T: int | None = None
    supports_backward: bool = True
    supports_state: bool = True
    # Extra capability test: returns sentences for what this kernel cannot do with ``call``.
    check: Callable[[KernelCall], list[str]] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes are {', '.join(MODES)}")

    def reasons(self, call: KernelCall) -> list[str]:
        out: list[str] = []
        if self.devices is not None and call.device not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)}, not {call.device}")
        if self.dtypes is not None and call.dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            out.append(f"takes {names} inputs, not {_dtype_name(call.dtype)}")
        if self.head_sizes is not None and not _channelwise(call.op) and call.N not in self.head_sizes:
            sizes = ", ".join(str(n) for n in self.head_sizes)
            out.append(f"needs head size N in {{{sizes}}}, got N={call.N}")
        if self.max_T is not None and self.max_T < call.T:
            out.append(f"needs T <= {self.max_T}, got T={call.T}")
        if call.requires_grad and not self.supports_backward:
            out.append("has no backward and this call needs gradients")
        if call.has_state and not self.supports_state:
            out.append("cannot take an initial state")
        if self.check is not None:
            out.extend(self.check(call))
        return out


@dataclass
class Backend:
    """A kernel provider. Subclass and override ``unavailable_reason`` or pass ``availability``."""

    name: str
    kernels: list[Kernel]
    priority: int = 0
    description: str = ""
    availability: Callable[[], str | None] | None = None
    provider: str = field(default="", compare=False)  # the plugin that registered it (set on registration)
    # Whole-model inference steps (rwkv_zoo.fused.FusedStep), chosen by rwkv_zoo.fused.select.
    steps: list[Any] = field(default_factory=list)
    # Faster versions of the blocks' small layer ops (rwkv_zoo.layerops: name -> function, NotImplemented
    # for a call it cannot run).
    layer_ops: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def unavailable_reason(self) -> str | None:
        """A sentence saying why this backend cannot run at all here, or None when it can."""
        return self.availability() if self.availability is not None else None

    def kernel(self, op: str, mode: str) -> Kernel | None:
        for k in self.kernels:
            if k.op == op and k.mode == mode:
                return k
        return None

    def check_ops(self) -> None:
        """Raise ``ValueError`` if a kernel is for an op that is not registered (checked at registration)."""
        known = opspec.get_ops()
        for k in self.kernels:
            if k.op not in known:
                raise ValueError(
                    f"backend {self.name!r} has a {k.mode} kernel for unknown op {k.op!r}; registered ops: "
                    f"{', '.join(known) or 'none'} (register the op with the rwkv_zoo_register_ops hook)"
                )

    def ops(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for k in self.kernels:
            out.setdefault(k.op, []).append(k.mode)
        return out

    def reasons(self, call: KernelCall) -> list[str]:
        """Sentences for why this backend cannot run ``call``; empty when it can."""
        why = self.unavailable_reason()
        if why:
            return [why]
        kernel = self.kernel(call.op, call.mode)
        if kernel is None:
            modes = [k.mode for k in self.kernels if k.op == call.op]
            if modes:
                return [f"has no {call.mode} kernel for {call.op} (has {', '.join(modes)})"]
            return [f"has no kernel for {call.op}"]
        return kernel.reasons(call)


@dataclass(frozen=True)
class Selection:
    """The outcome of dispatch for one call: who runs it, who decided, who was rejected and why."""

    call: KernelCall
    backend: str
    decided_by: str
    reason: str
    mode_reason: str
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()
    kernel: Kernel | None = field(default=None, compare=False, repr=False)

    @property
    def mode(self) -> str:
        return self.call.mode

    def explain(self) -> str:
        lines = [
            f"{self.call.describe()}",
            f"  -> {self.backend} ({self.decided_by}: {self.reason})",
            f"  mode {self.mode}: {self.mode_reason}",
        ]
        for name, why in self.rejected:
            lines.append(f"  not {name}: {'; '.join(why)}")
        return "\n".join(lines)
