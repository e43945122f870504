"""LoRA on rwkv_zoo models through Hugging Face ``peft``: wrap, save, load back, merge.

    from rwkv_zoo import lora
    tuned = lora.apply(model, r=8)                     # a peft.PeftModel; only the adapter trains
    ...train tuned like the model itself: tuned(tokens, state) -> (logits, state)...
    lora.save_adapter(tuned, "adapter/")               # adapter_config.json + adapter_model.safetensors
    tuned = lora.load_adapter(rwkv_zoo.load("base.pth"), "adapter/")
    merged = lora.merge(tuned)                         # a plain RWKV again: rwkv_zoo.save(merged, "out.pth")

Targets are the official key names of the projections (``att.key``, ``ffn.value``, ...): peft matches a
target against the end of a module's name, so ``att.key`` is every layer's ``blocks.N.att.key``. The
default is every official projection the model has (v5/v6 add ``att.gate``; v7's channel-mix has no
receptance); the head and the versions' own low-rank factors (``time_maa_w1``, v7's ``w1`` ...) are
plain parameters, not ``nn.Linear``, and stay frozen.

As RWKV-PEFT does, two small groups can train beside the adapter:

- ``train_norms``: every LayerNorm/GroupNorm (``ln0``, ``ln1``, ``ln2``, ``att.ln_x``, ``ln_out``),
  through peft's own ``modules_to_save``, so they are in ``adapter_model.safetensors`` and peft alone
  (``PeftModel.from_pretrained``) restores them;
- ``train_mixes``: the token-shift mix vectors (``time_mix_*``, ``time_maa_*``, v7's ``x_*``). These
  are parameters of the time-mix modules, not modules, which ``modules_to_save`` cannot hold (it would
  copy whole time-mix modules, projections included), so they train in place on the base model and are
  saved beside the adapter in ``rwkv_zoo_params.safetensors`` under their official keys;
  ``load_adapter`` puts them back (plain peft loading leaves the base model's values).

``merge`` folds everything into the weights (``merge_and_unload``) and returns the plain ``RWKV``, so
merged logits equal the adapted model's, and the fused CPU step runs again. An unmerged model runs its
modules layer by layer: the fused step refuses modules other than the exact ones it implements.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rwkv_zoo import fused
from rwkv_zoo.errors import CheckpointError, ConfigError
from rwkv_zoo.model import _mix_like

if TYPE_CHECKING:
    from peft import PeftModel

# Every projection an official RWKV block has (v4-v7, v7a, v8), by official key; a model is given the
# ones it has.
PROJECTIONS = (
    "att.receptance", "att.key", "att.value", "att.output", "att.gate",
    "ffn.receptance", "ffn.key", "ffn.value",
)
NORMS = ("ln0", "ln1", "ln2", "ln_x", "ln_out")
PARAMS_FILE = "rwkv_zoo_params.safetensors"
PARAMS_FORMAT = "rwkv_zoo.adapter_params/1"


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs Hugging Face peft: pip install 'rwkv-zoo[finetune]' (or peft)") from exc
    return peft


def _names(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def available_targets(model: nn.Module) -> list[str]:
    """The official projection names (``att.key`` ...) that ``model`` has as ``nn.Linear`` layers."""
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        for t in PROJECTIONS:
            if name.endswith("." + t) and t not in found:
                found.append(t)
    return [t for t in PROJECTIONS if t in found]


def _check_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    have = available_targets(model)
    targets = list(targets)
    if not targets:
        raise ConfigError("LoRA targets: give at least one projection, e.g. att.key")
    bad = [t for t in targets if t not in have]
    if bad:
        raise ConfigError(f"LoRA targets {', '.join(bad)} are not projections of this model; "
                          f"it has {', '.join(have)}")
    return targets


def _norm_modules(model: nn.Module) -> list[str]:
    norms = (nn.LayerNorm, nn.GroupNorm)
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, norms)}
    return [n for n in NORMS if n in present]


def mix_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The token-shift mix vectors by official key (``blocks.0.att.time_maa_k`` ...)."""
    return {name: p for name, p in model.named_parameters() if _mix_like(name) and p.squeeze().dim() <= 1}


def config(model: nn.Module, *, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
           targets: Sequence[str] | None = None, train_norms: bool = False) -> Any:
    """The ``peft.LoraConfig`` for ``model``: rank ``r``, ``alpha`` (default ``2 r``: scale 2), the
    official projection names ``targets`` (default: all the model has)."""
    peft = _peft()
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"LoRA rank must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = _check_targets(model, targets if targets is not None else available_targets(model))
    return peft.LoraConfig(
        r=r,
        lora_alpha=float(2 * r if alpha is None else alpha),
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=_norm_modules(model) if train_norms else None,
        bias="none",
    )


def apply(model: nn.Module, *, r: int = 8, alpha: float | None = None, dropout: float = 0.0,
          targets: Sequence[str] | None = None, train_norms: bool = False, train_mixes: bool = False) -> PeftModel:
    """Wrap ``model`` (an ``RWKV``) for LoRA training: a ``peft.PeftModel`` whose only trainable
    parameters are the adapter (and the norms / mix vectors if asked). It is called like the model.

    The adapter's ``B`` starts at zero, so the wrapped model computes exactly what ``model`` did."""
    peft = _peft()
    cfg = config(model, r=r, alpha=alpha, dropout=dropout, targets=targets, train_norms=train_norms)
    fused.invalidate(model)  # a fused step chosen or built for the plain modules no longer applies
    wrapped = peft.get_peft_model(model, cfg)
    if train_mixes:
        for p in mix_parameters(model).values():
            p.requires_grad_(True)
    wrapped.rwkv_zoo_train_mixes = train_mixes
    return wrapped


def base_model(wrapped: PeftModel) -> nn.Module:
    """The ``RWKV`` inside a ``PeftModel`` (its projections still wrapped until ``merge``)."""
    return wrapped.get_base_model()


def _write_dir(directory: str | os.PathLike, fill) -> None:
    """Write a folder under a temporary name beside it and swap it in only when complete."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():  # safetensors writes 0600 files; these get what any other file gets
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(wrapped: PeftModel, directory: str | os.PathLike) -> None:
    """Save the adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``) and,
    when mix vectors were trained, ``rwkv_zoo_params.safetensors``. The folder is replaced whole."""
    from safetensors.torch import save_file

    base = base_model(wrapped)

    def fill(tmp: Path) -> None:
        wrapped.save_pretrained(str(tmp), safe_serialization=True)
        if getattr(wrapped, "rwkv_zoo_train_mixes", False):
            tensors = {k: p.detach().contiguous().cpu() for k, p in mix_parameters(base).items()}
            meta = {"format": PARAMS_FORMAT, "version": str(getattr(base, "version", ""))}
            save_file(tensors, str(tmp / PARAMS_FILE), metadata=meta)

    _write_dir(directory, fill)


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = False) -> PeftModel:
    """``model`` with the adapter saved in ``directory`` (peft's format), ready to run or to train on
    (``trainable=True``). Mix vectors saved beside it replace the model's own (the model is changed)."""
    peft = _peft()
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} is not a peft adapter folder (no adapter_config.json)")
    with open(directory / "adapter_config.json") as f:
        kind = json.load(f).get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{directory}: adapter type {kind!r}, not LORA")
    cfg = peft.LoraConfig.from_pretrained(str(directory))
    targets = cfg.target_modules
    _check_targets(model, [targets] if isinstance(targets, str) else sorted(targets))
    extra = directory / PARAMS_FILE
    if extra.is_file():
        _load_params(model, extra)
    fused.invalidate(model)
    wrapped = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    wrapped.rwkv_zoo_train_mixes = extra.is_file()
    if trainable and extra.is_file():
        for p in mix_parameters(model).values():
            p.requires_grad_(True)
    return wrapped


def _load_params(model: nn.Module, path: Path) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != PARAMS_FORMAT:
            raise CheckpointError(f"{path}: metadata format {meta.get('format')!r}, not {PARAMS_FORMAT!r}")
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            p = params.get(key)
            t = f.get_tensor(key)
            if p is None or p.shape != t.shape:
                raise CheckpointError(f"{path}: {key} {list(t.shape)} does not fit this model "
                                      f"({'no such parameter' if p is None else list(p.shape)})")
            with torch.no_grad():
                p.copy_(t)


def merge(wrapped: PeftModel) -> nn.Module:
    """Fold the adapter (and trained norms) into the weights: the plain ``RWKV``, official keys again.

    Mix vectors trained in place are already the model's. The wrapper is consumed."""
    model = wrapped.merge_and_unload()
    fused.invalidate(model)
    for p in model.parameters():
        p.requires_grad_(True)  # a plain model again: every parameter trainable, as rwkv_zoo.build makes it
    return model


def merged_tensors(wrapped: PeftModel) -> dict[str, torch.Tensor]:
    """What ``merge`` would give, as official-key tensors, leaving ``wrapped`` as it is (training goes
    on): each adapted projection's ``W + scale B A`` (peft's own delta), trained norms, the rest as is."""
    peft = _peft()
    from peft.tuners.lora import LoraLayer

    wrapper_cls = peft.utils.other.ModulesToSaveWrapper
    base = base_model(wrapped)
    adapter = wrapped.active_adapter
    out: dict[str, torch.Tensor] = {}
    done: list[str] = []  # prefixes of modules handled whole (their children are peft's internals)
    with torch.no_grad():
        for name, mod in base.named_modules():
            if any(name.startswith(p + ".") for p in done):
                continue
            if isinstance(mod, LoraLayer):
                w = mod.get_base_layer().weight
                out[f"{name}.weight"] = (w + mod.get_delta_weight(adapter).to(w.dtype)).detach()
                done.append(name)
            elif isinstance(mod, wrapper_cls):
                for pn, p in mod.modules_to_save[adapter].named_parameters():
                    out[f"{name}.{pn}"] = p.detach()
                done.append(name)
            else:
                for pn, p in mod.named_parameters(recurse=False):
                    out[f"{name}.{pn}" if name else pn] = p.detach()
    return out
