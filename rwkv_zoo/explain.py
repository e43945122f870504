"""``rwkv_zoo.explain(model, tokens)``: which kernel each layer will run for an input, and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rwkv_zoo import dispatch, pluginmanager
from rwkv_zoo.dispatch import Selection
from rwkv_zoo.errors import parse_device, parse_dtype


@dataclass
class Explanation:
    """Dispatch decisions for one model and input shape: one ``Selection`` per distinct kernel call."""

    model_name: str
    batch_size: int
    T: int
    selections: list[tuple[list[int], Selection]]
    # Plugins that could have offered backends but are not loaded: blocked or failed (one sentence each).
    not_loaded: list[str] = field(default_factory=list)
    # How the model runs this call without gradients around the kernels (None: not asked, e.g. training).
    execution: str | None = None
    # Layers whose time-mix calls no dispatched kernel, grouped by what runs them instead.
    no_kernel: list[tuple[list[int], str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.model_name}: input [B={self.batch_size}, T={self.T}]"]
        for layers, sel in self.selections:
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            lines.append(f"{span} ({len(layers)}):")
            lines.extend("  " + line for line in sel.explain().splitlines())
        for layers, what in self.no_kernel:
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
            lines.append(f"{span} ({len(layers)}): no dispatch: {what}")
        lines.extend(f"not considered: {why}" for why in self.not_loaded)
        if self.execution:
            lines.append(f"runs as: {self.execution}")
        return "\n".join(lines)

    @property
    def backends(self) -> set[str]:
        return {sel.backend for _, sel in self.selections}


def explain(
    model,
    tokens: torch.Tensor | tuple[int, int] | None = None,
    *,
    T: int | None = None,
    batch_size: int = 1,
    requires_grad: bool = False,
    has_state: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Explanation:
    """Explain the kernel choices ``model(tokens)`` would make, without running the model.

    ``tokens`` may be a token tensor [B, T], a shape ``(B, T)``, or omitted with ``T=``. Works on a
    meta-device model (``rwkv_zoo.build(..., device="meta")``): nothing is allocated. ``device`` and
    ``dtype`` override the model's own, to ask "what would run on cuda in bf16?" (a meta-device model
    is explained for the CPU unless ``device`` says otherwise). ``requires_grad=True`` explains a
    training call (kernels without a backward are then rejected). ``device`` and ``dtype`` take the
    names ``build`` takes (``"cuda"``, ``"bf16"``, ``torch.bfloat16``, ...); an unknown one is refused.
    """
    dtype = parse_dtype(dtype)
    # Kernel calls name a device type; an index (cuda:1) does not change which kernel runs.
    device = parsed.type if (parsed := parse_device(device)) is not None else None
    if isinstance(tokens, torch.Tensor):
        batch_size, T = tokens.shape
    elif tokens is not None:
        batch_size, T = tokens
    if T is None:
        raise ValueError("explain() needs tokens, a (B, T) shape, or T=")
    if device is None and model.device.type == "meta":
        device = "cpu"  # a meta-device model is a plan; explain where its weights would live by default
    groups: dict[tuple, list[int]] = {}
    sels: dict[tuple, Selection] = {}
    fixed = model.mode is not None
    for i, call in model.kernel_calls(batch_size, T, requires_grad=requires_grad, has_state=has_state,
                                      device=device, dtype=dtype):
        sel = dispatch.select(call, model.backend, mode_fixed=fixed)
        key = (sel.call, sel.backend)
        groups.setdefault(key, []).append(i)
        sels[key] = sel
    name = f"{model.version}-{model.size_name}" if getattr(model, "size_name", None) else model.version
    selections = [(layers, sels[k]) for k, layers in groups.items()]
    execution = None if requires_grad else _execution(model, batch_size, T, device, dtype)
    no_kernel: dict[str, list[int]] = {}
    for i, what in model.no_kernel() if hasattr(model, "no_kernel") else ():
        no_kernel.setdefault(what, []).append(i)
    return Explanation(name, batch_size, T, selections, pluginmanager.not_loaded(), execution,
                       [(layers, what) for what, layers in no_kernel.items()])


def _execution(model, batch_size: int, T: int, device, dtype) -> str | None:
    """What runs the model body without gradients: a backend's fused step, or the modules (and why)."""
    from rwkv_zoo import fused

    if model.device.type == "meta":
        return None
    call = fused.StepCall(device or model.device.type, dtype or model.dtype, batch_size, T)
    return fused.select(model, call).describe()
