"""Inference weights: fp32, bf16, int8 or int4 projections packed for the cpu backend's kernels.

``prepare_inference(model, weights=...)`` replaces every ``nn.Linear`` of the blocks and the head by
an ``InferenceLinear`` holding the weight in fp32, bf16, int8 (symmetric, one fp32 scale per output
channel: ``W[n, :] ~= scale[n] * q[n, :]``) or int4 (symmetric, one fp32 scale per output channel and
group of ``INT4_GROUP`` = 64 input columns, codes in [-8, 7], two per byte), packed in the tile layout
of the cpu backend's kernels
(``rwkv_zoo.backends.cpu.kernels``), whose kernels multiply any number of rows with it (weights
streamed once per block of rows and widened in registers, fp32 accumulation). Activations and the
state stay fp32. The model keeps its call signature, so everything that runs a model runs it.

This is opt-in and only about the weights' format. Speed without asking comes from the fused step
(``rwkv_zoo.fused``): a model used without gradients on a CPU in fp32 runs its whole body in the cpu
backend's C++ step, from packed fp32 copies of its weights, whether or not it was prepared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo import fused

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
# int4: input columns per scale. 64 is the trade-off measured on random and trained-like weights: 32
# halves the rounding error's outliers but adds 0.125 byte per weight of scales (+25 % over 0.5 byte);
# 128 saves 0.03 byte but lets one large weight coarsen twice as many others. fp32 scales (0.0625 byte
# per weight) keep the kernels free of half-precision conversions.
INT4_GROUP = 64

__all__ = ["InferenceLinear", "prepare_inference", "quantize_int4", "quantize_int8"]


def _kernels():
    """The cpu backend's kernel module (imported on use: backends load as plugins, above this module)."""
    from rwkv_zoo.backends.cpu import kernels

    return kernels


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``weight [N, K] ~= scale[:, None] * q`` with ``|q| <= 127``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int4_codes(g: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Codes of groups ``g`` [..., group] at ``scale`` [..., 1] (0 stays 0) and their squared error [..., 1]."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(g / safe).clamp_(-8, 7)
    return q, (g - q * scale).square_().sum(-1, keepdim=True)


def quantize_int4(weight: Tensor, group: int = INT4_GROUP, refits: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric group-wise int4: ``weight [N, K] ~= scale[n, k // group] * q[n, k]`` with ``q`` int8 codes
    in [-8, 7] and ``scale`` fp32 [N, ceil(K / group)].

    Each group's scale is llama.cpp's Q4_0 one: the largest-magnitude weight mapped to -8, a step of
    ``max |w| / 8``, the sign with the larger magnitude getting the extra code (every error at most
    one step). ``refits`` > 0 then takes, that many times, the least-squares scale of the codes
    (``sum(w q) / sum(q q)``) and rounds again, keeping whichever scale has the smaller squared error
    (no group gets worse). Off by default: on random Gaussian weights (groups of 64) one refit cuts
    the squared error by 3.4 % and two by 6 % (a 13-candidate search: 10 %, next-token KL on v7-0.1B
    4.1e-2 -> 3.7e-2) for 2.8x and 4.3x the quantization time, which ``load(weights="int4")`` pays on
    every load."""
    w = weight.detach().float()
    N, K = w.shape
    pad = -K % group
    wp = torch.cat([w, w.new_zeros(N, pad)], 1) if pad else w
    g = wp.reshape(N, -1, group)
    best = g.gather(-1, g.abs().argmax(-1, keepdim=True)) / -8.0
    q, best_err = _int4_codes(g, best)
    for _ in range(refits):
        fit = (g * q).sum(-1, keepdim=True) / (q * q).sum(-1, keepdim=True).clamp_min(1e-30)
        q_fit, err = _int4_codes(g, fit)
        better = err < best_err
        best, best_err = torch.where(better, fit, best), torch.where(better, err, best_err)
        q = torch.where(better, q_fit, q)
    return q.to(torch.int8).reshape(N, -1)[:, :K].contiguous(), best.squeeze(-1)


def dequantize_int4(q: Tensor, scale: Tensor, group: int = INT4_GROUP) -> Tensor:
    """``quantize_int4``'s inverse: fp32 [N, K]."""
    return q.float() * scale.repeat_interleave(group, dim=1)[:, : q.shape[1]]


class InferenceLinear(nn.Module):
    """A bias-free linear layer for inference with its weight stored in fp32, bf16, int8 or int4.

    The weight is kept in the CPU kernels' tile layout (``rwkv_zoo.backends.cpu.kernels.pack``) when its input width
    is a multiple of 8, 16 for bf16 and 64 for int4 (every RWKV projection), else as [out, in] (int4:
    int8 codes and [out, groups] scales, multiplied by torch after dequantizing).
    """

    def __init__(self, weight: Tensor, kind: str = "fp32"):
        super().__init__()
        if kind not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {kind!r}")
        self.kind = kind
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        scale = None
        if kind == "int4":
            w, scale = quantize_int4(w)
            self.packed = weight.device.type == "cpu" and w.shape[1] % INT4_GROUP == 0
            if self.packed:
                w, scale = _kernels().pack_int4(w, scale)
            self.register_buffer("qweight", w.contiguous())
            self.register_buffer("scale", scale.contiguous())
            return
        if kind == "int8":
            w, scale = quantize_int8(w)
        else:
            w = w.to(WEIGHT_DTYPES[kind])
        self.packed = weight.device.type == "cpu" and _kernels().packable(w)
        if self.packed:
            w = _kernels().pack(w)
            if scale is not None:
                scale = torch.cat([scale, scale.new_zeros(-scale.shape[0] % _kernels().TILE_ROWS)])
        self.register_buffer("qweight", w.contiguous())
        self.register_buffer("scale", scale.contiguous() if scale is not None else None)

    def dequantized(self) -> Tensor:
        """The weight the kernels multiply with, as an fp32 [out, in] tensor."""
        if self.kind == "int4":
            q, s = (_kernels().unpack_int4(self.qweight, self.scale, self.out_features) if self.packed
                    else (self.qweight, self.scale))
            return dequantize_int4(q, s)
        w = _kernels().unpack(self.qweight, self.out_features) if self.packed else self.qweight
        w = w.float()
        return w * self.scale[: self.out_features, None] if self.scale is not None else w

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if (
            self.packed
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and _kernels().available()
        ):
            x2 = x.reshape(rows, self.in_features)
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            y = _kernels().gemv(x2, self.qweight, self.out_features, self.scale)
            return y.view(*x.shape[:-1], self.out_features) if y.is_contiguous() else y.reshape(
                *x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized().to(x.dtype))

@torch.no_grad()
def prepare_inference(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """Turn ``model`` (in place) into an inference model with ``weights`` in fp32, bf16, int8 or int4.

    The model may be in any float dtype (a bf16 checkpoint loaded as is): each projection is
    converted on its own, and the remaining parameters become fp32 (activations and state are fp32).

    Every ``nn.Linear`` of the blocks and the head becomes an ``InferenceLinear``; the small LoRA
    matrices, mixes, norms and the embedding (a row lookup) stay fp32. Parameters stop requiring
    gradients. The model keeps its call signature and state, so ``generate``, ``score`` and the CLI
    use it unchanged; ``rwkv_zoo.save`` refuses it (save the original weights instead).
    """
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("prepare_inference needs real weights, not a model on the meta device")
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, InferenceLinear))]
    for name, mod in targets:
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            raise ValueError(f"{name} has a bias; RWKV projections have none")
        weight = mod.dequantized() if isinstance(mod, InferenceLinear) else mod.weight
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, InferenceLinear(weight, weights))
    # The rest (embedding, mixes, norms, LoRA) becomes fp32 after the projections were replaced, so a
    # bf16 checkpoint is widened one matrix at a time instead of all at once (peak memory).
    # Fresh copies also let go of a memory-mapped checkpoint: otherwise the embedding's pages enter the
    # RSS one new token at a time and decode memory creeps up (measured +12.7 % over 10,000 tokens at
    # v4-169M, all of it the embedding's file pages).
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(torch.float32, copy=True)
    fused.invalidate(model)
    model.inference_weights = weights
    model.eval()
    return model
