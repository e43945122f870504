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
    """The JSON header of a safetensors file (8-byte length, then JSON), without touching the weights."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000 or n > path.stat().st_size - 8:
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n})")
        try:
            return json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None


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

        header = read_header(path)
        size = path.stat().st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
        if 8 + hlen + end > size:
            promised = 8 + hlen + end
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises {promised})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
        if meta.get("format") not in (None, "rwkv_zoo", "pt"):
            raise CheckpointError(f"{path}: safetensors metadata says format {meta.get('format')!r}, not a model")
        return Checkpoint(tensors, self.name, str(path), meta)

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        from safetensors.torch import save_file

        write_atomically(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)), ".safetensors")
