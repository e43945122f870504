"""The ``cpu`` backend's training kernels (csrc/cpu_wkv_train.cpp): outputs, final state and every
gradient against the reference in fp64, and dispatch giving them gradient calls on CPU tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from _deps import CXX, needs

import rwkv_zoo
from rwkv_zoo import dispatch, layerops, ops
from rwkv_zoo.backends import cpu as cpu_backend
from rwkv_zoo.backends.cpu import train as cpu_train
from rwkv_zoo.dispatch import KernelCall
from rwkv_zoo.opspec import get_op
from rwkv_zoo.testing import evaluate, rel_err

pytestmark = [pytest.mark.kernel, needs(cpu_backend.unavailable_reason() or cpu_train.unavailable_reason(), CXX)]

GATE = 1e-5  # fp32 against fp64 (PERF.md "Accuracy gates")
TRAINED = ("wkv7", "wkv6", "wkv5", "wkv4")


def _case(op: str, B: int, T: int, H: int, N: int, seed: int, decay_scale: float = 1.0):
    """fp64 inputs (random non-zero initial state last) and random fp64 upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    spec = get_op(op)
    inputs = spec.random_inputs(B, T, H, N, generator=g, decay_scale=decay_scale)
    probe = evaluate(lambda *a: ops.call(op, *a[:-1], state=a[-1], backend="reference", mode="chunk"), op, inputs,
                     None, grad=False)
    upstream = {n: torch.randn(probe[n].shape, generator=g, dtype=torch.float64) for n in ("y", *spec.state_names)}
    return inputs, upstream


def _compare(op: str, inputs, upstream, drop: tuple[str, ...] = ()) -> dict[str, float]:
    """Relative errors of the cpu kernel (fp32) against the reference chunk form in fp64 (exact to rounding),
    both under the loss sum(y * dy) + sum(state * dstate) without the terms named in ``drop``."""
    spec = get_op(op)
    if "state" in drop:
        drop = (*drop, *spec.state_names)
    up = {n: (torch.zeros_like(t) if n in drop else t) for n, t in upstream.items()}

    def cpu(*a):
        y, s = ops.call(op, *a[:-1], state=a[-1], backend="cpu")
        # A dropped term is not used at all, so autograd hands the kernel None for it.
        if "state" in drop:
            s = tuple(x.detach() for x in s) if isinstance(s, tuple) else s.detach()
        return (y.detach() if "y" in drop else y), s

    ref = evaluate(lambda *a: ops.call(op, *a[:-1], state=a[-1], backend="reference", mode="chunk"), op, inputs, up)
    got = evaluate(cpu, op, spec.cast_inputs(inputs, torch.float32, "cpu"), up)
    errors = {}
    for name, want in ref.items():
        have = got[name]
        assert have is not None, f"{op}: no {name}"
        assert torch.isfinite(have).all(), f"{op}: {name} has NaN or Inf"
        assert have.shape == want.shape
        errors[name] = rel_err(have, want)
    assert set(errors) >= {"y", *spec.state_names, *(f"d{n}" for n in (*spec.arg_names, *spec.state_names))}
    return errors


@pytest.mark.parametrize("op", TRAINED)
@pytest.mark.parametrize("N", [16, 32, 64])
def test_every_gradient_matches_reference(op, N):
    # B > 1, a random initial state, T = 37: two whole checkpoint chunks of 16 and a partial one
    # (wkv4 has no heads: C = H * N channels, a partial block of 64 when C = 32).
    H = 2 if N < 64 else 1
    inputs, upstream = _case(op, 2, 37, H, N, seed=N)
    errors = _compare(op, inputs, upstream)
    assert max(errors.values()) <= GATE, errors


@pytest.mark.parametrize("op", ["wkv6", "wkv5"])
def test_every_gradient_matches_reference_at_other_head_sizes_and_short_sequences(op):
    # N = 8 and 24 run the kernels' generic (run-time N) code, N = 16 its transposed backward walk;
    # T = 3 and 5 are shorter than one checkpoint chunk, 21 one whole chunk and a partial one. B * H = 6
    # tasks: the next task's rows are prefetched from the middle of another.
    for N, T in ((8, 3), (24, 21), (16, 5)):
        inputs, upstream = _case(op, 3, T, 2, N, seed=N)
        errors = _compare(op, inputs, upstream)
        assert max(errors.values()) <= GATE, (N, T, errors)


@pytest.mark.parametrize("op", TRAINED)
def test_gradient_from_only_the_output_or_only_the_state(op):
    # Infctx chunking sends a gradient into the final state; a plain loss sends none (None, not zeros).
    inputs, upstream = _case(op, 1, 20, 1, 16, seed=3)
    for drop in (("state",), ("y",)):
        errors = _compare(op, inputs, upstream, drop)
        assert max(errors.values()) <= GATE, (drop, errors)


@pytest.mark.parametrize("op", ["wkv6", "wkv5", "wkv4"])
@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_strong_and_weak_decay(op, scale):
    inputs, upstream = _case(op, 1, 33, 2, 16, seed=5, decay_scale=scale)
    errors = _compare(op, inputs, upstream)
    assert max(errors.values()) <= GATE, errors


def test_one_token_and_exactly_one_chunk():
    for T in (1, cpu_train.CKPT_LEN):
        inputs, upstream = _case("wkv7", 1, T, 2, 16, seed=T)
        errors = _compare("wkv7", inputs, upstream)
        assert max(errors.values()) <= GATE, (T, errors)


@pytest.mark.parametrize("op", TRAINED)
def test_dispatch_gives_gradient_calls_on_cpu_tensors_to_cpu(op):
    call = KernelCall(op, "chunk", "cpu", torch.float32, 16, 512, 4, 64, requires_grad=True, has_state=True)
    assert dispatch.select(call).backend == "cpu"
    # The real front-end with leaves that need gradients ends in the C++ backward.
    inputs = get_op(op).cast_inputs(get_op(op).random_inputs(1, 20, 1, 16), torch.float32, "cpu")
    state = tuple(x.requires_grad_() for x in inputs[-1]) if op == "wkv4" else inputs[-1].requires_grad_()
    leaves = [x.requires_grad_() for x in inputs[:-1]] + list(state if op == "wkv4" else [state])
    y, s = ops.call(op, *inputs[:-1], state=state)
    node = {"wkv7": "_WKV7Backward", "wkv4": "_WKV4Backward"}.get(op, "_WKV6Backward")
    states = s if isinstance(s, tuple) else (s,)
    assert type(y.grad_fn).__name__ == node and all(type(x.grad_fn).__name__ == node for x in states)
    (y.sum() + sum(x.sum() for x in states)).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_tiny_models_train_the_same_on_cpu_and_reference():
    # One version here: tests/models/test_paths.py trains every version through the cpu backend too.
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    for name in ("v7-tiny",):
        model = rwkv_zoo.randomize_(rwkv_zoo.build(name), seed=1)
        grads = {}
        for backend in ("cpu", "reference"):
            model.zero_grad()
            model.backend = backend
            logits, _ = model(tokens)
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
            grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert rel_err(grads["cpu"], grads["reference"]) < 1e-4, name


@pytest.mark.parametrize(("form", "F", "dyn", "T"),
                         [("delta", 6, False, 9), ("delta", 5, True, 9), ("lerp", 3, False, 9), ("delta", 5, True, 2)])
def test_shift_mix_matches_pytorch_in_fp64(form, F, dyn, T):
    # The fused token shift + lerps (v6/v7 "delta" form with v6's data-dependent part, v4/v5 "lerp"
    # form): values and every gradient against the PyTorch expression in fp64. T = 2: fewer tokens than
    # the rows the backward prefetches ahead.
    g = torch.Generator().manual_seed(3)
    B, C = 3, 40
    leaves = [torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g),
              *(torch.rand(1, 1, C, generator=g) for _ in range(F))]
    if dyn:
        leaves.append(0.1 * torch.randn(F, B, T, C, generator=g))
    up = torch.randn(F, B, T, C, generator=g, dtype=torch.float64)

    def run(xs, backend):
        xs = [x.clone().requires_grad_() for x in xs]
        outs = layerops.shift_mix(xs[0], xs[1], xs[2:2 + F], xs[2 + F] if dyn else None, form, backend=backend)
        assert len(outs) == F
        out = torch.stack(outs)
        grads = torch.autograd.grad(out, xs, up.to(out.dtype))
        return out.detach().double(), [d.double() for d in grads]

    got, got_grads = run(leaves, "cpu")
    want, want_grads = run([x.double() for x in leaves], "reference")
    assert rel_err(got, want) < GATE
    for have, ref in zip(got_grads, want_grads, strict=True):
        assert rel_err(have, ref) < GATE


def test_relu_sq_matches_pytorch_in_fp64():
    x = torch.randn(4, 8, 96, generator=torch.Generator().manual_seed(4))
    up = torch.randn(4, 8, 96, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    ya, yb = layerops.relu_sq(a, backend="cpu"), layerops.relu_sq(b, backend="reference")
    (ya.double() * up).sum().backward()
    (yb * up).sum().backward()
    assert rel_err(ya.double(), yb) < GATE and rel_err(a.grad.double(), b.grad) < GATE


def test_tanh_matches_pytorch_in_fp64():
    # Values from tiny to saturated (tanh(x) ~ x near 0 must keep its relative accuracy), and the gradient.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 8, 96, generator=g) * torch.logspace(-6, 1, 96)
    up = torch.randn(4, 8, 96, generator=g, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.double().requires_grad_()
    ya, yb = layerops.tanh(a, backend="cpu"), layerops.tanh(b, backend="reference")
    assert ya.grad_fn.name() == "_TanhBackward"  # the C++ op ran, not torch.tanh
    (ya.double() * up).sum().backward()
    (yb * up).sum().backward()
    assert ((ya.double() - yb).abs() / yb.abs()).max() < GATE
    assert rel_err(a.grad.double(), b.grad) < GATE


def _channel_mix_case(form, receptance, B, T, C, F_, seed):
    """fp32 inputs and modules for layerops.channel_mix, an fp64 copy of each, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g)
    shift = torch.randn(B, C, generator=g)
    mixes = [torch.rand(1, 1, C, generator=g) for _ in range(2)]
    mods = [torch.nn.Linear(i, o, bias=False) for i, o in ((C, F_), (F_, C), (C, C))]
    for m in mods:
        m.weight.data = torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5
    if not receptance:
        mixes[1], mods[2] = None, None
    up = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    f64 = [None if m is None else copy.deepcopy(m).double() for m in mods]
    leaves = [t.clone().requires_grad_() for t in (x, shift, *(m for m in mixes if m is not None))]
    leaves64 = [t.double().requires_grad_() for t in leaves]
    return leaves, mods, leaves64, f64, up


@pytest.mark.parametrize(("form", "receptance"), [("lerp", True), ("delta", True), ("delta", False)])
def test_channel_mix_matches_pytorch_in_fp64(form, receptance):
    # The whole channel-mix (token shift, three products, relu^2, sigmoid; v7: no receptance) against its
    # PyTorch definition in fp64, every gradient: x, the shift state, the mixes, the weights. Rows not a
    # multiple of the kernel's 6-row tiles or its row blocks, C and F not multiples of 16, 1 and 2 threads.
    threads = torch.get_num_threads()
    try:
        for (B, T, C, F_), n in (((3, 37, 24, 40), 1), ((2, 101, 20, 72), 2)):
            torch.set_num_threads(n)
            leaves, mods, leaves64, f64, up = _channel_mix_case(form, receptance, B, T, C, F_, seed=B + C)
            outs = []
            for ts, ms, backend in ((leaves, mods, "cpu"), (leaves64, f64, "reference")):
                mr = ts[3] if receptance else None
                y = layerops.channel_mix(ts[0], ts[1], ts[2], mr, ms[0], ms[1], ms[2], form=form, backend=backend)
                params = [m.weight for m in ms if m is not None]
                grads = torch.autograd.grad((y.double() * up).sum(), [*ts, *params])
                outs.append((y, grads))
            assert outs[0][0].grad_fn.name() == "_ChannelMixBackward"  # the C++ op ran
            assert rel_err(outs[0][0].double(), outs[1][0]) < GATE
            for have, want in zip(outs[0][1], outs[1][1], strict=True):
                assert have.shape == want.shape
                assert rel_err(have.double(), want) < GATE
    finally:
        torch.set_num_threads(threads)


def test_channel_mix_runs_wrapped_projections_as_modules():
    # A projection that is not a plain nn.Linear (a hook here; a LoRA layer or a parametrized weight alike)
    # must run as the module it is: the op declines and the definition, which calls the modules, runs. So
    # does an autocast region (the products would run in bf16 there) and a width where MKL is faster.
    leaves, mods, *_ = _channel_mix_case("lerp", True, 2, 9, 16, 32, seed=3)
    seen = []
    handle = mods[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    y = layerops.channel_mix(leaves[0], leaves[1], leaves[2], leaves[3], *mods, form="lerp", backend="cpu")
    assert seen == [torch.Size([2, 9, 32])] and y.grad_fn.name() != "_ChannelMixBackward"
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layerops.channel_mix(leaves[0], leaves[1], leaves[2], leaves[3], *mods, form="lerp", backend="cpu")
    assert y.dtype == torch.bfloat16
    y = layerops.channel_mix(leaves[0], leaves[1], leaves[2], leaves[3], *mods, form="lerp", backend="cpu")
    assert y.grad_fn.name() == "_ChannelMixBackward"
    # Past 192 x 768 weights MKL's packed products are faster: the modules run.
    leaves, mods, *_ = _channel_mix_case("lerp", True, 1, 3, 256, 1024, seed=4)
    y = layerops.channel_mix(leaves[0], leaves[1], leaves[2], leaves[3], *mods, form="lerp", backend="cpu")
    assert y.grad_fn.name() != "_ChannelMixBackward"


def test_ddlerp_matches_pytorch_in_fp64():
    # v6's data-dependent token shift and decay against its PyTorch definition in fp64: the five outputs
    # and every gradient (x, the shift state, the six mixes, both LoRAs, the decay), with a random upstream
    # gradient for each output; rows not a multiple of the row blocks, 1 and 2 threads, C wider than 5 Dm.
    threads = torch.get_num_threads()
    try:
        for (B, T, C, Dm, Dd), n in (((3, 37, 24, 8, 16), 1), ((2, 101, 32, 12, 20), 2), ((1, 130, 48, 4, 8), 2)):
            torch.set_num_threads(n)
            g = torch.Generator().manual_seed(C)
            x, shift = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
            mixes = [torch.rand(1, 1, C, generator=g) for _ in range(6)]
            w1, w2 = torch.randn(C, 5 * Dm, generator=g) * 0.3, torch.randn(5, Dm, C, generator=g) * 0.3
            decay = torch.randn(1, 1, C, generator=g) * 0.5 - 1
            dw1, dw2 = torch.randn(C, Dd, generator=g) * 0.3, torch.randn(Dd, C, generator=g) * 0.3
            ups = [torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(5)]
            results = []
            for dtype, backend in ((torch.float32, "cpu"), (torch.float64, "reference")):
                ins = [t.to(dtype).requires_grad_() for t in (x, shift, *mixes, w1, w2, decay, dw1, dw2)]
                outs = layerops.ddlerp(ins[0], ins[1], ins[2], ins[3:8], *ins[8:], backend=backend)
                loss = sum((o.double() * u).sum() for o, u in zip(outs, ups, strict=True))
                results.append((outs, torch.autograd.grad(loss, ins)))
            assert results[0][0][0].grad_fn.name() == "_DDLerpBackward"  # the C++ op ran
            for have, want in zip([*results[0][0], *results[0][1]], [*results[1][0], *results[1][1]], strict=True):
                assert have.shape == want.shape
                assert rel_err(have.double(), want) < GATE
    finally:
        torch.set_num_threads(threads)


def test_cpu_training_step_is_fused_and_deterministic():
    # The trainer's CPU optimizer is the fused AdamW; its run equals the for-loop AdamW's within fp32
    # rounding, and two runs with one thread count are bit-identical.
    from rwkv_zoo.train.trainer import TrainConfig, Trainer

    cfg = {"model": "v7", "model_options": {"n_layer": 1, "n_embd": 32, "head_size": 16}, "steps": 3,
           "batch_size": 4, "progress": False, "threads": 1, "lr": 1e-2,
           "data": {"task": "mqar", "num_pairs": 2, "num_keys": 8, "num_values": 8, "seq_len": 16}}
    runs = []
    for fused in (True, True, False):
        tr = Trainer(TrainConfig.from_dict(cfg))
        assert tr.optimizer.defaults["fused"] is True
        if not fused:
            groups = [{k: v for k, v in g.items() if k != "fused"} for g in tr.optimizer.param_groups]
            tr.optimizer = torch.optim.AdamW(groups, fused=False, foreach=False)
        for _ in range(2):
            tr.train_step()
        runs.append(torch.cat([p.detach().flatten() for p in tr.params]))
    assert torch.equal(runs[0], runs[1])
    assert rel_err(runs[0], runs[2]) < 1e-5


def test_head_group_norm_matches_pytorch_in_fp64():
    g = torch.Generator().manual_seed(6)
    ln = torch.nn.GroupNorm(4, 64, eps=64e-5)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5, generator=g)
        ln.bias.uniform_(-0.5, 0.5, generator=g)
    ln64 = torch.nn.GroupNorm(4, 64, eps=64e-5).double()
    ln64.load_state_dict(ln.state_dict())
    y = torch.randn(3, 5, 4, 16, generator=g)
    up = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    got, want = [], []
    for norm, x, out, be in ((ln, y.clone().requires_grad_(), got, "cpu"),
                             (ln64, y.double().requires_grad_(), want, "reference")):
        o = layerops.head_group_norm(x, norm, backend=be)
        grads = torch.autograd.grad(o, [x, norm.weight, norm.bias], up.to(o.dtype))
        out.extend(t.detach().double() for t in (o, *grads))
    for have, ref in zip(got, want, strict=True):
        assert rel_err(have, ref) < GATE


def test_layer_ops_follow_the_explicit_backend_choice():
    # Versions call rwkv_zoo.layerops, never a backend: the cpu backend offers its versions through
    # Backend.layer_ops, "reference" is plain PyTorch, and a call the cpu version cannot run (fp64)
    # falls back to the definition.
    assert layerops.implementations("shift_mix", "reference") == ()
    assert layerops.implementations("relu_sq", "cpu") == (cpu_train.relu_sq,)
    assert cpu_train.relu_sq in layerops.implementations("relu_sq")  # automatic: by priority
    with dispatch.use_backend("reference"):
        assert layerops.implementations("head_group_norm") == ()
    x = torch.randn(5, 7, dtype=torch.float64)
    assert cpu_train.relu_sq(x) is NotImplemented
    assert torch.equal(layerops.relu_sq(x, backend="cpu"), torch.relu(x).square())
    assert set(layerops.LAYER_OPS) == set(dispatch.get_backends()["cpu"].layer_ops)


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_trainer_clipping_matches_clip_grad_norm(scale):
    # The trainer's clipping skips clip_grad_norm_'s multiply by exactly 1.0 under the limit: the same
    # norm and the same gradients bit for bit, clipped (scale 10) or not (scale 1e-3).
    from rwkv_zoo.train.trainer import _clip_grad_norm

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(64, 64), (64,), (3, 5)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref, strict=True):
        p.grad = torch.randn(p.shape, generator=g) * scale
        q.grad = p.grad.clone()
    norm = _clip_grad_norm(ours, 1.0)
    assert norm == float(torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=True))
    assert (norm > 1.0) == (scale > 1)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, ref, strict=True))
