"""rwkv_zoo: every RWKV generation behind one state interface, with pluggable WKV kernel backends.

    import rwkv_zoo
    model = rwkv_zoo.build("v6", size="1.5B", device="meta")   # any size, no memory
    model = rwkv_zoo.build("v7-tiny")
    logits, state = model(tokens)                              # tokens [B, T] -> logits [B, T, V]
    logits, state = model(next_tokens, state)                  # carry the state
    print(rwkv_zoo.explain(model, tokens))                     # which kernel runs, and why
"""

from __future__ import annotations

from rwkv_zoo._version import __version__
from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, list_formats, load, save
from rwkv_zoo.dispatch import BackendError, Choice, KernelCall, Selection, list_backends, use_backend
from rwkv_zoo.errors import RWKVZooError, UnknownNameError, parse_device, parse_dtype
from rwkv_zoo.explain import explain
from rwkv_zoo.generation import GenerationResult, PrefixCache, ScoreResult, generate, score
from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.model import RWKV, RWKVConfig, randomize_
from rwkv_zoo.ops import wkv4, wkv5, wkv6, wkv7
from rwkv_zoo.opspec import OpArg, OpSpec, StatePart, get_op, list_ops
from rwkv_zoo.pluginmanager import list_plugins, plugin, register_plugin, unregister_plugin
from rwkv_zoo.registry import BuildSpec, SizePreset, VersionSpec, build, list_models, list_versions
from rwkv_zoo.state import LayerState, ModelIdentity, RWKVState, StateMismatchError


def param_groups(model: RWKV, weight_decay: float = 0.0) -> list[dict]:
    """The official optimizer parameter groups of ``model``'s version (weight decay, LR multipliers)."""
    from rwkv_zoo.registry import get_version

    return get_version(model.version).param_groups(model, weight_decay)


__all__ = [
    "RWKV",
    "Backend",
    "BackendError",
    "BuildSpec",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormat",
    "Choice",
    "GenerationResult",
    "Kernel",
    "KernelCall",
    "LayerState",
    "ModelIdentity",
    "OpArg",
    "OpSpec",
    "PrefixCache",
    "RWKVConfig",
    "RWKVState",
    "RWKVZooError",
    "ScoreResult",
    "Selection",
    "SizePreset",
    "StateMismatchError",
    "StatePart",
    "UnknownNameError",
    "VersionSpec",
    "__version__",
    "build",
    "explain",
    "generate",
    "get_op",
    "hookimpl",
    "list_backends",
    "list_formats",
    "list_models",
    "list_ops",
    "list_plugins",
    "list_versions",
    "load",
    "param_groups",
    "parse_device",
    "parse_dtype",
    "plugin",
    "randomize_",
    "register_plugin",
    "save",
    "score",
    "unregister_plugin",
    "use_backend",
    "wkv4",
    "wkv5",
    "wkv6",
    "wkv7",
]
