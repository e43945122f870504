"""The RWKV World chat format, as ``rwkv-zoo chat`` writes it: turns ``Role: text`` separated by a blank
line, the reply after ``Assistant:``, and the reply ending at the next blank line.

Each message is tokenized on its own and the ids concatenated, so a conversation's ids start with the
ids of every earlier turn (and of its system prompt): those prefixes are what the prefix cache reuses.
A blank line inside a message would read as the end of a turn, so runs of newlines become one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["ROLES", "STOP", "render_chat"]

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STOP = "\n\n"  # a reply ends at a blank line


def _clean(text: str) -> str:
    return re.sub(r"\n\s*\n", "\n", text.strip().replace("\r\n", "\n"))


def render_chat(messages: Sequence[tuple[str, str]], tokenizer) -> tuple[list[int], int]:
    """``(ids, system_len)`` for ``(role, text)`` messages: the prompt that asks for the next assistant
    reply, and the length of its leading system messages' ids (0 without any)."""
    ids: list[int] = []
    system_len = 0
    leading = True
    for role, text in messages:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        ids += tokenizer.encode(f"{ROLES[role]}: {_clean(text)}\n\n")
        if leading and ROLES[role] == "System":
            system_len = len(ids)
        else:
            leading = False
    ids += tokenizer.encode("Assistant:")
    return ids, system_len
