"""BlinkDL's official ``.pth``: a ``torch.save``d dict whose keys are the official names."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, describe_bytes, write_atomically

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
        _check_looks_like_torch(path)
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


def _check_looks_like_torch(path: Path) -> None:
    """Refuse a file that is neither a torch zip archive nor a legacy torch pickle before torch reads it.

    torch would fail deep inside its unpickler on such a file (``KeyError: 101`` for a text file), or
    call a 1-byte file a pickle that "could run code": neither tells the user what the file is.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK") or head[:2] in _PICKLE_MAGIC:
        return
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint: {describe_bytes(head)}; expected a torch.save'd state dict "
        f"(.pth) or a .safetensors file"
    )


def _torch_load(path: Path, mmap: bool):
    """torch.load limited to tensors, with torch's failures turned into one sentence about the file."""
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if not is_zip and magic == b"PK":
        # A zip archive whose central directory (at the end) is missing: the download or copy was cut.
        raise CheckpointError(f"{path}: truncated checkpoint (the zip archive has no end); download or save it again")
    try:
        # mmap needs the zip format (torch >= 1.6 saves); older files load without it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "Unsupported operand" in text:
            # A pickle with objects in it (a whole nn.Module, an optimizer), or one written by plain
            # pickle: refusing it is what weights_only is for. torch's advice to turn that off is not repeated.
            what = "Python objects other than tensors" if "GLOBAL" in text else "pickle data torch.save does not write"
            raise CheckpointError(
                f"{path}: refused to unpickle it: it holds {what}, and loading that could run code; save the "
                "weights alone with torch.save(model.state_dict(), path)"
            ) from None
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (unpickling failed); download or save it "
                              "again") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, IndexError, ValueError) as exc:
        # torch's own messages run to several sentences; the first says which part broke.
        first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first}); download or save it again") from None
