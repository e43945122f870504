"""The plugin contract of rwkv_zoo: seven hooks, each prefixed ``rwkv_zoo_``.

A plugin is any module or object with functions marked ``@rwkv_zoo.hookimpl``. Built-in versions and
backends are plugins too (see ``rwkv_zoo.pluginmanager.DEFAULT_PLUGINS``); third parties are found through
the entry-point group ``rwkv_zoo``. Hooks run when plugins are discovered or a decision is made, and
their results are cached; no hook runs once per kernel call.

An implementation may accept fewer arguments than its spec (pluggy passes only those it names), so
arguments added here later do not break old plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from rwkv_zoo.backend import Backend, Choice, KernelCall
    from rwkv_zoo.opspec import OpSpec
    from rwkv_zoo.registry import BuildSpec, VersionSpec

hookspec = pluggy.HookspecMarker("rwkv_zoo")
hookimpl = pluggy.HookimplMarker("rwkv_zoo")


@hookspec
def rwkv_zoo_register_versions(register: Callable[[VersionSpec], None]) -> None:
    """Register model versions: call ``register(VersionSpec(...))`` once per version.

    The built-in ``v4`` … ``v7`` register through this hook like any third-party version or hybrid.
    Registering a name twice raises, naming both plugins.
    """


@hookspec
def rwkv_zoo_register_ops(register: Callable[[OpSpec], None]) -> None:
    """Register ops: call ``register(OpSpec(...))`` once per op (``rwkv_zoo.opspec``).

    A spec declares the op's arguments (shape patterns, dtype rules), output, state layout, its literal
    recurrence (the oracle) and optionally a chunked reference, a random-input generator and conformance
    tolerances. The op can then be called through ``rwkv_zoo.ops.call(name, ...)``, the ``reference``
    backend runs it, any backend may register kernels for it, and ``rwkv_zoo.testing`` checks them. The
    built-in ``wkv4`` … ``wkv7`` register through this hook too. Registering a name twice raises,
    naming both plugins.
    """


@hookspec
def rwkv_zoo_register_backends(register: Callable[[Backend], None]) -> None:
    """Register kernel backends: call ``register(Backend(...))`` once per backend.

    A backend declares a name, a priority, the kernels it has per ``(op, mode)`` with their
    capabilities, and ``unavailable_reason()`` (a sentence such as "triton is not installed", or None).
    Registering must be cheap: import heavy dependencies lazily, inside the kernels.
    """


@hookspec(firstresult=True)
def rwkv_zoo_select_backend(call: KernelCall, candidates: list[str]) -> Choice | str | None:
    """Site policy: pick a backend for ``call`` among ``candidates`` (names that can run it).

    Return a ``Choice(backend, reason)``, a bare backend name, or None to let priority decide. The first
    non-None answer wins. An explicit user choice (argument, ``use_backend``, ``RWKV_ZOO_BACKEND``)
    is applied before this hook and is never overridden by it. Answers are cached per call key.
    """


@hookspec
def rwkv_zoo_register_formats(register: Callable[[Any], None]) -> None:
    """Register checkpoint formats and weight sources (detect, read, write).

    Each registered object names a format (``official-pth``, ``safetensors``, ``hf``, ...) and says
    whether it recognises a path; the checkpoint loaders ask formats in registration order.
    """


@hookspec
def rwkv_zoo_model_built(model: torch.nn.Module, spec: BuildSpec) -> None:
    """Notification after ``rwkv_zoo.build()`` made ``model`` from ``spec`` (version, size, dims)."""


@hookspec
def rwkv_zoo_update_env_info(info: dict[str, str]) -> None:
    """Add lines to the environment report of ``rwkv-zoo info`` and benchmark machine info.

    Mutate ``info`` in place: ``info["my-backend"] = "cuda 12.4, sm_90"``.
    """
