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
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo import pluginmanager

SUPPORTED = "RWKV-4, RWKV-5.2 (Eagle), RWKV-6.0 (Finch) and RWKV-7 x070 (Goose)"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit: the message says what was found and expected."""


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


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    for fmt in get_formats().values():
        try:
            if fmt.detect(p):
                return fmt
        except OSError:
            continue
    names = ", ".join(get_formats()) or "none"
    raise CheckpointError(f"{p}: not a checkpoint format rwkv_zoo recognises (formats: {names})")


# ---------------------------------------------------------------------------------------------------
# Version and dimension inference from official keys and shapes


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def infer_model(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, dict[str, Any]]:
    """``(version, build kwargs)`` from official keys and their shapes (SPEC.md §3.2, 4.2, 5.2, 6.2)."""
    keys = list(shapes)
    if "emb.weight" not in shapes or "head.weight" not in shapes:
        found = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
        raise CheckpointError(
            f"not an RWKV language model: no emb.weight/head.weight among the keys ({found}); supported: {SUPPORTED}"
        )
    V, C = shapes["emb.weight"]
    layers = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    if not layers:
        raise CheckpointError("no blocks.N.* keys: not an RWKV checkpoint")
    L = max(layers) + 1
    if sorted(layers) != list(range(L)):
        raise CheckpointError(f"blocks are not numbered 0..{L - 1}: missing {sorted(set(range(L)) - layers)}")
    has = lambda frag: any(frag in k for k in keys)  # noqa: E731
    F = shapes.get("blocks.0.ffn.key.weight", (None,))[0]
    kw: dict[str, Any] = {"n_layer": L, "n_embd": C, "vocab_size": V, "dim_ffn": F}
    prerelease = [f for f in (".att.time_aaaaa", ".att.time_misc_", ".att.xx_", ".att.ww_", ".att.aa_w") if has(f)]
    if prerelease:
        raise CheckpointError(
            f"pre-release RWKV-7 naming ({', '.join(f.removeprefix('.att.') + '*' for f in prerelease)}): only the "
            f"final x070 names (x_r, w0, r_k, ...) are supported; rename the keys first"
        )
    if has("att.r_k") or has("att.w0") or has("att.x_r"):
        _, N = shapes["blocks.0.att.r_k"]
        layer = 1 if L > 1 else 0  # layer 0 may lack v1 (Nov-2024 files)
        v1 = shapes.get(f"blocks.{layer}.att.v1") or shapes.get("blocks.0.att.v1")
        kw.update(head_size=N, dim_w_lora=shapes["blocks.0.att.w1"][1], dim_a_lora=shapes["blocks.0.att.a1"][1],
                  dim_g_lora=shapes["blocks.0.att.g1"][1])
        if v1 is not None:
            kw["dim_v_lora"] = v1[1]
        return "v7", kw
    if has("time_maa"):
        _, N = shapes["blocks.0.att.time_faaaa"]
        kw.update(head_size=N, dim_mix_lora=shapes["blocks.0.att.time_maa_w1"][1] // 5,
                  dim_decay_lora=shapes["blocks.0.att.time_decay_w1"][1])
        return "v6", kw
    if has("ln_x"):
        decay = shapes.get("blocks.0.att.time_decay", ())
        if len(decay) == 2 and decay[1] > 1:
            kw["head_size"] = decay[1]
            if has("att.time_first"):
                raise CheckpointError("v5.2-shaped decay with a v5.0 time_first bonus: unknown variant")
            return "v5", kw
        variant = "v5.1" if has("gate.weight") else "v5.0"
        raise CheckpointError(
            f"this is an {variant} checkpoint (one decay per head: time_decay shape {tuple(decay)}); "
            f"only v5.2 (time_decay of shape (H, N)) is supported. Supported: {SUPPORTED}"
        )
    if has("att.time_first") and has("att.time_decay"):
        return "v4", kw
    raise CheckpointError(f"keys and shapes match no known RWKV version; supported: {SUPPORTED}")


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
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    mmap: bool = True,
    format: str | None = None,
    weights: str | None = None,
):
    """Load a checkpoint of any registered format into a model (in eval mode).

    ``weights="fp32" | "bf16" | "int8"`` prepares the model for inference with its projection weights
    in that format (``rwkv_zoo.inference.prepare_inference``; activations and state stay fp32).

    The format and version are detected; ``dtype=None`` keeps the checkpoint's dtype (that of
    ``emb.weight``). Official state-tuning keys (``blocks.N.att.time_state``) become
    ``model.initial_state``, which the model starts from when called with ``state=None``.
    """
    from rwkv_zoo.registry import build

    fmt = get_formats()[format] if format else detect_format(path)
    ckpt = fmt.read(Path(path), mmap=mmap)
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
    if version == "v7":
        _fill_unused_v7(model, tensors)
    _check_against(model, tensors, str(path))
    # With weights= the file's dtype is kept here (mmap, no copy): prepare_inference converts per matrix.
    target_dtype = dtype or _model_dtype(tensors, str(path))
    target_device = torch.device(device) if device is not None else torch.device("cpu")
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


def _fill_unused_v7(model, tensors: dict[str, Tensor]) -> None:
    # Nov-2024 x070 files lack layer 0's v0/v1/v2, which no layer 0 uses (SPEC §6.1): add zeros.
    ref = tensors["emb.weight"]
    for name, p in model.state_dict().items():
        if name in model.unused_parameters() and name not in tensors:
            tensors[name] = torch.zeros(p.shape, dtype=ref.dtype)


# ---------------------------------------------------------------------------------------------------
# Saving


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):  # mkstemp makes 0600 files; a saved model gets the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            if os.path.isdir(tmp):
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.unlink(tmp)
        raise


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


def model_metadata(model) -> dict[str, str]:
    from rwkv_zoo import __version__

    return {
        "format": "rwkv_zoo",
        "version": model.version,
        "config": json.dumps(model.config.to_dict()),
        "rwkv_zoo_version": __version__,
    }


def save(model, path: str | os.PathLike, *, format: str | None = None, dtype: torch.dtype | None = None) -> None:
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
    formats[format].write(official_tensors(model, dtype), p, model_metadata(model))


def write_atomically(path: Path, writer: Callable[[str], None], suffix: str = "") -> None:
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
