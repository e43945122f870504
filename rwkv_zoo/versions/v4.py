"""RWKV-4: per-channel WKV with a time-decay and a bonus for the current token.

Paper: Peng et al., "RWKV: Reinventing RNNs for the Transformer Era" (2023), arXiv:2305.13048.
Facts: SPEC.md §3 (keys, formulas, init, released sizes).

Time-mix (per channel c, w = -exp(time_decay), u = time_first):
    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (same with v = 1)
    out   = W_o (sigmoid(W_r x_r) * wkv)
Token shift: x_* = mu * x + (1 - mu) * x'  (the mix weights the *current* token).
Channel-mix: sigmoid(W_r x_r) * W_v relu(W_k x_k)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from rwkv_zoo import ops
from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.layerops import channel_mix, shift_mix
from rwkv_zoo.model import (
    RWKV,
    Block,
    RWKVConfig,
    channel_ramp,
    layer_ratios,
    official_param_groups,
    orthogonal_,
)
from rwkv_zoo.protocols import Context
from rwkv_zoo.registry import SizePreset, VersionSpec

PILE_VOCAB = 50277
WORLD_VOCAB = 65536


@dataclass
class V4Config(RWKVConfig):
    version: ClassVar[str] = "v4"
    has_heads: ClassVar[bool] = False


def _shape_gain(w: Tensor) -> float:
    out_f, in_f = w.shape
    return math.sqrt(out_f / in_f) if out_f > in_f else 1.0


class V4TimeMix(nn.Module):
    wkv_op = "wkv4"

    def __init__(self, config: V4Config, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C = config.n_embd
        self.kernel_heads, self.kernel_head_size = 1, C
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def zero_wkv(self, batch_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
        return ops.zero_state4(batch_size, self.time_decay.shape[0], device)

    def forward(self, x: Tensor, shift: Tensor, wkv, ctx: Context) -> tuple[Tensor, Tensor, tuple]:
        # Token shift and the three lerps as one pass over [3, B, T, C] (the same arithmetic per element).
        new_shift = x[:, -1]
        mixes = [self.time_mix_k, self.time_mix_v, self.time_mix_r]
        xk, xv, xr = shift_mix(x, shift, mixes, form="lerp", backend=ctx.backend)
        k, v = self.key(xk), self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        w = -torch.exp(self.time_decay.float())  # per-step log-decay, always negative
        y, wkv = ops.wkv4(w, self.time_first.float(), k, v, wkv, mode=ctx.mode, backend=ctx.backend)
        return self.output(r * y.to(r.dtype)), new_shift, wkv

    @torch.no_grad()
    def init_weights(self) -> None:
        C = self.time_decay.shape[0]
        r01, r1 = layer_ratios(self.layer_id, self.n_layer)
        n = torch.arange(C, dtype=torch.float32)
        self.time_decay.copy_(-5 + 8 * (n / max(C - 1, 1)) ** (0.7 + 1.3 * r01))
        zigzag = ((n + 1) % 3 - 1) * 0.5
        self.time_first.copy_(math.log(0.3) + zigzag)
        ddd = channel_ramp(C).view(1, 1, C)
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_v.copy_(ddd**r1 + 0.3 * r01)
        self.time_mix_r.copy_(ddd ** (0.5 * r1))
        for lin in (self.key, self.receptance, self.output):
            lin.weight.zero_()
        orthogonal_(self.value.weight, _shape_gain(self.value.weight))


class V4ChannelMix(nn.Module):
    """Channel-mix of v4 and v5: sigmoid(W_r x_r) * W_v relu(W_k x_k)^2, v4 lerp convention."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, F = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        out = channel_mix(x, shift, self.time_mix_k, self.time_mix_r, self.key, self.value, self.receptance,
                          form="lerp", backend=ctx.backend)
        return out, x[:, -1]

    @torch.no_grad()
    def init_weights(self) -> None:
        C = self.time_mix_k.shape[-1]
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        ddd = channel_ramp(C).view(1, 1, C)
        self.time_mix_k.copy_(ddd**r1)
        self.time_mix_r.copy_(ddd**r1)
        self.value.weight.zero_()
        self.receptance.weight.zero_()
        orthogonal_(self.key.weight, self._key_gain())

    def _key_gain(self) -> float:
        return _shape_gain(self.key.weight)


class V4Block(Block):
    time_mix_cls = V4TimeMix
    channel_mix_cls = V4ChannelMix


class V4Model(RWKV):
    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        if any(p.is_meta for p in self.parameters()):
            return
        # RWKV-v4 proper inits emb orthogonally with entries of ~1e-4 (v4neo: U(+-lr_init)); both tiny.
        C, V = self.config.n_embd, self.config.vocab_size
        orthogonal_(self.emb.weight, 1e-4 * math.sqrt(max(V, C)))


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """v4neo ``layerwise_lr``: time_mix 1x, time_decay 2x, time_first 3x; weight decay on matrices."""
    return official_param_groups(model, weight_decay, LR_SCALES)


LR_SCALES = {"time_decay": 2.0, "time_first": 3.0}


def _pile(name, L, C, params, aliases=()):
    return SizePreset(name, L, C, PILE_VOCAB, aliases=aliases, params=params, note="Pile / Raven",
                      source="transformers' RWKV-4 conversion script (L, C per size); model cards")


def _world(name, L, C, aliases=()):
    return SizePreset(name, L, C, WORLD_VOCAB, aliases=aliases, note="World", source="RWKV-LM README size list")


SIZES = (
    _world("0.1B", 12, 768, ("world-0.1B",)),
    _world("0.4B", 24, 1024, ("world-0.4B",)),
    _world("1.5B", 24, 2048, ("world-1.5B",)),
    _world("3B", 32, 2560, ("world-3B",)),
    _world("7B", 32, 4096, ("world-7B",)),
    _pile("pile-169M", 12, 768, "169.3M", ("169M",)),
    _pile("pile-430M", 24, 1024, "430.4M", ("430M",)),
    _pile("pile-1.5B", 24, 2048, "1.515B", ("1B5", "pile-1B5")),
    _pile("pile-3B", 32, 2560, "2.985B"),
    _pile("pile-7B", 32, 4096, "7.39B"),
    _pile("pile-14B", 40, 5120, "14.15B", ("14B",)),  # RWKV-4's "14B" release; 61 x 4096 in v6/v7
    SizePreset("tiny", 2, 64, 256, released=False, note="for tests"),
    SizePreset("small", 4, 128, 1024, released=False, note="for tests and demos"),
)

def detect(shapes) -> dict | None:
    """Official RWKV-4 keys: ``att.time_first`` and ``att.time_decay`` of shape (C,), no GroupNorm."""
    decay = shapes.get("blocks.0.att.time_decay")
    if "blocks.0.att.time_first" in shapes and decay is not None and len(decay) == 1:
        return {}
    return None


SPEC = VersionSpec(
    name="v4",
    title="RWKV-4",
    config_cls=V4Config,
    model_factory=lambda cfg: V4Model(cfg, V4Block),
    sizes=SIZES,
    param_groups=param_groups,
    default_vocab=PILE_VOCAB,
    wkv_op="wkv4",
    block_cls=V4Block,
    lr_scales=LR_SCALES,
    detect=detect,
    relative_cost=1.0,
    description="per-channel WKV with time-decay and current-token bonus (2023)",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
