"""The module protocol every version's blocks follow: what a time-mix, a channel-mix and a block receive.

The generic model (``rwkv_zoo.model.RWKV``) runs ``x += att(ln1(x)); x += ffn(ln2(x))`` per block and
knows nothing else about a version. It talks to the two halves of a block through these protocols:

- a **time-mix** mixes along time through a WKV op (``wkv_op``, called through ``rwkv_zoo.ops`` so
  dispatch picks the kernel) and owns the layer's WKV state (``zero_wkv``);
- a **channel-mix** mixes channels of one token, with a token-shift state;
- both receive the call's ``Context``: the token ids and the normed embedding (DeepEmbed channel-mixes
  look rows up by id and mix in the embedding),
  the backend and mode the caller forced, and values one layer hands to later ones (v7's ``v_first``).

Shapes: ``x`` [B, T, C], shifts [B, C] (the previous token's normed input), ``wkv`` whatever the
time-mix's op keeps (``[B, H, K, V]`` fp32 for matrix states, a tuple of tensors for wkv4).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Wkv = Tensor | tuple[Tensor, ...]


@dataclass
class Context:
    """What every block of one forward call shares.

    ``carry`` is the extension point for a version whose layers pass something down the stack; a
    block must not rely on any entry it did not put there itself or that its version does not
    document. Gradient checkpointing recomputes a block with a ``copy()`` of the context as it was.
    """

    tokens: Tensor  # [B, T] token ids of this call
    backend: str | None = None  # a backend the caller forced (model.backend), or None: dispatch decides
    mode: str | None = None  # "chunk" / "recurrent" when forced, else None
    x0: Tensor | None = None  # [B, T, C] block 0's ln0 output (the normed embedding), set by Block
    v_first: Tensor | None = None  # v7: the value of the first v7 layer, which later layers lerp toward
    carry: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Context:
        return replace(self, carry=dict(self.carry))

    def absorb(self, other: Context) -> None:
        """Take what ``other`` (a copy that a block ran with) added: ``x0``, ``v_first``, new carry entries."""
        if self.x0 is None:
            self.x0 = other.x0
        if self.v_first is None:
            self.v_first = other.v_first
        for k, v in other.carry.items():
            self.carry.setdefault(k, v)


@runtime_checkable
class TimeMix(Protocol):
    """The time-mixing half of a block.

    ``kernel_heads`` / ``kernel_head_size`` are the ``H`` and ``N`` of the op calls (``1`` and ``C``
    for wkv4), so ``explain`` can say which kernel a layer will get without running it. A time-mix that
    calls no dispatched kernel (softmax attention) has ``wkv_op = ""`` and a ``runs_with`` sentence that
    ``explain`` shows instead.
    """

    wkv_op: str
    kernel_heads: int
    kernel_head_size: int

    def zero_wkv(self, batch_size: int, device: torch.device | str) -> Wkv:
        """The WKV state a fresh sequence starts from (fp32)."""
        ...

    def forward(self, x: Tensor, shift: Tensor, wkv: Wkv | None, ctx: Context) -> tuple[Tensor, Tensor, Wkv]:
        """``x`` [B, T, C] (ln1 output) -> (out [B, T, C], new shift [B, C], new wkv). ``wkv`` None: a
        fresh sequence (pass it on to the op as None)."""
        ...

    def init_weights(self) -> None: ...


@runtime_checkable
class ChannelMix(Protocol):
    """The channel-mixing half of a block."""

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """``x`` [B, T, C] (ln2 output) -> (out [B, T, C], new shift [B, C])."""
        ...

    def init_weights(self) -> None: ...
