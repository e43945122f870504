"""pytest plugin of rwkv_zoo: the backend conformance suite as test items, and a plugin fixture.

Installed with rwkv-zoo (entry point ``pytest11``), so in any project with rwkv-zoo installed::

    pytest --rwkv-zoo-backend mykernel                      # the full matrix, one item per case
    pytest --rwkv-zoo-backend mykernel -m rwkv_zoo_conformance -k "wkv7 and bfloat16"
    pytest --rwkv-zoo-backend mykernel --rwkv-zoo-plugin rwkv_zoo_mykernel   # not installed: register it

``--rwkv-zoo-backend NAME`` (repeatable) adds one item per case of ``rwkv_zoo.testing.conformance_cases``:
every ``(op, mode)`` kernel the backend registers × dtype × length, each run with a random initial
state and compared (output, final state, the gradient of every input and of the initial state) with
the fp64 reference recurrence. Cases the backend's capabilities reject are reported as skipped with
its reason. Items are marked ``rwkv_zoo_conformance`` and named
``rwkv-zoo-conformance[NAME]::wkv6-chunk-float32-T63``; the summary at the end gives the worst error
per op, mode and dtype. Options: ``--rwkv-zoo-dtypes`` (default ``float32,bfloat16``),
``--rwkv-zoo-T`` (default ``1,15,63,64,65``), ``--rwkv-zoo-device`` (default: ``cpu`` unless every
kernel of the backend needs another device), ``--rwkv-zoo-seed``, ``--rwkv-zoo-head-size``,
``--rwkv-zoo-rtol`` (overrides every gate), ``--rwkv-zoo-plugin MODULE`` (repeatable: import and
register a plugin module first, for a backend that is not installed through its entry point).

Fixture ``rwkv_zoo_plugin``: ``rwkv_zoo_plugin(obj, name=None)`` registers a plugin for the test and
unregisters it at teardown (``rwkv_zoo.testing.registered_plugin`` as a fixture).

The hooks do nothing unless ``--rwkv-zoo-backend`` is given, and this module imports no more than
``rwkv_zoo`` itself does (which imports torch). To leave it out of a run: ``-p no:rwkv_zoo.pytest_plugin``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MARKER = "rwkv_zoo_conformance"
DEFAULT_DTYPES = "float32,bfloat16"
_RESULTS = pytest.StashKey[dict]()
_CACHE = pytest.StashKey[dict]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rwkv_zoo", "rwkv_zoo backend conformance")
    group.addoption("--rwkv-zoo-backend", action="append", default=[], metavar="NAME",
                    help="run the conformance suite of this rwkv_zoo backend as test items (repeatable)")
    group.addoption("--rwkv-zoo-dtypes", default=DEFAULT_DTYPES, metavar="LIST",
                    help=f"comma-separated input dtypes (default {DEFAULT_DTYPES}; also float16, float64)")
    group.addoption("--rwkv-zoo-T", default=None, metavar="LIST",
                    help="comma-separated sequence lengths (default 1,15,63,64,65)")
    group.addoption("--rwkv-zoo-device", default=None, metavar="DEVICE",
                    help="device to run the kernels on (default cpu, unless every kernel needs another)")
    group.addoption("--rwkv-zoo-seed", type=int, default=42, help="seed of the random inputs (default 42)")
    group.addoption("--rwkv-zoo-head-size", type=int, default=16, metavar="N",
                    help="head size N (default 16; a kernel that declares head sizes gets one it takes)")
    group.addoption("--rwkv-zoo-rtol", type=float, default=None,
                    help="one relative-error gate for everything, instead of PERF.md's gates")
    group.addoption("--rwkv-zoo-plugin", action="append", default=[], metavar="MODULE",
                    help="import this module and register it as an rwkv_zoo plugin first (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a backend conformance case (rwkv_zoo.pytest_plugin)")
    config.stash[_RESULTS] = {}
    config.stash[_CACHE] = {}


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _dtypes(text: str) -> list:
    import torch

    out = []
    for name in _split(text):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise pytest.UsageError(f"--rwkv-zoo-dtypes: {name!r} is not a floating torch dtype")
        out.append(dtype)
    return out


def _lengths(text: str | None) -> tuple[int, ...]:
    from rwkv_zoo.testing import DEFAULT_TS

    if text is None:
        return DEFAULT_TS
    try:
        Ts = tuple(int(t) for t in _split(text))
    except ValueError:
        raise pytest.UsageError(f"--rwkv-zoo-T takes comma-separated integers, got {text!r}") from None
    if not Ts or min(Ts) < 1:
        raise pytest.UsageError(f"--rwkv-zoo-T needs lengths >= 1, got {text!r}")
    return Ts


def _default_device(backend) -> str:
    """``cpu`` unless every kernel declares devices without it; then the first device they declare."""
    devices = [k.devices for k in backend.kernels]
    if devices and all(d is not None and "cpu" not in d for d in devices):
        return devices[0][0]
    return "cpu"


def _register_plugin_modules(config: pytest.Config, modules: list[str]) -> None:
    import importlib

    from rwkv_zoo import pluginmanager

    pm = pluginmanager.get_plugin_manager()
    for modname in modules:
        try:
            module = importlib.import_module(modname)
        except Exception as exc:
            raise pytest.UsageError(f"--rwkv-zoo-plugin {modname}: cannot import it: {exc}") from exc
        if not pm.is_registered(module):  # already loaded through its entry point
            pluginmanager.register_plugin(module, modname)


class ConformanceCollector(pytest.Collector):
    """The cases of one backend (items are made up front; pytest never calls ``collect``)."""

    def collect(self):  # pragma: no cover - items are added in pytest_collection_modifyitems
        return []


class ConformanceFailure(Exception):
    """A conformance case that failed: its message and errors."""


class ConformanceItem(pytest.Item):
    """One ``(backend, op, mode, dtype, T)`` case of ``rwkv_zoo.testing.run_case``."""

    def __init__(self, *, backend: str, case, settings: dict[str, Any], **kwargs) -> None:
        super().__init__(**kwargs)
        self.backend = backend
        self.case = case
        self.settings = settings
        self.add_marker(MARKER)

    def runtest(self) -> None:
        from rwkv_zoo.testing import run_case

        result = run_case(self.backend, self.case, cache=self.config.stash[_CACHE], **self.settings)
        self.config.stash[_RESULTS].setdefault((self.backend, self.settings["device"]), []).append(result)
        for tensor, err in result.errors.items():
            self.user_properties.append((f"error_{tensor}", f"{err:.3e}"))
        if result.skipped:
            pytest.skip(result.message)
        if not result.passed:
            raise ConformanceFailure(result.message)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            errors = dict(self.user_properties)
            detail = ", ".join(f"{k.removeprefix('error_')} {v}" for k, v in errors.items())
            return (f"backend {self.backend!r} fails {self.case.id} on {self.settings['device']}: "
                    f"{excinfo.value}\nrelative errors vs the fp64 reference: {detail or '-'}")
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return "rwkv_zoo.testing", None, f"rwkv-zoo conformance: {self.backend} {self.case.id}"


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect, so they apply to these items too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    names = config.getoption("--rwkv-zoo-backend")
    if not names:
        return
    from rwkv_zoo import dispatch
    from rwkv_zoo.testing import conformance_cases

    _register_plugin_modules(config, config.getoption("--rwkv-zoo-plugin"))
    dtypes = _dtypes(config.getoption("--rwkv-zoo-dtypes"))
    Ts = _lengths(config.getoption("--rwkv-zoo-T"))
    backends = dispatch.get_backends()
    for name in names:
        if name not in backends:
            raise pytest.UsageError(
                f"--rwkv-zoo-backend: unknown backend {name!r}; registered backends: {', '.join(sorted(backends))}. "
                "Is its package installed (or RWKV_ZOO_NO_AUTOLOAD set)? --rwkv-zoo-plugin MODULE registers one."
            )
        settings = {
            "device": config.getoption("--rwkv-zoo-device") or _default_device(backends[name]),
            "seed": config.getoption("--rwkv-zoo-seed"),
            "N": config.getoption("--rwkv-zoo-head-size"),
            "rtol": config.getoption("--rwkv-zoo-rtol"),
        }
        cname = f"rwkv-zoo-conformance[{name}]"
        collector = ConformanceCollector.from_parent(session, name=cname, nodeid=cname)
        new = [ConformanceItem.from_parent(collector, name=case.id, backend=name, case=case, settings=settings)
               for case in conformance_cases(name, dtypes=dtypes, Ts=Ts)]
        # Reported as collected, so "collected N items" and collection-aware plugins count them.
        config.hook.pytest_collectreport(report=pytest.CollectReport(collector.nodeid, "passed", None, new))
        items.extend(new)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    from rwkv_zoo.testing import ConformanceReport

    terminalreporter.section("rwkv_zoo conformance (worst relative error vs the fp64 reference)")
    for (backend, device), cases in results.items():
        terminalreporter.write_line(ConformanceReport(backend, device, list(cases)).summary())


@pytest.fixture
def rwkv_zoo_plugin() -> Iterator[Callable[..., str]]:
    """``rwkv_zoo_plugin(obj, name=None) -> name``: register an rwkv_zoo plugin until the test ends."""
    from rwkv_zoo.testing import registered_plugin

    with contextlib.ExitStack() as stack:

        def register(obj, name: str | None = None) -> str:
            return stack.enter_context(registered_plugin(obj, name))

        yield register
