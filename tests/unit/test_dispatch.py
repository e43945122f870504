"""Dispatch with fake backends: priority, explicit choices, policy hook, mode fallback, explain text."""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import dispatch
from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.backends import cpu as cpu_backend
from rwkv_zoo.dispatch import BackendError, Choice, KernelCall

CALL = KernelCall("wkv6", "chunk", "cpu", torch.float32, B=2, T=100, H=4, N=64)


class FakeBackends:
    """A plugin registering the given backends."""

    def __init__(self, *backends: Backend):
        self.backends = backends

    @rwkv_zoo.hookimpl
    def rwkv_zoo_register_backends(self, register):
        for b in self.backends:
            register(b)


def _tagged(tag):
    def fn(r, k, v, w, u, state):
        return torch.full_like(r, float(tag)), state

    return fn


def fake(name, priority, *, modes=("chunk", "recurrent"), op="wkv6", **caps):
    kernels = [Kernel(op, m, _tagged(priority), **caps) for m in modes]
    return Backend(name, kernels, priority=priority, description=f"fake {name}")


@pytest.fixture
def fakes():
    plugin = FakeBackends(
        fake("fast", 50, devices=("cuda",)),
        fake("medium", 20, head_sizes=(64,), dtypes=(torch.float32, torch.bfloat16)),
        fake("gone", 99, modes=("chunk",)),
    )
    plugin.backends[2].availability = lambda: "the gone package is not installed"
    with rwkv_zoo.plugin(plugin, name="fakes"):
        yield


def test_highest_priority_backend_that_can_run_wins(fakes):
    sel = dispatch.select(CALL)
    assert sel.backend == "medium"
    assert sel.decided_by == "priority"
    rejected = dict(sel.rejected)
    assert "runs on cuda, not cpu" in rejected["fast"]
    assert rejected["gone"] == ("the gone package is not installed",)
    assert "reference" in sel.reason  # also able


def test_capabilities_reject_with_sentences(fakes):
    sel = dispatch.select(KernelCall("wkv6", "chunk", "cpu", torch.float16, 1, 100, 4, 32))
    assert sel.backend == "reference"
    why = dict(sel.rejected)["medium"]
    assert any("head size N in {64}, got N=32" in s for s in why)
    assert any("float32, bfloat16 inputs, not float16" in s for s in why)


def test_explicit_choice_that_cannot_run_raises_with_reasons(fakes):
    with pytest.raises(BackendError, match=r"'fast' \(chosen by backend= argument\).*runs on cuda, not cpu"):
        dispatch.select(CALL, "fast")
    with rwkv_zoo.use_backend("gone"), pytest.raises(BackendError, match="use_backend.*not installed"):
        dispatch.select(CALL)


def test_explicit_choice_sources_in_order(fakes, monkeypatch):
    monkeypatch.setenv("RWKV_ZOO_BACKEND", "reference")
    sel = dispatch.select(CALL)
    assert (sel.backend, sel.decided_by) == ("reference", "RWKV_ZOO_BACKEND")
    with rwkv_zoo.use_backend("medium"):
        assert dispatch.select(CALL).decided_by == "use_backend()"
        sel = dispatch.select(CALL, "reference")
        assert (sel.backend, sel.decided_by) == ("reference", "backend= argument")


def test_unknown_backend_lists_registered_ones(fakes):
    with pytest.raises(ValueError, match="unknown backend 'nope'.*medium.*reference"):
        dispatch.select(CALL, "nope")


def test_nothing_can_run_lists_every_backend(monkeypatch):
    never = Backend("only", [Kernel("wkv6", "chunk", _tagged(0), check=lambda c: ["never"])], priority=1)
    monkeypatch.setattr(dispatch, "get_backends", lambda: {"only": never})
    monkeypatch.setattr(dispatch, "_selection_cache", {})
    with pytest.raises(BackendError) as info:
        dispatch.select(CALL, mode_fixed=True)
    assert "no backend can run wkv6 [chunk] cpu float32 B=2 T=100 H=4 N=64" in str(info.value)
    assert "- only: never" in str(info.value)


def test_policy_hook_decides_when_nothing_explicit(fakes):
    class Policy:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_select_backend(self, call, candidates):
            assert "medium" in candidates and "fast" not in candidates
            return Choice("reference", "site prefers the oracle")

    with rwkv_zoo.plugin(Policy(), name="site-policy"):
        sel = dispatch.select(CALL)
        assert sel.backend == "reference"
        assert sel.decided_by == "policy of plugin site-policy"
        assert sel.reason == "site prefers the oracle"
        # an explicit choice still beats the policy
        assert dispatch.select(CALL, "medium").backend == "medium"


def test_policy_that_picks_an_impossible_backend_raises(fakes):
    class BadPolicy:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_select_backend(self, call, candidates):
            return "fast"

    with rwkv_zoo.plugin(BadPolicy(), name="bad-policy"), pytest.raises(BackendError, match="bad-policy.*fast"):
        dispatch.select(CALL)


def test_mode_falls_back_when_no_backend_has_the_preferred_one():
    only_recurrent = FakeBackends(fake("rec", 10, modes=("recurrent",), op="wkv5"))
    call = KernelCall("wkv5", "chunk", "cpu", torch.float32, 1, 100, 2, 64)
    with rwkv_zoo.plugin(only_recurrent, name="rec-only"):
        sel = dispatch.select(call, "rec")
        assert sel.mode == "recurrent"
        assert "no usable chunk kernel" in sel.mode_reason
        with pytest.raises(BackendError, match="has no chunk kernel"):
            dispatch.select(call, "rec", mode_fixed=True)


def test_auto_mode_is_recurrent_for_short_inputs():
    assert dispatch.auto_mode(1)[0] == "recurrent"
    assert dispatch.auto_mode(dispatch.RECURRENT_MAX_T + 1)[0] == "chunk"


def test_ops_run_the_selected_kernel(fakes):
    B, T, H, N = 1, 40, 2, 64
    r = k = v = w = torch.zeros(B, T, H, N)
    u = torch.zeros(H, N)
    y, _ = rwkv_zoo.wkv6(r, k, v, w, u)
    assert torch.all(y == 20.0)  # "medium" tags its output with its priority
    y, _ = rwkv_zoo.wkv6(r, k, v, w, u, backend="reference")
    assert torch.all(y == 0.0)


def test_selections_are_cached_and_invalidated_by_plugin_changes(fakes):
    a = dispatch.select(CALL)
    assert dispatch.select(CALL) is a
    with rwkv_zoo.plugin(FakeBackends(fake("better", 30)), name="better"):
        assert dispatch.select(CALL).backend == "better"
    assert dispatch.select(CALL).backend == "medium"


def test_explain_names_backend_mode_and_reasons(fakes):
    model = rwkv_zoo.build("v6", size="tiny", device="meta")
    text = str(rwkv_zoo.explain(model, (1, 100)))
    assert "wkv6 [chunk] cpu float32 B=1 T=100 H=4 N=16" in text
    # medium needs N=64; the C++ cpu backend (priority 2) runs inference calls where it builds
    assert f"-> {'cpu' if cpu_backend.unavailable_reason() is None else 'reference'} (priority" in text
    assert "not medium: needs head size N in {64}, got N=16" in text
    assert "not fast: runs on cuda, not cpu" in text
    text = str(rwkv_zoo.explain(model, (1, 1)))
    assert "[recurrent]" in text and "T=1 <= 16" in text
    model.backend = "fast"
    with pytest.raises(BackendError, match="runs on cuda, not cpu"):
        rwkv_zoo.explain(model, (1, 100))
    assert "fast" in rwkv_zoo.explain(model, (1, 100), device="cuda").backends


def test_build_with_unknown_backend_fails_early():
    with pytest.raises(ValueError, match="unknown backend 'nosuch'"):
        rwkv_zoo.build("v6-tiny", backend="nosuch")


def test_list_backends_reports_availability(fakes):
    rows = {b["name"]: b for b in rwkv_zoo.list_backends()}
    assert rows["reference"]["available"] and rows["reference"]["provider"] == "rwkv_zoo.backends.reference"
    assert rows["gone"]["available"] is False and "not installed" in rows["gone"]["reason"]
    assert rows["medium"]["ops"] == {"wkv6": ["chunk", "recurrent"]}
    assert rows["medium"]["provider"] == "fakes"
    assert set(rows["reference"]["ops"]) == {"wkv4", "wkv5", "wkv6", "wkv7"}
