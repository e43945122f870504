"""Versions, size presets and ``build()``.

Versions register through the ``rwkv_zoo_register_versions`` hook (the built-ins too). A size preset
names a shape shared by every version that has it, so ablations compare like with like:
``0.1B`` = 12 x 768, ``0.4B`` = 24 x 1024, ``1.5B`` = 24 x 2048, ``3B`` = 32 x 2560, ``7B`` = 32 x 4096,
``14B`` = 61 x 4096. Release labels (``"1B6"``, ``"1.6B"``, ``"2.9B"``, ``"169M"``) are aliases, matched
case-insensitively; shapes no other version shares carry a prefix (``pile-14B`` = 40 x 5120).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rwkv_zoo import pluginmanager
from rwkv_zoo.backend import MODES
from rwkv_zoo.errors import UnknownNameError, check_device_usable, parse_device, parse_dtype

DIM_ARGS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn")
# Options that turn a build into a hybrid: ``build("v6", size="1.5B", time_mix="v5")`` is routed to the
# version named HYBRID_VERSION with ``base="v6"``, sized by v6's preset (see plugins/hybrids.py).
HYBRID_OPTIONS = ("time_mix", "channel_mix", "layers")
HYBRID_VERSION = "hybrid"


@dataclass(frozen=True)
class SizePreset:
    """A named shape. ``options`` holds version options (LoRA dims, ...) that the release used."""

    name: str
    n_layer: int
    n_embd: int
    vocab_size: int
    aliases: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    released: bool = True
    params: str = ""  # the parameter count as the release names it
    note: str = ""
    # Where the release's shape (and LoRA ranks) is attested independently of this code: a model card,
    # the official demo, a conversion script. "" for a released preset means unverified.
    source: str = ""

    @property
    def verified(self) -> bool:
        return bool(self.source) and "unverified" not in self.source

    def dims(self) -> dict[str, Any]:
        return {"n_layer": self.n_layer, "n_embd": self.n_embd, "vocab_size": self.vocab_size, **dict(self.options)}


@dataclass
class VersionSpec:
    """Everything the core knows about one version, declared by the version's own file.

    - ``config_cls``: a ``RWKVConfig`` subclass (its fields are the build options);
    - ``block_cls``: the version's ``Block`` (its ``time_mix_cls`` and ``channel_mix_cls`` are what a
      hybrid takes from this version); ``model_factory`` defaults to ``RWKV(config, block_cls)``;
    - ``sizes``: presets with release aliases; ``param_groups``: the official optimizer groups (default:
      weight decay on matrices, no learning-rate multipliers);
    - ``detect(shapes) -> build kwargs | None``: recognise an official checkpoint from its keys and
      shapes (it may raise ``CheckpointError`` for a near miss it can name, e.g. a v5.0 file);
      ``fix_checkpoint(tensors, model)``: fix-ups before loading (timm's ``checkpoint_filter_fn``);
    - ``relative_cost``: training cost per token relative to v4 at equal size (schedules long ablation
      runs first);
    - ``lr_scales``: the learning-rate multipliers of its parameter groups, by name fragment (what
      ``param_groups`` uses; hybrids merge their components').
    """

    name: str
    title: str
    config_cls: type
    model_factory: Callable[[Any], nn.Module] | None = None
    sizes: Sequence[SizePreset] = ()
    param_groups: Callable[..., list[dict[str, Any]]] | None = None
    block_cls: type | None = None
    default_vocab: int = 65536
    wkv_op: str = ""
    description: str = ""
    detect: Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any] | None] | None = None
    fix_checkpoint: Callable[[dict[str, Any], nn.Module], None] | None = None
    relative_cost: float = 2.0
    lr_scales: Mapping[str, float] = field(default_factory=dict)
    provider: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.param_groups is None:
            from rwkv_zoo.model import official_param_groups

            scales = dict(self.lr_scales)

            def groups(model, weight_decay: float = 0.0):  # weight decay on matrices, lr_scales multipliers
                return official_param_groups(model, weight_decay, scales)

            self.param_groups = groups
        if self.model_factory is None:
            if self.block_cls is None:
                raise ValueError(f"version {self.name!r}: give block_cls= or model_factory=")
            from rwkv_zoo.model import RWKV

            block_cls = self.block_cls
            self.model_factory = lambda cfg: RWKV(cfg, block_cls)

    def make_model(self, config: Any) -> nn.Module:
        model = self.model_factory(config)
        model.version = self.name  # the registered name, not a parent config's class attribute
        return model

    def preset(self, size: str) -> SizePreset:
        key = str(size).strip().lower()
        for p in self.sizes:
            if key == p.name.lower() or key in (a.lower() for a in p.aliases):
                return p
        names = ", ".join(p.name for p in self.sizes)
        raise UnknownNameError(f"unknown size {size!r} for {self.name}; sizes: {names} (aliases: {self._aliases()})")

    def _aliases(self) -> str:
        return ", ".join(f"{a}->{p.name}" for p in self.sizes for a in p.aliases) or "none"


@dataclass(frozen=True)
class BuildSpec:
    """What ``build`` was asked for, passed to ``rwkv_zoo_model_built``."""

    version: str
    size: str | None
    config: Any
    device: str | None
    dtype: torch.dtype | None
    backend: str | None


_versions = pluginmanager.NamedRegistry("rwkv_zoo_register_versions", VersionSpec, "version")


def get_versions() -> dict[str, VersionSpec]:
    return _versions.get()


def list_versions() -> list[str]:
    return sorted(get_versions())


def list_models(pattern: str | None = None, *, released_only: bool = False) -> list[str]:
    """Every ``"<version>-<size>"`` name, optionally filtered by a wildcard pattern (``"v6-*"``)."""
    names = []
    for v in sorted(get_versions().values(), key=lambda s: s.name):
        for p in v.sizes:
            if released_only and not p.released:
                continue
            names.append(f"{v.name}-{p.name}")
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
    return names


def _lookup(name: str) -> VersionSpec | None:
    """A version by name, case-insensitively (``"V7"`` is ``"v7"``)."""
    versions = get_versions()
    if name in versions:
        return versions[name]
    folded = {k.lower(): v for k, v in versions.items()}
    return folded.get(name.lower())


def get_version(name: str) -> VersionSpec:
    spec = _lookup(str(name).strip())
    if spec is None:
        known = ", ".join(sorted(get_versions())) or "none (did every version plugin fail? see rwkv-zoo plugins)"
        raise UnknownNameError(f"unknown version {name!r}; versions: {known}")
    return spec


def resolve(name_or_version: str, size: str | None = None) -> tuple[VersionSpec, str | None]:
    """Split ``"v6-1.5B"`` into its version and size; ``("v6", "1.5B")`` passes through. Case-insensitive."""
    name = str(name_or_version).strip()
    spec = _lookup(name)
    if spec is not None:
        return spec, size
    # The longest registered version name that prefixes "<version>-<size>" (a version name may hold "-").
    for i in [i for i, ch in enumerate(name) if ch == "-"][::-1]:
        spec = _lookup(name[:i])
        if spec is not None:
            if size is not None:
                raise ValueError(f"{name!r} already names a size; do not also pass size={size!r}")
            return spec, name[i + 1:]
    get_version(name)  # raises with the list
    raise AssertionError("unreachable")


def make_config(
    spec: VersionSpec, size: str | None, dims: dict[str, Any], options: dict[str, Any],
    size_spec: VersionSpec | None = None,
):
    """The version's config from a preset (of ``size_spec``, default ``spec``) or explicit dims."""
    size_spec = size_spec or spec
    given = {k: v for k, v in dims.items() if v is not None}
    valid = spec.config_cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        extra = [n for n in valid if n not in DIM_ARGS]
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {spec.name}; its options are: {', '.join(extra) or 'none'}"
        )
    if size is not None:
        if given:
            raise ValueError(
                f"size= and explicit dimensions are exclusive: got size={size!r} and "
                f"{', '.join(f'{k}={v}' for k, v in given.items())}; use one or the other"
            )
        kwargs = size_spec.preset(size).dims()
    else:
        if "n_layer" not in given or "n_embd" not in given:
            raise ValueError(
                f"build({spec.name!r}) needs size= (one of {', '.join(p.name for p in spec.sizes)}) "
                f"or at least n_layer= and n_embd="
            )
        kwargs = {"vocab_size": size_spec.default_vocab, **given}
    kwargs.update(options)
    return spec.config_cls(**kwargs)


def build(
    name_or_version: str,
    size: str | None = None,
    *,
    n_layer: int | None = None,
    n_embd: int | None = None,
    vocab_size: int | None = None,
    head_size: int | None = None,
    dim_ffn: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    mode: str | None = None,
    init: bool = True,
    **version_options: Any,
) -> nn.Module:
    """Build a model: ``build("v6", size="1.5B")``, ``build("v6-1.5B")`` or explicit dimensions.

    ``device="meta"`` builds any size instantly with no memory. ``init=True`` applies the version's
    official initialisation (skipped on meta). ``backend`` forces a kernel backend for this model and
    ``mode`` (``"chunk"`` or ``"recurrent"``) a kernel mode; both stay settable as ``model.backend`` and
    ``model.mode`` (None = let dispatch decide). ``dtype`` is a ``torch.dtype`` or a name (``"bf16"``,
    ``"bfloat16"``, ``"fp32"``, ``"half"``, ...); ``device`` a ``torch.device`` or a name (``"cuda:1"``).
    """
    dtype = parse_dtype(dtype)
    target = parse_device(device) or torch.device("cpu")
    if target.type != "meta":
        check_device_usable(target)
    spec, size = resolve(name_or_version, size)
    size_spec = spec
    if spec.name != HYBRID_VERSION and any(k in version_options for k in HYBRID_OPTIONS):
        if HYBRID_VERSION not in get_versions():
            used = ", ".join(k for k in HYBRID_OPTIONS if k in version_options)
            raise ValueError(f"{used} make a hybrid model, but no plugin registers the {HYBRID_VERSION!r} version")
        size_spec, spec = spec, get_version(HYBRID_VERSION)
        version_options = {"base": size_spec.name, **version_options}
    dims = {"n_layer": n_layer, "n_embd": n_embd, "vocab_size": vocab_size, "head_size": head_size,
            "dim_ffn": dim_ffn}
    config = make_config(spec, size, dims, version_options, size_spec=size_spec)
    if mode is not None and mode not in MODES:
        raise UnknownNameError(f"unknown mode {mode!r}; modes are {', '.join(MODES)} (or None for automatic)")
    if backend is not None:
        from rwkv_zoo.dispatch import get_backends

        if backend not in get_backends():
            raise UnknownNameError(f"unknown backend {backend!r}; backends: {', '.join(sorted(get_backends()))}")
    if init and target.type != "meta":
        # Allocate once and initialise once: torch's default init would be overwritten anyway.
        with torch.device("meta"):
            model = spec.make_model(config)
        model.to_empty(device=target)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))  # any parameter the version's init forgets shows up as NaN
        model.init_weights()
    else:
        with target:
            model = spec.make_model(config)
    if dtype is not None:
        model.to(dtype=dtype)
    model.backend = backend
    model.mode = mode
    canonical = size_spec.preset(size).name if size is not None else None
    model.size_name = canonical
    build_spec = BuildSpec(spec.name, canonical, config, str(device) if device else None, dtype, backend)
    pluginmanager.get_plugin_manager().hook.rwkv_zoo_model_built(model=model, spec=build_spec)
    return model
