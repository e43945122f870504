"""Language-model data: a flat stream of token ids, sampled in windows.

Sources:

- ``text_file(path)``: a plain text file read byte by byte (tokens 0..255, memory-mapped), or with a
  tokenizer (anything with ``encode(str) -> list[int]``);
- ``binidx(prefix)``: RWKV-LM's ``prefix.bin`` / ``prefix.idx`` datasets (the Megatron ``MMIDIDX``
  layout that RWKV-LM's ``make_data.py`` writes), memory-mapped. Like RWKV-LM, the documents are read
  as one stream (the trainer samples windows across document boundaries).

``TokenStream.batch(seed, step, n, seq_len)`` draws ``n`` windows of ``seq_len + 1`` tokens at random
places of the training part, as a pure function of (seed, step): no data position to save, and every
rank of a distributed run can take its own rows of the same global batch. The last
``eval_fraction`` of the stream (at least one window) is held out; ``eval_batch`` walks it in order.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo.data.synthetic import step_generator

BINIDX_MAGIC = b"MMIDIDX\x00\x00"
# Megatron / RWKV-LM dtype codes of the .idx header (code 6 is float64 there, as numpy's old np.float).
BINIDX_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float64", 8: "uint16"}


@dataclass
class TokenStream:
    """Token ids ``tokens`` (a 1-D numpy array or memmap), with what the metrics need to know.

    ``bytes_per_token``: UTF-8 bytes per token of the text (1.0 for byte-level), for bits per byte.
    """

    tokens: Any
    vocab_size: int
    name: str = ""
    bytes_per_token: float | None = None
    eval_fraction: float = 0.01

    def __len__(self) -> int:
        return len(self.tokens)

    def split_point(self, seq_len: int) -> int:
        """Index where the held-out part starts (it has room for at least one window)."""
        n = len(self.tokens)
        held = max(seq_len + 1, int(n * self.eval_fraction))
        if n - held < seq_len + 1:
            raise ValueError(f"{self.name or 'data'}: {n} tokens are too few for windows of {seq_len + 1} tokens "
                             f"plus a held-out part; use a shorter ctx_len or more data")
        return n - held

    def _windows(self, starts: list[int], seq_len: int) -> tuple[Tensor, Tensor]:
        import numpy as np

        rows = np.stack([np.asarray(self.tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
        seq = torch.from_numpy(rows)
        return seq[:, :-1], seq[:, 1:].clone()

    def batch(self, seed: int, step: int, n: int, seq_len: int, split: str = "train") -> tuple[Tensor, Tensor]:
        """``n`` windows: inputs [n, seq_len] and next-token targets [n, seq_len]."""
        if split != "train":
            return self.eval_batch(step, n, seq_len)
        hi = self.split_point(seq_len) - seq_len - 1  # last valid start
        g = step_generator(seed, step)
        starts = torch.randint(0, hi + 1, (n,), generator=g).tolist()
        return self._windows(starts, seq_len)

    def eval_batch(self, index: int, n: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` of consecutive held-out windows (wrapping around the held-out part)."""
        lo = self.split_point(seq_len)
        count = max(1, (len(self.tokens) - lo - 1) // seq_len)
        starts = [lo + ((index * n + i) % count) * seq_len for i in range(n)]
        return self._windows(starts, seq_len)

    def eval_windows(self, seq_len: int) -> int:
        return max(1, (len(self.tokens) - self.split_point(seq_len) - 1) // seq_len)


def text_file(path: str | os.PathLike, tokenizer: Any = None, eval_fraction: float = 0.01) -> TokenStream:
    """A plain text file as a token stream: bytes (vocab 256, memory-mapped) or ``tokenizer.encode``.

    ``tokenizer``: None or ``"bytes"`` (byte level), a name or file for ``rwkv_zoo.tokenizers.get_tokenizer``
    (``"world"``, a ``tokenizer.json``), or any object with ``encode(str) -> list[int]``.
    """
    import numpy as np

    path = os.fspath(path)
    if isinstance(tokenizer, str) and tokenizer.lower() in ("bytes", "byte"):
        tokenizer = None
    elif isinstance(tokenizer, (str, os.PathLike)):
        from rwkv_zoo.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(tokenizer)
    if tokenizer is None:
        tokens = np.memmap(path, dtype=np.uint8, mode="r")
        return TokenStream(tokens, 256, os.path.basename(path), 1.0, eval_fraction)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    vocab = int(getattr(tokenizer, "vocab_size", int(ids.max()) + 1))
    bpt = len(text.encode("utf-8")) / max(1, len(ids))
    return TokenStream(ids, vocab, os.path.basename(path), bpt, eval_fraction)


@dataclass(frozen=True)
class BinIdxIndex:
    """The ``.idx`` header and arrays: ``dtype`` of the tokens, ``sizes`` (tokens per document),
    ``pointers`` (byte offset of each document in ``.bin``) and ``doc_idx``."""

    dtype: str
    sizes: Any
    pointers: Any
    doc_idx: Any


def read_binidx_index(path: str | os.PathLike) -> BinIdxIndex:
    import numpy as np

    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(9)
        if magic != BINIDX_MAGIC:
            raise ValueError(f"{path} is not a binidx index: it starts with {magic!r}, not {BINIDX_MAGIC!r}")
        (version,) = struct.unpack("<Q", f.read(8))
        if version != 1:
            raise ValueError(f"{path}: binidx index version {version} is not supported (only 1)")
        (code,) = struct.unpack("<B", f.read(1))
        if code not in BINIDX_DTYPES:
            raise ValueError(f"{path}: unknown dtype code {code}; known: {BINIDX_DTYPES}")
        (n_seq,) = struct.unpack("<Q", f.read(8))
        (n_doc,) = struct.unpack("<Q", f.read(8))
        offset = f.tell()
    buf = np.memmap(path, mode="r", dtype=np.uint8)
    sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=offset + sizes.nbytes)
    doc_idx = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=offset + sizes.nbytes + pointers.nbytes)
    return BinIdxIndex(BINIDX_DTYPES[code], sizes, pointers, doc_idx)


def binidx(prefix: str | os.PathLike, vocab_size: int | None = None, eval_fraction: float = 0.01) -> TokenStream:
    """RWKV-LM's ``prefix.bin`` + ``prefix.idx`` as one memory-mapped token stream.

    ``vocab_size`` defaults to the largest id + 1 (a full scan; pass it for big files, e.g. 65536 for
    the World tokenizer).
    """
    import numpy as np

    prefix = os.fspath(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    index = read_binidx_index(prefix + ".idx")
    tokens = np.memmap(prefix + ".bin", mode="r", dtype=np.dtype(index.dtype))
    expected = int(index.sizes.sum(dtype=np.int64))
    if len(tokens) != expected:
        raise ValueError(f"{prefix}.bin holds {len(tokens)} tokens but {prefix}.idx describes {expected}")
    if vocab_size is None:
        vocab_size = int(tokens.max()) + 1 if len(tokens) else 1
    return TokenStream(tokens, vocab_size, os.path.basename(prefix), None, eval_fraction)


def bits_per_byte(loss_nats: float, bytes_per_token: float | None) -> float | None:
    """Bits per UTF-8 byte from a mean loss per token in nats (None when bytes per token is unknown)."""
    if bytes_per_token is None or not bytes_per_token > 0:
        return None
    return loss_nats / math.log(2) / bytes_per_token
