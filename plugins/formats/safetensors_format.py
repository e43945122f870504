"""rwkv_zoo safetensors: official keys, and metadata (version, config, rwkv_zoo version) so that
loading needs no guessing. Plain safetensors files with official keys and no metadata load too."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, write_atomically

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte length, then JSON), checked against the file's size.

    Reads no weights, yet a truncated file is refused here: the header promises where every tensor
    ends, so ``inspect`` (which reads only this) cannot report a file that ``load`` would fail on.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            what = "an empty file" if not raw else f"{len(raw)} bytes"
            raise CheckpointError(f"{path}: not a safetensors file ({what}; even the header length is missing)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or n > size - 8:
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated: its first 8 bytes give a header of {n} bytes "
                f"and the file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(
        isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= set(v) and len(v["data_offsets"]) == 2
        for v in tensors.values()
    ):
        raise CheckpointError(f"{path}: not a safetensors file, or corrupt: its header is not a table of tensors")
    end = 8 + n + max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size:,} bytes, its header promises {end:,}); download or "
            "save it again"
        )
    return header


class SafetensorsFormat(CheckpointFormat):
    name = "safetensors"
    description = "rwkv_zoo safetensors: official keys + metadata (version, config)"
    writable = True

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".safetensors"

    def read_shapes(self, path: Path):
        header = read_header(path)
        meta = header.pop("__metadata__", None) or {}
        shapes = {k: (tuple(v["shape"]), _DTYPES.get(v["dtype"], v["dtype"])) for k, v in header.items()}
        return shapes, meta

    def read(self, path: Path, *, mmap: bool = True) -> Checkpoint:
        from safetensors import safe_open

        read_header(path)  # refuses a truncated file before safetensors maps it
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: corrupt safetensors file ({exc}); download or save it again") from None
        # rwkv_zoo.train/1: a training checkpoint's model.safetensors, official keys and config metadata too.
        if meta.get("format") not in (None, "rwkv_zoo", "pt", "rwkv_zoo.train/1"):
            raise CheckpointError(f"{path}: safetensors metadata says format {meta.get('format')!r}, not a model")
        return Checkpoint(tensors, self.name, str(path), meta)

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        from safetensors.torch import save_file

        write_atomically(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)), ".safetensors")
