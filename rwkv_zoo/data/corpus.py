"""A real-text corpus every machine has without a download: the Python standard library's own sources.

``stdlib_corpus()`` reads every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (installed
packages in ``site-packages``/``dist-packages`` and ``__pycache__`` left out), byte level (tokens
0..255), and splits it **by file**: a file is held out when the first 8 bytes of the SHA-256 of its
relative path (``/``-separated), read as an integer, fall below ``heldout`` of the 64-bit range. The
split therefore depends only on the path, not on the file list or the machine, and no file is on both
sides. Training files come first in the stream (sorted by path), then the held-out ones; training
windows never cross into the held-out part.

The text differs between Python versions (the stdlib changes), so bits per byte are comparable only
at the same Python minor version: ``describe()`` names it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from rwkv_zoo.data.tokens import TokenStream

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def is_heldout(relpath: str, heldout: float) -> bool:
    """Whether the file at ``relpath`` (``/``-separated) is held out: a pure function of the path."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h < heldout * 2**64


def stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Relative ``/``-separated paths of the stdlib's ``.py`` files, sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def split_files(files: list[str], heldout: float) -> tuple[list[str], list[str]]:
    train = [f for f in files if not is_heldout(f, heldout)]
    held = [f for f in files if is_heldout(f, heldout)]
    return train, held


@dataclass
class SplitTokenStream(TokenStream):
    """A ``TokenStream`` whose held-out part starts at a fixed index (a file boundary)."""

    split_at: int = 0
    train_files: int = 0
    heldout_files: int = 0

    def split_point(self, seq_len: int) -> int:
        n = len(self.tokens)
        if self.split_at < seq_len + 1 or n - self.split_at < seq_len + 1:
            raise ValueError(f"{self.name}: {self.split_at} training and {n - self.split_at} held-out tokens are "
                             f"too few for windows of {seq_len + 1} tokens; use a shorter ctx_len")
        return self.split_at

    def describe(self) -> str:
        return (f"{self.name}: {self.train_files} training files ({self.split_at:,} bytes), {self.heldout_files} "
                f"held-out files ({len(self.tokens) - self.split_at:,} bytes)")


@functools.lru_cache(maxsize=4)
def _load(root: str, heldout: float, max_bytes: int | None) -> tuple[bytes, int, int, int]:
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"corpus 'stdlib': no .py files under {root}")
    train, held = split_files(files, heldout)
    if not train or not held:
        raise ValueError(f"corpus 'stdlib': heldout={heldout} leaves {len(train)} training and {len(held)} held-out "
                         f"files; use a fraction between 0 and 1")

    def read(names: list[str]) -> bytes:
        parts, total = [], 0
        for name in names:
            data = Path(root, name).read_bytes()
            parts.append(data)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        return b"".join(parts)[:max_bytes] if max_bytes is not None else b"".join(parts)

    # Held-out text is capped at a tenth of max_bytes (at least 64 KiB): evaluation reads its start.
    tr = read(train)
    hd = read(held) if max_bytes is None else read(held)[: max(65536, max_bytes // 10)]
    return tr + hd, len(tr), len(train), len(held)


def stdlib_corpus(heldout: float = 0.1, max_bytes: int | None = None, root: str | None = None) -> SplitTokenStream:
    """The stdlib sources as a byte-level ``SplitTokenStream`` (see the module docstring).

    ``max_bytes``: read training files (in path order) until this many bytes, to bound memory.
    """
    import numpy as np

    if not 0.0 < float(heldout) < 1.0:
        raise ValueError(f"corpus 'stdlib': heldout must be between 0 and 1, got {heldout}")
    if max_bytes is not None and int(max_bytes) < 4096:
        raise ValueError(f"corpus 'stdlib': max_bytes must be >= 4096, got {max_bytes}")
    root = str(root or sysconfig.get_paths()["stdlib"])
    data, split, n_train, n_held = _load(root, float(heldout), None if max_bytes is None else int(max_bytes))
    tokens = np.frombuffer(data, dtype=np.uint8)
    name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
    return SplitTokenStream(tokens, 256, name, 1.0, 0.0, split_at=split, train_files=n_train, heldout_files=n_held)


CORPORA = {"stdlib": stdlib_corpus}


def make_corpus(spec: dict) -> SplitTokenStream:
    """``{"corpus": "stdlib", "heldout": 0.1, "max_bytes": N}``."""
    spec = dict(spec)
    name = spec.pop("corpus")
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; corpora: {', '.join(CORPORA)}")
    unknown = sorted(set(spec) - {"heldout", "max_bytes", "root"})
    if unknown:
        raise ValueError(f"corpus {name!r}: unknown option(s) {', '.join(unknown)}; options: heldout, max_bytes, root")
    return CORPORA[name](**spec)
