"""Inference fast paths: the one-token ``DecodeStep`` equals the module path, ``prepare_inference`` weights
(fp32 exact, bf16 / int8 close), the CPU GEMV kernels against ``F.linear``, their fallback, flat decode
memory, and ``rwkv-zoo bench``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rwkv_zoo
from rwkv_zoo import cpu_kernels, inference
from rwkv_zoo.checkpoint import CheckpointError
from rwkv_zoo.inference import InferenceLinear, prepare_inference
from rwkv_zoo.testing import registered_plugin

MODELS = ["v4-tiny", "v5-tiny", "v6-tiny", "v7-tiny"]


def _model(name, seed=1, **kw):
    return rwkv_zoo.randomize_(rwkv_zoo.build(name, **kw), seed=seed).eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _decode(model, tokens, state, fast: bool):
    """Feed tokens [B, T] one at a time; returns the stacked logits [B, T, V] and the final state."""
    model.fast_decode = fast
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            lo, state = model(tokens[:, t : t + 1], state)
            out.append(lo)
    model.fast_decode = True
    return torch.cat(out, 1), state


def _state_err(s1, s2):
    return max(_rel(a.float(), b.float()) for l1, l2 in zip(s1.layers, s2.layers, strict=True)
               for a, b in zip(l1.tensors(), l2.tensors(), strict=True) if b.norm() > 0)


@pytest.mark.parametrize("name", [*MODELS, "hybrid"])
def test_fast_decode_equals_module_path(name):
    if name == "hybrid":
        model = _model("v6", layers="v7,v6,v5,v4", n_layer=4, n_embd=64, vocab_size=256, head_size=16)
    else:
        model = _model(name)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompt, steps = torch.randint(0, V, (3, 5), generator=g), torch.randint(0, V, (3, 6), generator=g)
    with torch.no_grad():
        _, state = model(prompt)
    slow, s_slow = _decode(model, steps, state, fast=False)
    fast, s_fast = _decode(model, steps, state, fast=True)
    assert _rel(fast, slow) < 1e-5 and _state_err(s_fast, s_slow) < 1e-5
    # from the empty state (the kernels see no state), and the model's tuned initial state
    slow0, _ = _decode(model, steps[:, :2], None, fast=False)
    fast0, _ = _decode(model, steps[:, :2], None, fast=True)
    assert _rel(fast0, slow0) < 1e-5


def test_fast_decode_follows_weight_updates_and_rescale():
    model = _model("v5-tiny")
    tok = torch.tensor([[3]])
    with torch.no_grad():
        model(tok)  # builds and caches the step
        model.blocks[0].att.time_decay.add_(0.5)  # in place: the cached constants must be rebuilt
        model.set_rescale(1)
    slow, _ = _decode(model, tok, None, fast=False)
    fast, _ = _decode(model, tok, None, fast=True)
    assert _rel(fast, slow) < 1e-5


def test_fast_decode_follows_dtype_round_trips():
    model = prepare_inference(_model("v6-tiny"), "fp32")
    tok = torch.tensor([[3]])
    with torch.no_grad():
        before, _ = model(tok)  # caches the step (and its pointers into the fp32 tensors)
        model.double().float()  # every tensor replaced
        after, _ = model(tok)
    assert _rel(after, before) < 1e-6


def test_fast_paths_under_inference_mode():
    """A model built and prepared under torch.inference_mode() (its tensors have no version counter)."""
    ref = _model("v7-tiny")
    with torch.inference_mode():
        model = prepare_inference(_model("v7-tiny"), "fp32")
        got, state = model(torch.tensor([[1, 2, 3]]))
        got2, _ = model(torch.tensor([[4]]), state)
    with torch.no_grad():
        want, ref_state = ref(torch.tensor([[1, 2, 3]]))
        want2, _ = ref(torch.tensor([[4]]), ref_state)
    assert _rel(got, want) < 1e-5 and _rel(got2, want2) < 1e-5


def test_fast_decode_follows_load_state_dict_with_assign():
    model, other = _model("v7-tiny", seed=1), _model("v7-tiny", seed=2)
    tok = torch.tensor([[3]])
    with torch.no_grad():
        model(tok)  # caches the step with seed-1 tensors
        model.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects
        ours, _ = model(tok)
        ref, _ = other(tok)
    assert _rel(ours, ref) < 1e-6


def test_fast_decode_uses_the_backend_dispatch_chose():
    calls = []
    from rwkv_zoo.backends.reference.recurrent import wkv7_recurrent

    def counting(*args):
        calls.append(args[0].shape)
        return wkv7_recurrent(*args)

    class Plugin:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(rwkv_zoo.Backend("counting", [rwkv_zoo.Kernel("wkv7", "recurrent", counting)], priority=50))

    model = _model("v7-tiny")
    steps = torch.tensor([[1, 2, 3]])
    ref, _ = _decode(model, steps, None, fast=False)
    with registered_plugin(Plugin(), "counting-plugin"):
        out, _ = _decode(model, steps, None, fast=True)
    assert len(calls) == 3 * model.config.n_layer and all(s[1] == 1 for s in calls)
    assert _rel(out, ref) < 1e-5


def test_gradients_and_other_dtypes_take_the_module_path():
    model = _model("v7-tiny")
    logits, _ = model(torch.tensor([[1]]))  # grad enabled: the module path, differentiable
    logits.sum().backward()
    assert model.head.weight.grad is not None
    assert not inference.can_fast_decode(model.to(torch.float64), 1)


@pytest.mark.parametrize("name", MODELS)
def test_prepared_weights(name):
    ref_model = _model(name)
    g = torch.Generator().manual_seed(2)
    V = ref_model.config.vocab_size
    prompt, steps = torch.randint(0, V, (2, 20), generator=g), torch.randint(0, V, (2, 4), generator=g)
    with torch.no_grad():
        ref_full, state = ref_model(prompt)
    ref_steps, _ = _decode(ref_model, steps, state, fast=False)
    for weights, tol in (("fp32", 1e-5), ("bf16", 2e-2), ("int8", 5e-2)):
        model = prepare_inference(_model(name), weights)
        assert all(not p.requires_grad for p in model.parameters())
        assert isinstance(model.head, InferenceLinear) and model.head.kind == weights
        with torch.no_grad():
            full, _ = model(prompt)  # 40 rows: the widened-weight GEMM path
        out, _ = _decode(model, steps, state, fast=True)  # 2 rows: the GEMV kernels
        assert _rel(full, ref_full) < tol and _rel(out, ref_steps) < tol, weights
        kl = F.kl_div(torch.log_softmax(out, -1), torch.log_softmax(ref_steps, -1), log_target=True,
                      reduction="none").sum(-1).mean()
        assert kl < (1e-6 if weights == "fp32" else 2e-2)


def _fused_vs_python(model, B, steps=4, seed=0):
    """Decode ``steps`` tokens for B sequences with the one-call C++ step and with the Python step."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prompt, toks = torch.randint(0, V, (B, 3), generator=g), torch.randint(0, V, (B, steps), generator=g)
    out = {}
    for fused in (True, False):
        model.fused_decode = fused
        inference.invalidate(model)
        with torch.no_grad():
            _, state = model(prompt)
        first, _ = _decode(model, toks[:, :2], None, fast=True)  # from the empty state
        logits, state = _decode(model, toks, state, fast=True)
        out[fused] = (first, logits, state, inference.decode_step(model).fused())
    model.fused_decode = True
    return out[True], out[False]


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the CPU kernels (a C++ compiler, AVX2)")
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", [*MODELS, "hybrid"])
def test_fused_decode_equals_python_step(name, weights):
    if name == "hybrid":  # every time-mix and channel-mix in one model; vocab 250 pads the head's tiles
        model = _model("v6", layers="v7,v6,v5,v4,v7", n_layer=5, n_embd=64, vocab_size=250, head_size=16)
    else:
        model = _model(name)
    prepare_inference(model, weights)
    for B in (1, 3, 17):
        (f0, f, fs, fused), (p0, p, ps, none) = _fused_vs_python(model, B)
        assert isinstance(fused, inference.FusedDecode) and none is None
        assert _rel(f0, p0) < 1e-5 and _rel(f, p) < 1e-5 and _state_err(fs, ps) < 1e-5, B


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the CPU kernels (a C++ compiler, AVX2)")
def test_fused_decode_rescale_batch_limit_and_coverage():
    model = _model("v4", n_layer=4, n_embd=64, vocab_size=101)
    model.set_rescale(2)  # x halves after every second layer, the weights were divided to match
    prepare_inference(model, "fp32")
    (_, f, fs, fused), (_, p, ps, _) = _fused_vs_python(model, 2)
    assert fused is not None and _rel(f, p) < 1e-5 and _state_err(fs, ps) < 1e-5
    # v4's "head" is the whole width: any width goes (the 256-channel limit is for matrix-state heads)
    wide = prepare_inference(_model("v4", n_layer=1, n_embd=320, vocab_size=64), "int8")
    (_, f, fs, fused), (_, p, ps, _) = _fused_vs_python(wide, 2)
    assert fused is not None and _rel(f, p) < 1e-5 and _state_err(fs, ps) < 1e-5
    # an unprepared model, or fused_decode off: the Python step
    plain = _model("v7-tiny")
    with torch.no_grad():
        plain(torch.tensor([[1]]))
    step = inference.decode_step(plain)
    assert step.fused() is None and "prepare_inference" in step.fused_why_not


@pytest.mark.skipif(not cpu_kernels.available(), reason="needs the CPU kernels (a C++ compiler, AVX2)")
@pytest.mark.parametrize("name", [*MODELS, "hybrid"])
def test_fused_prefill_equals_module_path(name, monkeypatch):
    def make():
        if name == "hybrid":
            return _model("v6", layers="v7,v6,v5,v4,v7", n_layer=5, n_embd=64, vocab_size=250, head_size=16)
        return _model(name)

    ref, model = make(), prepare_inference(make(), "fp32")
    monkeypatch.setattr(inference, "PREFILL_CHUNK", 7)  # 19 tokens: chunks of 7, 7, 5 with the state between
    g = torch.Generator().manual_seed(3)
    V = ref.config.vocab_size
    toks = torch.randint(0, V, (3, 30), generator=g)
    with torch.no_grad():
        for keep in (0, 1, 9):
            want, ws = ref(toks[:, :19], logits_to_keep=keep)
            got, gs = model(toks[:, :19], logits_to_keep=keep)
            assert got.shape == want.shape and _rel(got, want) < 1e-5 and _state_err(gs, ws) < 1e-5, keep
        want2, ws2 = ref(toks[:, 19:], ws)  # continuing from a state
        got2, gs2 = model(toks[:, 19:], gs)
    assert inference.decode_step(model).fused() is not None
    assert _rel(got2, want2) < 1e-5 and _state_err(gs2, ws2) < 1e-5


def test_prepared_model_refuses_save_and_load_option(tmp_path):
    model = _model("v6-tiny")
    path = tmp_path / "m.pth"
    rwkv_zoo.save(model, path)
    q = rwkv_zoo.load(path, weights="int8")
    assert q.inference_weights == "int8" and q.blocks[0].ffn.key.qweight.dtype == torch.int8
    with pytest.raises(CheckpointError, match="prepared for inference"):
        rwkv_zoo.save(q, tmp_path / "again.pth")
    with pytest.raises(ValueError, match="weights must be one of"):
        prepare_inference(model, "int4")
    bf = prepare_inference(_model("v6-tiny").to(torch.bfloat16), "int8")  # a bf16 model is widened
    assert bf.dtype == torch.float32 and bf.head.kind == "int8"
    tok = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        a, _ = model(tok)
        b, _ = q(tok)
    assert _rel(b, a) < 5e-2


def test_quantize_int8_is_per_output_channel():
    w = torch.randn(6, 40) * torch.tensor([1e-3, 1, 10, 100, 0.5, 2.0])[:, None]
    q, scale = inference.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert (q.abs().amax(1) == 127).all()  # every row uses its full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 5, 16, 3000])  # 3000 rows: two row blocks of the prefill loop
def test_gemv_kernels_match_linear(M):
    g = torch.Generator().manual_seed(M)
    N = 37  # padded to whole 4-row tiles
    # K: a multiple of 8 (fp32/int8 tiles) but not of 16; bf16 tiles take 16 columns per step
    cases = (("fp32", 200, (10, 25, 4, 8)), ("bf16", 208, (10, 13, 4, 16)), ("int8", 200, (10, 25, 4, 8)))
    for kind, K, shape in cases:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        lin = InferenceLinear(w, kind)
        assert lin.packed and lin.qweight.shape == shape
        if kind == "int8":
            q, s = inference.quantize_int8(w)
            ref_w = q.float() * s[:, None]
        else:
            ref_w = w.bfloat16().float() if kind == "bf16" else w
        tol = 1e-4
        torch.testing.assert_close(lin.dequantized(), ref_w)  # unpack inverts pack
        torch.testing.assert_close(lin(x), F.linear(x, ref_w), rtol=tol, atol=tol)
        # a strided input (rows of a wider buffer), as the decode step passes views, and a 3-D one
        wide = torch.randn(M, K + 13, generator=g)[:, :K]
        torch.testing.assert_close(lin(wide), F.linear(wide, ref_w), rtol=tol, atol=tol)
        torch.testing.assert_close(lin(x[:, None]), F.linear(x[:, None], ref_w), rtol=tol, atol=tol)
    assert not InferenceLinear(torch.randn(4, 200), "bf16").packed  # bf16 needs K % 16 == 0


def test_kernels_build_where_they_can():
    """Where nothing rules them out (x86-64 with AVX2, a compiler, not disabled), every library must
    build and load: the callers fall back to PyTorch silently, so only this test sees a broken source."""
    if cpu_kernels._static_reason() is not None:
        pytest.skip(cpu_kernels._static_reason())
    for load in (cpu_kernels._load, cpu_kernels.load_wkv, cpu_kernels.load_decode):
        lib, why = load()
        assert lib is not None, why


def test_unpackable_width_uses_torch():
    w = torch.randn(5, 13)
    lin = InferenceLinear(w, "bf16")
    assert not lin.packed
    x = torch.randn(2, 13)
    torch.testing.assert_close(lin(x), F.linear(x, w.bfloat16().float()))


def test_kernels_disabled_fall_back(monkeypatch):
    monkeypatch.setenv("RWKV_ZOO_CPU_KERNELS", "0")
    cpu_kernels._load.cache_clear()
    try:
        assert "RWKV_ZOO_CPU_KERNELS=0" in cpu_kernels.unavailable_reason()
        w = torch.randn(8, 16)
        lin = InferenceLinear(w, "int8")
        assert lin.packed
        x = torch.randn(1, 16)
        torch.testing.assert_close(lin(x), F.linear(x, lin.dequantized()))
    finally:
        monkeypatch.delenv("RWKV_ZOO_CPU_KERNELS")
        cpu_kernels._load.cache_clear()


def test_kernel_build_reports_compiler_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("RWKV_ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/bin/false")
    cpu_kernels._load.cache_clear()
    try:
        why = cpu_kernels.unavailable_reason()
        assert why and "building the CPU kernels failed" in why and "/bin/false" in why
        assert not list(tmp_path.glob("*.so"))  # nothing half-written is left for the next process
    finally:
        cpu_kernels._load.cache_clear()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_decode_memory_is_flat():
    model = prepare_inference(_model("v7-tiny"), "int8")
    tok, state = torch.tensor([[1]]), None
    with torch.no_grad():
        for i in range(1, 3001):
            logits, state = model(tok, state)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            if i == 100:
                before = _rss()
    after = _rss()
    assert after - before <= max(0.01 * before, 4 << 20), (before, after)


@pytest.mark.slow
@pytest.mark.integration
def test_bench_cli_runs_and_compares_with_the_package(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "rwkv_zoo", "bench", "v4-tiny", "--weights", "fp32,int8", "--batch", "1,3",
           "--prefill", "32", "--decode", "4", "--threads", "1", "--repeat", "2", "--compare-official", "--kl",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "rwkv package" in text and "vs pkg fp32" in text and "KL(fp32 || int8)" in text
    import json

    data = json.loads(out.read_text())
    impls = {(r["impl"], r["weights"]) for r in data["rows"]}
    assert impls == {("rwkv_zoo", "fp32"), ("rwkv_zoo", "int8"), ("rwkv package", "fp32")}
    ours = next(r for r in data["rows"] if r["impl"] == "rwkv_zoo" and r["weights"] == "fp32")
    assert set(ours["decode"]) == {"1", "3"} and ours["prefill_s"] > 0 and ours["peak_rss"] > 0
    assert all(r["repeats"] == 2 for r in data["rows"])
    assert 0 <= data["kl"]["int8"]["decode"] < 0.05


def test_fused_paths_follow_dispatch():
    """A prepared model whose wkv7 dispatch gives to another backend runs that backend's kernel in
    prefill and decode (the fused C++ step is the cpu backend's, used only when cpu was chosen)."""
    calls = []
    from rwkv_zoo.backends.reference.recurrent import wkv7_recurrent

    def counting(*args):
        calls.append(args[0].shape[1])
        return wkv7_recurrent(*args)

    class Plugin:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            kernels = [rwkv_zoo.Kernel("wkv7", mode, counting) for mode in ("recurrent", "chunk")]
            register(rwkv_zoo.Backend("counting", kernels, priority=50))

    model = prepare_inference(_model("v7-tiny"), "fp32")
    L = model.config.n_layer
    with registered_plugin(Plugin(), "counting-plugin"), torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3, 4, 5]]))
        model(torch.tensor([[6]]), state)
    assert calls == [5] * L + [1] * L


def test_explain_says_how_inference_runs():
    model = _model("v7-tiny")
    assert "Python decode step" in rwkv_zoo.explain(model, (1, 1)).execution
    assert rwkv_zoo.explain(model, (1, 50)).execution == "the modules, layer by layer"
    assert rwkv_zoo.explain(model, (1, 50), requires_grad=True).execution is None
    prepare_inference(model, "int8")
    text = str(rwkv_zoo.explain(model, (2, 1)))
    if cpu_kernels.available():
        assert "runs as: the fused C++ step" in text
        assert "fused C++ step" in rwkv_zoo.explain(model, (2, 50)).execution
    model.backend = "reference"  # dispatch no longer picks cpu: no fused step
    assert "Python decode step" in rwkv_zoo.explain(model, (2, 1)).execution
