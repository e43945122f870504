"""RWKV-5.2 "Eagle": multi-head matrix-valued state, per-channel decay, silu gate, GroupNorm.

Paper: Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (2024),
arXiv:2404.05892. Facts: SPEC.md §4.

Per head (S is [K, V], w = exp(-exp(time_decay)), u = time_faaaa used as is):
    y_t = r_t^T (diag(u) k_t v_t^T + S_{t-1});   S_t = diag(w) S_{t-1} + k_t v_t^T
    out = W_o (GroupNorm_H(y, eps=64e-5) * silu(W_g x_g))
Token shift and channel-mix as in v4 (mix weights the current token); FFN width 3.5 C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo import ops
from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.layerops import head_group_norm, shift_mix
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
from rwkv_zoo.versions.v4 import V4ChannelMix

WORLD_VOCAB = 65536


@dataclass
class V5Config(RWKVConfig):
    version: ClassVar[str] = "v5"

    def default_dim_ffn(self) -> int:
        return ffn_3p5x(self.n_embd)


def decay_init(A: int, r01: float) -> Tensor:
    """time_decay of v5.2/v6: -6 + 5 (n/(A-1))^(0.7 + 1.3 r01) (SPEC §4.7)."""
    n = torch.arange(A, dtype=torch.float32)
    return -6 + 5 * (n / max(A - 1, 1)) ** (0.7 + 1.3 * r01)


def faaaa_init(A: int, r01: float) -> Tensor:
    """time_faaaa of v5.2/v6: r01 (1 - n/(A-1)) + 0.1 zigzag (SPEC §4.7)."""
    n = torch.arange(A, dtype=torch.float32)
    return r01 * (1 - n / max(A - 1, 1)) + 0.1 * ((n + 1) % 3 - 1)


class V5TimeMix(nn.Module):
    wkv_op = "wkv5"

    def __init__(self, config: V5Config, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.kernel_heads, self.kernel_head_size = H, N
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay = nn.Parameter(torch.empty(H, N))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def zero_wkv(self, batch_size: int, device) -> Tensor:
        H, N = self.time_decay.shape
        return torch.zeros(batch_size, H, N, N, device=device, dtype=torch.float32)

    def forward(self, x: Tensor, shift: Tensor, wkv: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        H, N = self.time_decay.shape
        # Token shift and the four lerps as one pass over [4, B, T, C] (the same arithmetic per element).
        new_shift = x[:, -1]
        mixes = [self.time_mix_k, self.time_mix_v, self.time_mix_r, self.time_mix_g]
        xk, xv, xr, xg = shift_mix(x, shift, mixes, form="lerp", backend=ctx.backend)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        w = -torch.exp(self.time_decay.float())  # [H, N] log of exp(-exp(d))
        y, wkv = ops.wkv5(r, k, v, w, self.time_faaaa.float(), wkv, mode=ctx.mode, backend=ctx.backend)
        y = head_group_norm(y, self.ln_x, backend=ctx.backend).to(x.dtype)
        return self.output(y * g), new_shift, wkv

    @torch.no_grad()
    def init_weights(self) -> None:
        H, N = self.time_decay.shape
        C = H * N
        r01, r1 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C).view(1, 1, C)
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_v.copy_(ddd**r1 + 0.3 * r01)
        self.time_mix_r.copy_(ddd ** (0.5 * r1))
        self.time_mix_g.copy_(ddd ** (0.5 * r1))
        self.time_decay.copy_(decay_init(C, r01).view(H, N))
        self.time_faaaa.copy_(faaaa_init(C, r01).view(H, N))
        self.ln_x.weight.fill_(((1 + self.layer_id) / self.n_layer) ** 0.7)
        self.ln_x.bias.zero_()
        # README "Initializing RWKV 5/6 Models" (Apr 2024): no shape gain.
        orthogonal_(self.receptance.weight, 1.0)
        orthogonal_(self.key.weight, 0.1)
        orthogonal_(self.value.weight, 1.0)
        orthogonal_(self.gate.weight, 0.1)
        self.output.weight.zero_()


class V5ChannelMix(V4ChannelMix):
    """Identical maths to v4 (SPEC §3.5); width 3.5 C and the 2024 init (key gain 1)."""

    def _key_gain(self) -> float:
        return 1.0


class V5Block(Block):
    time_mix_cls = V5TimeMix
    channel_mix_cls = V5ChannelMix


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """RWKV-v5 trainer: time_decay 2x, time_first 3x, the rest 1x; wd on >= 2-D ``.weight``."""
    return official_param_groups(model, weight_decay, LR_SCALES)


LR_SCALES = {"time_decay": 2.0, "time_first": 3.0}


def _world(name, L, C, params, aliases=(), released=True, note="World"):
    return SizePreset(name, L, C, WORLD_VOCAB, aliases=aliases, params=params, released=released, note=note,
                      source="RWKV-LM README size list; model cards" if released else "")


SIZES = (
    _world("0.1B", 12, 768, "", released=False,
           note="shape-matched to the other versions' 0.1B; the 2023 v5 0.1B release predates 5.2"),
    _world("0.4B", 24, 1024, "461.7M"),
    _world("1.5B", 24, 2048, "1.578B", ("1B5",)),
    _world("3B", 32, 2560, "3.063B"),
    _world("7B", 32, 4096, "7.518B"),
    SizePreset("tiny", 2, 64, 256, options=(("head_size", 16),), released=False, note="for tests"),
    SizePreset("small", 4, 128, 1024, options=(("head_size", 32),), released=False, note="for tests and demos"),
)

def detect(shapes) -> dict | None:
    """RWKV-5.2: ``att.ln_x`` and ``att.time_decay`` of shape (H, N); v5.0/5.1 are named and refused."""
    later = ("blocks.0.att.time_maa_x", "blocks.0.att.r_k", "blocks.0.att.x_r")  # v6 and v7 have ln_x too
    if "blocks.0.att.ln_x.weight" not in shapes or any(k in shapes for k in later):
        return None
    from rwkv_zoo.checkpoint import CheckpointError

    decay = shapes.get("blocks.0.att.time_decay", ())
    if len(decay) == 2 and decay[1] > 1:
        if "blocks.0.att.time_first" in shapes:
            raise CheckpointError("v5.2-shaped decay with a v5.0 time_first bonus: unknown variant")
        return {"head_size": decay[1]}
    variant = "v5.1" if "blocks.0.att.gate.weight" in shapes else "v5.0"
    raise CheckpointError(
        f"this is an {variant} checkpoint (one decay per head: time_decay shape {tuple(decay)}); "
        "only v5.2 (time_decay of shape (H, N)) is supported"
    )


SPEC = VersionSpec(
    name="v5",
    title="RWKV-5.2 Eagle",
    config_cls=V5Config,
    sizes=SIZES,
    param_groups=param_groups,
    default_vocab=WORLD_VOCAB,
    wkv_op="wkv5",
    block_cls=V5Block,
    lr_scales=LR_SCALES,
    detect=detect,
    relative_cost=1.2,
    description="multi-head matrix state, per-channel static decay, silu gate (2023)",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
