"""Whole-model steps: a backend's kernel for every layer, the final norm and the head in one call.

For inference on a CPU most of a decode step is overhead around small matrix products: ~40 tensor
ops and ~10 thread wake-ups per layer. A backend may therefore provide a ``FusedStep``: a kernel that
runs the whole model body for ``x`` [B, T, C] embeddings and returns the logits of the last ``keep``
positions and the new per-layer states. Like an op kernel it declares what it can run
(``check(model, call)`` returns sentences for what it cannot), and it is chosen here, per call:

1. only without gradients, outside ``torch.compile``, with ``model.fused_step`` true (the default)
   and ``model.mode`` unset (a forced kernel mode asks for per-layer kernels);
2. an explicit backend choice (``model.backend``, ``use_backend``, ``RWKV_ZOO_BACKEND``) restricts
   the choice to that backend's steps; otherwise every available backend's steps are candidates;
3. the highest-priority backend whose step accepts the model and the call wins. When none does the
   model runs its modules, layer by layer, with per-layer kernels from dispatch: always correct.

A step decides from the model's **exact** module classes (never ``isinstance``): a subclass that
changes the maths of a time-mix never inherits its parent's fused step. What a step builds from the
weights (packed copies) is cached on the model per weight version (the sum of the tensors' version
counters, which every in-place update bumps) and dropped by ``invalidate`` when tensors are moved or
replaced (``model.to``, ``load_state_dict(assign=True)``, ``prepare_inference``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rwkv_zoo import dispatch, pluginmanager

if TYPE_CHECKING:
    from torch import nn

    from rwkv_zoo.state import LayerState, RWKVState


@dataclass(frozen=True)
class StepCall:
    """What a whole-model step is asked to run: ``B`` sequences of ``T`` tokens on ``device``."""

    device: str
    dtype: torch.dtype
    B: int
    T: int

    def describe(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')} B={self.B} T={self.T}"


# A built step: (x [B, T, C] fp32 embeddings, state, fresh, keep) -> (logits [B, keep, V], new layer states)
Runner = Callable[[Tensor, "RWKVState", bool, int], "tuple[Tensor, list[LayerState]]"]


@dataclass
class FusedStep:
    """A backend's whole-model inference step.

    ``check(model, call)`` returns sentences for what it cannot run (empty: it can); it is called once
    per kind of call and must be cheap. ``build(model)`` prepares a runner from the current weights
    (e.g. packs them); it is called again whenever the weights changed.
    """

    name: str
    check: Callable[[nn.Module, StepCall], list[str]]
    build: Callable[[nn.Module], Runner]
    devices: Sequence[str] | None = None
    description: str = ""


@dataclass(frozen=True)
class StepSelection:
    """Who runs a call's model body: a backend's fused step, or the modules (``backend`` None)."""

    call: StepCall
    backend: str | None
    step: str | None
    reason: str
    rejected: tuple[tuple[str, str], ...] = field(default=())

    def describe(self) -> str:
        if self.backend is None:
            return f"the modules, layer by layer ({self.reason})"
        return f"the {self.backend} backend's fused step {self.step!r} ({self.reason})"


def _why_not_at_all(model: nn.Module) -> str | None:
    if not getattr(model, "fused_step", True):
        return "model.fused_step is False"
    if getattr(model, "mode", None) is not None:
        return f"model.mode={model.mode!r} asks for per-layer kernels"
    return None


def select(model: nn.Module, call: StepCall) -> StepSelection:
    """Choose the fused step for ``call`` (or the modules), with the reasons. Cached per model."""
    explicit, source = dispatch._explicit(getattr(model, "backend", None))
    key = (call, explicit, getattr(model, "fused_step", True), getattr(model, "mode", None),
           pluginmanager.generation())
    cache = model.__dict__.setdefault("_step_selections", {})
    if key in cache:
        return cache[key]
    why = _why_not_at_all(model)
    if why is not None:
        sel = StepSelection(call, None, None, why)
    else:
        sel = _select(model, call, explicit, source, dispatch.get_backends())
    cache[key] = sel
    return sel


def _select(model, call: StepCall, explicit: str | None, source: str, backends) -> StepSelection:
    rejected: list[tuple[str, str]] = []
    names = [explicit] if explicit else sorted(backends, key=lambda n: (-backends[n].priority, n))
    for name in names:
        backend = backends.get(name)
        steps = list(getattr(backend, "steps", ()) or ())
        if backend is None or not steps:
            if explicit:
                return StepSelection(call, None, None, f"{source} chose {name!r}, which has no fused step")
            continue
        why = backend.unavailable_reason()
        if why:
            rejected.append((name, why))
            continue
        for step in steps:
            if step.devices is not None and call.device not in step.devices:
                rejected.append((name, f"{step.name}: runs on {'/'.join(step.devices)}, not {call.device}"))
                continue
            reasons = step.check(model, call)
            if reasons:
                rejected.append((name, f"{step.name}: {'; '.join(reasons)}"))
                continue
            how = f"chosen explicitly by {source}" if explicit else f"highest priority ({backend.priority}) that fits"
            return StepSelection(call, name, step.name, how, tuple(rejected))
    if not rejected:
        return StepSelection(call, None, None, "no backend provides a fused step here")
    return StepSelection(call, None, None, "no fused step fits: " + "; ".join(f"{n}: {r}" for n, r in rejected),
                         tuple(rejected))


def applies(model: nn.Module) -> bool:
    """Whether this call may take a fused step at all (no gradients, not compiling)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and getattr(model, "fused_step", True)


def _tensors(model: nn.Module) -> list[Tensor]:
    # Tensors made under inference_mode have no version counter (and cannot change in place later).
    return [t for t in (*model.parameters(), *model.buffers()) if not t.is_inference()]


def _fingerprint(tensors: list[Tensor]) -> int:
    # Version counters only grow, so their sum changes whenever any tensor is updated in place (an
    # optimizer step, set_rescale, load_state_dict's copy). Per token this costs ~1 us per tensor.
    return sum(t._version for t in tensors)


def runner(model: nn.Module, sel: StepSelection) -> Runner:
    """The built step for ``sel``, rebuilt when the weights changed since it was built."""
    key = (sel.backend, sel.step)
    cached = model.__dict__.get("_fused_runner")
    if cached is not None and cached[0] == key and cached[2] == _fingerprint(cached[1]):
        return cached[3]
    backend = dispatch.get_backends()[sel.backend]
    step = next(s for s in backend.steps if s.name == sel.step)
    run = step.build(model)
    tensors = _tensors(model)
    model.__dict__["_fused_runner"] = (key, tensors, _fingerprint(tensors), run)
    return run


def invalidate(model: nn.Module, *_args: Any) -> None:
    """Forget what fused steps built from this model's tensors (they were moved or replaced)."""
    model.__dict__.pop("_fused_runner", None)
    model.__dict__.pop("_step_selections", None)
