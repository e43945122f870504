"""Training data: synthetic recall tasks generated in code, and language-model token streams.

Everything is deterministic by seed and random-access by step (a batch is a pure function of
``(seed, step)``), so resuming needs only the step and ranks of a distributed run take their rows of
the same global batch. See ``synthetic`` (MQAR, copying, selective copying), ``tokens`` (plain text,
RWKV-LM binidx) and ``sft`` (chat jsonl, loss on the assistant replies).
"""

from __future__ import annotations

from typing import Any

from rwkv_zoo.data.sft import ChatData, chat_prompt, sft_file
from rwkv_zoo.data.synthetic import (
    IGNORE,
    MQAR,
    TASKS,
    Copying,
    SelectiveCopying,
    Task,
    make_task,
    step_generator,
)
from rwkv_zoo.data.tokens import TokenStream, binidx, bits_per_byte, read_binidx_index, text_file

__all__ = [
    "IGNORE",
    "MQAR",
    "TASKS",
    "ChatData",
    "Copying",
    "SelectiveCopying",
    "Task",
    "TokenStream",
    "binidx",
    "bits_per_byte",
    "chat_prompt",
    "make_data",
    "make_task",
    "read_binidx_index",
    "sft_file",
    "step_generator",
    "text_file",
]


def make_data(spec: dict[str, Any]) -> Task | TokenStream | ChatData:
    """Data from a config table: ``{"task": "mqar", ...}`` (see ``TASKS``), ``{"text": PATH}`` (byte
    level; ``"tokenizer": "world"`` or a tokenizer.json to tokenize) or ``{"binidx": PREFIX,
    "vocab_size": V}``; ``eval_fraction`` for the last two; ``{"sft": PATH}`` (chat jsonl, see
    ``rwkv_zoo.data.sft``; ``"tokenizer"``: world by default); or ``{"corpus": "stdlib"}`` (the Python
    standard library's sources split by file, see ``corpus``)."""
    spec = dict(spec)
    if "text" in spec:
        return text_file(spec.pop("text"), eval_fraction=spec.pop("eval_fraction", 0.01), **spec)
    if "binidx" in spec:
        return binidx(spec.pop("binidx"), **spec)
    if "sft" in spec:
        return sft_file(spec.pop("sft"), **spec)
    if "corpus" in spec:
        from rwkv_zoo.data.corpus import make_corpus

        return make_corpus(spec)
    if "task" in spec:
        return make_task(spec)
    raise ValueError(f"data needs one of 'task' ({', '.join(TASKS)}), 'text', 'binidx', 'sft' or 'corpus'; "
                     f"got {sorted(spec)}")
