"""RWKV-6.0 "Finch": data-dependent token shift (ddlerp) and data-dependent decay.

Paper: Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (2024),
arXiv:2404.05892. Facts: SPEC.md §5.

With dx = x' - x (the mix weights the *previous* token, unlike v4/v5):
    h     = tanh((x + dx * maa_x) W1)        -> 5 rows, in the order w, k, v, r, g
    x_*   = x + dx * (maa_* + h_* W2[*])
    w_t   = exp(-exp(time_decay + tanh(x_w Wd1) Wd2))        per token and channel
    y_t   = r_t^T (diag(u) k_t v_t^T + S_{t-1});  S_t = diag(w_t) S_{t-1} + k_t v_t^T
    out   = W_o (GroupNorm_H(y, eps=64e-5) * silu(W_g x_g))
Channel-mix: sigmoid(W_r x_r) * W_v relu(W_k x_k)^2 with the v6 lerp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo import ops
from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.layerops import channel_mix, ddlerp, head_group_norm
from rwkv_zoo.model import (
    GROUPNORM_EPS,
    Block,
    RWKVConfig,
    channel_ramp,
    ffn_3p5x,
    layer_ratios,
    official_param_groups,
    orthogonal_,
)
from rwkv_zoo.protocols import Context
from rwkv_zoo.registry import SizePreset, VersionSpec
from rwkv_zoo.versions.v5 import decay_init, faaaa_init

WORLD_VOCAB = 65536


@dataclass
class V6Config(RWKVConfig):
    dim_mix_lora: int | None = None  # D_m: 32, or 64 for C >= 4096 (SPEC §5.1)
    dim_decay_lora: int | None = None  # D_d: 64, or 128 for C >= 4096

    version: ClassVar[str] = "v6"

    def __post_init__(self) -> None:
        super().__post_init__()
        big = self.n_embd >= 4096
        if self.dim_mix_lora is None:
            self.dim_mix_lora = 64 if big else 32
        if self.dim_decay_lora is None:
            self.dim_decay_lora = 128 if big else 64

    def default_dim_ffn(self) -> int:
        return ffn_3p5x(self.n_embd)


class V6TimeMix(nn.Module):
    wkv_op = "wkv6"

    def __init__(self, config: V6Config, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, H, N = config.n_embd, config.n_head, config.head_size
        Dm, Dd = config.dim_mix_lora, config.dim_decay_lora
        self.kernel_heads, self.kernel_head_size = H, N
        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * Dm))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, Dm, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.empty(Dd, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def zero_wkv(self, batch_size: int, device) -> Tensor:
        H, N = self.time_faaaa.shape
        return torch.zeros(batch_size, H, N, N, device=device, dtype=torch.float32)

    def forward(self, x: Tensor, shift: Tensor, wkv: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        H, N = self.time_faaaa.shape
        new_shift = x[:, -1]
        maa = [self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g]
        # The token shift with data-dependent lerps (LoRA on the shifted input) and the data-dependent decay.
        w, xk, xv, xr, xg = ddlerp(x, shift, self.time_maa_x, maa, self.time_maa_w1, self.time_maa_w2,
                                   self.time_decay, self.time_decay_w1, self.time_decay_w2, backend=ctx.backend)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        w = w.view(B, T, H, N)  # log of exp(-exp(ww)), fp32
        y, wkv = ops.wkv6(r, k, v, w, self.time_faaaa.float(), wkv, mode=ctx.mode, backend=ctx.backend)
        y = head_group_norm(y, self.ln_x, backend=ctx.backend).to(x.dtype)
        return self.output(y * g), new_shift, wkv

    @torch.no_grad()
    def init_weights(self) -> None:
        H, N = self.time_faaaa.shape
        C = H * N
        r01, r1 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C).view(1, 1, C)
        # "1 minus" the v5 values, because the v6 lerp weights the previous token (SPEC §5.6).
        self.time_maa_x.copy_(1 - ddd**r1)
        self.time_maa_w.copy_(1 - ddd**r1)
        self.time_maa_k.copy_(1 - ddd**r1)
        self.time_maa_v.copy_(1 - (ddd**r1 + 0.3 * r01))
        self.time_maa_r.copy_(1 - ddd ** (0.5 * r1))
        self.time_maa_g.copy_(1 - ddd ** (0.5 * r1))
        # RWKV-LM since Apr 2024: w1 zero, w2 U(+-0.01).
        self.time_maa_w1.zero_()
        self.time_maa_w2.uniform_(-0.01, 0.01)
        self.time_decay_w1.zero_()
        self.time_decay_w2.uniform_(-0.01, 0.01)
        self.time_decay.copy_(decay_init(C, r01).view(1, 1, C))
        self.time_faaaa.copy_(faaaa_init(C, r01).view(H, N))
        self.ln_x.weight.fill_(((1 + self.layer_id) / self.n_layer) ** 0.7)
        self.ln_x.bias.zero_()
        orthogonal_(self.receptance.weight, 1.0)
        orthogonal_(self.key.weight, 0.1)
        orthogonal_(self.value.weight, 1.0)
        orthogonal_(self.gate.weight, 0.1)
        self.output.weight.zero_()


class V6ChannelMix(nn.Module):
    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, F_ = config.n_embd, config.dim_ffn
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        # sigmoid(receptance(xr)) * value(relu(key(xk)) ** 2), xk and xr the token-shift lerps (delta form)
        out = channel_mix(x, shift, self.time_maa_k, self.time_maa_r, self.key, self.value, self.receptance,
                          form="delta", backend=ctx.backend)
        return out, x[:, -1]

    @torch.no_grad()
    def init_weights(self) -> None:
        C = self.time_maa_k.shape[-1]
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C).view(1, 1, C)
        self.time_maa_k.copy_(1 - ddd**r1)
        self.time_maa_r.copy_(1 - ddd**r1)
        orthogonal_(self.key.weight, 1.0)
        self.value.weight.zero_()
        self.receptance.weight.zero_()


class V6Block(Block):
    time_mix_cls = V6TimeMix
    channel_mix_cls = V6ChannelMix


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """RWKV-v5 trainer for x060: time_decay 2x (its LoRA ``time_decay_w1/w2`` 1x), the rest 1x."""
    return official_param_groups(model, weight_decay, LR_SCALES)


LR_SCALES = {"time_decay_w": 1.0, "time_decay": 2.0, "time_first": 3.0}


def _world(name, L, C, params, aliases=(), released=True, note="World"):
    return SizePreset(name, L, C, WORLD_VOCAB, aliases=aliases, params=params, released=released, note=note,
                      source="model cards (L, C, LoRA ranks)" if released else "")


SIZES = (
    _world("0.1B", 12, 768, "", released=False, note="shape-matched to the other versions' 0.1B; no v6 release"),
    _world("0.4B", 24, 1024, "", released=False, note="shape-matched to the other versions' 0.4B; no v6 release"),
    _world("1.5B", 24, 2048, "1.600B", ("1.6B", "1B6")),
    _world("3B", 32, 2560, "3.100B"),
    _world("7B", 32, 4096, "7.636B"),
    _world("14B", 61, 4096, "14.07B"),
    SizePreset("tiny", 2, 64, 256, options=(("head_size", 16), ("dim_mix_lora", 8), ("dim_decay_lora", 16)),
               released=False, note="for tests"),
    SizePreset("small", 4, 128, 1024, options=(("head_size", 32), ("dim_mix_lora", 16), ("dim_decay_lora", 32)),
               released=False, note="for tests and demos"),
)

def detect(shapes) -> dict | None:
    """RWKV-6.0: the ddlerp LoRA ``att.time_maa_w1`` and per-head ``att.time_faaaa``."""
    try:
        _, N = shapes["blocks.0.att.time_faaaa"]
        return {"head_size": N, "dim_mix_lora": shapes["blocks.0.att.time_maa_w1"][1] // 5,
                "dim_decay_lora": shapes["blocks.0.att.time_decay_w1"][1]}
    except (KeyError, ValueError, IndexError):
        return None


SPEC = VersionSpec(
    name="v6",
    title="RWKV-6.0 Finch",
    config_cls=V6Config,
    sizes=SIZES,
    param_groups=param_groups,
    default_vocab=WORLD_VOCAB,
    wkv_op="wkv6",
    block_cls=V6Block,
    lr_scales=LR_SCALES,
    detect=detect,
    relative_cost=2.0,
    description="data-dependent token shift and decay (2024)",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
