"""Shared plumbing for Hugging Face style model folders (``config.json`` + weights), used by the
``hf`` and ``fla`` formats: finding the folder, reading its config and weight files (single or
sharded safetensors / ``pytorch_model.bin``), shapes without loading, and atomic folder writes.

Weights are read the way the single-file formats read them: safetensors through ``safe_open`` with
truncation checks, ``.bin`` files with ``torch.load(weights_only=True)`` (a pickle cannot run code)
and ``mmap`` where the file allows it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import CheckpointError

from .official import _torch_load
from .safetensors_format import _DTYPES, read_header

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def is_weight_file(name: str) -> bool:
    """Files that hold (or index) weights in an HF folder; a rewrite of the folder replaces them all."""
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))


def folder_of(path: Path) -> Path | None:
    """The model folder ``path`` names: the folder itself, or the folder of a weight file / config
    inside it (so ``load("repo/model.safetensors")`` reads the whole folder). None if not a folder model."""
    if path.is_dir():
        return path if (path / CONFIG).is_file() else None
    if path.is_file() and (path.name == CONFIG or is_weight_file(path.name)) and (path.parent / CONFIG).is_file():
        return path.parent
    return None


def read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG}: unreadable config ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / CONFIG}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def detect_folder(
    path: Path, model_types, is_layout: Callable[[list[str]], bool], config_says: Callable[[dict], bool]
) -> bool:
    """The shared ``detect`` of folder formats: a config.json with one of ``model_types``, then the
    stored key names decide (``is_layout``); if the weights cannot be read, the config alone
    (``config_says``), so that ``read`` gets to report what is wrong with them."""
    folder = folder_of(path)
    if folder is None:
        return False
    try:
        cfg = read_config(folder)
    except CheckpointError:
        return False
    if cfg.get("model_type") not in model_types:
        return False
    try:
        keys = stored_keys(folder)
    except CheckpointError:
        keys = []
    return is_layout(keys) if keys else config_says(cfg)


def _index(folder: Path, name: str) -> list[Path]:
    try:
        weight_map = json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / name}: unreadable shard index ({type(exc).__name__}: {exc})") from None
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        p = folder / shard
        if not p.is_file():
            raise CheckpointError(f"{folder / name} names the shard {shard}, which is missing")
        files.append(p)
    return files


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in the order transformers prefers: safetensors (sharded or not),
    then ``pytorch_model.bin`` (sharded or not)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return _index(folder, SAFETENSORS_INDEX)
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if (folder / BIN_INDEX).is_file():
        return _index(folder, BIN_INDEX)
    if (folder / BIN).is_file():
        return [folder / BIN]
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise CheckpointError(
        f"{folder}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}); found: {found}"
    )


def _checked_header(path: Path) -> dict:
    return read_header(path)  # which also refuses a truncated file


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open

    _checked_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None


def _load_bin(path: Path, mmap: bool) -> dict[str, Tensor]:
    obj = _torch_load(path, mmap)
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def load_tensors(folder: Path, *, mmap: bool = True) -> dict[str, Tensor]:
    """Every tensor of the folder under its stored name (shards merged; a name in two shards is an error)."""
    out: dict[str, Tensor] = {}
    for f in weight_files(folder):
        part = _load_safetensors(f) if f.suffix == ".safetensors" else _load_bin(f, mmap)
        twice = sorted(set(part) & set(out))
        if twice:
            raise CheckpointError(f"{f}: keys already read from another shard: {', '.join(twice[:5])}")
        out.update(part)
    return out


def load_meta(folder: Path) -> dict[str, Tensor]:
    """Meta-device tensors with each stored tensor's shape and dtype, read from headers where the
    format has them (safetensors) and from a memory-mapped ``torch.load`` otherwise."""
    out: dict[str, Tensor] = {}
    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            for k, v in _checked_header(f).items():
                if k != "__metadata__":
                    dtype = _DTYPES.get(v["dtype"])
                    if dtype is None:
                        raise CheckpointError(f"{f}: {k} has dtype {v['dtype']}, which is not supported")
                    out[k] = torch.empty(v["shape"], dtype=dtype, device="meta")
        else:
            out.update({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in _load_bin(f, True).items()})
    return out


def stored_keys(folder: Path) -> list[str]:
    """Tensor names without reading weights: shard index, safetensors header, or a mmap'd ``.bin``."""
    for name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / name).is_file():
            try:
                return list(json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"])
            except (OSError, ValueError, KeyError, TypeError):
                return []
    return list(load_meta(folder))


# ---------------------------------------------------------------------------------------------------
# Atomic folder writes


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_folder_atomically(path: Path, fill: Callable[[Path], None], *, keep: Callable[[str], bool]) -> None:
    """Build the folder in a temporary directory next to ``path``, then put it in place.

    Files of an existing folder that ``keep(name)`` accepts (tokenizer files, README, ...) are carried
    over (hard links where possible); the rest (old weights, old config) are replaced. The old folder
    is swapped out in one atomic step where the OS allows (``renameat2``), otherwise by two renames;
    either way ``path`` never holds a half-written folder, and a failure before the swap leaves the old
    folder untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; an HF checkpoint is a folder")
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        carried = set()
        if path.is_dir():
            for entry in path.iterdir():
                if entry.is_file() and keep(entry.name):
                    try:
                        os.link(entry, tmp / entry.name)
                    except OSError:
                        shutil.copy2(entry, tmp / entry.name)
                    carried.add(entry.name)
        fill(tmp)
        for entry in tmp.iterdir():  # safetensors writes 0600; give new files the usual permissions
            if entry.name not in carried and entry.is_file():
                os.chmod(entry, 0o666 & ~umask)
        if not path.exists():
            os.rename(tmp, path)
            return
        if _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
        os.rmdir(old)
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise



def write_hf_folder(path: Path, tensors: dict[str, Tensor], config: dict, metadata) -> None:
    """An HF-style folder: ``model.safetensors`` (metadata ``format: pt``, which transformers requires),
    ``config.json``, and for a World-vocabulary model (65536 rows) ``rwkv_vocab_v20230424.txt``, which
    the RWKV org's and fla-hub's repos ship and llama.cpp's converter reads. Written atomically; the
    other files of an existing folder are kept."""
    from rwkv_zoo.tokenizers import WORLD_VOCAB_FILE, WORLD_VOCAB_SIZE, TokenizerError, find_world_vocab

    vocab = None
    if config.get("vocab_size") == WORLD_VOCAB_SIZE:
        try:
            vocab = find_world_vocab()
        except TokenizerError:
            vocab = None  # the folder is still complete; only llama.cpp's converter wants the file

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        st_meta = {"format": "pt"}
        if metadata.get("rwkv_zoo_version"):
            st_meta["rwkv_zoo_version"] = metadata["rwkv_zoo_version"]
        save_file(tensors, str(tmp / SAFETENSORS), metadata=st_meta)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if vocab is not None and not (tmp / WORLD_VOCAB_FILE).exists():
            shutil.copyfile(vocab, tmp / WORLD_VOCAB_FILE)

    write_folder_atomically(Path(path), fill, keep=lambda name: name != CONFIG and not is_weight_file(name))
