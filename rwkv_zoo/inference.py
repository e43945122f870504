"""Inference fast paths: a lean one-token decode step, and fp32 / bf16 / int8 weights for it.

``model(tokens [B, 1], state)`` without gradients runs ``DecodeStep`` instead of the module tree
(``RWKV.forward`` routes there; ``model.fast_decode = False`` turns it off). The step is the same
maths as the version files, written for one token on ``[B, C]`` tensors: mixes as ``lerp``/fused
stacks, constants such as ``exp(-exp(time_decay))`` computed once per weight version, the one-step
WKV recurrence inline, and no module-call or dispatch overhead per layer. It is checked against the
module path to fp32 rounding for every version and hybrids (tests/generation/test_inference.py).
Dispatch still decides: the step asks for the ``recurrent`` kernel once per call and runs its own
one-step recurrence when dispatch chose ``reference`` (the same formulas), and any other backend's
kernel through the op front-end. When it chose ``cpu`` and the model is prepared (below), the whole
step (every layer, the final norm and the head) runs in one C++ call, ``FusedDecode``
(``csrc/cpu_decode.cpp``): one OpenMP region per token instead of ~40 tensor ops and ~10 thread
wake-ups per layer. Prompts ([B, T > 1], no gradients) of a prepared model take the same C++ step
when dispatch picks ``cpu`` for them.

``prepare_inference(model, weights=...)`` replaces every ``nn.Linear`` of the blocks and the head by
an ``InferenceLinear`` holding the weight in fp32, bf16 or int8 (symmetric, one fp32 scale per output
channel: ``W[n, :] ~= scale[n] * q[n, :]``), packed in the tile layout of ``rwkv_zoo.cpu_kernels``,
whose kernels multiply any number of rows with it (weights streamed once per block of rows and
widened in registers, fp32 accumulation; as fast as torch's fp32 GEMM here, and bf16/int8 need no
widened copy). Activations and the state stay fp32 throughout.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo import cpu_kernels, ops
from rwkv_zoo.state import LayerState, RWKVState

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
CPU = "cpu"  # marker: dispatch chose the cpu backend, whose C++ kernels the step calls directly


def _cpu_wkv():
    """The cpu backend's module (imported here, not at the top: the backends load as plugins)."""
    from rwkv_zoo.backends import cpu

    return cpu


PREFILL_CHUNK = 512  # tokens per fused C++ call: bounds its scratch (~60 MiB at C = 768) in long prefills

__all__ = ["DecodeStep", "InferenceLinear", "prepare_inference", "quantize_int8"]


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``weight [N, K] ~= scale[:, None] * q`` with ``|q| <= 127``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-30) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class InferenceLinear(nn.Module):
    """A bias-free linear layer for inference with its weight stored in fp32, bf16 or int8.

    The weight is kept in the CPU kernels' tile layout (``cpu_kernels.pack``) when its input width
    is a multiple of 8, 16 for bf16 (every RWKV projection), else as [out, in].
    """

    def __init__(self, weight: Tensor, kind: str = "fp32"):
        super().__init__()
        if kind not in WEIGHT_DTYPES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {kind!r}")
        self.kind = kind
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        scale = None
        if kind == "int8":
            w, scale = quantize_int8(w)
        else:
            w = w.to(WEIGHT_DTYPES[kind])
        self.packed = weight.device.type == "cpu" and cpu_kernels.packable(w)
        if self.packed:
            w = cpu_kernels.pack(w)
            if scale is not None:
                scale = torch.cat([scale, scale.new_zeros(-scale.shape[0] % cpu_kernels.TILE_ROWS)])
        self.register_buffer("qweight", w.contiguous())
        self.register_buffer("scale", scale.contiguous() if scale is not None else None)

    def dequantized(self) -> Tensor:
        """The weight the kernels multiply with, as an fp32 [out, in] tensor."""
        w = cpu_kernels.unpack(self.qweight, self.out_features) if self.packed else self.qweight
        w = w.float()
        return w * self.scale[: self.out_features, None] if self.scale is not None else w

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if (
            self.packed
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and cpu_kernels.available()
        ):
            x2 = x.reshape(rows, self.in_features)
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            y = cpu_kernels.gemv(x2, self.qweight, self.out_features, self.scale)
            return y.view(*x.shape[:-1], self.out_features) if y.is_contiguous() else y.reshape(
                *x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized().to(x.dtype))

@torch.no_grad()
def prepare_inference(model: nn.Module, weights: str = "fp32") -> nn.Module:
    """Turn ``model`` (in place) into an inference model with ``weights`` in fp32, bf16 or int8.

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
    invalidate(model)
    model.inference_weights = weights
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------
# The decode step


def _lin(mod: nn.Module):
    if isinstance(mod, InferenceLinear):
        return mod.forward
    weight = mod.weight
    return lambda x: F.linear(x, weight)


def _flat(p: Tensor) -> Tensor:
    return p.detach().reshape(-1).float()


def _group_norm(y: Tensor, H: int, ln: nn.GroupNorm) -> Tensor:
    return F.group_norm(y, H, ln.weight, ln.bias, ln.eps)


def _wkv4_step(a, b, p, w, u, k, v):
    # The reference recurrence for one token (backends/reference/recurrent.py), on [B, C].
    q = torch.maximum(p, u + k)
    e1, e2 = torch.exp(p - q), torch.exp(u + k - q)
    y = (e1 * a + e2 * v) / (e1 * b + e2)
    q2 = torch.maximum(p + w, k)
    e1, e2 = torch.exp(p + w - q2), torch.exp(k - q2)
    return y, e1 * a + e2 * v, e1 * b + e2, q2


class _Layer:
    """One block's tensors, pre-shaped for [B, C] inputs."""

    def __init__(self, block: nn.Module):
        from rwkv_zoo.versions import v4, v5, v6, v7

        att, ffn = block.att, block.ffn
        self.ln0 = block.ln0
        self.ln1, self.ln2 = block.ln1, block.ln2
        if isinstance(att, v5.V5TimeMix):
            self.att_kind = "v5"
        elif isinstance(att, v4.V4TimeMix):
            self.att_kind = "v4"
        elif isinstance(att, v6.V6TimeMix):
            self.att_kind = "v6"
        elif isinstance(att, v7.V7TimeMix):
            self.att_kind = "v7"
        else:
            raise TypeError(type(att).__name__)
        if isinstance(ffn, v4.V4ChannelMix):
            self.ffn_kind = "v4"
            self.f_mk, self.f_mr = _flat(ffn.time_mix_k), _flat(ffn.time_mix_r)
        elif isinstance(ffn, v6.V6ChannelMix):
            self.ffn_kind = "v6"
            self.f_mk, self.f_mr = 1 - _flat(ffn.time_maa_k), 1 - _flat(ffn.time_maa_r)
        elif isinstance(ffn, v7.V7ChannelMix):
            self.ffn_kind = "v7"
            self.f_mk = 1 - _flat(ffn.x_k)
        else:
            raise TypeError(type(ffn).__name__)
        self.f_key, self.f_value = _lin(ffn.key), _lin(ffn.value)
        self.f_rec = _lin(ffn.receptance) if self.ffn_kind != "v7" else None
        self.op = att.wkv_op
        self.H, self.N = att.kernel_heads, att.kernel_head_size
        self.r, self.k, self.v, self.o = _lin(att.receptance), _lin(att.key), _lin(att.value), _lin(att.output)
        kind = self.att_kind
        if kind == "v4":
            self.mk, self.mv, self.mr = _flat(att.time_mix_k), _flat(att.time_mix_v), _flat(att.time_mix_r)
            self.w = -torch.exp(_flat(att.time_decay))
            self.u = _flat(att.time_first)
        elif kind == "v5":
            self.mk, self.mv, self.mr = _flat(att.time_mix_k), _flat(att.time_mix_v), _flat(att.time_mix_r)
            self.mg = _flat(att.time_mix_g)
            self.g = _lin(att.gate)
            self.logw = -torch.exp(att.time_decay.detach().float())  # [H, N]
            self.decay = torch.exp(self.logw)[None, :, :, None]  # [1, H, K, 1]
            self.u = att.time_faaaa.detach().float()[None, :, :, None]
            self.ln_x = att.ln_x
        elif kind == "v6":
            self.maa_x = _flat(att.time_maa_x)
            self.maa = torch.stack([_flat(getattr(att, f"time_maa_{c}")) for c in "wkvrg"])[:, None, :]  # [5, 1, C]
            self.maa_w1 = att.time_maa_w1.detach()
            self.maa_w2 = att.time_maa_w2.detach()
            self.decay0 = _flat(att.time_decay)
            self.dw1, self.dw2 = att.time_decay_w1.detach(), att.time_decay_w2.detach()
            self.u = att.time_faaaa.detach().float()[None, :, :, None]
            self.g = _lin(att.gate)
            self.ln_x = att.ln_x
        else:
            self.mix = torch.stack([_flat(getattr(att, f"x_{c}")) for c in "rwkvag"])[:, None, :]  # [6, 1, C]
            self.w0, self.w1, self.w2 = _flat(att.w0), att.w1.detach(), att.w2.detach()
            self.a0, self.a1, self.a2 = _flat(att.a0), att.a1.detach(), att.a2.detach()
            self.v0, self.v1, self.v2 = _flat(att.v0), att.v1.detach(), att.v2.detach()
            self.g1, self.g2 = att.g1.detach(), att.g2.detach()
            self.k_k, self.k_a = _flat(att.k_k), _flat(att.k_a)
            self.r_k = att.r_k.detach().float()  # [H, N]
            self.ln_x = att.ln_x


class DecodeStep:
    """``step(x [B, C] embeddings, state) -> (logits [B, V], state)`` for one token, no gradients."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = [_Layer(b) for b in model.blocks]
        self.head = _lin(model.head)
        self.ln_out = model.ln_out
        # Tensors made under torch.inference_mode() have no version counter (and cannot be tracked).
        self.tensors = [t for t in (*model.parameters(), *model.buffers()) if not t.is_inference()]
        self.key = self.fingerprint()
        self._fused: FusedDecode | bool | None = False  # False: not tried yet
        self.fused_why_not: str | None = None

    def fingerprint(self) -> int:
        # In-place updates (an optimizer step, set_rescale, load_state_dict's copy) bump tensor versions,
        # which only grow: their sum changes when any does, and the step's cached constants are rebuilt.
        # (A per-token check: data pointers too cost 0.2 ms per token at 12 layers.) What moves or
        # replaces tensors drops the cached step through invalidate(): model.to() / .float() (RWKV._apply),
        # prepare_inference, load_state_dict(assign=True).
        return sum(t._version for t in self.tensors)

    @torch.no_grad()
    def prefill(self, x: Tensor, state: RWKVState, fresh: bool, keep: int):
        """``x`` [B, T, C] through the fused C++ step when dispatch chose cpu for every layer and the model
        is prepared: (logits [B, keep, V], layers); else None (the caller runs the modules)."""
        B, T, _ = x.shape
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        if not all(k is CPU for k in self._kernels(B, not fresh, x.device, x.dtype, T).values()):
            return None
        fused = self.fused()
        return None if fused is None else fused(x, state, fresh, keep or T)

    def fused(self) -> FusedDecode | None:
        """The one-call C++ step, built on first use (None where it does not apply)."""
        if self._fused is False:
            if getattr(self.model, "fused_decode", True):
                self._fused, self.fused_why_not = FusedDecode.build(self.model, self.layers)
            else:
                self._fused, self.fused_why_not = None, "model.fused_decode is False"
        return self._fused

    def _kernels(self, B: int, has_state: bool, device, dtype, T: int = 1) -> dict[str, Any]:
        """Per op: None to run the inline reference recurrence, else dispatch's ``Selection`` (its kernel
        then runs through the op front-end, which checks what the kernel returns)."""
        out: dict[str, Any] = {}
        m = self.model
        mode = (m.mode or "recurrent") if T == 1 else m.mode
        for layer in self.layers:
            if layer.op in out:
                continue
            sel = ops._select(layer.op, mode, device.type, dtype, B, T, layer.H, layer.N, False, has_state,
                              m.backend)
            # Dispatch only chooses cpu where its kernels are built; they are called directly (one call
            # instead of ~10 tensor ops). reference's recurrence is the step's own inline maths.
            if sel.backend == "cpu":
                out[layer.op] = CPU
            else:
                out[layer.op] = None if sel.backend == "reference" and sel.mode == "recurrent" else sel
        return out

    @torch.no_grad()
    def __call__(self, x: Tensor, state: RWKVState, fresh: bool) -> tuple[Tensor, list[LayerState]]:
        model = self.model
        B, C = x.shape
        kernels = self._kernels(B, not fresh, x.device, x.dtype)
        if all(k is CPU for k in kernels.values()):
            fused = self.fused()
            if fused is not None:
                logits, layers = fused(x[:, None], state, fresh, 1)
                return logits[:, 0], layers
        ctx: dict[str, Tensor] = {}
        new_layers = []
        every = model.rescale_every
        for i, (layer, ls) in enumerate(zip(self.layers, state.layers, strict=True)):
            if layer.ln0 is not None:
                x = F.layer_norm(x, (C,), layer.ln0.weight, layer.ln0.bias, layer.ln0.eps)
            xa = F.layer_norm(x, (C,), layer.ln1.weight, layer.ln1.bias, layer.ln1.eps)
            out, wkv = self._time_mix(layer, xa, ls.att_shift, ls.wkv, kernels[layer.op], ctx, B)
            x = x + out
            xf = F.layer_norm(x, (C,), layer.ln2.weight, layer.ln2.bias, layer.ln2.eps)
            x = x + self._channel_mix(layer, xf, ls.ffn_shift)
            new_layers.append(LayerState(xa, xf, wkv))
            if every and (i + 1) % every == 0:
                x = x / 2
        x = F.layer_norm(x, (C,), self.ln_out.weight, self.ln_out.bias, self.ln_out.eps)
        return self.head(x), new_layers

    @staticmethod
    def _channel_mix(layer: _Layer, x: Tensor, xx: Tensor) -> Tensor:
        xk = torch.lerp(xx, x, layer.f_mk)
        k = torch.relu(layer.f_key(xk)).square_()
        if layer.ffn_kind == "v7":
            return layer.f_value(k)
        r = torch.sigmoid(layer.f_rec(torch.lerp(xx, x, layer.f_mr)))
        return r * layer.f_value(k)

    def _time_mix(self, layer: _Layer, x: Tensor, xx: Tensor, wkv, kernel, ctx, B: int):
        kind, H, N = layer.att_kind, layer.H, layer.N
        if kind == "v4":
            k = layer.k(torch.lerp(xx, x, layer.mk))
            v = layer.v(torch.lerp(xx, x, layer.mv))
            r = torch.sigmoid(layer.r(torch.lerp(xx, x, layer.mr)))
            if wkv is None and (kernel is None or kernel is CPU):
                wkv = ops.zero_state4(B, x.shape[1], x.device)
            if kernel is None:
                y, a, b, p = _wkv4_step(*wkv, layer.w, layer.u, k, v)
                wkv = (a, b, p)
            elif kernel is CPU:
                y, wkv = _cpu_wkv().wkv4(layer.w, layer.u, k[:, None], v[:, None], wkv)
                y = y[:, 0]
            else:
                y, wkv = ops.wkv4(layer.w, layer.u, k[:, None], v[:, None], wkv, mode=kernel.mode,
                                  backend=kernel.backend)
                y = y[:, 0]
            return layer.o(r * y), wkv
        if wkv is None and (kernel is None or kernel is CPU):
            wkv = x.new_zeros(B, H, N, N)
        if kind == "v5":
            r = layer.r(torch.lerp(xx, x, layer.mr))
            k = layer.k(torch.lerp(xx, x, layer.mk))
            v = layer.v(torch.lerp(xx, x, layer.mv))
            g = F.silu(layer.g(torch.lerp(xx, x, layer.mg)))
            y, wkv = self._wkv56(kernel, r, k, v, layer.decay, layer.logw, layer.u, wkv, B, H, N, "wkv5")
            y = _group_norm(y, H, layer.ln_x)
            return layer.o(y * g), wkv
        if kind == "v6":
            dx = xx - x
            h = torch.tanh(torch.addcmul(x, dx, layer.maa_x) @ layer.maa_w1)  # [B, 5 * Dm]
            m = torch.bmm(h.view(B, 5, -1).transpose(0, 1), layer.maa_w2)  # [5, B, C]: w, k, v, r, g
            mixed = torch.addcmul(x, dx, layer.maa + m)  # [5, B, C]
            r, k, v = layer.r(mixed[3]), layer.k(mixed[1]), layer.v(mixed[2])
            g = F.silu(layer.g(mixed[4]))
            logw = -torch.exp(layer.decay0 + torch.tanh(mixed[0] @ layer.dw1) @ layer.dw2)  # [B, C]
            y, wkv = self._wkv56(kernel, r, k, v, None, logw.view(B, H, N), layer.u, wkv, B, H, N, "wkv6")
            y = _group_norm(y, H, layer.ln_x)
            return layer.o(y * g), wkv
        return self._v7(layer, x, xx, wkv, kernel, ctx, B, H, N)

    @staticmethod
    def _wkv56(sel, r, k, v, decay, logw, u, S, B, H, N, op: str):
        if sel is CPU:
            r4, k4, v4 = (t.view(B, 1, H, N) for t in (r, k, v))
            fn = _cpu_wkv().wkv6 if op == "wkv6" else _cpu_wkv().wkv5
            y, S = fn(r4, k4, v4, logw.view(B, 1, H, N) if op == "wkv6" else logw, u.view(H, N), S)
            return y.view(B, H * N), S
        if sel is not None:
            r4, k4, v4 = (t.view(B, 1, H, N) for t in (r, k, v))
            w = logw.view(B, 1, H, N) if op == "wkv6" else logw
            y, S = ops.OP_FUNCTIONS[op](r4, k4, v4, w, u.view(H, N), S, mode=sel.mode, backend=sel.backend)
            return y.view(B, H * N), S
        r, k, v = r.view(B, H, 1, N), k.view(B, H, N, 1), v.view(B, H, 1, N)
        kv = k @ v  # [B, H, K, V]
        y = r @ torch.addcmul(S, u, kv)  # bonus on the current token, read before the update
        if decay is None:
            decay = torch.exp(logw).unsqueeze(-1)
        S = torch.addcmul(kv, decay, S)
        return y.view(B, H * N), S

    @staticmethod
    def _v7(layer: _Layer, x, xx, S, kernel, ctx, B, H, N):
        from rwkv_zoo.versions.v7 import DECAY_SCALE

        C = H * N
        mixed = torch.addcmul(x, xx - x, layer.mix)  # [6, B, C]: r, w, k, v, a, g
        r, k, v = layer.r(mixed[0]), layer.k(mixed[2]), layer.v(mixed[3])
        logw = -DECAY_SCALE * torch.sigmoid(layer.w0 + torch.tanh(mixed[1] @ layer.w1) @ layer.w2)
        a = torch.sigmoid(layer.a0 + (mixed[4] @ layer.a1) @ layer.a2)
        g = torch.sigmoid(mixed[5] @ layer.g1) @ layer.g2
        kk = F.normalize((k * layer.k_k).view(B, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * layer.k_a)
        if "v_first" not in ctx:
            ctx["v_first"] = v
        else:
            v = torch.lerp(v, ctx["v_first"], torch.sigmoid(layer.v0 + (mixed[3] @ layer.v1) @ layer.v2))
        rh, kh, vh, ah = r.view(B, H, N), k.view(B, H, N), v.view(B, H, N), a.view(B, H, N)
        if kernel is CPU:
            y, S = _cpu_wkv().wkv7(*(t.view(B, 1, H, N) for t in (rh, logw, kh, vh, -kk, kk * ah)), S)
            y = y.view(B, C)
        elif kernel is not None:
            args = [t.view(B, 1, H, N) for t in (rh, logw, kh, vh, -kk, kk * ah)]
            y, S = ops.wkv7(*args, S, mode=kernel.mode, backend=kernel.backend)
            y = y.view(B, C)
        else:
            # S_t = diag(exp(w)) S + b (a^T S) + k v^T with a = -kk, b = kk * a_t; y = S_t^T r.
            sa = (-kk).unsqueeze(-2) @ S  # [B, H, 1, V]
            S = torch.exp(logw.view(B, H, N, 1)) * S + (kk * ah).unsqueeze(-1) @ sa
            S = S + kh.unsqueeze(-1) @ vh.unsqueeze(-2)
            y = (rh.unsqueeze(-2) @ S).view(B, C)
        y = _group_norm(y, H, layer.ln_x)
        y = y + ((rh * kh * layer.r_k).sum(-1, keepdim=True) * vh).view(B, C)
        return layer.o(y * g), S


class FusedDecode:
    """The whole decode step in one C++ call (``csrc/cpu_decode.cpp``): every layer, the final norm and
    the head, in one OpenMP parallel region, for B sequences of T tokens (decode: T = 1; prefill:
    ``RWKV.forward`` sends whole prompts here, which then need no module calls either).

    Used by ``DecodeStep`` when dispatch chose the ``cpu`` backend for every layer and the model was
    prepared (``prepare_inference``: projections packed), so the C++ step is the cpu backend's kernel
    plus the same maths as the Python step around it. ``FusedDecode.build`` says why not for what it
    does not cover (the step then runs in Python).
    """

    def __init__(self, model: nn.Module, layers: list[_Layer], lib):
        from rwkv_zoo.ops import V4_P_INIT

        self.lib = lib
        self.keep: list[Tensor] = []  # the tensors the structures point into
        self.C = model.config.n_embd
        self.L = len(layers)
        self.params = (cpu_kernels.LayerP * self.L)()
        every = model.rescale_every
        for i, (block, layer) in enumerate(zip(model.blocks, layers, strict=True)):
            self._fill(self.params[i], block, layer, bool(every and (i + 1) % every == 0))
        self.kinds = [layer.att_kind for layer in layers]
        self.shapes = [(layer.H, layer.N) for layer in layers]
        self.ln_out = (self._ptr(model.ln_out.weight), self._ptr(model.ln_out.bias), float(model.ln_out.eps))
        self.head = self._lin(model.head)
        self.vocab = model.head.out_features
        self.p_init = float(V4_P_INIT)

    @classmethod
    def build(cls, model: nn.Module, layers: list[_Layer]) -> tuple[FusedDecode | None, str | None]:
        """The fused step and None, or None and why it does not apply to this model."""
        lib, why = cpu_kernels.load_decode()
        if lib is None:
            return None, why
        mods = [m for name, m in model.named_modules() if isinstance(m, (nn.Linear, InferenceLinear))]
        if not all(isinstance(m, InferenceLinear) and m.packed for m in mods):
            return None, "the projections are not packed (prepare_inference was not run)"
        for block, layer in zip(model.blocks, layers, strict=True):
            att = block.att
            names = ("time_maa_w1", "time_decay_w1", "w1", "a1", "v1", "g1")
            loras = [getattr(att, n) for n in names if hasattr(att, n)]
            if any(m.shape[-1] % 8 for m in loras):
                return None, "a LoRA width is not a multiple of 8"
            if layer.att_kind != "v4" and (layer.N > 256 or model.config.n_embd != layer.H * layer.N):
                return None, f"head size {layer.N}: the fused step takes heads of up to 256 channels"
        if model.config.n_embd % 8:
            return None, "the model width is not a multiple of 8"
        return cls(model, layers, lib), None

    # -- building the structures ------------------------------------------------------------------
    def _ptr(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _rows(self, rows: list[Tensor]) -> int:
        return self._ptr(torch.stack([r.detach().reshape(-1).float() for r in rows]))

    def _lin(self, mod: InferenceLinear) -> cpu_kernels.Lin:
        self.keep.append(mod.qweight)
        kind = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}[mod.qweight.dtype]
        scale = None
        if mod.scale is not None:
            self.keep.append(mod.scale)
            scale = mod.scale.data_ptr()
        return cpu_kernels.Lin(mod.qweight.data_ptr(), scale, kind, mod.qweight.shape[0] * cpu_kernels.TILE_ROWS,
                               mod.in_features)

    def _lora(self, weight: Tensor) -> cpu_kernels.Lin:
        """A LoRA matrix used as ``x @ weight`` ([in, out]): packed fp32 as [out, in]."""
        packed = cpu_kernels.pack(weight.detach().float().t().contiguous())
        self.keep.append(packed)
        return cpu_kernels.Lin(packed.data_ptr(), None, 0, packed.shape[0] * cpu_kernels.TILE_ROWS, weight.shape[0])

    def _fill(self, P, block: nn.Module, layer: _Layer, halve: bool) -> None:
        att, ffn = block.att, block.ffn
        P.att_kind, P.ffn_kind = int(layer.att_kind[1]), int(layer.ffn_kind[1])
        P.H, P.N, P.halve = layer.H, layer.N, int(halve)
        if block.ln0 is not None:
            P.ln0_w, P.ln0_b, P.ln0_eps = self._ptr(block.ln0.weight), self._ptr(block.ln0.bias), block.ln0.eps
        P.ln1_w, P.ln1_b, P.ln1_eps = self._ptr(block.ln1.weight), self._ptr(block.ln1.bias), block.ln1.eps
        P.ln2_w, P.ln2_b, P.ln2_eps = self._ptr(block.ln2.weight), self._ptr(block.ln2.bias), block.ln2.eps
        if layer.att_kind != "v4":
            P.lnx_w, P.lnx_b, P.lnx_eps = self._ptr(att.ln_x.weight), self._ptr(att.ln_x.bias), att.ln_x.eps
        P.r, P.k, P.v, P.o = (self._lin(m) for m in (att.receptance, att.key, att.value, att.output))
        kind = layer.att_kind
        if kind == "v4":
            P.mix = self._rows([att.time_mix_k, att.time_mix_v, att.time_mix_r])
            P.w, P.u = self._ptr(layer.w), self._ptr(layer.u)
        elif kind == "v5":
            P.mix = self._rows([att.time_mix_k, att.time_mix_v, att.time_mix_r, att.time_mix_g])
            P.w, P.u, P.g = self._ptr(layer.logw), self._ptr(att.time_faaaa), self._lin(att.gate)
        elif kind == "v6":
            P.mix = self._rows([att.time_maa_x] + [getattr(att, f"time_maa_{c}") for c in "wkvrg"])
            P.w, P.u, P.g = self._ptr(layer.decay0), self._ptr(att.time_faaaa), self._lin(att.gate)
            P.l1[0], P.l1[1], P.l1[2] = (self._lora(m) for m in (att.time_maa_w1, att.time_decay_w1,
                                                                 att.time_decay_w2))
            for m in range(5):
                P.l2[m] = self._lora(att.time_maa_w2[m])
        else:
            P.mix = self._rows([getattr(att, f"x_{c}") for c in "rwkvag"])
            P.w, P.a0, P.v0 = self._ptr(att.w0), self._ptr(att.a0), self._ptr(att.v0)
            P.k_k, P.k_a, P.r_k = self._ptr(att.k_k), self._ptr(att.k_a), self._ptr(att.r_k)
            for j, c in enumerate("wavg"):
                P.l1[j], P.l2[j] = self._lora(getattr(att, f"{c}1")), self._lora(getattr(att, f"{c}2"))
        P.f_mk = self._ptr(layer.f_mk)
        P.fk, P.fv = self._lin(ffn.key), self._lin(ffn.value)
        if layer.ffn_kind != "v7":
            P.f_mr, P.fr = self._ptr(layer.f_mr), self._lin(ffn.receptance)

    # -- the step ---------------------------------------------------------------------------------
    def __call__(self, x: Tensor, state: RWKVState, fresh: bool, keep: int) -> tuple[Tensor, list[LayerState]]:
        """``x`` [B, T, C] embeddings -> (logits [B, keep, V] of the last ``keep`` tokens, new layer states).

        Long inputs run in chunks of ``PREFILL_CHUNK`` tokens (the state carried between them), which
        bounds the scratch memory; the results do not depend on the chunking."""
        T = x.shape[1]
        x = x.float()
        outs = []
        layers = state.layers
        for t0 in range(0, T, PREFILL_CHUNK):
            t1 = min(T, t0 + PREFILL_CHUNK)
            k = max(0, min(t1 - t0, keep - (T - t1)))  # positions of this chunk among the last `keep`
            logits, layers = self._run(x[:, t0:t1], layers, fresh and t0 == 0, k)
            if k:
                outs.append(logits)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), layers

    def _new_state(self, B: int):
        """Uninitialized tensors for the new state: the shifts, the v4 (a, b, p) and the matrix states,
        each group cut from one buffer with one call (per-piece views cost ~3 us each in Python). Matrix
        states above 8 MB in all get a buffer per layer: a v7-0.1B state at batch 16 is 38 MB, above
        glibc's largest mmap threshold, so one buffer would be mapped and zeroed afresh every step
        (measured: ~10 % of the step); per-layer buffers are reused from the heap."""
        C, L = self.C, self.L
        shifts = torch.empty(2 * L, B, C).unbind(0)
        n4 = self.kinds.count("v4")
        v4 = torch.empty(3 * n4, B, C).unbind(0) if n4 else ()
        mats = [(B, H, N, N) for kind, (H, N) in zip(self.kinds, self.shapes, strict=True) if kind != "v4"]
        if mats and len(set(mats)) == 1 and len(mats) * math.prod(mats[0]) * 4 <= 8 << 20:
            wkv = torch.empty(len(mats), *mats[0]).unbind(0)
        else:
            wkv = [torch.empty(shape) for shape in mats]
        return shifts, iter(v4), iter(wkv)

    def _run(self, x: Tensor, layers: list[LayerState], fresh: bool, keep: int):
        B, T, C = x.shape
        x = x.contiguous().clone()  # the kernel overwrites it
        shifts, v4, wkv = self._new_state(B)
        ins: list[Tensor | None] = []
        new_layers = []
        for i, (kind, ls) in enumerate(zip(self.kinds, layers, strict=True)):
            ins += (ls.att_shift, ls.ffn_shift)
            if kind == "v4":
                ins += (None, None, None) if fresh else ls.wkv
                new_layers.append(LayerState(shifts[2 * i], shifts[2 * i + 1], (next(v4), next(v4), next(v4))))
            else:
                ins += (None if fresh else ls.wkv, None, None)
                new_layers.append(LayerState(shifts[2 * i], shifts[2 * i + 1], next(wkv)))
        # States from another source (a bf16 model's shifts, a transposed view) are made fp32 contiguous;
        # ours already are. `keep_alive` holds the converted copies until the call returns.
        keep_alive = [t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()
                      for t in ins]
        out_ptrs = []
        for kind, ls in zip(self.kinds, new_layers, strict=True):
            out_ptrs += (ls.att_shift, ls.ffn_shift, *ls.wkv) if kind == "v4" else (ls.att_shift, ls.ffn_shift, ls.wkv,
                                                                                    None, None)
        P5 = ctypes.c_void_p * (5 * self.L)
        in_arr = P5(*[None if t is None else t.data_ptr() for t in keep_alive])
        out_arr = P5(*[None if t is None else t.data_ptr() for t in out_ptrs])
        logits = torch.empty(B, keep, self.head.N, dtype=torch.float32)
        self.lib.rz_decode(self.params, self.L, B, T, C, x.data_ptr(), in_arr, out_arr, *self.ln_out,
                           ctypes.byref(self.head), keep, logits.data_ptr(), self.p_init, torch.get_num_threads())
        return (logits if self.vocab == self.head.N else logits[..., : self.vocab]), new_layers


def decode_step(model: nn.Module) -> DecodeStep:
    """The model's cached ``DecodeStep``, rebuilt when its weights changed since it was made."""
    step = model.__dict__.get("_decode_step")
    if step is None or step.key != step.fingerprint():
        step = DecodeStep(model)
        model.__dict__["_decode_step"] = step
    return step


def invalidate(model: nn.Module, *_args) -> None:
    """Forget the cached ``DecodeStep`` (its modules or tensors were replaced)."""
    model.__dict__.pop("_decode_step", None)


def can_fast_decode(model: nn.Module, T: int) -> bool:
    return (
        T == 1
        and getattr(model, "fast_decode", True)
        and not torch.is_grad_enabled()
        and model.dtype == torch.float32
        and (model.mode is None or model.mode == "recurrent")
        and not torch.compiler.is_compiling()
    )



def can_fast_prefill(model: nn.Module, T: int) -> bool:
    """Whether ``tokens [B, T > 1]`` may take the fused C++ step (``DecodeStep.prefill`` then still asks
    dispatch, and needs a prepared model)."""
    return (
        T > 1
        and getattr(model, "fast_decode", True)
        and getattr(model, "inference_weights", None) is not None
        and not torch.is_grad_enabled()
        and model.dtype == torch.float32
        and not torch.compiler.is_compiling()
    )
