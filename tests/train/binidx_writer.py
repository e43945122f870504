"""A minimal writer of RWKV-LM / Megatron ``.bin`` + ``.idx`` files, for test fixtures.

Layout of ``.idx`` (little endian): magic ``MMIDIDX\\0\\0``, u64 version 1, u8 dtype code, u64 number
of sequences, u64 number of doc_idx entries, then int32 sizes, int64 byte pointers, int64 doc_idx.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def write_binidx(prefix: str | Path, documents: list[list[int]], dtype=np.uint16) -> Path:
    prefix = Path(prefix)
    arrays = [np.asarray(d, dtype=dtype) for d in documents]
    with open(prefix.with_suffix(".bin"), "wb") as f:
        for a in arrays:
            f.write(a.tobytes(order="C"))
    sizes = np.array([len(a) for a in arrays], dtype=np.int32)
    pointers = np.zeros(len(arrays), dtype=np.int64)
    if len(arrays) > 1:
        pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize)
    doc_idx = np.arange(len(arrays) + 1, dtype=np.int64)
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())
    return prefix
