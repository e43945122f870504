"""Plugin discovery: built-ins from ``DEFAULT_PLUGINS``, third parties from the ``rwkv_zoo`` entry points.

Loading is lazy and idempotent: the first call that needs a registry (``build``, ``list_backends``, ...)
loads plugins once. A plugin that fails to import is recorded with its error and skipped; everything
else keeps working, and ``rwkv_zoo.list_plugins()`` / ``rwkv-zoo plugins`` show the failure.

Environment:
- ``RWKV_ZOO_DISABLE_PLUGINS``: comma-separated plugin names (built-in module names or entry-point
  names) that are never loaded.
- ``RWKV_ZOO_NO_AUTOLOAD=1``: do not load third-party entry points (hermetic tests); built-ins still load.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from rwkv_zoo import hookspecs

ENTRY_POINT_GROUP = "rwkv_zoo"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "rwkv_zoo.versions.v4",
    "rwkv_zoo.versions.v5",
    "rwkv_zoo.versions.v6",
    "rwkv_zoo.versions.v7",
    "rwkv_zoo.backends.reference.specs",
    "rwkv_zoo.versions.v7a",
    "rwkv_zoo.versions.v8",
    "rwkv_zoo.backends.reference",
    "rwkv_zoo.backends.cpu",
    "rwkv_zoo.backends.triton",
    "rwkv_zoo.backends.cuda",
    "rwkv_zoo.backends.fla",
    "rwkv_zoo.plugins.formats",
    "rwkv_zoo.plugins.attention",
    "rwkv_zoo.plugins.hybrids",
)


@dataclass
class PluginRecord:
    name: str
    source: str  # "builtin", "entrypoint" or "runtime"
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    disabled: bool = False
    dist: str | None = None  # the distribution that ships it: "rwkv-zoo" for built-ins, ep.dist's name

    @property
    def distribution(self) -> str | None:
        """``"name version"`` of the providing distribution (``"rwkv-zoo-exact 0.1.0"``), or None."""
        if self.dist is None:
            return None
        return f"{self.dist} {self.version}" if self.version else self.dist


class _State:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("rwkv_zoo")
        self.pm.add_hookspecs(hookspecs)
        self.loaded = False
        self.records: dict[str, PluginRecord] = {}
        # Bumped whenever the set of plugins changes; registries and dispatch caches key on it.
        self.generation = 0


_state = _State()


def _disabled_names() -> set[str]:
    raw = os.environ.get("RWKV_ZOO_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _autoload_enabled() -> bool:
    return os.environ.get("RWKV_ZOO_NO_AUTOLOAD", "").strip().lower() not in ("1", "true", "yes")


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _hook_names(plugin: Any) -> list[str]:
    return sorted(h.name for h in _state.pm.get_hookcallers(plugin) or [])


def _register(plugin: Any, name: str, source: str, version: str | None = None, dist: str | None = None) -> None:
    _state.pm.register(plugin, name=name)
    _state.pm.check_pending()  # a misspelled hook name fails loudly instead of being ignored
    _state.records[name] = PluginRecord(name, source, version, _hook_names(plugin), dist=dist)
    _state.generation += 1


def load_plugins(*, autoload: bool | None = None) -> None:
    """Load the built-in plugins and (unless disabled) the entry-point plugins, once."""
    if _state.loaded:
        return
    _state.loaded = True
    disabled = _disabled_names()
    from rwkv_zoo._version import __version__ as ours

    for modname in DEFAULT_PLUGINS:
        if modname in disabled:
            _state.records[modname] = PluginRecord(modname, "builtin", ours, disabled=True, dist="rwkv-zoo")
            continue
        try:
            module = importlib.import_module(modname)
            _register(module, modname, "builtin", ours, "rwkv-zoo")
        except Exception as exc:  # a broken plugin must not take the library down
            _state.records[modname] = PluginRecord(modname, "builtin", ours, error=_short_error(exc),
                                                   dist="rwkv-zoo")
    if autoload is None:
        autoload = _autoload_enabled()
    if not autoload:
        return
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        version = ep.dist.version if ep.dist is not None else None
        dist = ep.dist.name if ep.dist is not None else None
        if ep.name in disabled:
            _state.records[ep.name] = PluginRecord(ep.name, "entrypoint", version, disabled=True, dist=dist)
            continue
        if _state.pm.has_plugin(ep.name):
            continue
        try:
            _register(ep.load(), ep.name, "entrypoint", version, dist)
        except Exception as exc:
            _state.records[ep.name] = PluginRecord(ep.name, "entrypoint", version, error=_short_error(exc),
                                                   dist=dist)


def get_plugin_manager() -> pluggy.PluginManager:
    load_plugins()
    return _state.pm


def generation() -> int:
    load_plugins()
    return _state.generation


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object or module at run time (tests, notebooks). Returns its name."""
    load_plugins()
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    _register(plugin, name, "runtime")
    return name


def unregister_plugin(name: str) -> None:
    load_plugins()
    plugin = _state.pm.get_plugin(name)
    if plugin is not None:
        _state.pm.unregister(plugin, name=name)
    _state.records.pop(name, None)
    _state.generation += 1


@contextlib.contextmanager
def plugin(obj: Any, name: str | None = None) -> Iterator[str]:
    """``with rwkv_zoo.plugin(MyPlugin()):`` registers a plugin for the block, then removes it."""
    registered = register_plugin(obj, name)
    try:
        yield registered
    finally:
        unregister_plugin(registered)


def record_failure(name: str, exc: BaseException, source: str = "runtime") -> None:
    """Mark a plugin as failed when one of its hooks raised during collection."""
    rec = _state.records.get(name) or PluginRecord(name, source)
    rec.error = _short_error(exc)
    _state.records[name] = rec


def list_plugins() -> list[dict[str, Any]]:
    """Every plugin seen: name, source, version, providing distribution (``"rwkv-zoo-exact 0.1.0"``),
    hooks it implements, and its error if it failed or whether ``RWKV_ZOO_DISABLE_PLUGINS`` blocked it."""
    load_plugins()
    return [
        {
            "name": r.name,
            "source": r.source,
            "version": r.version,
            "distribution": r.distribution,
            "hooks": list(r.hooks),
            "error": r.error,
            "disabled": r.disabled,
        }
        for r in _state.records.values()
    ]


def distribution_of(plugin_name: str) -> str | None:
    """``"name version"`` of the distribution that provides plugin ``plugin_name``, or None (runtime)."""
    load_plugins()
    rec = _state.records.get(plugin_name)
    return rec.distribution if rec is not None else None


def not_loaded() -> list[str]:
    """One sentence per plugin that is not loaded: blocked by ``RWKV_ZOO_DISABLE_PLUGINS``, or failed."""
    load_plugins()
    out = []
    for r in _state.records.values():
        where = f" ({r.distribution})" if r.distribution else ""
        if r.disabled:
            out.append(f"plugin {r.name}{where} is blocked by RWKV_ZOO_DISABLE_PLUGINS")
        elif r.error:
            out.append(f"plugin {r.name}{where} failed: {r.error}")
    return out


def collect(hook_name: str, make_register: Callable[[str], Callable[[Any], None]]) -> None:
    """Run a ``register_*`` hook one plugin at a time, in registration order.

    ``make_register(plugin_name)`` returns the ``register`` callback handed to that plugin, so the
    host knows who registered what. A plugin whose hook raises is recorded as failed (shown by
    ``rwkv-zoo plugins``) and skipped; the others still register.
    """
    pm = get_plugin_manager()
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # pluggy keeps them LIFO
        try:
            impl.function(make_register(impl.plugin_name))
        except Exception as exc:
            record_failure(impl.plugin_name, exc)


class NamedRegistry:
    """Named objects (backends, versions, formats) collected from one ``register_*`` hook.

    Collected on first use and again whenever the set of plugins changes (cached per generation).
    ``register(obj)`` checks the type, refuses a second object of the same name (naming both
    plugins) and records the registering plugin in ``obj.provider`` where the object has one.
    ``validate(obj)``, if given, raises for an object that refers to something unknown; like any error
    in a plugin's hook, that marks the plugin as failed with the message.
    """

    def __init__(self, hook_name: str, cls: type, kind: str, validate: Callable[[Any], None] | None = None):
        self.hook_name, self.cls, self.kind, self.validate = hook_name, cls, kind, validate
        self.generation = -1
        self._found: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        gen = generation()
        if gen == self.generation:
            return self._found
        found: dict[str, Any] = {}
        providers: dict[str, str] = {}

        def make_register(plugin: str):
            def register(obj: Any) -> None:
                if not isinstance(obj, self.cls):
                    raise TypeError(f"register() takes a rwkv_zoo.{self.cls.__name__}, got {type(obj).__name__}")
                if obj.name in found:
                    raise ValueError(
                        f"{self.kind} {obj.name!r} is registered twice (by {providers[obj.name]} and {plugin})"
                    )
                if self.validate is not None:
                    self.validate(obj)
                if hasattr(obj, "provider"):
                    obj.provider = plugin
                providers[obj.name] = plugin
                found[obj.name] = obj

            return register

        collect(self.hook_name, make_register)
        self.generation, self._found = gen, found
        return found


def _reset_for_tests() -> None:
    """Forget every plugin (next use loads again). Only for the test suite."""
    global _state
    _state = _State()
