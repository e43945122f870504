"""Checkpoints: detect a file's format and version, load it into a model, save models.

``rwkv_zoo.load(path)`` asks each registered format (hook ``rwkv_zoo_register_formats``) whether it
recognises the path, reads the tensors under the **official key names**, infers the version and every
dimension from the keys and shapes (LoRA ranks included; nothing hard-coded), builds the model on the
meta device and loads with ``assign=True`` and strict key checks: the weights exist once in memory.

``rwkv_zoo.save(model, path)`` writes rwkv_zoo safetensors (``.safetensors``; metadata with the version
and config, read back without guessing), an official ``.pth`` (anything else), or another registered
format by name. Every write goes to a temporary file that is renamed over the target, so an interrupted
save leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo import pluginmanager
from rwkv_zoo.errors import CheckpointError, UnknownNameError, check_device_usable, parse_device, parse_dtype
from rwkv_zoo.fileio import atomic_path

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Checkpoint:
    """Tensors under official key names, plus what the format knew about them."""

    tensors: dict[str, Tensor]
    format: str
    path: str
    metadata: dict[str, str] = field(default_factory=dict)


class CheckpointFormat:
    """A checkpoint format plugin. Subclass it and register an instance through
    ``rwkv_zoo_register_formats``. ``read`` returns tensors renamed to the official keys;
    ``write`` takes official keys and writes this format's layout."""

    name: str = ""
    description: str = ""
    writable: bool = False

    def detect(self, path: Path) -> bool:
        """Cheap check (extension, magic bytes, a config file): is ``path`` in this format?"""
        raise NotImplementedError

    def read(self, path: Path, *, mmap: bool = True) -> Checkpoint:
        raise NotImplementedError

    def read_shapes(self, path: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]] | None:
        """Shapes and dtypes by official key, and metadata, without loading weights (None: unsupported)."""
        return None

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        raise CheckpointError(f"the {self.name} format cannot be written")


# ---------------------------------------------------------------------------------------------------
# Format registry


_formats = pluginmanager.NamedRegistry("rwkv_zoo_register_formats", CheckpointFormat, "format")


def get_formats() -> dict[str, CheckpointFormat]:
    """Registered formats by name, in registration order (the order ``detect_format`` asks them)."""
    return _formats.get()


def list_formats() -> list[dict[str, Any]]:
    return [{"name": f.name, "writable": f.writable, "description": f.description} for f in get_formats().values()]


def describe_bytes(head: bytes) -> str:
    """What a file that is not a checkpoint seems to be, from its first bytes, for an error message."""
    if not head:
        return "an empty file (0 bytes)"
    text = None
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = next((line for line in text.splitlines() if line.strip()), "")
        return f"a text file starting with {first[:24]!r}" if first else "a text file of blank lines"
    return f"binary data of an unknown kind, starting with {head[:8]!r}"


def resolve_run_path(path: str | os.PathLike) -> Path:
    """The model file behind a training run folder or one of its checkpoint folders, else ``path``.

    A run folder (``out_dir`` of ``rwkv-zoo train``: a ``checkpoints/`` folder inside) gives its newest
    complete checkpoint's ``model.safetensors``; a checkpoint folder (``step-N/``: ``model.safetensors``
    next to ``trainer.pt``) gives its own.
    """
    p = Path(path)
    if not p.is_dir():
        return p
    if (p / "model.safetensors").is_file() and (p / "trainer.pt").is_file():
        return p / "model.safetensors"
    ckpts = p / "checkpoints"
    if ckpts.is_dir():
        # Listed rather than read from the ``latest`` pointer, which a kill can leave one behind.
        done = sorted(c for c in ckpts.glob("step-*")
                      if (c / "model.safetensors").is_file() and (c / "trainer.pt").is_file())
        if not done:
            raise CheckpointError(f"{p} is a training run folder without a finished checkpoint yet (nothing in "
                                  f"{ckpts}); train longer or give a checkpoint file")
        return done[-1] / "model.safetensors"
    return p


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    p = resolve_run_path(path)
    if not p.exists():
        raise CheckpointError(f"no such file or directory: {p}")
    if p.is_file() and not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: permission denied (the file cannot be read)")
    for fmt in get_formats().values():
        try:
            if fmt.detect(p):
                return fmt
        except OSError:
            continue
    names = ", ".join(get_formats()) or "none"
    if p.is_dir():
        raise CheckpointError(
            f"{p} is a folder that no checkpoint format recognises (folder formats want a config.json next to "
            f"the weights); give a checkpoint file, or an HF/fla model folder (formats: {names})"
        )
    with open(p, "rb") as f:
        head = f.read(64)
    raise CheckpointError(
        f"{p}: not a checkpoint format rwkv_zoo recognises: {describe_bytes(head)} (formats: {names}; a .pth or "
        ".safetensors file, or a model folder)"
    )


# ---------------------------------------------------------------------------------------------------
# Version and dimension inference from official keys and shapes


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _common_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """n_layer, n_embd, vocab_size and dim_ffn: what every version's checkpoint shows the same way."""
    keys = list(shapes)
    if "emb.weight" not in shapes or "head.weight" not in shapes:
        found = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
        raise CheckpointError(
            f"not an RWKV language model: no emb.weight/head.weight among the keys ({found}); supported: {supported()}"
        )
    V, C = shapes["emb.weight"]
    layers = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    if not layers:
        raise CheckpointError("no blocks.N.* keys: not an RWKV checkpoint")
    L = max(layers) + 1
    if sorted(layers) != list(range(L)):
        raise CheckpointError(f"blocks are not numbered 0..{L - 1}: missing {sorted(set(range(L)) - layers)}")
    F = shapes.get("blocks.0.ffn.key.weight", (None,))[0]
    return {"n_layer": L, "n_embd": C, "vocab_size": V, "dim_ffn": F}


def supported() -> str:
    from rwkv_zoo.registry import get_versions

    return ", ".join(f"{s.name} ({s.title})" for s in get_versions().values() if s.detect is not None)


def candidates(shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """Every registered version whose ``detect`` claims these keys, as ``(version, build kwargs)``, and
    the refusals that detectors raised for near misses (a v5.0 file, pre-release v7 names)."""
    from rwkv_zoo.registry import get_versions

    common = _common_dims(shapes)
    found, refusals = [], []
    for spec in get_versions().values():
        if spec.detect is None:
            continue
        try:
            kw = spec.detect(shapes)
        except CheckpointError as e:
            refusals.append(str(e))
            continue
        if kw is not None:
            found.append((spec.name, {**common, **kw}))
    return found, refusals


def infer_model(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, dict[str, Any]]:
    """``(version, build kwargs)`` from official keys and their shapes.

    Each version's ``detect`` is asked; when several claim a file (a DeepEmbed v7 file also has every
    v7 key), the one whose model has exactly the file's keys wins (built on the meta device: no
    memory). Keys a version's ``fix_checkpoint`` would add (v7's optional layer-0 v0/v1/v2) count as
    present.
    """
    from rwkv_zoo.registry import build, get_version

    found, refusals = candidates(shapes)
    if not found:
        if refusals:
            raise CheckpointError(refusals[0] + f". Supported: {supported()}")
        raise CheckpointError(f"keys and shapes match no known RWKV version; supported: {supported()}")
    if len(found) == 1 and not refusals:
        return found[0]
    scored = []
    for version, kw in found:
        try:
            model = build(version, device="meta", init=False, **kw)
        except (ValueError, TypeError) as e:
            scored.append((10**9, version, kw, str(e)))
            continue
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        fix = get_version(version).fix_checkpoint
        optional = set(model.unused_parameters()) if fix is not None else set()
        present = set(shapes) | (optional & set(expected))
        mismatch = len(present ^ set(expected)) + sum(
            1 for k in set(shapes) & set(expected) if tuple(shapes[k]) != expected[k])
        scored.append((mismatch, version, kw, ""))
    scored.sort(key=lambda t: t[0])
    best = scored[0]
    if best[0] and refusals:
        raise CheckpointError(refusals[0] + f". Supported: {supported()}")
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------------
# Loading


def _check_against(model, tensors: Mapping[str, Tensor], path: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if extra:
        problems.append(f"unexpected keys: {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
    for k in sorted(set(expected) & set(tensors)):
        if tuple(tensors[k].shape) != expected[k]:
            problems.append(f"{k}: expected shape {list(expected[k])}, found {list(tensors[k].shape)}")
    if problems:
        raise CheckpointError(f"{path} does not fit a {model.version} model: " + "; ".join(problems[:12]))


def _model_dtype(tensors: Mapping[str, Tensor], path: str) -> torch.dtype:
    for k, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
            raise CheckpointError(f"{path}: {k} has dtype {t.dtype}, which is not supported (supported: {names})")
    return tensors["emb.weight"].dtype


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    mmap: bool = True,
    format: str | None = None,
    weights: str | None = None,
):
    """Load a checkpoint of any registered format into a model (in eval mode).

    ``path`` may also be a training run folder (its newest checkpoint) or one checkpoint folder of it.

    ``weights="fp32" | "bf16" | "int8" | "int4"`` prepares the model for inference with its projection weights
    in that format (``rwkv_zoo.inference.prepare_inference``; activations and state stay fp32).

    The format and version are detected; ``dtype=None`` keeps the checkpoint's dtype (that of
    ``emb.weight``); ``dtype`` and ``device`` take the names ``build`` takes (``"bf16"``, ``"cuda:1"``).
    Official state-tuning keys (``blocks.N.att.time_state``) become ``model.initial_state``, which the
    model starts from when called with ``state=None``.
    """
    from rwkv_zoo.registry import build, get_version

    # Names are checked before any byte is read: a typo should not cost a multi-GB read first.
    dtype = parse_dtype(dtype)
    target_device = parse_device(device) or torch.device("cpu")
    check_device_usable(target_device)
    if format is not None and format not in get_formats():
        raise UnknownNameError(f"unknown checkpoint format {format!r}; formats: {', '.join(get_formats())}")
    path = resolve_run_path(path)
    fmt = get_formats()[format] if format else detect_format(path)
    ckpt = fmt.read(path, mmap=mmap)
    tensors = dict(ckpt.tensors)
    time_state = {k: tensors.pop(k) for k in [k for k in tensors if k.endswith(".att.time_state")]}
    meta_config = ckpt.metadata.get("config")
    if meta_config:
        cfg = json.loads(meta_config)
        version = ckpt.metadata["version"]
        kwargs = {k: v for k, v in cfg.items() if v is not None}
    else:
        version, kwargs = infer_model({k: tuple(v.shape) for k, v in tensors.items()})
    model = build(version, device="meta", init=False, backend=backend, **kwargs)
    fix = get_version(version).fix_checkpoint
    if fix is not None:
        fix(tensors, model)
    _check_against(model, tensors, str(path))
    # With weights= the file's dtype is kept here (mmap, no copy): prepare_inference converts per matrix.
    target_dtype = dtype or _model_dtype(tensors, str(path))
    converted = {k: v.to(device=target_device, dtype=target_dtype) for k, v in tensors.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    rescale = int(ckpt.metadata.get("rescale_every", "0") or 0)
    if rescale:
        model.rescale_every = rescale  # the file holds rescaled weights (written that way on purpose)
    if time_state:
        from rwkv_zoo.state import RWKVState

        model.initial_state = RWKVState.from_time_state(model, time_state)
    model.checkpoint_format = fmt.name
    if weights is not None:
        from rwkv_zoo.inference import prepare_inference

        del converted, tensors, ckpt  # each projection is converted and its source dropped in turn
        prepare_inference(model, weights)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Saving


def official_tensors(model, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The model's weights under official keys, un-rescaled, detached and contiguous."""
    every = getattr(model, "rescale_every", 0)
    out = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        if every and (m := _BLOCK.match(k)) and (k.endswith("att.output.weight") or k.endswith("ffn.value.weight")):
            t = t * (2 ** (int(m.group(1)) // every))
        out[k] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def export_tensors(model, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``official_tensors`` plus, for a state-tuned model (``model.initial_state``), the official
    ``blocks.N.att.time_state`` keys ([H, V, K] fp32): the file BlinkDL's ``rwkv`` package and
    RWKV-Runner load with the tuned state merged in."""
    out = official_tensors(model, dtype)
    if getattr(model, "initial_state", None) is not None:
        out.update(model.initial_state.to_time_state())
    return out


def model_metadata(model) -> dict[str, str]:
    from rwkv_zoo._version import __version__

    return {
        "format": "rwkv_zoo",
        "version": model.version,
        "config": json.dumps(model.config.to_dict()),
        "rwkv_zoo_version": __version__,
    }


def save(model, path: str | os.PathLike, *, format: str | None = None, dtype: str | torch.dtype | None = None) -> None:
    """Write ``model``: ``.safetensors`` -> rwkv_zoo safetensors, else an official ``.pth``;
    ``format=`` picks any writable registered format (e.g. ``"hf"`` for a transformers RWKV-4 folder)."""
    if getattr(model, "inference_weights", None):
        raise CheckpointError(
            f"this model was prepared for inference ({model.inference_weights} weights, projections replaced): "
            "save the original model instead"
        )
    p = Path(path)
    if format is None:
        format = "safetensors" if p.suffix == ".safetensors" else "official-pth"
    formats = get_formats()
    if format not in formats or not formats[format].writable:
        writable = ", ".join(n for n, f in formats.items() if f.writable)
        raise CheckpointError(f"cannot write format {format!r}; writable formats: {writable}")
    formats[format].write(official_tensors(model, parse_dtype(dtype)), p, model_metadata(model))


def check_save_target(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Refuse a target whose folder is missing or not writable (or, for a file format, is a folder).

    Checked before writing because every write goes through a temporary file next to the target: the
    OSError would name that temporary file, which the user never mentioned.
    """
    p = Path(path)
    parent = p.absolute().parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist; create it first"
        raise CheckpointError(f"cannot save to {p}: the folder {parent} {what}")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot save to {p}: permission denied (the folder {parent} is not writable)")
    if not folder and p.is_dir():
        raise CheckpointError(f"cannot save to {p}: it is a folder; give a file name")


def write_atomically(path: Path, writer: Callable[[str], None], suffix: str = "") -> None:
    """Write one file through ``writer(tmp)`` and a rename (folder formats create their folders instead)."""
    check_save_target(path)
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
