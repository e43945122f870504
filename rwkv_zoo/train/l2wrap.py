"""L2Wrap (SPEC.md §3.7): leave the loss value alone, nudge the largest logit of every position toward 0.

The official trainers add, in backward, ``max_j y_tj * 1e-4 / (B * T)`` to the gradient of the argmax
logit of each position: the gradient of ``1e-4 * mean_{b,t} max_j(y_btj)^2 / 2``, which keeps logits
from drifting upward (bf16 suffers most). The official ``L2Wrap`` ignores the gradient that reaches the
loss, so scaling the loss (gradient accumulation, a loss scaler, averaging across ranks) scaled the
cross-entropy part but not this one. Here the extra term is multiplied by that incoming gradient: it
is exactly the gradient of ``loss + grad_scale-consistent penalty``, whatever multiplies the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

FACTOR = 1e-4


class L2Wrap(torch.autograd.Function):
    """``L2Wrap.apply(loss, logits, scale)``: returns ``loss``; in backward also sends
    ``scale * max_logit * grad_output`` to the argmax logit of each position of ``logits`` [..., V].

    ``scale`` is ``1e-4 / (B * T)`` for a batch of B sequences of T tokens (``l2wrap_scale``).
    """

    @staticmethod
    def forward(ctx, loss: Tensor, logits: Tensor, scale: float) -> Tensor:
        top, idx = logits.detach().max(dim=-1, keepdim=True)
        ctx.save_for_backward(top, idx)
        ctx.scale = scale
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        top, idx = ctx.saved_tensors
        extra = (top.float() * (ctx.scale * grad_output.float())).to(ctx.logits_dtype)
        grad_logits = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=top.device)
        grad_logits.scatter_(-1, idx, extra)
        return grad_output, grad_logits, None


def l2wrap_scale(batch_size: int, seq_len: int) -> float:
    """The official per-logit factor for a batch of ``batch_size`` sequences of ``seq_len`` tokens."""
    return FACTOR / (batch_size * seq_len)


def l2wrap(loss: Tensor, logits: Tensor, scale: float) -> Tensor:
    """Functional form of ``L2Wrap.apply``."""
    return L2Wrap.apply(loss, logits, scale)
