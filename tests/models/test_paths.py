"""Every way a model can run, forced one at a time, against the float64 recurrent oracle.

Dispatch sends no-grad calls to the cpu backend and grad calls to a backend with a backward, and the
fused step replaces the modules without gradients: a test that does not force its path may compare a
path with itself. Here each case names and forces its path, and asserts which one ran:

- ``train``: gradients on, the backend and mode forced (``model.backend`` / ``model.mode``);
- ``modules``: no gradients, modules forced (``fused_step=False``), the backend and mode forced;
- ``module-decode``: the same token by token from the empty state (recurrent mode);
- ``fused`` / ``fused-decode``: no gradients, default dispatch, for models a fused step implements;

for every backend that runs on this CPU (reference, cpu, triton in its interpreter where installed) and
both modes. The oracle is the same weights in float64 through the reference backend's literal
recurrence. A backend that cannot run a forced case must say so (``BackendError``), never fall back.
"""

from __future__ import annotations

import os

# Triton's interpreter runs the triton backend's kernels on the CPU; it must be chosen before the first
# kernel runs (tests/kernels/test_triton.py does the same).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from _deps import block_versions

import rwkv_zoo
from rwkv_zoo import fused
from rwkv_zoo.dispatch import BackendError, get_backends

VERSIONS = block_versions()
T = 20  # > 16: chunk mode is what dispatch would pick; the chunk kernels see a partial last chunk
TOL = 1e-5  # fp32 against fp64, relative to the logits' norm (PERF.md's fp32 gate)


def _cpu_backends() -> list[str]:
    out = []
    for name, b in sorted(get_backends().items()):
        if b.unavailable_reason() is None and any(k.devices is None or "cpu" in k.devices for k in b.kernels):
            out.append(name)
    return out


BACKENDS = [b for b in _cpu_backends() if b in ("reference", "cpu", "triton")]


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm())


def _state_rel(state, want) -> float:
    """The largest relative error over every tensor of every layer's state (v4's running maximum ``p``
    starts at -1e30 for channels never updated: those tensors are compared where both are finite)."""
    worst = 0.0
    for a, b in zip(state.layers, want.layers, strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            keep = y.abs() < 1e20
            if keep.any():
                worst = max(worst, _rel(x[keep], y[keep]))
    return worst


@pytest.fixture(scope="module", params=VERSIONS)
def case(request):
    """(model fp32, tokens, (oracle logits, oracle final state) in fp64) for one version."""
    version = request.param
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=11).eval()
    toks = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    oracle = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=11).double().eval()
    oracle.backend, oracle.mode = "reference", "recurrent"
    with torch.no_grad():
        want = oracle(toks)
    return model, toks, want


def _forced(model, backend, mode, fused_step):
    model.backend, model.mode, model.fused_step = backend, mode, fused_step


def _kernel(model, backend, mode):
    """The forced backend's kernel for the model's op; False when it has none; None when the time-mix calls
    no dispatched kernel at all (attention: a forced backend or mode has nothing to apply to)."""
    op = model.blocks[0].att.wkv_op
    if not op:
        return None
    return get_backends()[backend].kernel(op, mode) or False


def _reset(model):
    _forced(model, None, None, True)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_path(case, backend, mode):
    model, toks, want = case  # want: (logits, final state) of the fp64 oracle
    _forced(model, backend, mode, False)
    try:
        kernel = _kernel(model, backend, mode)
        if kernel is not None and (not kernel or not kernel.supports_backward):
            with pytest.raises(BackendError):
                model(toks)
            return
        logits, state = model(toks)
        assert logits.requires_grad
        logits.float().square().mean().backward()
        assert _rel(logits.detach(), want[0]) < TOL and _state_rel(state, want[1]) < TOL
        assert all(p.grad is not None for n, p in model.named_parameters() if n not in model.unused_parameters())
    finally:
        model.zero_grad(set_to_none=True)
        _reset(model)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_path_without_grad(case, backend, mode):
    model, toks, want = case
    _forced(model, backend, mode, False)
    try:
        if _kernel(model, backend, mode) is False:
            with torch.no_grad(), pytest.raises(BackendError):
                model(toks)
            return
        with torch.no_grad():
            logits, state = model(toks)
        assert _rel(logits, want[0]) < TOL and _state_rel(state, want[1]) < TOL
    finally:
        _reset(model)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # interpreter: ~1 s per launch
def test_module_decode_path(case, backend):
    model, toks, want = case
    _forced(model, backend, "recurrent", False)
    try:
        state, steps = None, []
        with torch.no_grad():
            for t in range(T):
                out, state = model(toks[:, t : t + 1], state)
                steps.append(out)
        assert _rel(torch.cat(steps, 1), want[0]) < TOL and _state_rel(state, want[1]) < TOL
    finally:
        _reset(model)


def test_fused_paths(case):
    """The default without gradients: the fused step where one implements the model, else the modules."""
    model, toks, want = case
    sel = fused.select(model, fused.StepCall("cpu", torch.float32, 2, T))
    with torch.no_grad():
        full, full_state = model(toks)
        state, steps = None, []
        for t in range(T):
            out, state = model(toks[:, t : t + 1], state)
            steps.append(out)
    assert _rel(full, want[0]) < TOL and _rel(torch.cat(steps, 1), want[0]) < TOL
    assert _state_rel(full_state, want[1]) < TOL and _state_rel(state, want[1]) < TOL
    if model.version in ("v4", "v5", "v6", "v7") and "cpu" in BACKENDS:
        assert sel.backend == "cpu", sel.reason  # the path this test names really ran
    else:
        assert sel.backend is None
