"""The ``cuda`` backend: nvcc compiles its kernels, its numerics run in a CPU emulator, dispatch skips it here.

Without a GPU three things are checked:
- every ``csrc/*.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90 (template, syntax and register
  errors fail here; skipped only where nvcc is absent);
- the kernels' per-thread arithmetic (``csrc/wkv_math.cuh``, shared with the ``.cu`` files) run by the
  CPU emulator (``csrc/emulate.cpp``, threads one after another between the kernels' barriers), through
  the backend's own custom ops and autograd, passes ``rwkv_zoo.testing.check_backend`` against the fp64
  reference: outputs, final state, every gradient incl. the initial state's;
- the backend registers, says what is missing, and dispatch skips it with that reason.
On a GPU the tests marked ``gpu`` run the real kernels through the same conformance suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _deps import CXX, NVCC, missing, needs

import rwkv_zoo
from rwkv_zoo import dispatch
from rwkv_zoo.backends import cuda as cb
from rwkv_zoo.backends.reference import recurrent as ref
from rwkv_zoo.dispatch import BackendError, KernelCall
from rwkv_zoo.testing import check_backend, evaluate, make_inputs, registered_plugin, rel_err

pytestmark = pytest.mark.kernel

CSRC = Path(cb.__file__).resolve().parent / "csrc"
OPS = ("wkv4", "wkv5", "wkv6", "wkv7")
HAS_GPU = torch.cuda.is_available() and torch.version.cuda is not None


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Emulator (and, on a GPU, extension) builds go to a per-run temporary cache unless one is set."""
    if os.environ.get("RWKV_ZOO_CUDA_CACHE"):
        yield
        return
    os.environ["RWKV_ZOO_CUDA_CACHE"] = str(tmp_path_factory.mktemp("rwkv_zoo_cuda_cache"))
    try:
        yield
    finally:
        os.environ.pop("RWKV_ZOO_CUDA_CACHE", None)


# ---------------------------------------------------------------------------------------------------
# nvcc: every kernel file compiles for the architectures we ship for


def _nvcc() -> str | None:
    return cb.nvcc_path()


needs_nvcc = needs(None if _nvcc() else "nvcc is not installed (CUDA toolkit)", NVCC)


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("source", [*sorted(p.name for p in CSRC.glob("*.cu")), "wkv7_chunk.cu:tc"])
def test_kernel_file_compiles_with_nvcc(source, tmp_path):
    source, _, variant = source.partition(":")
    extra = ["-DRWKV_C7_BWD_TC=1"] if variant == "tc" else []  # the opt-in tensor-core chunk backward
    # --threads 2: the two architectures compile in parallel (CI has 2 cores and runs tests one at a time:
    # 53 -> 34 s for wkv6.cu under load, with the same ptxas report).
    cmd = [_nvcc(), "-c", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Werror", "all-warnings", *extra,
           "--resource-usage", "--threads", "2",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-I", str(CSRC), str(CSRC / source), "-o", str(tmp_path / "k.o")]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0
    print(f"{source}: {time.perf_counter() - start:.1f} s")
    # ptxas's report per kernel and architecture: spills at the head sizes models ship with (N <= 64)
    # stay small (a few hundred bytes of stack: L1-resident); N=128 is allowed to spill (noted in the
    # kernels' docstrings). A change that makes a kernel spill kilobytes fails here, not on a GPU.
    report = done.stdout + done.stderr
    spills = re.findall(r"Function properties for (\S+)\n.*?(\d+) bytes spill stores", report)
    assert spills, report[-2000:]
    small = {name: int(n) for name, n in spills if "Li128E" not in name}
    assert max(small.values(), default=0) <= 512, {k: v for k, v in small.items() if v > 512}


@needs_nvcc
def test_every_kernel_file_is_built_by_the_loader():
    from rwkv_zoo.backends.cuda import loader

    assert set(loader.KERNEL_SOURCES) == {p.name for p in CSRC.glob("*.cu")}
    for name in (*loader.HEADERS, loader.BINDING, "emulate.cpp"):
        assert (CSRC / name).exists()


_STUBS = {
    # Headers a CPU-only torch wheel's CUDA headers include but this machine's toolkit may lack: the
    # binding uses none of them, so empty declarations are enough for a syntax check.
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\n"
                  "typedef enum { CUSPARSE_STATUS_SUCCESS = 0 } cusparseStatus_t;\n"
                  "inline const char* cusparseGetErrorString(cusparseStatus_t) { return \"\"; }\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\n"
                   "typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;\n",
    "cublasLt.h": "#include \"cublas_v2.h\"\ntypedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolverSp.h": "",
    "cusolver_common.h": "typedef enum { CUSOLVER_STATUS_SUCCESS = 0 } cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


@pytest.mark.slow
@needs(None if shutil.which("g++") else "g++ is not on PATH", CXX)
@needs_nvcc
def test_binding_parses_against_this_torch(tmp_path):
    # The torch binding is built only on a GPU machine; here it is at least parsed against this torch's
    # headers (ATen/c10 CUDA headers included), so an API misuse fails CI.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    candidates = [Path(os.environ[e]) / "include" for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)]
    candidates += [Path(_nvcc()).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        missing(f"no cuda_runtime.h in {', '.join(map(str, candidates))}", NVCC)
    for name, text in _STUBS.items():
        if not (cuda_include / name).exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("#pragma once\n" + text)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=rwkv_zoo_cuda_check",
           *(f"-I{p}" for p in include_paths()), f"-I{tmp_path}", f"-I{cuda_include}", f"-I{CSRC}",
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / "binding.cpp")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def test_loader_flags_and_cache(monkeypatch, tmp_path):
    from rwkv_zoo.backends.cuda import loader

    monkeypatch.setenv("RWKV_ZOO_CUDA_CACHE", str(tmp_path))
    assert loader.cache_dir() == tmp_path
    monkeypatch.delenv("RWKV_ZOO_CUDA_CHUNK_BWD_TC", raising=False)
    plain = loader.source_hash()
    assert "-DRWKV_C7_BWD_TC=1" not in loader.nvcc_flags() and "--use_fast_math" not in loader.nvcc_flags()
    monkeypatch.setenv("RWKV_ZOO_CUDA_CHUNK_BWD_TC", "1")
    assert "-DRWKV_C7_BWD_TC=1" in loader.nvcc_flags()
    assert loader.source_hash() != plain  # a different build, never a stale library


def test_kernel_sources_have_no_torch_headers():
    # CI compiles each .cu with plain nvcc: only the binding may include torch.
    for path in [*CSRC.glob("*.cu"), *CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:
        text = path.read_text()
        assert "torch/" not in text and "ATen/" not in text, path.name


# ---------------------------------------------------------------------------------------------------
# the kernels' arithmetic, emulated on the CPU, through the backend's custom ops and autograd


def _emulated():
    class Plugin:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            register(cb.make_backend(emulated=True))

    return registered_plugin(Plugin(), name="cuda-emulated-plugin")


needs_cxx = needs(None if shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
                  else "no host C++ compiler (c++, g++ or clang++) on PATH", CXX)


@needs_cxx
@pytest.mark.parametrize("N", [32])  # N = 64: the threaded test below runs the real kernels at 64
def test_emulated_kernels_conform_fp32(N):
    with _emulated():
        report = check_backend("cuda-emulated", dtypes=(torch.float32,), Ts=(1, 15, 16, 17, 65), B=2, H=2, N=N)
    ran = [r for r in report.results if not r.skipped]
    assert {r.op for r in ran} == set(OPS) and len(ran) == 4 * 5, str(report)
    assert report.ok, str(report)
    assert not any("forward only" in r.message for r in ran)
    assert max(report.max_errors().values()) <= 1e-5, str(report)


@needs_cxx
def test_emulated_kernels_conform_bf16_fp16():
    with _emulated():
        report = check_backend("cuda-emulated", dtypes=(torch.bfloat16, torch.float16), Ts=(33,), B=1, H=2, N=32)
    # 4 recurrent kernels and the wkv7 chunk kernel, in both dtypes.
    assert report.ok and len([r for r in report.results if not r.skipped]) == 10, str(report)


@pytest.fixture
def threaded(monkeypatch):
    """The backend's CPU path runs the real kernel files, a CPU thread per CUDA thread (emulate.THREADED)."""
    from rwkv_zoo.backends.cuda import _ops, emulate

    monkeypatch.setattr(_ops, "EMULATOR", emulate.THREADED)


@needs_cxx
@pytest.mark.parametrize("N", [32, 64])
def test_threaded_real_kernels_conform_fp32(N, threaded):
    # The .cu kernels themselves (fp32 instantiation, compiled by g++ with host_threads.h): their
    # indexing, 16-step staging, checkpoints and barrier placement, through the custom ops and autograd.
    with _emulated():
        report = check_backend("cuda-emulated", modes=("recurrent",), dtypes=(torch.float32,), Ts=(1, 16, 17, 40),
                               B=2, H=2, N=N)
    ran = [r for r in report.results if not r.skipped]
    assert len(ran) == 4 * 4 and report.ok, str(report)
    assert max(report.max_errors().values()) <= 1e-5, str(report)


@needs_cxx
@pytest.mark.parametrize("N", [32, 64])
def test_threaded_chunk_kernel_matches_its_emulation(N, monkeypatch):
    # wkv7_chunk.cu with only its wmma calls replaced by loops (same rounding): staging, zero padding of
    # the last chunk, phases, barriers and output indexing agree with the phase-by-phase emulation.
    from rwkv_zoo.backends.cuda import _ops, emulate, recurrent

    gen = torch.Generator().manual_seed(4)
    x = [t.float() for t in make_inputs("wkv7", 2, 37, 2, N, generator=gen)]
    y_emu, s_emu = recurrent.wkv7_chunk(*x)
    monkeypatch.setattr(_ops, "EMULATOR", emulate.THREADED)
    y_thr, s_thr = recurrent.wkv7_chunk(*x)
    assert rel_err(y_thr, y_emu) <= 1e-5 and rel_err(s_thr, s_emu) <= 1e-5
    y_ref, s_ref = ref.wkv7_recurrent(*[t.double() for t in x])
    assert rel_err(y_thr, y_ref) <= 1e-3 and rel_err(s_thr, s_ref) <= 1e-3


@needs_cxx
@pytest.mark.parametrize(("op", "T", "scale"), [("wkv6", 100, 10.0), ("wkv6", 100, 0.1), ("wkv5", 100, 10.0),
                                                 ("wkv7", 100, 1.0), ("wkv4", 200, 10.0)])
@pytest.mark.parametrize("impl", ["threaded"])
def test_emulated_backward_strong_and_weak_decay(op, T, scale, impl, monkeypatch):
    # wkv5/6: the backward rebuilds S_{t-1} forward from 16-step checkpoints, never divides by the
    # decay, so a decay of exp(-30) per step costs no accuracy. wkv7 inverts its update between
    # checkpoints: fine for v7's decay (>= 0.545), which make_inputs keeps at every scale.
    if impl == "threaded":
        from rwkv_zoo.backends.cuda import _ops, emulate

        monkeypatch.setattr(_ops, "EMULATOR", emulate.THREADED)
    gen = torch.Generator().manual_seed(11)
    inputs = make_inputs(op, 1, T, 2, 32, generator=gen, decay_scale=scale)
    plain = evaluate(getattr(ref, f"{op}_recurrent"), op, inputs, None, grad=False)
    upstream = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in plain.items()}
    want = evaluate(getattr(ref, f"{op}_recurrent"), op, inputs, upstream)
    from rwkv_zoo.backends.cuda import recurrent

    f32 = [tuple(s.float() for s in x) if isinstance(x, tuple) else x.float() for x in inputs]
    got = evaluate(getattr(recurrent, f"{op}_recurrent"), op, f32, {n: t.float() for n, t in upstream.items()})
    errors = {n: rel_err(got[n], t) for n, t in want.items()}
    assert max(errors.values()) <= 1e-5, errors


@needs_cxx
def test_emulated_ops_trace_with_torch_compile():
    # The custom ops' fake implementations let torch.compile trace through them (no graph break).
    from rwkv_zoo.backends.cuda import recurrent

    gen = torch.Generator().manual_seed(0)
    r, k, v, w, u, s = (x.float() for x in make_inputs("wkv6", 1, 9, 2, 32, generator=gen))
    want = recurrent.wkv6_recurrent(r, k, v, w, u, s)
    compiled = torch.compile(recurrent.wkv6_recurrent, backend="eager", fullgraph=True)
    got = compiled(r, k, v, w, u, s)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_cxx
@pytest.mark.parametrize("N", [32, 64])
def test_emulated_chunk_algorithm_error(N):
    # The chunked tensor-core algorithm on fp32 inputs: what remains is its own error, from the fp16
    # pairwise and tf32 state products (modelled by the emulator), well inside the bf16 gate of 5e-3.
    from rwkv_zoo.backends.cuda import recurrent

    gen = torch.Generator().manual_seed(1)
    x = make_inputs("wkv7", 1, 100, 2, N, generator=gen)
    y_ref, s_ref = ref.wkv7_recurrent(*x)
    y, s = recurrent.wkv7_chunk(*[t.float() for t in x])
    assert rel_err(y, y_ref) <= 1e-3 and rel_err(s, s_ref) <= 1e-3


@needs_cxx
@pytest.mark.parametrize(("N", "tc"), [(32, False), (64, False), (64, True)])
def test_chunk_backward_gradients(N, tc, monkeypatch):
    # The chunked backward (csrc/wkv7_chunk_bwd.cuh, run verbatim by the threaded host build) against the
    # fp64 reference on fp32 inputs: every gradient, the initial state's included, within the rounding
    # the forward's fp16/tf32 products leave (~5e-4), across a partial last chunk.
    # tc: the products on tensor cores (RWKV_ZOO_CUDA_CHUNK_BWD_TC=1), modelled with tf32 rounding.
    import functools

    from rwkv_zoo.backends.cuda import _ops, emulate, recurrent

    bwd = functools.partial(emulate.threaded_library, tc)
    monkeypatch.setattr(_ops, "EMULATOR", emulate.Emulator(emulate.library, bwd))
    gen = torch.Generator().manual_seed(3)
    x = make_inputs("wkv7", 2, 37, 2, N, generator=gen)
    plain = evaluate(ref.wkv7_recurrent, "wkv7", x, None, grad=False)
    upstream = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in plain.items()}
    want = evaluate(ref.wkv7_recurrent, "wkv7", x, upstream)
    got = evaluate(recurrent.wkv7_chunk, "wkv7", [t.float() for t in x], {n: t.float() for n, t in upstream.items()})
    errors = {n: rel_err(got[n], t) for n, t in want.items()}
    assert max(errors.values()) <= 2e-3, errors


@needs(None if shutil.which("g++") else "g++ is not on PATH", CXX)
def test_chunk_shared_memory_sizes_match_the_kernel(tmp_path):
    # The capability check's byte counts are the kernel's shared-memory structs (fp16 is 2 bytes either way).
    src = tmp_path / "sz.cpp"
    src.write_text('#include "wkv7_chunk_bwd.cuh"\n#include <cstdio>\nusing namespace rwkv_zoo_cuda;\n'
                   "template <int N> struct Bw { Chunk7Smem<N, _Float16> f; Chunk7Grad<N> g; };\n"
                   'int main() { printf("%zu %zu", sizeof(Bw<32>), sizeof(Bw<64>)); }\n')
    subprocess.run(["g++", "-std=c++17", "-I", str(CSRC), str(src), "-o", str(tmp_path / "sz")], check=True)
    out = subprocess.run([str(tmp_path / "sz")], capture_output=True, text=True, check=True).stdout.split()
    assert {32: int(out[0]), 64: int(out[1])} == cb.CHUNK_BWD_SMEM


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rwkv_zoo.backends.cuda import _ops

    with FakeTensorMode():
        r = torch.empty(2, 33, 3, 32, dtype=torch.bfloat16)
        w = torch.empty(2, 33, 3, 32)
        s = torch.empty(2, 3, 32, 32)
        y, sT, sa, ck = _ops.wkv7_fwd(r, w, r, r, r, r, s, True)
        assert y.shape == r.shape and y.dtype == torch.bfloat16 and sT.dtype == torch.float32
        assert sa.shape == (2, 33, 3, 32) and ck.shape == (2, 3, 3, 32, 32)
        y, sT = _ops.wkv6_fwd(r, r, r, torch.empty(3, 32), torch.empty(3, 32), s)
        assert y.shape == r.shape and sT.shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------
# registration, availability, dispatch


def test_registered_with_its_kernels():
    b = dispatch.get_backends()["cuda"]
    assert b.ops() == {"wkv4": ["recurrent"], "wkv5": ["recurrent"], "wkv6": ["recurrent"],
                       "wkv7": ["recurrent", "chunk"]}
    assert b.kernel("wkv7", "recurrent").head_sizes == (32, 64, 128)
    chunk = b.kernel("wkv7", "chunk")
    assert chunk.head_sizes == (32, 64) and chunk.supports_backward
    assert chunk.dtypes == (torch.bfloat16, torch.float16)
    assert b.kernel("wkv6", "recurrent").devices == ("cuda",)
    assert b.provider == "rwkv_zoo.backends.cuda"


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_unavailable_reason_names_what_is_missing():
    why = cb.unavailable_reason()
    assert why is not None and why.startswith("the cuda backend needs ")
    if torch.version.cuda is None:
        assert "a CUDA build of torch" in why and torch.__version__ in why
    elif not torch.cuda.is_available():
        assert "a CUDA GPU" in why


def test_unavailable_reason_lists_each_missing_piece(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(cb, "nvcc_path", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(cb, "ninja_path", lambda: "/usr/bin/ninja")
    cb._toolchain_missing.cache_clear()
    try:
        assert cb.unavailable_reason() is None
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 1))
        assert "compute capability >= 7.0 (this one is 6.1)" in cb.unavailable_reason()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
        monkeypatch.setattr(cb, "nvcc_path", lambda: None)
        monkeypatch.setattr(cb, "ninja_path", lambda: None)
        cb._toolchain_missing.cache_clear()
        why = cb.unavailable_reason()
        assert "nvcc" in why and "ninja" in why and "compute capability" not in why
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert "a CUDA GPU (torch.cuda.is_available() is False)" in cb.unavailable_reason()
    finally:
        cb._toolchain_missing.cache_clear()


def test_availability_check_compiles_and_imports_nothing():
    import sys

    before = set(sys.modules)
    cb.unavailable_reason()
    assert not {m for m in set(sys.modules) - before if m.startswith(("torch.utils.cpp_extension",
                                                                           "rwkv_zoo.backends.cuda._ops"))}


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_dispatch_skips_it_with_its_reason_and_explicit_choice_raises():
    why = cb.unavailable_reason()
    call = KernelCall("wkv7", "recurrent", "cuda", torch.bfloat16, 8, 1, 64, 64)
    sel = dispatch.select(call)
    assert sel.backend != "cuda"
    assert why in dict(sel.rejected)["cuda"]
    assert why in sel.explain()
    with pytest.raises(BackendError, match="CUDA build of torch|CUDA GPU"):
        dispatch.select(call, "cuda")
    # The public op says the same, on CPU tensors too.
    x = torch.randn(1, 2, 1, 32)
    with pytest.raises(BackendError, match="the cuda backend needs"):
        rwkv_zoo.ops.wkv7(x, -torch.rand_like(x), x, x, x, x, backend="cuda")


def test_capability_reasons_when_available(monkeypatch):
    monkeypatch.setattr(cb, "unavailable_reason", lambda: None)
    b = cb.make_backend()
    b.availability = lambda: None
    assert not b.reasons(KernelCall("wkv6", "recurrent", "cuda", torch.bfloat16, 8, 4096, 64, 64, True, True))
    assert any("head size" in r for r in b.reasons(KernelCall("wkv6", "recurrent", "cuda", torch.float32,
                                                                1, 8, 1, 256)))
    assert any("float64" in r for r in b.reasons(KernelCall("wkv7", "recurrent", "cuda", torch.float64,
                                                              1, 8, 1, 64)))
    assert any("runs on cuda" in r for r in b.reasons(KernelCall("wkv4", "recurrent", "cpu", torch.float32,
                                                                   1, 8, 1, 64)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    call = KernelCall("wkv7", "chunk", "cuda", torch.bfloat16, 1, 100, 1, 64)
    assert any("compute capability >= 8.0 (this GPU is 7.5)" in r for r in b.reasons(call))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: type("P", (), {"shared_memory_per_block_optin": 232448})())
    assert not b.reasons(call)
    assert not b.reasons(KernelCall("wkv7", "chunk", "cuda", torch.bfloat16, 1, 100, 1, 64, True))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a: type("P", (), {"shared_memory_per_block_optin": 101376})())
    assert not b.reasons(call)  # the forward fits
    assert any("shared memory" in r for r in b.reasons(KernelCall("wkv7", "chunk", "cuda", torch.bfloat16,
                                                                    1, 100, 1, 64, True)))
    assert any("float32" in r for r in b.reasons(KernelCall("wkv7", "chunk", "cuda", torch.float32, 1, 100, 1, 64)))


# ---------------------------------------------------------------------------------------------------
# on a GPU: the real kernels


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build of torch")
@pytest.mark.skipif(cb.unavailable_reason() is not None, reason=str(cb.unavailable_reason()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_conformance(dtype):
    report = check_backend("cuda", dtypes=(dtype,), Ts=(1, 15, 16, 17, 64, 65, 1000), device="cuda", N=64)
    assert report.ok, str(report)
    chunk_cases = 0 if dtype == torch.float32 else 7  # the wkv7 chunk kernel takes bf16/fp16
    assert len([r for r in report.results if not r.skipped]) == 4 * 7 + chunk_cases, str(report)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build of torch")
@pytest.mark.skipif(cb.unavailable_reason() is not None, reason=str(cb.unavailable_reason()))
@pytest.mark.parametrize("N", [32, 128])
def test_gpu_conformance_other_head_sizes(N):
    report = check_backend("cuda", dtypes=(torch.float32,), Ts=(17, 65), device="cuda", N=N)
    assert report.ok, str(report)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and a CUDA build of torch")
@pytest.mark.skipif(cb.unavailable_reason() is not None, reason=str(cb.unavailable_reason()))
def test_gpu_matches_emulator_to_rounding():
    # The emulator runs the same per-thread arithmetic: the GPU kernels agree with it to rounding.
    from rwkv_zoo.backends.cuda import recurrent

    gen = torch.Generator().manual_seed(2)
    args = [x.float() for x in make_inputs("wkv7", 2, 40, 2, 64, generator=gen)]
    y_cpu, s_cpu = recurrent.wkv7_recurrent(*args)
    y_gpu, s_gpu = recurrent.wkv7_recurrent(*(x.cuda() for x in args))
    assert rel_err(y_gpu.cpu(), y_cpu) <= 1e-6 and rel_err(s_gpu.cpu(), s_cpu) <= 1e-6
    # The tensor-core chunk kernel against its emulation (rounding modelled, summation order not).
    bf = [x.bfloat16() if i != 1 and i != 6 else x for i, x in enumerate(args)]
    y_cpu, s_cpu = recurrent.wkv7_chunk(*bf)
    y_gpu, s_gpu = recurrent.wkv7_chunk(*(x.cuda() for x in bf))
    assert rel_err(y_gpu.cpu(), y_cpu) <= 1e-2 * 0.5 and rel_err(s_gpu.cpu(), s_cpu) <= 1e-3


def test_sources_ship_as_package_data():
    import fnmatch

    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "rwkv_zoo.backends.cuda" in cfg["packages"]
    globs = cfg["package-data"]["rwkv_zoo.backends.cuda"]
    for path in CSRC.iterdir():
        assert any(fnmatch.fnmatch(f"csrc/{path.name}", g) for g in globs), path.name
