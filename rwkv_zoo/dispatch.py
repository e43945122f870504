"""Choosing a backend for each kernel call, and saying why.

Order of decision for a ``KernelCall``:
1. an explicit choice, strongest first: the ``backend=`` argument (of an op or of ``build``), then
   ``with rwkv_zoo.use_backend(name):``, then the ``RWKV_ZOO_BACKEND`` environment variable. An
   explicit choice that cannot run the call **raises** with the reasons; it never falls back silently;
2. the site policy hook ``rwkv_zoo_select_backend`` (first plugin that answers);
3. the highest priority among the backends that can run the call (ties broken by name).
If nothing can run the call, the error lists every backend with its reasons.

Mode: when the caller does not fix it, ``recurrent`` is used for short sequences (decode, T <=
``RECURRENT_MAX_T``) and ``chunk`` otherwise; if no backend has a kernel in that mode, the other mode is
tried, and the ``Selection`` says so. Selections are cached per call key and plugin generation.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import replace

from rwkv_zoo import opspec, pluginmanager
from rwkv_zoo.backend import MODES, Backend, Choice, Kernel, KernelCall, Selection
from rwkv_zoo.errors import BackendError

# KernelCall, Choice and Selection live with the backend contract; imported from here by older code.
__all__ = [
    "RECURRENT_MAX_T",
    "BackendError",
    "Choice",
    "Kernel",
    "KernelCall",
    "Selection",
    "auto_mode",
    "backends_generation",
    "explicit_backend",
    "get_backends",
    "list_backends",
    "select",
    "use_backend",
]

RECURRENT_MAX_T = 16

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("rwkv_zoo_backend", default=None)


# ---------------------------------------------------------------------------------------------------
# Backend registry (collected through the register_backends hook, cached per plugin generation)

_backends = pluginmanager.NamedRegistry("rwkv_zoo_register_backends", Backend, "backend", Backend.check_ops)
_selection_cache: dict[tuple, Selection] = {}


def get_backends() -> dict[str, Backend]:
    before = _backends.generation
    found = _backends.get()
    if _backends.generation != before:
        _selection_cache.clear()  # keys carry the generation; this only frees the stale ones
    return found


def backends_generation() -> int:
    """A number that changes whenever the set of registered backends does (for callers' caches)."""
    get_backends()
    return _backends.generation


def list_backends() -> list[dict]:
    """Every backend: name, provider (plugin) and its distribution, priority, whether it is available
    (or why not), ops and modes."""
    out = []
    for b in sorted(get_backends().values(), key=lambda b: (-b.priority, b.name)):
        why = b.unavailable_reason()
        out.append(
            {
                "name": b.name,
                "provider": b.provider,
                "distribution": pluginmanager.distribution_of(b.provider),
                "priority": b.priority,
                "available": why is None,
                "reason": why,
                "ops": b.ops(),
                "description": b.description,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Explicit choices


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run every kernel call in the block on backend ``name`` (raises where it cannot run a call)."""
    token = _context_backend.set(name)
    try:
        yield
    finally:
        _context_backend.reset(token)


def _explicit(backend: str | None) -> tuple[str | None, str]:
    if backend:
        return backend, "backend= argument"
    ctx = _context_backend.get()
    if ctx:
        return ctx, "use_backend()"
    env = os.environ.get("RWKV_ZOO_BACKEND", "").strip()
    if env:
        return env, "RWKV_ZOO_BACKEND"
    return None, ""


def explicit_backend(backend: str | None = None) -> str | None:
    """The backend chosen explicitly for a call (``backend=``, then ``use_backend()``, then
    ``RWKV_ZOO_BACKEND``), or None for automatic selection."""
    return _explicit(backend)[0]


def auto_mode(T: int) -> tuple[str, str]:
    if T <= RECURRENT_MAX_T:
        return "recurrent", f"T={T} <= {RECURRENT_MAX_T}: step by step is cheapest for short inputs"
    return "chunk", f"T={T} > {RECURRENT_MAX_T}: chunked matrix form"


def _other(mode: str) -> str:
    return "chunk" if mode == "recurrent" else "recurrent"


def _format_all(rejected: dict[str, list[str]]) -> str:
    return "\n".join(f"  - {name}: {'; '.join(why)}" for name, why in rejected.items())


def select(call: KernelCall, backend: str | None = None, *, mode_fixed: bool = False) -> Selection:
    """Choose the backend for ``call`` (its ``mode`` is the preferred one unless ``mode_fixed``)."""
    backends = get_backends()
    explicit, source = _explicit(backend)
    key = (call, explicit, source, mode_fixed, pluginmanager.generation())
    hit = _selection_cache.get(key)
    if hit is not None:
        return hit
    opspec.get_op(call.op)  # an unknown op raises, listing the registered ones (never cached, so checked here)
    if call.mode not in MODES:
        raise ValueError(f"unknown mode {call.mode!r}; modes are {', '.join(MODES)}")
    sel = _select(call, backends, explicit, source, mode_fixed)
    _selection_cache[key] = sel
    return sel


def _reasons_for(call: KernelCall, backends: dict[str, Backend]) -> dict[str, list[str]]:
    return {name: b.reasons(call) for name, b in sorted(backends.items())}


def _select(
    call: KernelCall, backends: dict[str, Backend], explicit: str | None, source: str, mode_fixed: bool
) -> Selection:
    mode_reason = "fixed by the caller" if mode_fixed else auto_mode(call.T)[1]
    modes = [call.mode] if mode_fixed else [call.mode, _other(call.mode)]

    if explicit is not None:
        if explicit not in backends:
            missing = pluginmanager.not_loaded()
            raise ValueError(
                f"unknown backend {explicit!r} (from {source}); registered backends: {', '.join(sorted(backends))}"
                + (f". Not loaded: {'; '.join(missing)}" if missing else "")
            )
        b = backends[explicit]
        first_reasons: list[str] = []
        for i, m in enumerate(modes):
            c = replace(call, mode=m)
            why = b.reasons(c)
            if not why:
                if i == 0:
                    mr = mode_reason
                else:
                    mr = f"{explicit} has no usable {call.mode} kernel ({'; '.join(first_reasons)})"
                return Selection(c, explicit, source, "chosen explicitly", mr, (), b.kernel(c.op, c.mode))
            if i == 0:
                first_reasons = why
        raise BackendError(
            f"backend {explicit!r} (chosen by {source}) cannot run {call.describe()}: {'; '.join(first_reasons)}.\n"
            f"Backends that can: {', '.join(n for n, r in _reasons_for(call, backends).items() if not r) or 'none'}"
        )

    all_rejected: dict[str, list[str]] = {}
    for i, m in enumerate(modes):
        c = replace(call, mode=m)
        reasons = _reasons_for(c, backends)
        able = [n for n, r in reasons.items() if not r]
        rejected = tuple((n, tuple(r)) for n, r in reasons.items() if r)
        if i == 0:
            all_rejected = {n: r for n, r in reasons.items() if r}
        if not able:
            continue
        mr = mode_reason if i == 0 else f"no backend can run {call.mode} here, so {m} is used"
        choice, policy = _ask_policy(c, able)
        if choice is not None:
            if choice.backend not in able:
                why = reasons.get(choice.backend, ["is not registered"])
                raise BackendError(
                    f"the backend policy of plugin {policy!r} chose {choice.backend!r} for {c.describe()}, "
                    f"which cannot run it: {'; '.join(why)}"
                )
            return Selection(
                c, choice.backend, f"policy of plugin {policy}", choice.reason or "site policy", mr, rejected,
                backends[choice.backend].kernel(c.op, c.mode),
            )
        best = sorted(able, key=lambda n: (-backends[n].priority, n))[0]
        others = [n for n in able if n != best]
        reason = f"highest priority ({backends[best].priority}) of those that can run it"
        if others:
            reason += f"; also able: {', '.join(others)}"
        return Selection(c, best, "priority", reason, mr, rejected, backends[best].kernel(c.op, c.mode))

    raise BackendError(f"no backend can run {call.describe()}:\n{_format_all(all_rejected)}")


def _ask_policy(call: KernelCall, able: list[str]) -> tuple[Choice | None, str]:
    """Run the firstresult policy hook by hand, in pluggy's call order, to know which plugin answered."""
    pm = pluginmanager.get_plugin_manager()
    for impl in reversed(pm.hook.rwkv_zoo_select_backend.get_hookimpls()):
        kwargs = {"call": call, "candidates": list(able)}
        answer = impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        if answer is not None:
            return (answer if isinstance(answer, Choice) else Choice(str(answer))), impl.plugin_name
    return None, ""
