"""Long context by state passing ("infctx"): train a long sequence in chunks, carrying the state.

``chunked_backward(model, inputs, targets, chunk_len, loss_fn)`` computes the gradient of
``sum over chunks of loss_fn(logits_chunk, targets_chunk)`` for a sequence of any length, with memory
bounded by one chunk (plus one state per chunk):

- **full** (default): the exact gradient of the whole sequence, through the state. A first pass
  without autograd records the state entering every chunk; then, from the last chunk to the first,
  each chunk is run again from its recorded entering state (a leaf that requires grad), and backward
  gets the chunk's loss plus the gradient that the later chunks sent into its output state. The
  entering state's gradient is what goes to the chunk before. This is gradient checkpointing at chunk
  boundaries: one extra forward per chunk buys a gradient equal to the full-sequence one (the official
  CUDA kernels cannot send gradients into the initial state, so RWKV-LM's infctx truncates; our ops can).
- **truncated**: forward and backward each chunk in order and detach the state between chunks
  (truncated backpropagation through time: no gradient crosses a chunk boundary).

``sync(last)`` returns a context manager for each backward call (``last`` is True for the final one),
which is how a DDP/FSDP trainer skips the gradient all-reduce of all calls but the last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rwkv_zoo.state import RWKVState


def state_tensors(state: RWKVState) -> list[Tensor]:
    return [t for ls in state.layers for t in ls.tensors()]


def _leaf_state(state: RWKVState) -> RWKVState:
    """A copy of ``state`` whose tensors are fresh leaves that require grad."""
    out = state.detach()
    for t in state_tensors(out):
        if t.is_floating_point():
            t.requires_grad_(True)
    return out


def _no_context(last: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def chunk_bounds(T: int, chunk_len: int | None) -> list[tuple[int, int]]:
    if not chunk_len or chunk_len >= T:
        return [(0, T)]
    return [(s, min(s + chunk_len, T)) for s in range(0, T, chunk_len)]


def chunked_backward(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    chunk_len: int | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    truncated: bool = False,
    state: RWKVState | None = None,
    sync: Callable[[bool], Any] = _no_context,
    forward: Callable[..., Any] | None = None,
) -> tuple[float, RWKVState]:
    """Backward of ``sum_chunks loss_fn(logits, targets)`` over ``inputs`` [B, T] in chunks.

    Returns the summed loss value and the final state (detached). Gradients accumulate into ``.grad``
    as ``loss.backward()`` would. ``forward(inputs, state) -> (logits, state)`` defaults to ``model``
    (pass one that wraps autocast, for example). ``state``: the state entering the first chunk (None =
    a fresh sequence); a state that requires grad receives its gradient in ``full`` mode.
    """
    forward = forward or model
    bounds = chunk_bounds(inputs.shape[1], chunk_len)
    last = len(bounds) - 1

    if truncated or len(bounds) == 1:
        total = 0.0
        for i, (s, e) in enumerate(bounds):
            with sync(i == last):
                logits, out = forward(inputs[:, s:e], state)
                loss = loss_fn(logits, targets[:, s:e])
                loss.backward()
            total += float(loss.detach())
            state = out.detach()
        return total, state

    # Pass 1: the state entering every chunk, without autograd.
    entering: list[RWKVState | None] = [state]
    with torch.no_grad():
        for s, e in bounds[:-1]:
            _, out = forward(inputs[:, s:e], entering[-1])
            entering.append(out)

    # Pass 2: last chunk first; each backward also carries the gradient of the chunk's output state.
    total = 0.0
    grad_out: list[Tensor | None] | None = None
    final: RWKVState | None = None
    for i in range(last, -1, -1):
        s, e = bounds[i]
        s_in = entering[i] if i == 0 else _leaf_state(entering[i])  # type: ignore[arg-type]
        with sync(i == 0):
            logits, out = forward(inputs[:, s:e], s_in)
            loss = loss_fn(logits, targets[:, s:e])
            tensors, grads = [loss], [torch.ones_like(loss)]
            if grad_out is not None:
                for t, g in zip(state_tensors(out), grad_out, strict=True):
                    if g is not None and t.requires_grad:
                        tensors.append(t)
                        grads.append(g)
            torch.autograd.backward(tensors, grads)
        if final is None:
            final = out.detach()
        total += float(loss.detach())
        grad_out = [t.grad for t in state_tensors(s_in)] if i > 0 else None
    assert final is not None
    return total, final
