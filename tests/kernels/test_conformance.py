"""``rwkv_zoo.testing.check_backend``: the reference backend conforms, broken backends are caught."""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.backends.reference.chunk import wkv6_chunk
from rwkv_zoo.testing import check_backend

pytestmark = pytest.mark.kernel


def test_reference_backend_conforms():
    report = check_backend("reference")
    assert report.ok, str(report)
    ran = [r for r in report.results if not r.skipped]
    assert {(r.op, r.mode) for r in ran} == {
        (op, mode) for op in ("wkv4", "wkv5", "wkv6", "wkv7") for mode in ("recurrent", "chunk")
    }
    assert all(r.errors and max(r.errors.values()) <= 1e-5 for r in ran)
    text = str(report)
    assert "40/40 cases passed" in text and "wkv7" in text and "chunk" in text


def test_reference_backend_conforms_in_fp64_and_bf16():
    report = check_backend("reference", dtypes=(torch.float64, torch.bfloat16), Ts=(1, 65))
    assert report.ok, str(report)
    worst = report.max_errors()
    assert all(err <= 1e-10 for (_, _, dt), err in worst.items() if dt == "float64")


def _backend_plugin(name: str, kernels: list[rwkv_zoo.Kernel]):
    class Plugin:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(rwkv_zoo.Backend(name=name, kernels=kernels, priority=-100, description="test double"))

    return rwkv_zoo.plugin(Plugin(), name=f"{name}-plugin")


def _scaled(r, k, v, w, u, state):
    y, s = wkv6_chunk(r, k, v, w, u, state)
    return y * 1.01, s


def _nan(r, k, v, w, u, state):
    y, s = wkv6_chunk(r, k, v, w, u, state)
    y = y.clone()
    y[0, -1, 0, 0] = float("nan")  # one unwritten-looking element
    return y, s


def _wrong_dtype(r, k, v, w, u, state):
    y, s = wkv6_chunk(r, k, v, w, u, state)
    return y.double(), s


def _state_detached(r, k, v, w, u, state):
    return wkv6_chunk(r, k, v, w, u, state.detach())


def _raises(r, k, v, w, u, state):
    raise RuntimeError("kernel exploded")


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (_scaled, "y error"),
        (_nan, "y has NaN/Inf"),
        (_wrong_dtype, "y is float64, expected float32"),
        (_state_detached, "no gradient for state"),
        (_raises, "raised RuntimeError: kernel exploded"),
    ],
    ids=["y*1.01", "nan", "wrong-dtype", "state-detached", "raises"],
)
def test_broken_backend_fails(fn, expected):
    with _backend_plugin("broken-test", [rwkv_zoo.Kernel("wkv6", "chunk", fn)]):
        report = check_backend("broken-test", raise_on_fail=False)
        assert not report.ok
        assert report.failures and all(r.op == "wkv6" and r.mode == "chunk" for r in report.failures)
        assert any(expected in r.message for r in report.failures), str(report)
        with pytest.raises(AssertionError, match="wkv6 \\[chunk\\]"):
            check_backend("broken-test")


def test_capabilities_are_respected():
    """Calls a kernel declares it cannot run are skipped; a kernel without backward is checked forward only."""
    kernels = [
        rwkv_zoo.Kernel("wkv6", "chunk", wkv6_chunk, supports_backward=False),
        rwkv_zoo.Kernel("wkv6", "recurrent", wkv6_chunk, dtypes=[torch.float16]),
    ]
    with _backend_plugin("partial-test", kernels):
        report = check_backend("partial-test", Ts=(1, 40))
        assert report.ok, str(report)
        chunk = [r for r in report.results if r.mode == "chunk"]
        assert all(r.passed and "forward only" in r.message and "dr" not in r.errors for r in chunk)
        rec = [r for r in report.results if r.mode == "recurrent"]
        assert all(r.skipped and "float16" in r.message for r in rec)
        with pytest.raises(AssertionError, match="no conformance case could run"):
            check_backend("partial-test", modes=["recurrent"])


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        check_backend("nope")
