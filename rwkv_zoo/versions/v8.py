"""RWKV-8 "Heron", release candidate rc00: the x070 time-mix with a token-indexed channel-mix output gate.

Facts: RWKV-LM ``RWKV-v7/rwkv_v8_rc00_demo.py`` (the only public definition; checkpoint
``rwkv-8-pile-rc00-20250508`` in BlinkDL/rwkv-8-pile, 12 x 768, Pile vocabulary 50304). The demo needs
CUDA, so tests/models/test_v8.py compares with a token loop written in the test from the demo's formulas.

The time-mix is v7's, unchanged (``V7TimeMix``). The channel-mix ("rc00 DeepEmbed") multiplies the x070
channel-mix output by a per-layer row looked up by token id:
    out_t = (W_v relu(W_k x_k)^2) * enn[tok_t]          enn: [V, C] per layer (``ffn.enn.weight``)
The lookup is a row gather (``nn.Embedding``), so a memory-mapped checkpoint's tables (38.6M values
per layer at V = 50304) are read only at the rows of the tokens seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.model import Block, channel_ramp, layer_ratios, orthogonal_, token_shift
from rwkv_zoo.protocols import Context
from rwkv_zoo.registry import VersionSpec
from rwkv_zoo.versions import v7
from rwkv_zoo.versions.v7 import PILE_VOCAB, V7Config, V7TimeMix


@dataclass
class V8Config(V7Config):
    version: ClassVar[str] = "v8"


class V8ChannelMix(nn.Module):
    """Not a subclass of ``V7ChannelMix`` on purpose: code that recognises a v7 channel-mix by its class
    (the core's fused decode step) would run it without the ``enn`` gate."""

    def __init__(self, config: V8Config, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, F_, V = config.n_embd, config.dim_ffn, config.vocab_size
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        # _weight: no default normal_ init of a [V, C] table that init_weights() overwrites anyway
        self.enn = nn.Embedding(V, C, _weight=torch.empty(V, C))

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        xx, new_shift = token_shift(x, shift)
        k = torch.relu(self.key(x + (xx - x) * self.x_k)).square()
        return self.value(k) * self.enn(ctx.tokens), new_shift

    @torch.no_grad()
    def init_weights(self) -> None:
        """x_k, key, value as x070's channel-mix (train_temp). No public trainer initialises ``enn``; ours
        is 1 everywhere, so every layer starts as an x070 channel-mix and the gate learns per token."""
        C = self.x_k.shape[-1]
        _, r1 = layer_ratios(self.layer_id, self.n_layer)
        self.x_k.copy_(1 - channel_ramp(C).view(1, 1, C) ** (r1**4))
        orthogonal_(self.key.weight, 1.0)
        self.value.weight.zero_()
        self.enn.weight.fill_(1.0)


class V8Block(Block):
    time_mix_cls = V7TimeMix
    channel_mix_cls = V8ChannelMix



def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """x070's groups (``att.w0`` 2x). No public RWKV-8 trainer: ``ffn.enn.weight`` follows the x070 rule
    (a ``.weight`` matrix, like ``emb.weight``), so it gets weight decay."""
    return v7.param_groups(model, weight_decay)


_preset = v7._preset  # the same x070 LoRA ranks make a preset


SIZES = (
    # 631.3M = v7's pile-168M (167.7M) + twelve [50304, 768] enn tables (463.6M).
    _preset("pile-0.1B", PILE_VOCAB, 12, 768, (64, 64, 32, 128), "631.3M", ("rc00", "pile-rc00"),
            note="Pile rc00 (rwkv-8-pile-rc00-20250508); LoRA dims assumed as v7 pile-168M [unverified]"),
    _preset("tiny", 256, 2, 64, (8, 8, 8, 16), "", released=False, note="for tests", head_size=16),
    _preset("small", 1024, 4, 128, (16, 16, 16, 32), "", released=False, note="for tests and demos",
            head_size=32),
)


def detect(shapes) -> dict | None:
    """An x070 file (v7's detector) with ``ffn.enn.weight`` [V, C]."""
    if "blocks.0.ffn.enn.weight" not in shapes:
        return None
    return v7.detect(shapes)


SPEC = VersionSpec(
    name="v8",
    title="RWKV-8 Heron (rc00 DeepEmbed)",
    config_cls=V8Config,
    sizes=SIZES,
    param_groups=param_groups,
    default_vocab=v7.WORLD_VOCAB,
    wkv_op="wkv7",
    block_cls=V8Block,
    lr_scales=v7.LR_SCALES,
    detect=detect,
    fix_checkpoint=v7.fill_unused,  # the demo never reads layer 0's v0/v1/v2 (it overwrites them)
    relative_cost=4.0,
    description="x070 time-mix, channel-mix output gated by a per-token table (rc00, 2025)",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
