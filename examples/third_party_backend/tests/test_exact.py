"""Tests of the ``exact`` backend: what a plugin author should test, in about ten seconds on a CPU.

The conformance matrix itself is one command away (rwkv-zoo installs the pytest plugin)::

    pytest --rwkv-zoo-backend exact --rwkv-zoo-plugin rwkv_zoo_exact -m rwkv_zoo_conformance
"""

from __future__ import annotations

import importlib.metadata

import pytest
import rwkv_zoo_exact
import torch

import rwkv_zoo
from rwkv_zoo.testing import check_backend, make_inputs, rel_err


@pytest.fixture
def exact(rwkv_zoo_plugin):
    """The plugin registered for one test (the fixture comes with rwkv-zoo's pytest plugin)."""
    return rwkv_zoo_plugin(rwkv_zoo_exact, "exact")


def test_registers_with_honest_capabilities(exact):
    b = {b["name"]: b for b in rwkv_zoo.list_backends()}["exact"]
    assert b["available"] and b["provider"] == exact and b["priority"] < 0
    assert b["ops"] == {op: ["recurrent", "chunk"] for op in ("wkv4", "wkv5", "wkv6", "wkv7")}
    call = rwkv_zoo.KernelCall("wkv6", "chunk", "mps", torch.float32, 1, 64, 2, 64)
    from rwkv_zoo.dispatch import get_backends

    assert get_backends()["exact"].reasons(call) == ["runs on cpu/cuda, not mps"]


def test_conformance_fp32_fp64_bf16(exact):
    report = check_backend("exact", dtypes=(torch.float32, torch.float64, torch.bfloat16), Ts=(1, 17))
    assert report.ok, str(report)
    worst = report.max_errors()
    # float64 inside: fp32 results are the exact ones rounded once, fp64 ones agree to ~1e-15.
    assert max(e for (_, _, dt), e in worst.items() if dt == "float32") < 1e-6
    assert max(e for (_, _, dt), e in worst.items() if dt == "float64") < 1e-12


def test_float64_inside_beats_the_float32_reference(exact):
    """The point of the backend: on fp32 inputs it is closer to the float64 truth than fp32 arithmetic."""
    g = torch.Generator().manual_seed(0)
    r, k, v, w, u, s = make_inputs("wkv6", 1, 512, 2, 64, generator=g)
    truth, _ = rwkv_zoo.wkv6(r, k, v, w, u, s, backend="reference", mode="recurrent")
    args32 = [x.float() for x in (r, k, v, w, u, s)]
    ref32, _ = rwkv_zoo.wkv6(*args32, backend="reference", mode="chunk")
    exact32, _ = rwkv_zoo.wkv6(*args32, backend="exact", mode="chunk")
    assert exact32.dtype == torch.float32
    assert rel_err(exact32, truth) < rel_err(ref32, truth)
    assert rel_err(exact32, truth) < 1e-7


def test_a_model_runs_on_it_and_explain_says_so(exact):
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7-tiny"), seed=0).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref, _ = model(tokens)
        with rwkv_zoo.use_backend("exact"):
            text = str(rwkv_zoo.explain(model, tokens))
            out, state = model(tokens)
    assert "-> exact (use_backend(): chosen explicitly)" in text
    assert rel_err(out, ref) < 1e-5 and state.layers[0].wkv.dtype == torch.float32


def test_bf16_model_keeps_its_dtypes(exact):
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v6-tiny"), seed=0).to(torch.bfloat16).eval()
    tokens = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad(), rwkv_zoo.use_backend("exact"):
        logits, state = model(tokens)
    assert logits.dtype == torch.bfloat16 and state.layers[0].wkv.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_entry_point_is_declared():
    """Installed (pip install -e .), the distribution declares the entry point rwkv_zoo loads."""
    try:
        dist = importlib.metadata.distribution("rwkv-zoo-exact")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rwkv-zoo-exact is not installed: pip install -e .")
    eps = [ep for ep in dist.entry_points if ep.group == "rwkv_zoo"]
    assert [(ep.name, ep.value) for ep in eps] == [("exact", "rwkv_zoo_exact")]
