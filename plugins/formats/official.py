"""BlinkDL's official ``.pth``: a ``torch.save``d dict whose keys are the official names."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, write_atomically

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class OfficialPth(CheckpointFormat):
    name = "official-pth"
    description = "BlinkDL .pth (torch.save of the official state dict); read with weights_only=True and mmap"
    writable = True

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix in (".pth", ".pt"):
            return True
        with open(path, "rb") as f:
            head = f.read(4)
        return head.startswith(b"PK") or head[:2] in _PICKLE_MAGIC

    def read(self, path: Path, *, mmap: bool = True) -> Checkpoint:
        obj = _torch_load(path, mmap)
        if not isinstance(obj, Mapping):
            found = type(obj).__name__
            raise CheckpointError(f"{path}: expected a dict of tensors (an official state dict), found {found}")
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")
        return Checkpoint(dict(obj), self.name, str(path))

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        # The official layout has no metadata: key names and shapes say everything.
        write_atomically(path, lambda tmp: torch.save(dict(tensors), tmp))


def _torch_load(path: Path, mmap: bool):
    try:
        # mmap needs the zip format (torch >= 1.6 saves); older files load without it.
        use_mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle it: the file holds Python objects other than tensors, and loading "
            f"them could run code (torch.load weights_only=True). Only plain state dicts are accepted. ({exc})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {exc})") from None
