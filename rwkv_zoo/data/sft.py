"""Chat SFT data: a jsonl file of conversations, in the RWKV World chat format, loss on the replies only.

Each line is ``{"text": "..."}`` (every token trains) or ``{"messages": [{"role": ..., "content": ...},
...]}`` with roles ``system``, ``user`` and ``assistant``. A conversation is rendered as RWKV World
models were trained to read it (and as ``rwkv-zoo chat`` writes it, through ``chat_prompt``)::

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}\\n\\nUser: ...

Only the assistant replies train: the tokens of `` {reply}\\n\\n`` (the blank line too, so the model
learns where a turn ends); the ``Assistant:`` prefix, the user and system turns get the target
``IGNORE``. Each turn is tokenized on its own and the pieces joined, so the mask falls exactly on turn
boundaries. A blank line ends a turn in this format, so runs of blank lines inside a turn become one
newline (``normalize``).

Batches are a pure function of (seed, step), as for the other data. A batch's samples have their own
lengths: they are padded on the right to the longest (at most ``ctx_len + 1`` tokens, longer samples
are cut), and padded positions have target ``IGNORE``. Right padding keeps padding out of every real
token's state: a sequence is causal, each sample starts at position 0 from the initial state (the tuned
one, in state tuning), and the pad tokens only ever follow its last real token. A sample longer than
the trainer's ``chunk_len`` goes through the infctx chunks like any other sequence.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo.data.synthetic import IGNORE, step_generator

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PAD = 0  # id of the padding token; its targets are IGNORE, so which id it is does not matter


def normalize(text: str) -> str:
    """A turn's text as the format holds it: stripped, blank lines inside it collapsed to one newline."""
    return re.sub(r"\n\s*\n+", "\n", str(text).strip())


def chat_prompt(user: str) -> str:
    """What a user turn adds before the model replies: ``User: {user}\\n\\nAssistant:``."""
    return f"{ROLES['user']}: {normalize(user)}\n\n{ROLES['assistant']}:"


def render(messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """A conversation as ``(text, trains)`` pieces whose concatenation is the rendered conversation;
    ``trains`` is True for the assistant replies (`` {reply}\\n\\n``)."""
    pieces: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; roles: {', '.join(ROLES)}")
        if role == "assistant":
            pieces.append((f"{ROLES['assistant']}:", False))
            pieces.append((f" {normalize(m['content'])}\n\n", True))
        else:
            pieces.append((f"{ROLES[role]}: {normalize(m['content'])}\n\n", False))
    if not any(trains for _, trains in pieces):
        raise ValueError("the conversation has no assistant message, so nothing in it would train")
    return pieces


def encode(sample: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of a sample and, per id, whether it is a target that trains."""
    if "messages" in sample:
        ids: list[int] = []
        mask: list[bool] = []
        for text, trains in render(sample["messages"]):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [trains] * len(piece)
        return ids, mask
    if "text" in sample:
        ids = tokenizer.encode(str(sample["text"]))
        return ids, [True] * len(ids)
    raise ValueError(f"a sample needs 'text' or 'messages', got the keys {sorted(sample)}")


@dataclass
class ChatData:
    """Encoded samples (``ids``, ``mask``) with the interface of a ``TokenStream`` for the trainer."""

    samples: list[tuple[list[int], list[bool]]]
    vocab_size: int
    name: str = ""
    eval_fraction: float = 0.05
    bytes_per_token: float | None = None  # no bits per byte: the loss covers the replies only
    eval_count: int = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.samples)
        if n == 0:
            raise ValueError(f"{self.name or 'SFT data'}: no samples")
        # At least one held out when there are two or more; a single sample is both (a smoke test).
        self.eval_count = min(n - 1, max(1, round(n * self.eval_fraction))) if n > 1 else 0

    @property
    def train_samples(self) -> list[tuple[list[int], list[bool]]]:
        return self.samples[: len(self.samples) - self.eval_count]

    @property
    def eval_samples(self) -> list[tuple[list[int], list[bool]]]:
        return self.samples[len(self.samples) - self.eval_count:] or self.samples

    def describe(self) -> str:
        return f"{self.name} ({len(self.train_samples)} conversations, {self.eval_count} held out)"

    def rows(self, chosen: Sequence[tuple[list[int], list[bool]]], seq_len: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets [n, T], right-padded to the longest sample (T <= seq_len)."""
        cut = [(ids[: seq_len + 1], mask[: seq_len + 1]) for ids, mask in chosen]
        T = max(1, max(len(ids) for ids, _ in cut) - 1)
        inputs = torch.full((len(cut), T), PAD, dtype=torch.long)
        targets = torch.full((len(cut), T), IGNORE, dtype=torch.long)
        for r, (ids, mask) in enumerate(cut):
            seq = torch.tensor(ids, dtype=torch.long)
            n = len(ids) - 1
            if n < 1:
                continue
            inputs[r, :n] = seq[:-1]
            trains = torch.tensor(mask[1:], dtype=torch.bool)
            targets[r, :n] = torch.where(trains, seq[1:], torch.full_like(seq[1:], IGNORE))
        return inputs, targets

    def batch(self, seed: int, step: int, n: int, seq_len: int, split: str = "train") -> tuple[Tensor, Tensor]:
        if split != "train":
            return self.eval_batch(step, n, seq_len)
        pool = self.train_samples
        picks = torch.randint(0, len(pool), (n,), generator=step_generator(seed, step)).tolist()
        return self.rows([pool[i] for i in picks], seq_len)

    def eval_batch(self, index: int, n: int, seq_len: int) -> tuple[Tensor, Tensor]:
        pool = self.eval_samples
        return self.rows([pool[(index * n + i) % len(pool)] for i in range(n)], seq_len)


def sft_file(path: str | os.PathLike, tokenizer: Any = "world", eval_fraction: float = 0.05) -> ChatData:
    """Read a jsonl file of ``{"text": ...}`` / ``{"messages": [...]}`` lines (blank lines skipped).

    ``tokenizer``: a name or file for ``rwkv_zoo.tokenizers.get_tokenizer`` (default the World
    tokenizer; ``"bytes"`` for byte-level test models) or an object with ``encode`` and ``vocab_size``.
    """
    from rwkv_zoo.tokenizers import get_tokenizer

    path = os.fspath(path)
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                if not isinstance(sample, dict):
                    raise ValueError(f"expected a JSON object, got {type(sample).__name__}")
                samples.append(encode(sample, tok))
            except ValueError as exc:  # json.JSONDecodeError is one
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    return ChatData(samples, int(tok.vocab_size), os.path.basename(path), eval_fraction)
