"""The cpu backend's per-ISA kernel builds: every build this CPU runs against the portable one (GEMV in
fp32/bf16/int8/int4 and the fused decode step), builds it cannot run compiled without running, the
``RWKV_ZOO_CPU_ISA`` override (valid, invalid, unsupported), int4 quantization and ``load(weights="int4")``.

Builds that quantize activations (int8 weights on AVX2 and AVX-512: int8 activations in blocks of 32
columns; BF16 dot) are compared with looser tolerances: they round the activations on purpose, so they
equal the portable fp32 arithmetic only up to that rounding; the int8 dot is also checked exactly
against the same quantization done in torch."""

from __future__ import annotations

import concurrent.futures
import tempfile
from pathlib import Path

import pytest
import torch
from _deps import CXX, missing

import rwkv_zoo
from rwkv_zoo import inference
from rwkv_zoo.backends.cpu import fused as cpu_fused
from rwkv_zoo.backends.cpu import kernels
from rwkv_zoo.inference import InferenceLinear, prepare_inference
from rwkv_zoo.state import RWKVState

KINDS = ("fp32", "bf16", "int8", "int4")
RUNNABLE = kernels.runnable_isas()
OTHERS = [isa for isa in kernels.ISAS if isa not in RUNNABLE]
# Relative error allowed against the portable build: summation order only, except where a build
# rounds the activations (int8 dots: ~1/254 of the largest input of each block of 32 per element;
# bf16: 2^-9 relative per element).
TOL = {"fp32": 1e-5, "bf16": 1e-5, "int8": 1e-5, "int4": 1e-5}
LOSSY = {(isa, kind): 1e-2 for isa in ("avx2", "avx512", "avx512_vnni", "avx512_bf16") for kind in ("int8", "int4")}
LOSSY[("avx512_bf16", "bf16")] = 1e-2
QBLK = 32  # cpu_tiles.h's activation block
# The fused decode step of a build against portable, where it differs from _step_tol: the bf16 build
# rounds activations to bf16 in every bf16 projection on top of int8 / int4; under emulation
# (tools/isa_emulation) its logits differed by 6.6e-3 and its states by 9.3e-3 on a model like
# _mixed_model, too close to 1e-2 for a random model not to cross it. A kernel bug shows as O(1).
DECODE_TOL = {"avx512_bf16": 2e-2}


def _step_tol(isa: str) -> float:
    """A whole model step of ``isa`` against portable: its loosest weight format's tolerance."""
    return max((v for (i, _), v in LOSSY.items() if i == isa), default=1e-4)


def _modules_on_portable(monkeypatch) -> None:
    """The module path (InferenceLinear -> kernels.gemv) runs the portable build from here on."""
    gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a, **k: gemv(*a, **{**k, "isa": "portable"}))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build every runnable variant's GEMV and decode libraries at once (compilers run in parallel)."""
    if kernels._static_reason() is not None:
        missing(kernels._static_reason(), CXX)
    loads = [fn for isa in RUNNABLE for fn in (lambda i=isa: kernels._load(i), lambda i=isa: kernels.load_decode(i))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for lib, why in pool.map(lambda f: f(), loads):
            assert lib is not None, why


def test_every_runnable_build_reports_its_isa():
    assert RUNNABLE[0] == "portable"
    for isa in RUNNABLE:
        assert kernels._load(isa)[0].rz_isa().decode() == isa
        assert kernels.load_decode(isa)[0].rz_decode_isa().decode() == isa
    print(f"runnable here: {RUNNABLE}; compiled only: {OTHERS}")


@pytest.mark.parametrize("kind", KINDS)
def test_gemv_variants_match_portable(kind):
    g = torch.Generator().manual_seed(0)
    for N, K, M in ((37, 128, 1), (8, 64, 5), (20, 192, 13)):
        w = torch.randn(N, K, generator=g)
        lin = InferenceLinear(w, kind)
        assert lin.packed
        x = torch.randn(M, K, generator=g)
        exact = x @ lin.dequantized().t()
        ref = kernels.gemv(x, lin.qweight, N, lin.scale, isa="portable")
        assert _rel(ref, exact) < 1e-5, (kind, N, K, M)
        for isa in RUNNABLE[1:]:
            y = kernels.gemv(x, lin.qweight, N, lin.scale, isa=isa)
            assert y.shape == (M, N)
            assert _rel(y, ref) < LOSSY.get((isa, kind), TOL[kind]), (isa, kind, N, K, M)


DOT_KC = 384  # csrc/cpu_tiles.h's K-block of the fp32 prefill path (dot_gemm, from 48 rows)


def test_fp32_prefill_rows_are_bitwise_alone():
    """fp32 prefill (csrc/cpu_tiles.h's dot_gemm from 48 rows; fewer rows take the tile kernels): each
    row of a call of B rows equals, bit for bit, the same row computed alone (B = 1, the tile kernel) and
    in a call of 47 rows (the tile kernels' row groups), in every runnable build (each against itself).
    Row counts around the 24-row panels (48 exact, 49 and 513 leave 1- and 9-row tails, 64 a 16-row
    one), input widths with and without a K-block tail (K = 8; 392 = one 384-column block and 8; 776 =
    two and 8), output counts with a padded tile (N = 37) and several chunks of tiles (N = 516: 129
    tiles), x rows with a stride wider than K, 1 and 2 threads. Each build is also checked against a
    float64 product and the portable build."""
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for N, K in ((37, 8), (37, 392), (516, 776)):
            assert K < DOT_KC or K % DOT_KC
            w = torch.randn(N, K, generator=g)
            packed = kernels.pack(w)
            x = torch.randn(513, K + 8, generator=g)[:, :K]
            exact = x.double() @ w.double().t()
            ref = kernels.gemv(x, packed, N, isa="portable")
            for isa in RUNNABLE:
                torch.set_num_threads(1)
                alone = torch.cat([kernels.gemv(x[i:i + 1], packed, N, isa=isa) for i in range(513)])
                assert _rel(alone.double(), exact) < 1e-6, (isa, N, K)
                assert _rel(alone, ref) < 1e-5, (isa, N, K)
                for nt in (1, 2):
                    torch.set_num_threads(nt)
                    for M in (47, 48, 49, 64, 513):
                        y = kernels.gemv(x[:M], packed, N, isa=isa)
                        assert y.shape == (M, N)
                        assert torch.equal(y, alone[:M]), (isa, nt, N, K, M)
                    # a call's rows in another order: the same rows, bit for bit
                    perm = torch.randperm(513, generator=g)[:100]
                    assert torch.equal(kernels.gemv(x[perm], packed, N, isa=isa), alone[perm]), (isa, nt, N, K)
    finally:
        torch.set_num_threads(threads)


def _fp32_model():
    return prepare_inference(rwkv_zoo.randomize_(rwkv_zoo.build("v7", n_layer=2, n_embd=64, vocab_size=256,
                                                               head_size=16), seed=4).eval(), "fp32")


def test_fused_fp32_prefill_rows_do_not_depend_on_the_batch():
    """The fused step's fp32 prefill (dot_gemm from 48 token rows per call, the tile kernels below):
    16 prompts of 64 tokens run as one batch (1,024 rows per call), in batches of 3 and alone (64 rows),
    and the first 40 tokens of some alone (40 rows: the tile kernels), give the same logits at every
    position and the same states, bit for bit, in every runnable build, with 1 and 2 threads."""
    model = _fp32_model()
    kinds, why = cpu_fused._kinds(model)
    assert not why
    g = torch.Generator().manual_seed(6)
    prompts = torch.randint(0, 256, (16, 64), generator=g)
    threads = torch.get_num_threads()

    def run(step, rows, T=64):
        with torch.no_grad():
            out, layers = step(model.emb(prompts[rows, :T]), model.zero_state(len(rows), wkv=False), True, T)
        return out, [t for ls in layers for t in ls.tensors()]

    try:
        for isa in RUNNABLE:
            step = cpu_fused.FusedDecode(model, kinds, kernels.load_decode(isa)[0])
            for nt in (1, 2):
                torch.set_num_threads(nt)
                whole, st = run(step, list(range(16)))
                assert whole.shape == (16, 64, 256)
                for rows in ([0, 1, 2], [13, 14, 15], [5], [9]):
                    out, st_r = run(step, rows)
                    assert torch.equal(out, whole[rows]), (isa, nt, rows)
                    assert len(st_r) == len(st) == 6
                    assert all(torch.equal(a, b[rows]) for a, b in zip(st_r, st, strict=True)), (isa, nt, rows)
                for i in (0, 7):
                    short, _ = run(step, [i], 40)
                    assert torch.equal(short[0], whole[i, :40]), (isa, nt, i)
    finally:
        torch.set_num_threads(threads)


def _dot_reference(x, lin):
    """What the integer dots compute: activations rounded to int8 per block of QBLK columns (scale =
    the block's max|x| / 127), exact integer products with the weights' codes, fp32 scales afterwards."""
    M, K = x.shape
    xb = x.double().reshape(M, K // QBLK, QBLK)
    s = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xb / torch.where(s > 0, s, torch.ones_like(s)))
    if lin.kind == "int8":
        wq, sw = inference.quantize_int8(lin.dequantized())  # the stored codes again (exactly representable)
        sw = sw.double()[:, None].expand(-1, K // QBLK)
    else:
        wq, sw = kernels.unpack_int4(lin.qweight, lin.scale, lin.out_features)
        sw = sw.double().repeat_interleave(kernels.I4_GROUP // QBLK, 1)
    wb = wq.double().reshape(-1, K // QBLK, QBLK)
    return torch.einsum("mbk,nbk,mb,nb->mn", q, wb, s[..., 0], sw)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_integer_dots_equal_their_quantization(kind):
    """The integer dots of the x86 builds equal the block quantization done in torch up to fp32
    rounding, including the extremes where a 16-bit pair sum of vpmaddubsw would saturate if the sign
    trick (int8) or the unsigned codes (int4) did not keep the products in range."""
    g = torch.Generator().manual_seed(5)
    N, K = 12, 256
    w = torch.randn(N, K, generator=g)
    w[0] = -1.0  # int8: every code -127; int4: every code -8
    w[1, ::2], w[1, 1::2] = 1.0, -1.0
    lin = InferenceLinear(w, kind)
    x = torch.randn(7, K, generator=g)
    x[0] = 3.0  # every code 127
    x[1, :QBLK] = 0.0  # a block of zeros (scale 0)
    x[2, ::2] = -5.0
    ref = _dot_reference(x, lin)
    assert ref[0, 0] == pytest.approx(-K * 3.0, rel=1e-6)
    for isa in RUNNABLE[1:]:
        y = kernels.gemv(x, lin.qweight, N, lin.scale, isa=isa).double()
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-6, isa


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_integer_dots_every_row_count_and_tail(kind):
    """Prefill shapes: every row-group size the tile kernels split M into (4-row groups and their 2- and
    1-row tails: M = 1, 3, 4, 5, 17, 64), output counts that leave a padded tile (N % 4 != 0), and an
    input width that is not a multiple of the activation block (int8, K = 72: fp32 activations). Each
    runnable build equals the torch emulation of its quantization (within 1e-6 of the largest output)
    where it quantizes, and the portable build within the rounding of the activations everywhere."""
    g = torch.Generator().manual_seed(11)
    shapes = ((37, 128), (6, 192)) if kind == "int8" else ((37, 128), (10, 192))
    if kind == "int8":
        shapes += ((13, 72),)
    for N, K in shapes:
        lin = InferenceLinear(torch.randn(N, K, generator=g), kind)
        assert lin.packed
        x = torch.randn(64, K, generator=g)
        x[3, :QBLK] = 0.0  # a block whose scale is 0
        quantizes = K % QBLK == 0
        ref_q = _dot_reference(x, lin) if quantizes else None
        ref_p = kernels.gemv(x, lin.qweight, N, lin.scale, isa="portable")
        for M in (1, 3, 4, 5, 17, 64):
            for isa in RUNNABLE[1:]:
                y = kernels.gemv(x[:M], lin.qweight, N, lin.scale, isa=isa)
                assert y.shape == (M, N)
                assert _rel(y, ref_p[:M]) < 1e-2, (isa, kind, N, K, M)
                if quantizes:
                    err = (y.double() - ref_q[:M]).abs().max() / ref_q[:M].abs().max()
                    assert float(err) < 1e-6, (isa, kind, N, K, M)
                else:
                    assert _rel(y, ref_p[:M]) < 1e-5, (isa, kind, N, K, M)


def _mixed_model():
    """A v7 + v4 hybrid whose projections use every weight format: int4 in the time-mix of both
    layers, int8 in the channel-mix, bf16 in the v7 output and the v4 receptance, fp32 elsewhere."""
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v6", layers="v7,v4", n_layer=2, n_embd=64, vocab_size=250,
                                               head_size=16), seed=2).eval()
    model = prepare_inference(model, "int4")
    for block in model.blocks:
        for name in ("key", "value"):
            setattr(block.ffn, name, InferenceLinear(getattr(block.ffn, name).dequantized(), "int8"))
    model.blocks[0].att.output = InferenceLinear(model.blocks[0].att.output.dequantized(), "bf16")
    model.blocks[1].att.receptance = InferenceLinear(model.blocks[1].att.receptance.dequantized(), "bf16")
    model.head = InferenceLinear(model.head.dequantized(), "fp32")
    return model


def test_decode_step_variants_match_portable(monkeypatch):
    model = _mixed_model()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 250, (2, 6), generator=g)
    tok = torch.randint(0, 250, (2, 1), generator=g)
    kinds, why = cpu_fused._kinds(model)
    assert not why and [k for k, _ in kinds] == ["v7", "v4"]
    outs = {}
    for isa in RUNNABLE:
        step = cpu_fused.FusedDecode(model, kinds, kernels.load_decode(isa)[0])
        with torch.no_grad():
            state = model.zero_state(2, wkv=False)
            pre, layers = step(model.emb(prompt), state, True, 1)
            dec, _ = step(model.emb(tok), RWKVState(layers, state.identity), False, 1)
        outs[isa] = torch.cat([pre, dec], 1)
    # the portable build equals the modules running the portable GEMV (fp32 activations everywhere)
    _modules_on_portable(monkeypatch)
    with torch.no_grad():
        model.fused_step = False
        ref, st = model(prompt, logits_to_keep=1)
        ref2, _ = model(tok, st)
    assert _rel(outs["portable"], torch.cat([ref, ref2], 1)) < 1e-4
    for isa in RUNNABLE[1:]:
        assert _rel(outs[isa], outs["portable"]) < DECODE_TOL.get(isa, _step_tol(isa)), isa


def test_fused_prefill_matches_the_modules_gemm(monkeypatch):
    """A prefill of 2 x 29 = 58 token rows: the modules' fp32 projections (the head over every position,
    the LoRAs) and the fused step's all-fp32 calls (the head, the LoRA-up matrices) take dot_gemm (from
    48 rows, a 10-row tail panel). Every runnable build of the fused step equals the modules running the
    portable build."""
    model = _mixed_model()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 250, (2, 29), generator=g)
    kinds, why = cpu_fused._kinds(model)
    assert not why
    _modules_on_portable(monkeypatch)
    with torch.no_grad():
        model.fused_step = False
        ref, _ = model(prompt)
    for isa in RUNNABLE:
        step = cpu_fused.FusedDecode(model, kinds, kernels.load_decode(isa)[0])
        with torch.no_grad():
            out, _ = step(model.emb(prompt), model.zero_state(2, wkv=False), True, 29)
        assert out.shape == ref.shape
        assert _rel(out, ref) < _step_tol(isa), isa


def test_builds_this_cpu_cannot_run_still_compile():
    """A variant that cannot run here is compiled (to an object file, at -O0: the instruction-set checks
    of the intrinsics still apply), so a syntax or target error in its code cannot hide."""
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda isa: kernels.compile_check("cpu_gemv", isa, Path(tmp)), OTHERS))
        assert len(list(Path(tmp).glob("*.o"))) == len(OTHERS)


def test_compile_check_reports_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_compiler", lambda: "/bin/false")
    with pytest.raises(RuntimeError, match="failed to compile cpu_gemv.cpp for avx512"):
        kernels.compile_check("cpu_gemv", "avx512", tmp_path)


def test_isa_selection_and_override():
    avx2 = frozenset({"avx2", "fma"})
    full = frozenset({*avx2, "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"})
    if kernels._is_x86():
        assert kernels.select_isa("", avx2) == ("avx2", "the best this CPU runs")
        assert kernels.select_isa("auto", full)[0] == "avx512_bf16"
        assert kernels.select_isa(None, frozenset({*avx2, "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}))[0] \
            == "avx512_vnni"
        assert kernels.select_isa("AVX2", full) == ("avx2", "forced by RWKV_ZOO_CPU_ISA")
        with pytest.raises(kernels.IsaError, match=r"avx512_vnni asks for .* this CPU lacks avx512f, avx512bw, "
                                                   r"avx512vl, avx512_vnni \(it runs: portable, avx2\)"):
            kernels.select_isa("avx512_vnni", avx2)
    assert kernels.select_isa("portable", frozenset()) == ("portable", "forced by RWKV_ZOO_CPU_ISA")
    with pytest.raises(kernels.IsaError, match="RWKV_ZOO_CPU_ISA='sse9' is not an instruction set"):
        kernels.select_isa("sse9", avx2)


@pytest.mark.parametrize("value", ["portable", "sse9", "avx512_bf16"])
def test_override_env_var(monkeypatch, value):
    if value == "avx512_bf16":  # a CPU without it (this one may have it)
        monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    caches = (kernels._load, kernels.load_wkv, kernels.load_decode, kernels.load_wkv_train)
    monkeypatch.setenv("RWKV_ZOO_CPU_ISA", value)
    for c in caches:
        c.cache_clear()
    try:
        if value == "portable":
            assert kernels.unavailable_reason() is None and kernels.isa() == "portable"
            assert kernels.describe_isa().startswith("portable (plain C++ loops")
            lin = InferenceLinear(torch.randn(12, 64), "int4")
            x = torch.randn(3, 64)
            torch.testing.assert_close(lin(x), x @ lin.dequantized().t(), rtol=1e-5, atol=1e-5)
        else:
            why = kernels.unavailable_reason()
            assert why and why.startswith("RWKV_ZOO_CPU_ISA=") and value in why and kernels.isa() is None
            assert kernels.load_decode()[0] is None and kernels.load_wkv()[1] == why
            assert kernels.describe_isa() == f"none: {why}"
            lin = InferenceLinear(torch.randn(12, 64), "int8")  # the layers fall back to torch
            x = torch.randn(3, 64)
            torch.testing.assert_close(lin(x), x @ lin.dequantized().t())
    finally:
        monkeypatch.delenv("RWKV_ZOO_CPU_ISA")
        for c in caches:
            c.cache_clear()


def test_int4_round_trip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 200, generator=g) * torch.rand(10, 1, generator=g)  # K = 200: a partial last group
    q, s = inference.quantize_int4(w)
    assert q.dtype == torch.int8 and q.shape == (10, 200) and s.shape == (10, 4)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    deq = inference.dequantize_int4(q, s)
    wp = torch.cat([w, w.new_zeros(10, 56)], 1).reshape(10, 4, 64)
    bound = wp.abs().amax(-1).repeat_interleave(64, 1)[:, :200] / 8  # one step, max|w| / 8 per group
    assert bool(((deq - w).abs() <= bound * (1 + 1e-6)).all())
    # least-squares refits: no group's squared error above the absmax scale's, and less in all
    q2, s2 = inference.quantize_int4(w, refits=2)
    q0, s0 = q, s
    err = (inference.dequantize_int4(q2, s2) - w).square()
    err0 = (inference.dequantize_int4(q0, s0) - w).square()
    per_group = lambda e: torch.cat([e, e.new_zeros(10, 56)], 1).reshape(10, 4, 64).sum(-1)  # noqa: E731
    assert bool((per_group(err) <= per_group(err0) * (1 + 1e-6)).all()) and float(err.sum()) < float(err0.sum())
    assert float((deq - w).abs().mean() / w.abs().mean()) < 0.12
    # packing: exact round trip, rows padded to a tile (N = 10 -> 12)
    q2, s2 = inference.quantize_int4(w[:, :192])
    packed, scales = kernels.pack_int4(q2, s2)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 24, 4, 4) and scales.shape == (3, 3, 4)
    uq, us = kernels.unpack_int4(packed, scales, 10)
    assert torch.equal(uq, q2) and torch.equal(us, s2)
    # an unpackable width (K % 64 != 0) keeps codes and scales and multiplies through torch
    lin = InferenceLinear(w, "int4")
    assert not lin.packed and lin.qweight.dtype == torch.int8
    x = torch.randn(2, 200, generator=g)
    torch.testing.assert_close(lin(x), x @ deq.t())


def test_load_int4_generates(tmp_path):
    path = tmp_path / "m.pth"
    base = rwkv_zoo.randomize_(rwkv_zoo.build("v7-tiny"), seed=4).eval()
    rwkv_zoo.save(base, path)
    model = rwkv_zoo.load(path, weights="int4")
    assert model.inference_weights == "int4" and model.head.kind == "int4"
    assert model.blocks[0].att.key.qweight.dtype == torch.uint8 and model.blocks[0].att.key.packed
    assert "'cpu-fused'" in rwkv_zoo.explain(model, (1, 1)).execution  # the fused step runs int4
    out = rwkv_zoo.generate(model, [1, 2, 3], max_new_tokens=5, temperature=0)
    assert len(out.tokens) == 5
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        ref, _ = base(prompt)
        got, _ = model(prompt)
    kl = torch.nn.functional.kl_div(torch.log_softmax(got, -1), torch.log_softmax(ref, -1), log_target=True,
                                    reduction="none").sum(-1).mean()
    assert float(kl) < 5e-2


def test_cli_accepts_int4():
    from rwkv_zoo.cli import make_parser

    parser = make_parser()
    for args in (["generate", "--prompt", "hi"], ["chat"], ["eval", "--text", "f.txt"], ["score", "--text", "f.txt"]):
        assert parser.parse_args([*args, "v7-tiny", "--weights", "int4"]).weights == "int4"
