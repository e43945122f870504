"""Inference: the cpu backend's fused whole-model step equals the modules (decode and prefill, every
version, hybrids, fp32/bf16/int8 weights), is on by default and follows weight changes, is chosen per
exact module class (a subclass runs its own maths), ``prepare_inference`` weights, the CPU GEMV kernels
against ``F.linear``, their fallback, flat decode memory, and ``rwkv-zoo bench``."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _deps import CXX, missing, needs

import rwkv_zoo
from rwkv_zoo import fused, inference
from rwkv_zoo.backends.cpu import fused as cpu_fused
from rwkv_zoo.backends.cpu import kernels as cpu_kernels
from rwkv_zoo.checkpoint import CheckpointError
from rwkv_zoo.inference import InferenceLinear, prepare_inference

MODELS = ["v4-tiny", "v5-tiny", "v6-tiny", "v7-tiny"]
needs_kernels = needs(cpu_kernels.unavailable_reason(), CXX)  # CI has them: a skip there is a failure


def _model(name, seed=1, **kw):
    if name == "hybrid":  # every time-mix and channel-mix in one model; vocab 250 pads the head's tiles
        return _model("v6", seed, layers="v7,v6,v5,v4,v7", n_layer=5, n_embd=64, vocab_size=250, head_size=16)
    return rwkv_zoo.randomize_(rwkv_zoo.build(name, **kw), seed=seed).eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _decode(model, tokens, state, fused_step: bool):
    """Feed tokens [B, T] one at a time without gradients; the stacked logits [B, T, V] and the final state."""
    model.fused_step = fused_step
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            lo, state = model(tokens[:, t : t + 1], state)
            out.append(lo)
    model.fused_step = True
    return torch.cat(out, 1), state


def _state_err(s1, s2):
    return max(_rel(a.float(), b.float()) for l1, l2 in zip(s1.layers, s2.layers, strict=True)
               for a, b in zip(l1.tensors(), l2.tensors(), strict=True) if b.norm() > 0)


def _force_isa(monkeypatch, isa):
    """Load the ``isa`` build from here on (fresh caches; the originals keep their libraries)."""
    monkeypatch.setenv("RWKV_ZOO_CPU_ISA", isa)
    monkeypatch.setattr(cpu_kernels, "_load", functools.cache(cpu_kernels._load.__wrapped__))
    monkeypatch.setattr(cpu_kernels, "load_wkv", functools.cache(cpu_kernels.load_wkv.__wrapped__))
    monkeypatch.setattr(cpu_kernels, "load_decode", functools.cache(cpu_kernels.load_decode.__wrapped__))


def _ran_fused(model, B=1, T=1) -> bool:
    return fused.select(model, fused.StepCall("cpu", model.dtype, B, T)).backend == "cpu"


@needs_kernels
@pytest.mark.parametrize("weights", [None, "fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", [*MODELS, "hybrid"])
def test_fused_decode_equals_the_modules(name, weights, monkeypatch):
    """Token by token from a prefilled state and from the empty state, B = 1, 3 and 17 (odd tile counts)."""
    if weights == "int8":
        # The AVX2 / AVX-512 builds multiply int8 weights with int8-quantized activations: the step's
        # fp32 ops (fast-math) round differently from the modules', and where that flips an activation's
        # rounding the outputs part by a quantization step. The portable build keeps fp32 activations, so
        # the two paths still agree to rounding there (tests/kernels/test_cpu_isa.py covers the dots).
        _force_isa(monkeypatch, "portable")
    model = _model(name)
    if weights:
        prepare_inference(model, weights)
    assert _ran_fused(model), fused.select(model, fused.StepCall("cpu", model.dtype, 1, 1)).reason
    tol = 1e-5
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    for B in (1, 3, 17):
        prompt, steps = torch.randint(0, V, (B, 5), generator=g), torch.randint(0, V, (B, 4), generator=g)
        model.fused_step = False
        with torch.no_grad():
            _, state = model(prompt)
        model.fused_step = True
        slow, s_slow = _decode(model, steps, state, fused_step=False)
        fast, s_fast = _decode(model, steps, state, fused_step=True)
        assert _rel(fast, slow) < tol and _state_err(s_fast, s_slow) < tol, B
        slow0, _ = _decode(model, steps[:, :2], None, fused_step=False)
        fast0, _ = _decode(model, steps[:, :2], None, fused_step=True)
        assert _rel(fast0, slow0) < tol, B


@needs_kernels
@pytest.mark.parametrize("name", [*MODELS, "hybrid"])
def test_fused_prefill_equals_the_modules(name, monkeypatch):
    model = _model(name)
    monkeypatch.setattr(cpu_fused, "PREFILL_CHUNK", 7)  # 19 tokens: chunks of 7, 7, 5 with the state between
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, model.config.vocab_size, (3, 30), generator=g)

    def run(on, *args, **kw):
        model.fused_step = on
        with torch.no_grad():
            return model(*args, **kw)

    for keep in (0, 1, 9):
        want, ws = run(False, toks[:, :19], logits_to_keep=keep)
        got, gs = run(True, toks[:, :19], logits_to_keep=keep)
        assert got.shape == want.shape and _rel(got, want) < 1e-5 and _state_err(gs, ws) < 1e-5, keep
    want2, ws2 = run(False, toks[:, 19:], ws)  # continuing from a state
    got2, gs2 = run(True, toks[:, 19:], gs)
    assert _rel(got2, want2) < 1e-5 and _state_err(gs2, ws2) < 1e-5
    assert _ran_fused(model, 3, 19)


@needs_kernels
def test_fused_step_is_the_default_and_leaves_the_model_as_it_was(tmp_path):
    model = _model("v6-tiny")
    params = {n: p for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert _ran_fused(model) and "_fused_runner" in model.__dict__
    # parameters are the same objects with the same values; state_dict and save see the plain model
    assert all(p is params[n] and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith(".key"))
    rwkv_zoo.save(model, tmp_path / "m.safetensors")
    assert set(rwkv_zoo.load(tmp_path / "m.safetensors").state_dict()) == set(model.state_dict())
    # training still works and the next inference call sees the new weights
    model.train()
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    logits.float().pow(2).mean().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.eval()
    slow, _ = _decode(model, torch.tensor([[4, 5]]), None, fused_step=False)
    fast, _ = _decode(model, torch.tensor([[4, 5]]), None, fused_step=True)
    untrained, _ = _decode(_model("v6-tiny"), torch.tensor([[4, 5]]), None, fused_step=False)
    assert _rel(fast, slow) < 1e-5 and _rel(slow, untrained) > 1e-3


@needs_kernels
def test_fused_step_follows_weight_updates_rescale_and_dtype_round_trips():
    model = _model("v5-tiny")
    tok = torch.tensor([[3]])
    with torch.no_grad():
        model(tok)  # builds and caches the step
        model.blocks[0].att.time_decay.add_(0.5)  # in place: the packed copies must be rebuilt
        model.set_rescale(1)
    slow, _ = _decode(model, tok, None, fused_step=False)
    fast, _ = _decode(model, tok, None, fused_step=True)
    assert _rel(fast, slow) < 1e-5
    with torch.no_grad():
        before, _ = model(tok)
        model.double().float()  # every tensor replaced: the step's pointers must not be used
        after, _ = model(tok)
    assert _rel(after, before) < 1e-6


@needs_kernels
def test_fused_step_under_inference_mode_and_load_state_dict_with_assign():
    ref = _model("v7-tiny")
    with torch.inference_mode():  # tensors without version counters
        model = prepare_inference(_model("v7-tiny"), "fp32")
        got, state = model(torch.tensor([[1, 2, 3]]))
        got2, _ = model(torch.tensor([[4]]), state)
    ref.fused_step = False
    with torch.no_grad():
        want, ref_state = ref(torch.tensor([[1, 2, 3]]))
        want2, _ = ref(torch.tensor([[4]]), ref_state)
    assert _rel(got, want) < 1e-5 and _rel(got2, want2) < 1e-5
    model, other = _model("v7-tiny", seed=1), _model("v7-tiny", seed=2)
    with torch.no_grad():
        model(torch.tensor([[3]]))  # caches the step with seed-1 tensors
        model.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects
        ours, _ = model(torch.tensor([[3]]))
        other.fused_step = False
        theirs, _ = other(torch.tensor([[3]]))
    assert _rel(ours, theirs) < 1e-6


@needs_kernels
def test_fused_step_follows_explicit_backend_choices_and_gradients():
    model = _model("v7-tiny")
    steps = torch.tensor([[1, 2, 3]])
    calls = []
    from rwkv_zoo.backends.reference.recurrent import wkv7_recurrent

    def counting(*args):
        calls.append(args[0].shape)
        return wkv7_recurrent(*args)

    class Plugin:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(rwkv_zoo.Backend("counting", [rwkv_zoo.Kernel("wkv7", "recurrent", counting)], priority=50))

    ref, _ = _decode(model, steps, None, fused_step=False)
    with rwkv_zoo.plugin(Plugin(), name="counting-plugin"):
        # dispatch gives the layers' recurrent wkv7 calls to the higher-priority backend, which has no
        # fused step: the modules run its kernels, the cpu step never bypasses it
        out, _ = _decode(model, steps, None, fused_step=True)
        assert len(calls) == 3 * model.config.n_layer and _rel(out, ref) < 1e-5
        assert "'counting'" in rwkv_zoo.explain(model, steps[:, :1]).execution
        with rwkv_zoo.use_backend("cpu"):  # an explicit choice of the step's backend: the fused step again
            out, _ = _decode(model, steps, None, fused_step=True)
            assert "fused step" in rwkv_zoo.explain(model, steps[:, :1]).execution
    assert len(calls) == 3 * model.config.n_layer and _rel(out, ref) < 1e-5
    logits, _ = model(torch.tensor([[1]]))  # grad enabled: the modules, differentiable
    logits.sum().backward()
    assert model.head.weight.grad is not None
    assert not _ran_fused(model.to(torch.float64))


@needs_kernels
def test_a_subclass_that_changes_the_maths_never_inherits_the_fused_step():
    from rwkv_zoo.versions.v6 import V6TimeMix

    class Halved(V6TimeMix):
        def forward(self, x, shift, wkv, ctx):
            out, shift, wkv = super().forward(x, shift, wkv, ctx)
            return out / 2, shift, wkv

    model = _model("v6-tiny")
    for b in model.blocks:
        b.att.__class__ = Halved
    sel = fused.select(model, fused.StepCall("cpu", torch.float32, 1, 1))
    assert sel.backend is None and "Halved" in sel.reason
    assert "Halved" in rwkv_zoo.explain(model, torch.tensor([[1]])).execution
    toks = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(toks)
    steps, _ = _decode(model, toks, None, fused_step=True)
    assert _rel(steps, full) < 1e-5


@needs_kernels
def test_fused_step_coverage_rescale_and_wide_v4():
    model = _model("v4", n_layer=4, n_embd=64, vocab_size=101)
    model.set_rescale(2)  # x halves after every second layer, the weights were divided to match
    toks = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(1))
    slow, s_slow = _decode(model, toks, None, fused_step=False)
    fast, s_fast = _decode(model, toks, None, fused_step=True)
    assert _ran_fused(model) and _rel(fast, slow) < 1e-5 and _state_err(s_fast, s_slow) < 1e-5
    # v4's "head" is the whole width: any width goes (the 256-channel limit is for matrix-state heads)
    wide = prepare_inference(_model("v4", n_layer=1, n_embd=320, vocab_size=64), "int8")
    slow, _ = _decode(wide, toks % 64, None, fused_step=False)
    fast, _ = _decode(wide, toks % 64, None, fused_step=True)
    assert _ran_fused(wide) and _rel(fast, slow) < 1e-5
    # what the step does not cover runs the modules, and says why
    odd = _model("v7", n_layer=1, n_embd=64, vocab_size=64, head_size=16, dim_w_lora=12)
    sel = fused.select(odd, fused.StepCall("cpu", torch.float32, 1, 1))
    assert sel.backend is None and "LoRA width" in sel.reason
    off = _model("v7-tiny")
    off.fused_step = False
    assert "fused_step is False" in rwkv_zoo.explain(off, torch.tensor([[1]])).execution


@pytest.mark.parametrize("name", MODELS)
def test_prepared_weights(name):
    ref_model = _model(name)
    ref_model.fused_step = False
    g = torch.Generator().manual_seed(2)
    V = ref_model.config.vocab_size
    prompt, steps = torch.randint(0, V, (2, 20), generator=g), torch.randint(0, V, (2, 4), generator=g)
    with torch.no_grad():
        ref_full, state = ref_model(prompt)
    ref_steps, _ = _decode(ref_model, steps, state, fused_step=False)
    for weights, tol in (("fp32", 1e-5), ("bf16", 2e-2), ("int8", 5e-2)):
        model = prepare_inference(_model(name), weights)
        assert all(not p.requires_grad for p in model.parameters())
        assert isinstance(model.head, InferenceLinear) and model.head.kind == weights
        for on in (False, True):  # the modules with the GEMV kernels, and the fused step
            model.fused_step = on
            with torch.no_grad():
                full, _ = model(prompt)
            out, _ = _decode(model, steps, state, fused_step=on)
            assert _rel(full, ref_full) < tol and _rel(out, ref_steps) < tol, (weights, on)
            kl = F.kl_div(torch.log_softmax(out, -1), torch.log_softmax(ref_steps, -1), log_target=True,
                          reduction="none").sum(-1).mean()
            assert kl < (1e-6 if weights == "fp32" else 2e-2)


def test_prepared_model_refuses_save_and_load_option(tmp_path):
    model = _model("v6-tiny")
    path = tmp_path / "m.pth"
    rwkv_zoo.save(model, path)
    q = rwkv_zoo.load(path, weights="int8")
    assert q.inference_weights == "int8" and q.blocks[0].ffn.key.qweight.dtype == torch.int8
    with pytest.raises(CheckpointError, match="prepared for inference"):
        rwkv_zoo.save(q, tmp_path / "again.pth")
    with pytest.raises(ValueError, match="weights must be one of"):
        prepare_inference(model, "int3")
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
        missing(cpu_kernels._static_reason(), CXX)
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


def test_explain_says_how_inference_runs():
    model = _model("v7-tiny")
    assert rwkv_zoo.explain(model, (1, 50), requires_grad=True).execution is None
    text = str(rwkv_zoo.explain(model, (2, 1)))
    if cpu_kernels.available():
        assert "runs as: the cpu backend's fused step 'cpu-fused'" in text
        assert "fused step" in rwkv_zoo.explain(model, (2, 50)).execution
    model.backend = "reference"  # an explicit choice of a backend without a fused step: the modules
    assert rwkv_zoo.explain(model, (2, 1)).execution.startswith("the modules, layer by layer")
    assert "has no fused step" in rwkv_zoo.explain(model, (2, 1)).execution


def test_bench_pairs_each_round_with_llama_cpp_and_alternates_the_order(monkeypatch, capsys):
    """Ratios against llama.cpp come from samples of the same round, and odd rounds run the jobs in
    reverse, so drift over a run cannot favour one side."""
    from rwkv_zoo import bench

    order, clock = [], iter(range(100))

    def fake_worker(kind, kwargs, timeout):
        order.append(kind)
        if kind == "machine":
            return {"gemm_flops": 1e11, "read_bytes_per_s": 2e10}
        t = next(clock)  # each round slower than the last: a drifting machine
        if kind == "ours":
            return {"impl": "rwkv_zoo", "weights": kwargs["weights"], "decode": {"1": 0.010 * (1 + t)},
                    "prefill_s": 1.0 * (1 + t), "peak_rss": 1}
        return {"impl": "llama.cpp", "weights": "Q8_0", "file": "q8.gguf", "decode": {"1": 0.012 * (1 + t)},
                "prefill_s": 1.5 * (1 + t), "peak_rss": 1}

    monkeypatch.setattr(bench, "_run_worker", fake_worker)
    opts = bench.BenchOptions(model="v7-tiny", threads=1, prefill=8, decode=2, repeat=3,
                              compare_llamacpp=("q8.gguf",))
    assert bench.report(opts, "v7-tiny", ["fp32", "int8"], [1]) == 0
    assert order == ["machine", "ours", "ours", "llamacpp", "llamacpp", "ours", "ours", "ours", "ours",
                     "llamacpp"]
    pairs = bench.paired_ratios([("ours", {"weights": "int8"}), ("llamacpp", {})],
                                [[{"weights": "int8", "decode": {"1": 1.0}, "prefill_s": 2.0},
                                  {"weights": "int8", "decode": {"1": 4.0}, "prefill_s": 2.0}],
                                 [{"weights": "Q8_0", "decode": {"1": 1.5}, "prefill_s": 3.0},
                                  {"weights": "Q8_0", "decode": {"1": 4.0}, "prefill_s": 5.0}]])
    assert pairs == [{"ours": "int8", "llamacpp": "Q8_0", "file": "", "rounds": 2,
                      "decode": {"median": 1.25, "min": 1.0, "max": 1.5},
                      "prefill": {"median": 2.0, "min": 1.5, "max": 2.5}}]
    out = capsys.readouterr().out
    # fp32 has no F32 file here: only int8 is paired with the Q8_0 file
    assert "int8    vs Q8_0   (q8.gguf): decode" in out and "fp32    vs" not in out
