"""Prefill a prompt, then decode greedily one token at a time, carrying the recurrent state.

Shows:
- ``logits, state = model(prompt)`` (prefill, chunked kernels) then ``model(next_token, state)``
  (decode, recurrent kernels): RWKV needs no KV cache, only a fixed-size state per sequence;
- that decoding with the state gives the same logits as one parallel pass over the whole text;
- ``state.clone()`` to branch a conversation, ``RWKVState.concat`` to batch two sequences and
  ``state.select(i)`` to take one back out;
- that a state from another model is rejected with ``rwkv_zoo.StateMismatchError``.

The weights are random (``rwkv_zoo.randomize_``), so the "text" is token ids, not words.
Run: ``python examples/02_decode_with_state.py``
"""

from __future__ import annotations

import torch

import rwkv_zoo
from rwkv_zoo import RWKVState, StateMismatchError


def greedy(model, state: RWKVState, last_logits: torch.Tensor, steps: int) -> tuple[list[int], RWKVState]:
    """Decode ``steps`` tokens greedily from ``state``; ``last_logits`` [B, V] are the prompt's last."""
    out = []
    token = last_logits.argmax(-1, keepdim=True)  # [B, 1]
    for _ in range(steps):
        out.append(int(token[0, 0]))
        logits, state = model(token, state)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return out, state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7-small"), seed=1).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 24))

    # 1. Prefill the prompt in one call, then decode 16 tokens carrying the state.
    logits, state = model(prompt)
    print(f"prefill: prompt {list(prompt.shape)} -> logits {list(logits.shape)}; {state}")
    print(rwkv_zoo.explain(model, prompt, requires_grad=False, has_state=True))
    generated, _ = greedy(model, state, logits[:, -1], 16)
    print(f"greedy continuation: {generated}")

    # 2. One parallel pass over prompt + continuation gives the same logits as prefill + decode.
    full = torch.cat([prompt, torch.tensor([generated])], dim=1)
    parallel, _ = model(full)
    stepped, s = [logits], state
    for t in generated[:-1]:
        step_logits, s = model(torch.tensor([[t]]), s)
        stepped.append(step_logits)
    err = rel(torch.cat(stepped, dim=1), parallel[:, :-1])
    print(f"prefill + decode vs one parallel pass over {full.shape[1]} tokens: relative error {err:.1e}")
    assert err < 1e-5

    # 3. clone(): branch the conversation; both branches start from the same state.
    branch = state.clone()
    again, _ = greedy(model, branch, logits[:, -1], 16)
    print(f"decoding again from a clone gives the same tokens: {again == generated}")
    assert again == generated

    # 4. concat() two sequences into a batch of 2, decode both at once, select() one back.
    other_prompt = torch.randint(0, model.config.vocab_size, (1, 10))
    other_logits, other_state = model(other_prompt)
    batch = RWKVState.concat([state, other_state])
    print(f"concat: {batch}")
    tokens = torch.cat([logits[:, -1], other_logits[:, -1]]).argmax(-1, keepdim=True)  # [2, 1]
    batch_logits, batch = model(tokens, batch)
    alone_logits, alone_state = model(tokens[1:], other_state)
    print(f"batched step vs the second sequence alone: relative error {rel(batch_logits[1:], alone_logits):.1e}")
    second = batch.select(1)
    nxt = alone_logits[:, -1].argmax(-1, keepdim=True)
    err = rel(model(nxt, second)[0], model(nxt, alone_state)[0])
    print(f"select(1) -> {second}; its next step vs the one-sequence run: relative error {err:.1e}")
    assert err < 1e-5

    # 5. A state belongs to the model that made it.
    stranger = rwkv_zoo.build("v6-small")
    try:
        stranger(tokens[:1], state)
    except StateMismatchError as exc:
        print(f"StateMismatchError, as it should be: {exc}")
    else:
        raise AssertionError("a v7 state was accepted by a v6 model")
    try:
        model(tokens, state)  # two sequences, a state for one
    except StateMismatchError as exc:
        print(f"StateMismatchError for a batch mismatch: {exc}")


if __name__ == "__main__":
    main()
