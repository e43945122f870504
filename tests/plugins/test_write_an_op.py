"""PLUGINS.md "Write an op": its example runs as written, and the op it adds works end to end.

The section's first python block is a plugin module (an op spec with its literal recurrence, and a
backend kernel for it); the second uses it. Both are executed exactly as they appear in the document.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import dispatch, ops
from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.testing import check_backend, registered_plugin, rel_err

ROOT = Path(__file__).resolve().parents[2]
MODULE = "rwkv_zoo_decaysum"


def _blocks() -> list[str]:
    doc = (ROOT / "PLUGINS.md").read_text()
    section = doc.split("\n## Write an op\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def decaysum(monkeypatch):
    """The document's plugin module, importable as ``rwkv_zoo_decaysum`` (not registered)."""
    module = types.ModuleType(MODULE)
    module.__file__ = str(ROOT / "PLUGINS.md")
    exec(compile(_blocks()[0], f"PLUGINS.md:{MODULE}", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, MODULE, module)
    return module


def _inputs(B=2, T=40, C=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g))
    k, v = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    return w, k, v, torch.randn(B, C, generator=g)


def test_document_has_the_plugin_and_its_use():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "rwkv_zoo_register_ops" in blocks[0] and "OpSpec(" in blocks[0] and "Kernel(" in blocks[0]
    assert 'rwkv_zoo.ops.call("decaysum"' in blocks[1]


def test_usage_block_runs_as_written(decaysum, capsys):
    exec(compile(_blocks()[1], "PLUGINS.md:usage", "exec"), {"__name__": "decaysum_usage"})
    out = capsys.readouterr().out
    assert "decaysum" in out and "chunk" in out  # the conformance summary of mysum
    assert "decaysum" not in rwkv_zoo.list_ops()  # unregistered after the block


def test_op_is_listed_and_dispatch_picks_the_backend(decaysum):
    with registered_plugin(decaysum):
        assert "decaysum" in rwkv_zoo.list_ops()
        assert rwkv_zoo.get_op("decaysum") is decaysum.DECAYSUM
        assert rwkv_zoo.get_op("decaysum").provider == MODULE
        assert dispatch.get_backends()["reference"].ops()["decaysum"] == ["recurrent"]  # from the spec alone
        sel = ops._select("decaysum", None, "cpu", torch.float32, 2, 100, 1, 12, False, True, None)
        assert (sel.backend, sel.mode, sel.kernel.fn) == ("mysum", "chunk", decaysum.decaysum_matrix)
        text = sel.explain()
        assert text.startswith("decaysum [chunk] cpu float32 B=2 T=100 C=12")  # channelwise: C, no heads
        assert "-> mysum (priority" in text
        # Short calls prefer recurrent, which only reference has: said so, not hidden.
        short = ops._select("decaysum", None, "cpu", torch.float32, 2, 4, 1, 12, False, False, None)
        assert short.backend == "reference" and short.mode == "recurrent"


def test_kernel_matches_the_oracle_with_gradients(decaysum):
    w, k, v, s0 = _inputs()
    with registered_plugin(decaysum):
        leaves = [x.clone().requires_grad_() for x in (w, k, v, s0)]
        y, s = ops.call("decaysum", *leaves[:3], state=leaves[3], mode="chunk")
        assert y.shape == (2, 40, 12) and s.shape == (2, 12) and s.dtype == torch.float32
        grads = torch.autograd.grad((y * y).sum() + s.sum(), leaves)
    ref_leaves = [x.double().requires_grad_() for x in (w, k, v, s0)]
    y_ref, s_ref = decaysum.decaysum_recurrent(*ref_leaves)
    ref_grads = torch.autograd.grad((y_ref * y_ref).sum() + s_ref.sum(), ref_leaves)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, g_ref) < 1e-5
    assert not torch.allclose(y, torch.zeros_like(y))


def test_default_state_is_the_spec_initial_state(decaysum):
    w, k, v, _ = _inputs(T=20)
    with registered_plugin(decaysum):
        y, _ = ops.call("decaysum", w, k, v, backend="reference")
        y0, _ = ops.call("decaysum", w, k, v, state=torch.zeros(2, 12), backend="mysum", mode="chunk")
    assert torch.allclose(y, y0, atol=1e-5)


def test_conformance_suite_runs_the_new_op(decaysum):
    with registered_plugin(decaysum):
        report = check_backend("mysum", dtypes=(torch.float32, torch.bfloat16), Ts=(1, 15, 40))
        assert {r.op for r in report.results} == {"decaysum"}
        assert len([r for r in report.results if not r.skipped]) == 6 and report.ok
        assert {"y", "s", "dw", "dk", "dv", "ds"} <= set(report.results[0].errors)
        # The reference runs it too (recurrent kernel only: the spec has no chunked form).
        ref = check_backend("reference", ops=["decaysum"], Ts=(1, 15))
        assert [r.mode for r in ref.results] == ["recurrent", "recurrent"] and ref.ok


def test_a_wrong_kernel_fails_conformance(decaysum):
    def off(w, k, v, state):
        y, s = decaysum.decaysum_matrix(w, k, v, state)
        return y * 1.01, s

    class Broken:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(Backend("offsum", [Kernel("decaysum", "chunk", off)]))

    with registered_plugin(decaysum), registered_plugin(Broken(), "offsum-plugin"):
        report = check_backend("offsum", Ts=(15,), raise_on_fail=False)
        assert not report.ok and "y error" in report.failures[0].message


def test_wrong_arguments_raise_clear_errors(decaysum):
    w, k, v, s0 = _inputs(T=10)
    with registered_plugin(decaysum):
        with pytest.raises(ValueError, match=re.escape("v must have shape [B, T, C] = [2, 10, 12], got [2, 10, 11]")):
            ops.call("decaysum", w, k, v[..., :-1])
        with pytest.raises(ValueError, match=re.escape("w must have shape [C] = [12], got [11]")):
            ops.call("decaysum", w[:-1], k, v)
        with pytest.raises(ValueError, match=re.escape("k must be [B, T, C], got shape [2, 10]")):
            ops.call("decaysum", w, k[..., 0], v)
        with pytest.raises(ValueError, match=re.escape("state must have shape [B, C] = [2, 12], got [1, 12]")):
            ops.call("decaysum", w, k, v, state=s0[:1])
        with pytest.raises(TypeError, match="decaysum takes 3 arguments"):
            ops.call("decaysum", w, k)
        with pytest.raises(ValueError, match="decaysum needs T >= 1"):
            ops.call("decaysum", w, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="unknown op 'decaysum'; ops are wkv4, wkv5, wkv6, wkv7"):
        ops.call("decaysum", w, k, v)


def test_a_kernel_for_an_unknown_op_is_a_clear_error(decaysum):
    class Orphan:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(Backend("orphan", [Kernel("decaysum", "chunk", decaysum.decaysum_matrix)]))

    with registered_plugin(Orphan(), "orphan-plugin"):  # the op's plugin is not registered
        assert "orphan" not in dispatch.get_backends()
        error = next(p for p in rwkv_zoo.list_plugins() if p["name"] == "orphan-plugin")["error"]
        assert "backend 'orphan' has a chunk kernel for unknown op 'decaysum'" in error
        assert "registered ops: wkv4, wkv5, wkv6, wkv7" in error
        with pytest.raises(ValueError, match="unknown backend 'orphan'.*unknown op 'decaysum'"):
            dispatch.select(dispatch.KernelCall("wkv4", "chunk", "cpu", torch.float32, 1, 4, 1, 8), "orphan")
        # With the op registered too (a plugin may bring both, in any order), the same backend works.
        with registered_plugin(decaysum):
            assert "orphan" in dispatch.get_backends()
