"""RWKV-7 "Goose" (x070): the generalized delta rule with a diagonal-plus-low-rank transition.

Paper: Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State Evolution" (2025), arXiv:2503.14456.
Facts: SPEC.md §6.

With dx = x' - x and x_* = x + dx * mu_* (static mixes):
    w_t   = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w W1) W2))       decay in (0.545, 1)
    a_t   = sigmoid(a0 + (x_a A1) A2)                           in-context learning rate
    g     = sigmoid(x_g G1) G2
    kk    = normalize(k * k_k) per head;   k <- k * (1 + (a - 1) * k_a)
    v     <- lerp(v, v_first, sigmoid(v0 + (x_v V1) V2))         layers >= 1 (v_first = layer 0's v)
    S_t   = S_{t-1} (diag(w_t) - kk (a kk)^T) + v_t k_t^T;   y_t = S_t r_t    (official [V, K] layout)
    out   = W_o ((GroupNorm_H(y) + (sum_head r k r_k) v) * g)
Here the state is stored key-first ([B, H, K, V]) like every other version; the kernel's low-rank
vectors are ``a = -kk`` and ``b = kk * a_t``.
Channel-mix: W_v relu(W_k x_k)^2 (no receptance), width 4 C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo import ops
from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.layerops import channel_mix, head_group_norm, shift_mix
from rwkv_zoo.model import (
    GROUPNORM_EPS,
    Block,
    RWKVConfig,
    channel_ramp,
    layer_ratios,
    official_param_groups,
    orthogonal_,
)
from rwkv_zoo.protocols import Context
from rwkv_zoo.registry import SizePreset, VersionSpec

WORLD_VOCAB = 65536
PILE_VOCAB = 50304  # 50277 padded to 50304 (SPEC §2.2)
DECAY_SCALE = math.exp(-0.5)  # the trainer's 0.6065306597; the package RNN path rounds it to 0.606531


def _lora_dim(factor: float, x: float) -> int:
    """The Dec-2024 RWKV-v5 x070 suggestion: max(32, 32 * round(factor * x / 32)); Python rounding."""
    return max(32, 32 * round(factor * x / 32))


@dataclass
class V7Config(RWKVConfig):
    dim_w_lora: int | None = None  # D_w (decay)
    dim_a_lora: int | None = None  # D_a (in-context learning rate)
    dim_v_lora: int | None = None  # D_v (value residual)
    dim_g_lora: int | None = None  # D_g (gate)

    version: ClassVar[str] = "v7"

    def __post_init__(self) -> None:
        super().__post_init__()
        C = self.n_embd
        if self.dim_w_lora is None:
            self.dim_w_lora = _lora_dim(1.8, math.sqrt(C))
        if self.dim_a_lora is None:
            self.dim_a_lora = _lora_dim(1.8, math.sqrt(C))
        if self.dim_v_lora is None:
            self.dim_v_lora = _lora_dim(1.3, math.sqrt(C))
        if self.dim_g_lora is None:
            self.dim_g_lora = _lora_dim(0.6, C**0.8)


class V7TimeMix(nn.Module):
    wkv_op = "wkv7"
    first_layer_unused = ("v0", "v1", "v2")  # the first v7 layer makes v_first and never lerps toward it

    def __init__(self, config: V7Config, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.kernel_heads, self.kernel_head_size = H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w1 = nn.Parameter(torch.empty(C, config.dim_w_lora))
        self.w2 = nn.Parameter(torch.empty(config.dim_w_lora, C))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, config.dim_a_lora))
        self.a2 = nn.Parameter(torch.empty(config.dim_a_lora, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        # Layer 0 never uses v0/v1/v2 (it *is* v_first); current trainers still create them (SPEC §6.1).
        self.v1 = nn.Parameter(torch.empty(C, config.dim_v_lora))
        self.v2 = nn.Parameter(torch.empty(config.dim_v_lora, C))
        self.v0 = nn.Parameter(torch.empty(1, 1, C))
        self.g1 = nn.Parameter(torch.empty(C, config.dim_g_lora))
        self.g2 = nn.Parameter(torch.empty(config.dim_g_lora, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def zero_wkv(self, batch_size: int, device) -> Tensor:
        H, N = self.r_k.shape
        return torch.zeros(batch_size, H, N, N, device=device, dtype=torch.float32)

    def forward(self, x: Tensor, shift: Tensor, wkv: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        H, N = self.r_k.shape
        # Token shift and the six lerps in one pass over [6, B, T, C] (the same arithmetic per element as
        # six separate ones; one C++ op forward and one backward on a CPU).
        new_shift = x[:, -1]
        mixes = [self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g]
        xr, xw, xk, xv, xa, xg = shift_mix(x, shift, mixes, backend=ctx.backend)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)  # [B, T, C]
        z = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        logw = -DECAY_SCALE * torch.sigmoid(z.float())  # log of the per-step decay, fp32
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * self.k_a).to(k.dtype)  # .to: under autocast a is fp32 and k bf16
        if ctx.v_first is None:  # the first v7 layer: its value is what later layers lerp toward
            ctx.v_first = v
        else:
            v = v + (ctx.v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2).to(v.dtype)
        rh, kh, vh = r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N)
        ah = a.view(B, T, H, N)
        y, wkv = ops.wkv7(rh, logw.view(B, T, H, N), kh, vh, -kk, kk * ah, wkv,
                          mode=ctx.mode, backend=ctx.backend)
        y = head_group_norm(y, self.ln_x, backend=ctx.backend).to(x.dtype)
        bonus = (rh * kh * self.r_k).sum(-1, keepdim=True) * vh  # [B, T, H, N]
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), new_shift, wkv

    @torch.no_grad()
    def init_weights(self) -> None:
        H, N = self.r_k.shape
        C = H * N
        r01, r1 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C).view(1, 1, C)
        n = torch.arange(C, dtype=torch.float32)
        lin = (n / max(C - 1, 1) - 0.5).view(1, 1, C)
        q = ((n % N) - (N - 1) / 2) / ((N - 1) / 2) if N > 1 else torch.zeros(C)
        zigzag = (q * q.abs()).view(1, 1, C)
        omega = (-6 + 6 * (n / max(C - 1, 1)) ** (1 + r01**0.3)).view(1, 1, C)
        self.x_r.copy_(1 - ddd ** (0.2 * r1))
        self.x_w.copy_(1 - ddd ** (0.9 * r1))
        self.x_k.copy_(1 - ddd ** (0.7 * r1))
        self.x_v.copy_(1 - ddd ** (0.7 * r1))
        self.x_a.copy_(1 - ddd ** (0.9 * r1))
        self.x_g.copy_(1 - ddd ** (0.2 * r1))
        self.w0.copy_(omega + 0.5 + 2.5 * zigzag)  # "+0.5 comes from softplus"
        self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * lin)
        self.v0.copy_(0.73 - 0.4 * lin)
        for lora1, lora2 in ((self.w1, self.w2), (self.a1, self.a2), (self.v1, self.v2), (self.g1, self.g2)):
            lora1.zero_()
            rows, cols = lora2.shape
            orthogonal_(lora2, 0.1 * (math.sqrt(rows / cols) if rows > cols else 1.0))
        self.k_k.copy_(0.71 - 0.1 * lin)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.ln_x.weight.fill_(((1 + self.layer_id) / self.n_layer) ** 0.7)
        self.ln_x.bias.zero_()
        orthogonal_(self.receptance.weight, 1.0)
        orthogonal_(self.key.weight, 0.1)
        orthogonal_(self.value.weight, 1.0)
        self.output.weight.zero_()


class V7ChannelMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, F_ = config.n_embd, config.dim_ffn
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        # value(relu(key(xk)) ** 2), xk the token-shift lerp (delta form); no receptance
        out = channel_mix(x, shift, self.x_k, None, self.key, self.value, form="delta", backend=ctx.backend)
        return out, x[:, -1]

    @torch.no_grad()
    def init_weights(self) -> None:
        C = self.x_k.shape[-1]
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        self.x_k.copy_(1 - channel_ramp(C).view(1, 1, C) ** (r1**4))
        orthogonal_(self.key.weight, 1.0)
        self.value.weight.zero_()


class V7Block(Block):
    time_mix_cls = V7TimeMix
    channel_mix_cls = V7ChannelMix


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """train_temp: ``att.w0`` 2x, the rest 1x; weight decay only on >= 2-D ``.weight`` matrices."""
    return official_param_groups(model, weight_decay, LR_SCALES)


LR_SCALES = {"att.w0": 2.0}


def _preset(name, V, L, C, loras, params, aliases=(), released=True, note="", head_size=None, source=""):
    dw, da, dv, dg = loras
    opts = (("dim_w_lora", dw), ("dim_a_lora", da), ("dim_v_lora", dv), ("dim_g_lora", dg))
    if head_size is not None:
        opts += (("head_size", head_size),)
    return SizePreset(name, L, C, V, aliases=aliases, options=opts, params=params, released=released, note=note,
                      source=source)


_CARDS = "two independent third-party config tables that agree"


SIZES = (
    _preset("0.1B", WORLD_VOCAB, 12, 768, (64, 64, 32, 128), "191.1M", ("world-0.1B",), note="World / G1",
            source="official demo rwkv_v7_demo.py"),
    _preset("0.4B", WORLD_VOCAB, 24, 1024, (64, 64, 32, 128), "450.8M", ("world-0.4B",), note="World / G1",
            source="RWKV-LM README; " + _CARDS),
    _preset("1.5B", WORLD_VOCAB, 24, 2048, (96, 96, 64, 256), "1.528B", ("world-1.5B", "1B5"), note="World / G1",
            source="RWKV-LM README weight table"),
    _preset("3B", WORLD_VOCAB, 32, 2560, (96, 96, 64, 320), "2.948B", ("2.9B", "world-2.9B"), note="World / G1 2.9B",
            source=_CARDS),
    _preset("7B", WORLD_VOCAB, 32, 4096, (128, 128, 96, 480), "7.200B", ("7.2B",), note="G0 / G1 7.2B", source=_CARDS),
    _preset("14B", WORLD_VOCAB, 61, 4096, (192, 192, 128, 384), "13.27B", ("13.3B", "13B"), note="G0 / G1 13.3B",
            source=_CARDS),
    _preset("pile-168M", PILE_VOCAB, 12, 768, (64, 64, 32, 128), "167.7M", ("168M",), note="Pile",
            source="official demo history (Nov 2024)"),
    _preset("pile-421M", PILE_VOCAB, 24, 1024, (64, 64, 64, 128), "421.2M", ("421M",), note="Pile",
            source="official demo history (Nov 2024)"),
    _preset("pile-1.47B", PILE_VOCAB, 24, 2048, (96, 96, 64, 256), "1.465B", ("1.47B",),
            note="Pile; LoRA dims inferred from the parameter count [unverified]"),
    _preset("tiny", 256, 2, 64, (8, 8, 8, 16), "", released=False, note="for tests", head_size=16),
    _preset("small", 1024, 4, 128, (16, 16, 16, 32), "", released=False, note="for tests and demos",
            head_size=32),
)
_PRERELEASE = (".att.time_aaaaa", ".att.time_misc_", ".att.xx_", ".att.ww_", ".att.aa_w")


def detect(shapes) -> dict | None:
    """x070 final names: ``att.r_k`` (H, N) and the LoRA pairs w1/a1/v1/g1; pre-release names refused."""
    prerelease = sorted({f for f in _PRERELEASE for k in shapes if f in k})
    if prerelease:
        from rwkv_zoo.checkpoint import CheckpointError

        raise CheckpointError(
            f"pre-release RWKV-7 naming ({', '.join(f.removeprefix('.att.') + '*' for f in prerelease)}): only the "
            f"final x070 names (x_r, w0, r_k, ...) are supported; rename the keys first"
        )
    try:
        _, N = shapes["blocks.0.att.r_k"]
        kw = {"head_size": N, "dim_w_lora": shapes["blocks.0.att.w1"][1], "dim_a_lora": shapes["blocks.0.att.a1"][1],
              "dim_g_lora": shapes["blocks.0.att.g1"][1]}
    except (KeyError, ValueError, IndexError):
        return None
    v1 = shapes.get("blocks.1.att.v1") or shapes.get("blocks.0.att.v1")  # layer 0 may lack v1 (Nov-2024 files)
    if v1 is not None:
        kw["dim_v_lora"] = v1[1]
    return kw


def fill_unused(tensors: dict, model: nn.Module) -> None:
    """Nov-2024 x070 files lack layer 0's v0/v1/v2, which no layer 0 uses (SPEC §6.1): add zeros."""
    ref = tensors["emb.weight"]
    for name, p in model.state_dict().items():
        if name in model.unused_parameters() and name not in tensors:
            tensors[name] = torch.zeros(p.shape, dtype=ref.dtype)


SPEC = VersionSpec(
    name="v7",
    title="RWKV-7 Goose (x070)",
    config_cls=V7Config,
    sizes=SIZES,
    param_groups=param_groups,
    default_vocab=WORLD_VOCAB,
    wkv_op="wkv7",
    block_cls=V7Block,
    lr_scales=LR_SCALES,
    detect=detect,
    fix_checkpoint=fill_unused,
    relative_cost=4.0,
    description="generalized delta rule, diagonal-plus-low-rank transition, value residual (2025)",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
