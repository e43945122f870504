"""RWKV-7 DeepEmbed ("rwkv7a", x070 + DeepEmbed): the x070 time-mix with a token-indexed channel-mix.

Released as the ``rwkv7a-g1*`` checkpoints (BlinkDL/rwkv7-g1). Facts: RWKV-LM ``RWKV-v7/rwkv_v7a_demo.py``
and the ``rwkv`` package 0.8.32 with ``RWKV_DE_VERSION=1`` (the numerical reference, tests/models/test_v7a.py).

The time-mix is v7's, unchanged (``V7TimeMix``). The channel-mix scales the squared-ReLU key by a factor
that depends on the token id through a per-layer table of R x R matrices (R = 32 in the releases):
    M_t  = s_emb[tok_t] + s_emb_x e_t         (R*R values viewed as R x R; e_t = ln0(emb[tok_t]))
    k    = relu(W_k x_k)^2 * ((x_t s1) M_t s2 + s0)       x_t: the ln2 output, x_k: its token-shift mix
    out  = W_v k
The package folds ``s_emb + ln0(emb) s_emb_x^T`` into one [V, R*R] table at load. Here the official
keys stay parameters and the sum is formed per token in forward, from row gathers (``nn.Embedding``)
only: a memory-mapped checkpoint's [V, R*R] tables (67M values per layer at V = 65536) are touched only
at the rows of the tokens seen, so they can stay on disk.

``e_t`` is the output of block 0's ``ln0``, which the generic ``Block`` puts in the call's context
(``ctx.x0``), since a channel-mix only sees its own ln2 output; so a v7a channel-mix also works in a
hybrid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.model import Block, channel_ramp, layer_ratios, orthogonal_, token_shift
from rwkv_zoo.protocols import Context
from rwkv_zoo.registry import VersionSpec
from rwkv_zoo.versions import v7
from rwkv_zoo.versions.v7 import WORLD_VOCAB, V7Config, V7TimeMix


@dataclass
class V7aConfig(V7Config):
    dim_s_lora: int = 32  # R: rank of s1/s2; each s_emb row is an R x R matrix (the package assumes 32)

    version: ClassVar[str] = "v7a"


class V7aChannelMix(nn.Module):
    """Not a subclass of ``V7ChannelMix`` on purpose: code that recognises a v7 channel-mix by its class
    (the core's fused decode step) would run it without the DeepEmbed factor."""

    def __init__(self, config: V7aConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, F_, V, R = config.n_embd, config.dim_ffn, config.vocab_size, config.dim_s_lora
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        # _weight: no default normal_ init of a [V, R*R] table that init_weights() overwrites anyway
        self.s_emb = nn.Embedding(V, R * R, _weight=torch.empty(V, R * R))
        self.s_emb_x = nn.Linear(C, R * R, bias=False)
        self.s0 = nn.Parameter(torch.empty(1, 1, F_))
        self.s1 = nn.Parameter(torch.empty(C, R))
        self.s2 = nn.Parameter(torch.empty(R, F_))

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        R = self.s1.shape[1]
        xx, new_shift = token_shift(x, shift)
        k = torch.relu(self.key(x + (xx - x) * self.x_k)).square()
        emb = ctx.x0  # ln0(emb[tokens]): Block puts it in the context in layer 0
        if emb is None:
            raise RuntimeError("a v7a (DeepEmbed) channel-mix needs ctx.x0 (the normed embedding), which the generic "
                               "Block sets in layer 0; this model's layer 0 is a block that does not")
        m = (self.s_emb(ctx.tokens) + self.s_emb_x(emb)).view(B, T, R, R)  # [B, T, R, R]
        ss = ((x @ self.s1).unsqueeze(-2) @ m).squeeze(-2)  # [B, T, R]
        k = k * (ss @ self.s2 + self.s0).to(k.dtype)
        return self.value(k), new_shift

    @torch.no_grad()
    def init_weights(self) -> None:
        """x_k, key, value as x070's channel-mix (train_temp). No public trainer initialises the DeepEmbed
        keys, so this is our choice: the factor starts at exactly 1 (s0 = 1, s2 = 0: the layer is an
        x070 channel-mix at step 0), each s_emb row is the flattened identity and s_emb_x = 0 (every
        token starts with M = I), and s1 is orthogonal so ``ss`` is non-zero and s2 gets a gradient at
        step 0; the token-dependent parts then learn from s2's first update on."""
        C = self.x_k.shape[-1]
        R = self.s1.shape[1]
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        self.x_k.copy_(1 - channel_ramp(C).view(1, 1, C) ** (r1**4))
        orthogonal_(self.key.weight, 1.0)
        self.value.weight.zero_()
        self.s_emb.weight.copy_(torch.eye(R, device=self.s_emb.weight.device).flatten().expand_as(self.s_emb.weight))
        self.s_emb_x.weight.zero_()
        self.s0.fill_(1.0)
        orthogonal_(self.s1, 1.0)
        self.s2.zero_()


class V7aBlock(Block):
    time_mix_cls = V7TimeMix
    channel_mix_cls = V7aChannelMix


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """x070's groups (``att.w0`` 2x). No public DeepEmbed trainer: its tables follow the x070 rule, so the
    ``.weight`` matrices ``s_emb``/``s_emb_x`` get weight decay like ``emb.weight``, s0/s1/s2 do not."""
    return v7.param_groups(model, weight_decay)


def _preset(name, V, L, C, loras, params, aliases=(), released=True, note="", head_size=None, rank=32):
    """v7's preset plus the DeepEmbed rank R."""
    source = "file size (2.01 GB fp16) and tensor count (462) of the released files" if released else ""
    p = v7._preset(name, V, L, C, loras, params, aliases, released, note, head_size, source=source)
    return replace(p, options=(*p.options, ("dim_s_lora", rank)))


SIZES = (
    # 1.007B parameters, 2.01 GB in fp16: 816M of them are the twelve [65536, 1024] s_emb tables.
    _preset("0.1B", WORLD_VOCAB, 12, 768, (64, 64, 32, 128), "1.007B", ("g1b-0.1B", "g1d-0.1B"),
            note="G1 DeepEmbed: rwkv7a-g1b-0.1b-20250819, rwkv7a-g1d-0.1b-20260212"),
    _preset("tiny", 256, 2, 64, (8, 8, 8, 16), "", released=False, note="for tests", head_size=16,
            rank=8),
    _preset("small", 1024, 4, 128, (16, 16, 16, 32), "", released=False, note="for tests and demos",
            head_size=32, rank=16),
)


def detect(shapes) -> dict | None:
    """An x070 file (v7's detector) with ``ffn.s_emb``: the rank R from ``s1`` [C, R], checked against
    the s_emb width R*R."""
    if "blocks.0.ffn.s_emb.weight" not in shapes:
        return None
    kw = v7.detect(shapes)
    if kw is None:
        return None
    try:
        R = shapes["blocks.0.ffn.s1"][1]
        width = shapes["blocks.0.ffn.s_emb.weight"][1]
    except (KeyError, IndexError):
        return None
    if width != R * R:
        from rwkv_zoo.checkpoint import CheckpointError

        raise CheckpointError(f"DeepEmbed: ffn.s_emb is {width} wide but ffn.s1 has rank {R} (expected {R * R})")
    return {**kw, "dim_s_lora": R}


def fix_checkpoint(tensors: dict, model: nn.Module) -> None:
    """v7's fix-up (layer 0's unused v0/v1/v2 may be absent; the demo never reads them), and ``s0`` as
    [1, 1, F] if a file stores it flat (the package squeezes every key, so it reads either)."""
    v7.fill_unused(tensors, model)
    for k in [k for k in tensors if k.endswith(".ffn.s0") and tensors[k].dim() == 1]:
        tensors[k] = tensors[k].view(1, 1, -1)


SPEC = VersionSpec(
    name="v7a",
    title="RWKV-7 DeepEmbed (rwkv7a)",
    config_cls=V7aConfig,
    sizes=SIZES,
    param_groups=param_groups,
    default_vocab=WORLD_VOCAB,
    wkv_op="wkv7",
    block_cls=V7aBlock,
    lr_scales=v7.LR_SCALES,
    detect=detect,
    fix_checkpoint=fix_checkpoint,
    relative_cost=4.2,
    description="x070 with a token-indexed low-rank factor on the channel-mix (DeepEmbed, 2025)",
)

@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
