"""Hybrid models for cross-version ablations: time-mix and channel-mix of any version, per layer.

    build("v6", size="1.5B", time_mix="v5", channel_mix="v4")   # v6 shape, v5 time-mix, v4 channel-mix
    build("v7", n_layer=4, n_embd=256, layers="v7,v7,v6,v6")     # per layer (an entry "v7/v4" = tm/cm)
    build("hybrid", size="tiny", base="v6", time_mix="v7")       # the same thing, spelled directly

``build`` routes the options ``time_mix``, ``channel_mix`` and ``layers`` to the version registered
here, named ``hybrid``, with ``base`` set to the version named in the call, whose size preset gives the
shape (``rwkv_zoo.registry.HYBRID_OPTIONS``). Each layer is an ordinary ``Block`` whose time-mix and
channel-mix are the unmodified classes of the named versions, built from that version's own config
(its LoRA dims and defaults), so a v5 time-mix in a hybrid is exactly a v5 time-mix and its parameters
have the official names. The state interface is the usual one: each layer carries the state its
time-mix needs (the ``(a, b, p)`` triple for v4 layers, ``[B, H, K, V]`` for v5-v7).

The model's ``version`` is ``"hybrid"`` (so ``rwkv_zoo.param_groups`` finds the union of the official
parameter groups), and its state identity names the per-layer plan (``hybrid[v5/v4,v5/v4]``), so a
state from a plain v6 or from another hybrid is rejected. ``dim_ffn`` is one width for every layer:
by default the channel-mix version's own width when every layer uses the same channel-mix (4 C for
v4 and v7, 3.5 C for v5 and v6), else the base version's. In a v7 layer the value residual lerps
toward the value of the first v7 layer (whose ``v0``/``v1``/``v2`` are unused, as in layer 0 of v7).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from torch import nn

from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.model import RWKV, Block, RWKVConfig, official_param_groups
from rwkv_zoo.registry import SizePreset, VersionSpec, get_version, get_versions
from rwkv_zoo.state import ModelIdentity

NAME = "hybrid"
DIMS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn")


def components() -> dict[str, tuple[type, type, type]]:
    """``{version: (config class, time-mix class, channel-mix class)}`` for every registered version that
    declares a ``block_cls`` (the built-ins and any third party's), this plugin's own excepted."""
    out = {}
    for name, spec in get_versions().items():
        if name != NAME and spec.block_cls is not None:
            out[name] = (spec.config_cls, spec.block_cls.time_mix_cls, spec.block_cls.channel_mix_cls)
    return out


def component_options() -> list[str]:
    """The options of every component version (LoRA dims, ...), which a hybrid config passes through."""
    names: list[str] = []
    for cfg_cls, _, _ in components().values():
        names += [f.name for f in fields(cfg_cls) if f.name not in DIMS and f.name not in names]
    return names


def _check_version(v: str, what: str) -> str:
    v = str(v).strip()
    comps = components()
    if v not in comps:
        folded = {k.lower(): k for k in comps}
        v = folded.get(v.lower(), v)  # names are case-insensitive
    if v not in comps:
        raise ValueError(f"hybrid: {what} {v!r} is not a version with blocks; use one of {', '.join(comps)}")
    return v


def parse_layers(layers: str | Sequence[str]) -> list[tuple[str, str]]:
    """``"v7,v7,v6/v4"`` -> ``[("v7", "v7"), ("v7", "v7"), ("v6", "v4")]`` (entry = tm or tm/cm)."""
    entries = [e.strip() for e in layers.split(",")] if isinstance(layers, str) else [str(e).strip() for e in layers]
    plan = []
    for e in entries:
        tm, _, cm = e.partition("/")
        plan.append((_check_version(tm, "time_mix"), _check_version(cm or tm, "channel_mix")))
    return plan


@dataclass(init=False)
class HybridConfig(RWKVConfig):
    """Shared dimensions, the per-layer plan, and the options of the component versions (``options``)."""

    base: str = "v7"
    time_mix: str | None = None
    channel_mix: str | None = None
    layers: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    version: ClassVar[str] = NAME

    def __init__(self, n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64, dim_ffn: int | None = None,
                 base: str = "v7", time_mix: str | None = None, channel_mix: str | None = None,
                 layers: str | Sequence[str] | None = None, options: dict[str, Any] | None = None, **more: Any):
        self.n_layer, self.n_embd, self.vocab_size, self.head_size, self.dim_ffn = (
            n_layer, n_embd, vocab_size, head_size, dim_ffn)
        self.base, self.time_mix, self.channel_mix, self.layers = base, time_mix, channel_mix, layers
        self.options = {**(options or {}), **{k: v for k, v in more.items() if v is not None}}
        self.__post_init__()

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)] + component_options()

    def __post_init__(self) -> None:
        self.base = _check_version(self.base, "base")
        unknown = sorted(set(self.options) - set(component_options()))
        if unknown:
            raise ValueError(f"hybrid: unknown option(s) {', '.join(unknown)}; options of the component versions: "
                             f"{', '.join(component_options()) or 'none'}")
        if self.layers is not None:
            if self.time_mix is not None or self.channel_mix is not None:
                raise ValueError("hybrid: give either layers= or time_mix=/channel_mix=, not both "
                                 "(a layers entry 'v6/v4' sets a layer's time-mix and channel-mix)")
            if not isinstance(self.layers, str):
                self.layers = ",".join(self.layers)
            self.plan = parse_layers(self.layers)
            if len(self.plan) != self.n_layer:
                raise ValueError(f"hybrid: layers names {len(self.plan)} layers ({self.layers}) but n_layer="
                                 f"{self.n_layer}; give one entry per layer or n_layer={len(self.plan)}")
        else:
            tm = _check_version(self.time_mix or self.base, "time_mix")
            cm = _check_version(self.channel_mix or self.base, "channel_mix")
            self.plan = [(tm, cm)] * self.n_layer
        # Instance attribute: heads only matter when some time-mix has heads (v5-v7).
        comps = components()
        self.has_heads = any(comps[tm][0].has_heads for tm, _ in self.plan)
        super().__post_init__()

    def default_dim_ffn(self) -> int:
        cms = {cm for _, cm in self.plan}
        owner = cms.pop() if len(cms) == 1 else self.base
        return self.component(owner, dim_ffn=None).dim_ffn

    def component(self, version: str, **override: Any) -> RWKVConfig:
        """The config of one component version: the shared dimensions plus that version's options."""
        cls = components()[version][0]
        names = {f.name for f in fields(cls)}
        kwargs = {k: getattr(self, k) for k in DIMS if k in names}
        kwargs.update({k: v for k, v in self.options.items() if k in names})
        kwargs.update(override)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """The plan as it would be written in ``layers=``: ``v5/v4,v5/v4``."""
        return ",".join(tm if tm == cm else f"{tm}/{cm}" for tm, cm in self.plan)


@functools.cache
def block_class(tm: str, cm: str) -> type[Block]:
    """A ``Block`` with the time-mix of version ``tm`` and the channel-mix of version ``cm``."""
    comps = components()
    time_mix, channel_mix = comps[tm][1], comps[cm][2]

    def make_time_mix(config: HybridConfig, layer_id: int) -> nn.Module:
        return time_mix(config.component(tm), layer_id)

    def make_channel_mix(config: HybridConfig, layer_id: int) -> nn.Module:
        return channel_mix(config.component(cm), layer_id)

    name = f"Hybrid{tm.upper()}{cm.upper()}Block"
    return type(name, (Block,), {"time_mix_cls": staticmethod(make_time_mix),
                                 "channel_mix_cls": staticmethod(make_channel_mix),
                                 "__module__": __name__, "__qualname__": name,
                                 "__doc__": f"Block with the {tm} time-mix and the {cm} channel-mix."})


def hybrid_block(config: HybridConfig, layer_id: int) -> Block:
    """The block factory ``RWKV`` calls once per layer."""
    return block_class(*config.plan[layer_id])(config, layer_id)


class HybridModel(RWKV):
    """An ``RWKV`` whose layers come from different versions (see the module docstring)."""

    config: HybridConfig

    @property
    def identity(self) -> ModelIdentity:
        ident = super().identity
        return ModelIdentity(f"{NAME}[{self.config.describe()}]", ident.n_layer, ident.n_embd, ident.n_head,
                             ident.head_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={self.config.describe()}"


def lr_scales(versions) -> dict[str, float]:
    """The learning-rate multipliers of every component version (``VersionSpec.lr_scales``), longest
    fragment first so that the more specific one wins (v6's ``time_decay_w`` 1x before ``time_decay`` 2x)."""
    merged: dict[str, float] = {}
    for v in versions:
        for fragment, scale in get_version(v).lr_scales.items():
            merged.setdefault(fragment, scale)
    return dict(sorted(merged.items(), key=lambda kv: -len(kv[0])))


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """The union of the official groups of the versions the model's layers come from."""
    used = {v for pair in model.config.plan for v in pair}
    return official_param_groups(model, weight_decay, lr_scales(sorted(used)))


def _shared_sizes() -> tuple[SizePreset, ...]:
    """Every preset name of v4-v7 whose shape agrees across the versions that have it, with the union
    of their options; aliases that mean different shapes in different versions are dropped."""
    by_name: dict[str, list[tuple[str, SizePreset]]] = {}
    for version in components():
        for p in get_version(version).sizes:
            by_name.setdefault(p.name, []).append((version, p))
    shape_of_label: dict[str, set] = {}
    for name, entries in by_name.items():
        for _, p in entries:
            for label in (name, *p.aliases):
                shape_of_label.setdefault(label.lower(), set()).add((p.n_layer, p.n_embd, p.vocab_size))
    out = []
    for name, entries in by_name.items():
        shapes = {(p.n_layer, p.n_embd, p.vocab_size) for _, p in entries}
        if len(shapes) != 1:
            continue
        options: dict[str, Any] = {}
        aliases: list[str] = []
        for _, p in entries:
            for k, val in p.options:
                options.setdefault(k, val)
            aliases += [a for a in p.aliases if len(shape_of_label[a.lower()]) == 1 and a not in aliases]
        L, C, V = shapes.pop()
        versions = ", ".join(v for v, _ in entries)
        out.append(SizePreset(name, L, C, V, aliases=tuple(aliases), options=tuple(sorted(options.items())),
                              released=False, note=f"shape of {versions}"))
    return tuple(out)


class _LazySizes(tuple):
    """The shared presets, computed when first asked (the component versions may register after this
    plugin), and again whenever the set of versions changed."""

    def __new__(cls):
        return super().__new__(cls)

    def _current(self) -> tuple[SizePreset, ...]:
        return _shared_sizes_cached(tuple(sorted(components())))

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __getitem__(self, i):
        return self._current()[i]

    def __bool__(self) -> bool:
        return True


@functools.lru_cache(maxsize=8)
def _shared_sizes_cached(_versions: tuple[str, ...]) -> tuple[SizePreset, ...]:
    return _shared_sizes()


SPEC = VersionSpec(
    name=NAME,
    title="Hybrid (time-mix and channel-mix of any version, per layer)",
    config_cls=HybridConfig,
    model_factory=lambda cfg: HybridModel(cfg, hybrid_block, version=NAME),
    sizes=_LazySizes(),
    param_groups=param_groups,
    default_vocab=65536,
    description="cross-version ablations: build('v6', time_mix='v5', channel_mix='v4') or layers='v7,v7,v6,v6'",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
