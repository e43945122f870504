"""Whole-model steps: a backend's kernel for every layer, the final norm and the head in one call.

For inference on a CPU most of a decode step is overhead around small matrix products: ~40 tensor
ops and ~10 thread wake-ups per layer. A backend may therefore provide a ``FusedStep``: a kernel that
runs the whole model body for ``x`` [B, T, C] embeddings and returns the logits of the last ``keep``
positions and the new per-layer states. Like an op kernel it declares what it can run
(``check(model, call)`` returns sentences for what it cannot), and it is chosen here, per call:

1. only without gradients, outside ``torch.compile``, with ``model.fused_step`` true (the default)
   and ``model.mode`` unset (a forced kernel mode asks for per-layer kernels);
2. dispatch is asked for every layer's kernel call, exactly as the modules would ask (explicit choices,
   the policy hook, priorities); only when it gives them all to one backend may that backend's step
   run, since the step replaces those kernels too;
3. the step must accept the model and the call (``check``). Otherwise the model runs its modules,
   layer by layer, with per-layer kernels from dispatch: always correct.

A step decides from the model's **exact** module classes (never ``isinstance``): a subclass that
changes the maths of a time-mix never inherits its parent's fused step. What a step builds from the
weights (packed copies) is cached on the model per weight version (the sum of the tensors' version
counters, which in-place updates bump, plus a count of fused optimizer steps, which do not) and
dropped by ``invalidate`` when tensors are moved or replaced (``model.to``, ``load_state_dict(assign=True)``,
``prepare_inference``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

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


# Bumped whenever any module is assigned as a submodule anywhere (torch's global registration hook): a
# library that swaps a model's layers (peft's LoRA layers wrap projections in place) changes what a step
# may read, so choices and built steps made before are not reused. Building models bumps it too, which
# costs one fresh choice per model, never a wrong one.
_structure = [0]


def _module_assigned(_module: Any, _name: str, _submodule: Any) -> None:
    _structure[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_module_assigned)


def select(model: nn.Module, call: StepCall) -> StepSelection:
    """Choose the fused step for ``call`` (or the modules), with the reasons. Cached per model."""
    explicit, source = dispatch._explicit(getattr(model, "backend", None))
    key = (call, explicit, getattr(model, "fused_step", True), getattr(model, "mode", None),
           pluginmanager.generation(), _structure[0])
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
    # A step replaces the body, and with it every layer's kernel: it may run only where dispatch gives all
    # of them to the step's own backend (an explicit choice, the policy hook and priorities all apply
    # as they would layer by layer, so a higher-priority backend's kernels are never bypassed).
    try:
        chosen = {dispatch.select(kc, getattr(model, "backend", None)).backend
                  for _, kc in model.kernel_calls(call.B, call.T, device=call.device, dtype=call.dtype)}
    except (dispatch.BackendError, ValueError) as exc:
        return StepSelection(call, None, None, f"dispatch cannot run the layers' kernels: {exc}")
    if not chosen:
        return StepSelection(call, None, None, "no layer calls a dispatched kernel, so no backend's fused step "
                                               "applies")
    if len(chosen) != 1:
        return StepSelection(call, None, None, f"dispatch chose {', '.join(sorted(chosen))} for different "
                                               "layers; a fused step runs one backend's kernels")
    name = chosen.pop()
    how = f"chosen explicitly by {source}" if explicit else "dispatch's choice for every layer"
    backend = backends[name]
    steps = list(getattr(backend, "steps", ()) or ())
    if not steps:
        return StepSelection(call, None, None, f"dispatch chose {name!r} for the layers' kernels ({how}), "
                                               "which has no fused step")
    rejected: list[tuple[str, str]] = []
    for step in steps:
        if step.devices is not None and call.device not in step.devices:
            rejected.append((name, f"{step.name}: runs on {'/'.join(step.devices)}, not {call.device}"))
            continue
        reasons = step.check(model, call)
        if reasons:
            rejected.append((name, f"{step.name}: {'; '.join(reasons)}"))
            continue
        return StepSelection(call, name, step.name, how, tuple(rejected))
    return StepSelection(call, None, None, "no fused step fits: " + "; ".join(f"{n}: {r}" for n, r in rejected),
                         tuple(rejected))


def applies(model: nn.Module) -> bool:
    """Whether this call may take a fused step at all (no gradients, not compiling)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and getattr(model, "fused_step", True)


def _tensors(model: nn.Module) -> list[Tensor]:
    # Tensors made under inference_mode have no version counter (and cannot change in place later).
    return [t for t in (*model.parameters(), *model.buffers()) if not t.is_inference()]


# Optimizer steps with ``fused=True`` (torch's fused AdamW/Adam kernels) write the parameters without
# bumping their version counters (torch 2.13), so a fingerprint of versions alone would keep serving
# the packed copies of the weights before such a step. Every fused step anywhere is counted instead;
# an unrelated optimizer only costs one rebuild.
_fused_optimizer_steps = 0


def _count_fused_step(optimizer: torch.optim.Optimizer, *_args: Any) -> None:
    global _fused_optimizer_steps
    if any(g.get("fused") for g in optimizer.param_groups):
        _fused_optimizer_steps += 1


register_optimizer_step_post_hook(_count_fused_step)


def _fingerprint(tensors: list[Tensor]) -> tuple[int, int]:
    # Version counters only grow, so their sum changes whenever any tensor is updated in place (an
    # optimizer step, set_rescale, load_state_dict's copy). Per token this costs ~1 us per tensor.
    return sum(t._version for t in tensors), _fused_optimizer_steps


def runner(model: nn.Module, sel: StepSelection) -> Runner:
    """The built step for ``sel``, rebuilt when the weights changed since it was built."""
    key = (sel.backend, sel.step, _structure[0])
    cached = model.__dict__.get("_fused_runner")
    if cached is not None and cached[0] == key and cached[2] == _fingerprint(cached[1]):
        return cached[3]
    backend = dispatch.get_backends()[sel.backend]
    step = next(s for s in backend.steps if s.name == sel.step)
    run = step.build(model)
    key = (sel.backend, sel.step, _structure[0])  # after the build, which may itself make modules
    tensors = _tensors(model)
    model.__dict__["_fused_runner"] = (key, tensors, _fingerprint(tensors), run)
    return run


def invalidate(model: nn.Module, *_args: Any) -> None:
    """Forget what fused steps built from this model's tensors (they were moved or replaced)."""
    model.__dict__.pop("_fused_runner", None)
    model.__dict__.pop("_step_selections", None)
