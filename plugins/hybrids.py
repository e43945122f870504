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
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.model import RWKV, Block, RWKVConfig, official_param_groups
from rwkv_zoo.registry import SizePreset, VersionSpec
from rwkv_zoo.state import ModelIdentity
from rwkv_zoo.versions import v4, v5, v6, v7

NAME = "hybrid"
COMPONENTS = {
    "v4": (v4.V4Config, v4.V4TimeMix, v4.V4ChannelMix),
    "v5": (v5.V5Config, v5.V5TimeMix, v5.V5ChannelMix),
    "v6": (v6.V6Config, v6.V6TimeMix, v6.V6ChannelMix),
    "v7": (v7.V7Config, v7.V7TimeMix, v7.V7ChannelMix),
}
VERSION_OPTIONS = ("dim_mix_lora", "dim_decay_lora", "dim_w_lora", "dim_a_lora", "dim_v_lora", "dim_g_lora")
DIMS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn")


def _check_version(v: str, what: str) -> str:
    v = str(v).strip()
    if v not in COMPONENTS:
        raise ValueError(f"hybrid: {what} {v!r} is not a version with blocks; use one of {', '.join(COMPONENTS)}")
    return v


def parse_layers(layers: str | Sequence[str]) -> list[tuple[str, str]]:
    """``"v7,v7,v6/v4"`` -> ``[("v7", "v7"), ("v7", "v7"), ("v6", "v4")]`` (entry = tm or tm/cm)."""
    entries = [e.strip() for e in layers.split(",")] if isinstance(layers, str) else [str(e).strip() for e in layers]
    plan = []
    for e in entries:
        tm, _, cm = e.partition("/")
        plan.append((_check_version(tm, "time_mix"), _check_version(cm or tm, "channel_mix")))
    return plan


@dataclass
class HybridConfig(RWKVConfig):
    """Shared dimensions, the per-layer plan, and the options of every component version."""

    base: str = "v7"
    time_mix: str | None = None
    channel_mix: str | None = None
    layers: str | None = None
    dim_mix_lora: int | None = None
    dim_decay_lora: int | None = None
    dim_w_lora: int | None = None
    dim_a_lora: int | None = None
    dim_v_lora: int | None = None
    dim_g_lora: int | None = None

    version: ClassVar[str] = NAME

    def __post_init__(self) -> None:
        _check_version(self.base, "base")
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
        self.has_heads = any(tm != "v4" for tm, _ in self.plan)
        super().__post_init__()

    def default_dim_ffn(self) -> int:
        cms = {cm for _, cm in self.plan}
        owner = cms.pop() if len(cms) == 1 else self.base
        return self.component(owner, dim_ffn=None).dim_ffn

    def component(self, version: str, **override: Any) -> RWKVConfig:
        """The config of one component version: the shared dimensions plus that version's options."""
        cls = COMPONENTS[version][0]
        names = {f.name for f in fields(cls)}
        kwargs = {k: getattr(self, k) for k in DIMS if k in names}
        kwargs.update({k: getattr(self, k) for k in VERSION_OPTIONS if k in names and getattr(self, k) is not None})
        kwargs.update(override)
        return cls(**kwargs)

    def describe(self) -> str:
        """The plan as it would be written in ``layers=``: ``v5/v4,v5/v4``."""
        return ",".join(tm if tm == cm else f"{tm}/{cm}" for tm, cm in self.plan)


@functools.cache
def block_class(tm: str, cm: str) -> type[Block]:
    """A ``Block`` with the time-mix of version ``tm`` and the channel-mix of version ``cm``."""
    time_mix, channel_mix = COMPONENTS[tm][1], COMPONENTS[cm][2]

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

    def unused_parameters(self) -> list[str]:
        for i, (tm, _) in enumerate(self.config.plan):
            if tm == "v7":  # the first v7 layer makes v_first and never lerps toward it
                return [f"blocks.{i}.att.{n}" for n in ("v0", "v1", "v2")]
        return []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={self.config.describe()}"


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """The union of the official groups: time_decay 2x (v6 decay LoRA 1x), time_first 3x, v7 w0 2x."""
    return official_param_groups(
        model, weight_decay, {"time_decay_w": 1.0, "time_decay": 2.0, "time_first": 3.0, "att.w0": 2.0}
    )


def _shared_sizes() -> tuple[SizePreset, ...]:
    """Every preset name of v4-v7 whose shape agrees across the versions that have it, with the union
    of their options; aliases that mean different shapes in different versions are dropped."""
    by_name: dict[str, list[tuple[str, SizePreset]]] = {}
    for version, module in (("v4", v4), ("v5", v5), ("v6", v6), ("v7", v7)):
        for p in module.SIZES:
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


SPEC = VersionSpec(
    name=NAME,
    title="Hybrid (time-mix and channel-mix of any version, per layer)",
    config_cls=HybridConfig,
    model_factory=lambda cfg: HybridModel(cfg, hybrid_block, version=NAME),
    sizes=_shared_sizes(),
    param_groups=param_groups,
    default_vocab=65536,
    description="cross-version ablations: build('v6', time_mix='v5', channel_mix='v4') or layers='v7,v7,v6,v6'",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
