"""CPU matrix-vector kernels for decode and prefill, compiled at first use and called through ``ctypes``.

Decode reads every weight once per token, so on a CPU it is bound by memory bandwidth; the kernels
in ``csrc/cpu_gemv.cpp`` stream weights stored ``[out, in]`` in fp32, bf16, int8 (one fp32 scale per
output row) or int4 (one fp32 scale per output row and group of 64 columns), widen them in registers
and accumulate in fp32, for any number of rows of input (OpenMP threads = ``torch.get_num_threads()``).

Instruction sets: every library is built once per ISA from the same sources with that ISA's flags
(``ISAS``; ``csrc/cpu_tiles.h`` picks its loops from the compiler's macros), and the process loads the
best build the CPU runs, judged by the flags the kernel reports (``/proc/cpuinfo``):
``portable`` (plain C++, any CPU, fp32 activations), ``avx2`` (AVX2 + FMA; int8 and int4 weights times
activations quantized to int8 per block of 32 columns, in integer dots with ``vpmaddubsw``),
``avx512`` (F/BW/VL), ``avx512_vnni`` (the integer dots with ``vpdpbusd``) and ``avx512_bf16`` (+ VNNI,
and bf16 weights times bf16-rounded activations with ``vdpbf16ps``). ``RWKV_ZOO_CPU_ISA=<name>`` forces one
(``auto`` or unset: the best); a name that is not an ISA, or one this CPU lacks, makes the kernels
unavailable with that reason (``rwkv-zoo info`` / ``backends`` show it) rather than crashing in an
illegal instruction.

The libraries (this one, ``csrc/cpu_wkv.cpp`` for the ``cpu`` backend's WKV recurrences and
``csrc/cpu_decode.cpp`` for the fused step) are built with the system C++ compiler (``$CXX``, else
``c++``/``g++``) into a cache directory (``$RWKV_ZOO_CACHE``, else ``~/.cache/rwkv_zoo``), named after
the ISA and a hash of the source and the flags; a file lock keeps two processes from building at
once and the file is renamed into place, so a reader never sees half a library. No torch headers:
building takes a few seconds.

``unavailable_reason()`` says why the kernels cannot run here (not POSIX, no compiler, the build
failed, a bad ``RWKV_ZOO_CPU_ISA``, ``RWKV_ZOO_CPU_KERNELS=0``); callers then fall back to
``torch.nn.functional.linear``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).with_name("csrc")
BASE_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c++17")  # compile flags
LINK_FLAGS = ("-shared", "-fopenmp")  # the link step's (no -ffast-math: see _build)
_AVX2 = ("-mavx2", "-mfma")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl")
# name -> (compiler flags, /proc/cpuinfo flags it needs, what it does). Ordered from least to most
# capable: the default is the last one the CPU runs. avx512_bf16 includes VNNI (every CPU with
# AVX512_BF16 has VNNI), so one build serves both int8 and bf16 weights on such a CPU.
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "portable": ((), (), "plain C++ loops (no intrinsics; any CPU)"),
    "avx2": (_AVX2, ("avx2", "fma"), "AVX2 + FMA (int8/int4 weights x int8 activations, vpmaddubsw)"),
    "avx512": (_AVX512, ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"), "AVX-512F/BW/VL"),
    "avx512_vnni": ((*_AVX512, "-mavx512vnni"),
                    ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
                    "AVX-512 + VNNI (int8 weights x int8 activations, vpdpbusd)"),
    "avx512_bf16": ((*_AVX512, "-mavx512vnni", "-mavx512bf16"),
                    ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"),
                    "AVX-512 + VNNI + BF16 (bf16 weights x bf16 activations, vdpbf16ps)"),
}
ISA_ENV = "RWKV_ZOO_CPU_ISA"
# name -> (source, extra flags, ABI version). The WKV loops need -ffast-math so expf vectorizes (libmvec);
# the GEMV kernels do not use it, so their sums keep IEEE semantics.
LIBRARIES = {
    "cpu_gemv": ("cpu_gemv.cpp", (), 6),
    "cpu_wkv": ("cpu_wkv.cpp", ("-ffast-math",), 1),
    "cpu_decode": ("cpu_decode.cpp", ("-ffast-math",), 6),
    "cpu_wkv_train": ("cpu_wkv_train.cpp", ("-ffast-math",), 5),
}
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}  # uint8: packed int4
I4_GROUP = 64  # int4: input columns per scale (csrc/cpu_tiles.h's I4_GROUP)

_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class IsaError(ValueError):
    """RWKV_ZOO_CPU_ISA names no ISA, or one this CPU cannot run."""


def cache_dir() -> Path:
    root = os.environ.get("RWKV_ZOO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "rwkv_zoo"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (``/proc/cpuinfo``; the kernel hides what the
    OS does not enable), else what torch's capability implies (it does not cover VNNI or BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability() if _is_x86() else ""
    flags = {"avx2", "fma"} if ("AVX2" in cap or "AVX512" in cap) else set()
    if "AVX512" in cap:
        flags |= {"avx512f", "avx512bw", "avx512vl"}
    return frozenset(flags)


def runnable_isas(flags: frozenset[str] | None = None) -> list[str]:
    """The ISAs whose builds this CPU (or one with ``flags``) can run, least capable first."""
    if not _is_x86():
        return ["portable"]
    flags = cpu_flags() if flags is None else flags
    return [name for name, (_, need, _) in ISAS.items() if set(need) <= flags]


def select_isa(env: str | None = None, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """``(isa, how it was chosen)`` for ``RWKV_ZOO_CPU_ISA`` (``env``; None: read it) on this CPU (or
    one with ``flags``). Raises ``IsaError`` for a name that is not an ISA or one the CPU cannot run."""
    raw = os.environ.get(ISA_ENV, "") if env is None else env
    want = raw.strip().lower()
    can = runnable_isas(flags)
    if want in ("", "auto"):
        return can[-1], "the best this CPU runs"
    if want not in ISAS:
        raise IsaError(f"{ISA_ENV}={raw!r} is not an instruction set of the CPU kernels; use auto, "
                       f"{', '.join(ISAS)}")
    if want not in can:
        if not _is_x86() and want != "portable":
            lacks = f"{platform.machine()} is not x86-64"
        else:
            have = cpu_flags() if flags is None else flags
            lacks = "this CPU lacks " + ", ".join(f for f in ISAS[want][1] if f not in have)
        raise IsaError(f"{ISA_ENV}={want} asks for {ISAS[want][2]} kernels, but {lacks} "
                       f"(it runs: {', '.join(can)})")
    return want, f"forced by {ISA_ENV}"


def describe_isa() -> str:
    """One line for ``rwkv-zoo info`` / ``backends`` / ``explain``: the ISA the kernels use and why."""
    try:
        isa, how = select_isa()
    except IsaError as exc:
        return f"none: {exc}"
    return f"{isa} ({ISAS[isa][2]}; {how}; runnable here: {', '.join(runnable_isas())})"


def _static_reason() -> str | None:
    if os.environ.get("RWKV_ZOO_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by RWKV_ZOO_CPU_KERNELS=0"
    if os.name != "posix":
        return "the CPU kernels are built as a POSIX shared library"
    if _compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def build_flags(name: str, isa: str) -> tuple[str, ...]:
    """The compiler flags of library ``name`` built for ``isa``."""
    return (*BASE_FLAGS, *ISAS[isa][0], *LIBRARIES[name][1])


def _build(cxx: str, name: str, isa: str = "avx2") -> Path:
    source, _, _ = LIBRARIES[name]
    src_path = CSRC / source
    flags = build_flags(name, isa)
    # The headers count too: cpu_gemv.cpp and cpu_decode.cpp share the tile kernels of cpu_tiles.h.
    text = src_path.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    tag = hashlib.sha256(text + " ".join((cxx, *flags, "link:", *LINK_FLAGS)).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{name}-{isa}-{tag}.so"
    if lib.exists():
        return lib
    import fcntl

    with open(out_dir / f"{name}-{isa}-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-", suffix=".so")
        os.close(fd)
        try:
            # Compile, then link without the compile flags: linked with -ffast-math, GCC adds crtfastmath.o,
            # whose constructor turns on flush-to-zero (MXCSR FTZ + DAZ) for the whole process when the
            # library loads: torch's own CPU ops would then flush denormals to zero after the first call
            # into these kernels.
            obj = tmp + ".o"
            for cmd in ([cxx, *flags, "-c", "-o", obj, str(src_path)], [cxx, *LINK_FLAGS, "-o", tmp, obj]):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{cxx} failed to build {source}:\n{proc.stderr.strip()[-2000:]}")
            os.replace(tmp, lib)
        finally:
            for path in (tmp, tmp + ".o"):
                if os.path.exists(path):
                    os.unlink(path)
    return lib


def compile_check(name: str, isa: str, out_dir: Path) -> None:
    """Compile library ``name`` for ``isa`` to an object file without linking or loading it (for
    builds this CPU cannot run: a syntax or target error still shows). Raises RuntimeError on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found")
    flags = [f for f in build_flags(name, isa) if f != "-O3"]
    src = CSRC / LIBRARIES[name][0]
    proc = subprocess.run([cxx, *flags, "-O1", "-c", "-o", str(Path(out_dir) / f"{name}-{isa}.o"), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cxx} failed to compile {src.name} for {isa}:\n{proc.stderr.strip()[-2000:]}")


def _open(name: str, abi_symbol: str, isa: str | None) -> tuple[ctypes.CDLL | None, str | None]:
    why = _static_reason()
    if why:
        return None, why
    try:
        if isa is None:
            isa = select_isa()[0]
        elif isa not in runnable_isas():
            return None, f"this CPU cannot run the {isa} build (it runs: {', '.join(runnable_isas())})"
    except IsaError as exc:
        return None, str(exc)
    try:
        lib = ctypes.CDLL(str(_build(_compiler(), name, isa)))
    except Exception as exc:  # a broken toolchain must not break inference: report and fall back
        return None, f"building the CPU kernels failed ({type(exc).__name__}: {exc})"
    if getattr(lib, abi_symbol)() != LIBRARIES[name][2]:
        return None, f"the cached {name} library has another ABI version; clear {cache_dir()}"
    return lib, None


@functools.cache
def _load(isa: str | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """The GEMV library for ``isa`` (None: the selected one) and None, or None and why it cannot load."""
    lib, why = _open("cpu_gemv", "rz_abi_version", isa)
    if lib is None:
        return None, why
    lib.rz_gemv.argtypes = [_I, _P, _I, _I, _I, _P, _P, _I, _P, _I, _INT]
    lib.rz_gemv.restype = None
    lib.rz_isa.restype = ctypes.c_char_p
    return lib, None


@functools.cache
def load_wkv(isa: str | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """The WKV recurrence library (``csrc/cpu_wkv.cpp``) and None, or None and why it cannot load."""
    lib, why = _open("cpu_wkv", "rz_wkv_abi_version", isa)
    if lib is None:
        return None, why
    lib.rz_wkv4.argtypes = [_P] * 11 + [_I, _I, _I, _INT]
    lib.rz_wkv6.argtypes = [_P, _P, _P, _P, _INT, _P, _P, _P, _P, _I, _I, _I, _I, _INT]
    lib.rz_wkv7.argtypes = [_P] * 9 + [_I, _I, _I, _I, _INT]
    for fn in (lib.rz_wkv4, lib.rz_wkv6, lib.rz_wkv7):
        fn.restype = None
    return lib, None


@functools.cache
def load_wkv_train(isa: str | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """The training WKV library (``csrc/cpu_wkv_train.cpp``: forward with checkpoints, backward) and None,
    or None and why it cannot load."""
    lib, why = _open("cpu_wkv_train", "rz_wkv_train_abi_version", isa)
    if lib is None:
        return None, why
    lib.rz_wkv6_fwd.argtypes = [_P, _P, _P, _P, _INT, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _INT]
    lib.rz_wkv6_bwd.argtypes = [_P, _P, _P, _P, _INT, _P] + [_P] * 9 + [_I] * 5 + [_INT]
    lib.rz_wkv7_fwd.argtypes = [_P] * 10 + [_I] * 5 + [_INT]
    lib.rz_wkv7_bwd.argtypes = [_P] * 16 + [_I] * 5 + [_INT]
    lib.rz_wkv4_fwd.argtypes = [_P] * 14 + [_I] * 3 + [_INT]
    lib.rz_wkv4_bwd.argtypes = [_P] * 18 + [_I] * 3 + [_INT]
    for fn in (lib.rz_wkv4_fwd, lib.rz_wkv4_bwd, lib.rz_wkv6_fwd, lib.rz_wkv6_bwd, lib.rz_wkv7_fwd, lib.rz_wkv7_bwd):
        fn.restype = None
    return lib, None


class Lin(ctypes.Structure):
    """One packed matrix for ``rz_decode`` (csrc/cpu_decode.cpp's ``Lin``; every field 8 bytes)."""

    _fields_ = [("w", _P), ("scale", _P), ("kind", _I), ("N", _I), ("K", _I)]


class LayerP(ctypes.Structure):
    """One layer's parameters for ``rz_decode`` (csrc/cpu_decode.cpp's ``LayerP``, same field order)."""

    _fields_ = [
        ("att_kind", _I), ("ffn_kind", _I), ("H", _I), ("N", _I), ("halve", _I),
        ("ln0_eps", ctypes.c_double), ("ln1_eps", ctypes.c_double), ("ln2_eps", ctypes.c_double),
        ("lnx_eps", ctypes.c_double),
        *((name, _P) for name in ("ln0_w", "ln0_b", "ln1_w", "ln1_b", "ln2_w", "ln2_b", "lnx_w", "lnx_b")),
        ("mix", _P), ("w", _P), ("u", _P), ("a0", _P), ("v0", _P), ("k_k", _P), ("k_a", _P), ("r_k", _P),
        ("r", Lin), ("k", Lin), ("v", Lin), ("o", Lin), ("g", Lin), ("l1", Lin * 5), ("l2", Lin * 5),
        ("fk", Lin), ("fv", Lin), ("fr", Lin), ("f_mk", _P), ("f_mr", _P),
    ]


@functools.cache
def load_decode(isa: str | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """The whole-step decode library (``csrc/cpu_decode.cpp``) and None, or None and why it cannot load."""
    lib, why = _open("cpu_decode", "rz_decode_abi_version", isa)
    if lib is None:
        return None, why
    lib.rz_decode.argtypes = [ctypes.POINTER(LayerP), _I, _I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_double,
                              ctypes.POINTER(Lin), _I, _P, ctypes.c_float, _INT]
    lib.rz_decode.restype = None
    lib.rz_decode_isa.restype = ctypes.c_char_p
    return lib, None


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot run here (building them on first call), or None."""
    return _load()[1]


def available() -> bool:
    return _load()[0] is not None


def isa() -> str | None:
    """The ISA of the loaded kernels (None where they cannot load)."""
    lib = _load()[0]
    return lib.rz_isa().decode() if lib is not None else None


TILE_ROWS, TILE_K = 4, 8  # the packed layout of csrc/cpu_tiles.h: [N / 4, K / 8, 4, 8] (bf16: K / 16 and 16)


def tile_k(dtype: torch.dtype) -> int:
    """Input columns per tile row: 16 for bf16 (one 256-bit load), 64 for int4 (a scale group), else 8."""
    return {torch.bfloat16: 2 * TILE_K, torch.uint8: I4_GROUP}.get(dtype, TILE_K)


def packable(weight: Tensor) -> bool:
    """Whether [N, K] ``weight`` fits the tile layout of ``pack`` (int4 codes: ``pack_int4`` needs K % 64 == 0)."""
    return weight.dim() == 2 and weight.shape[1] % tile_k(weight.dtype) == 0


def pack(weight: Tensor) -> Tensor:
    """[N, K] -> the kernels' tile layout [N' / 4, K / L, 4, L] (N' = N rounded up to 4, zero rows added).

    L = 8, except bf16: L = 16, stored interleaved (w0, w8, w1, w9, ..., w7, w15) so that the low halves
    of a 256-bit load's 32-bit lanes are columns 0-7 and the high halves 8-15: the kernel widens each
    half to fp32 with one shift or mask instead of a two-step conversion."""
    N, K = weight.shape
    L = 2 * TILE_K if weight.dtype == torch.bfloat16 else TILE_K
    pad = -N % TILE_ROWS
    if pad:
        weight = torch.cat([weight, weight.new_zeros(pad, K)])
    n4 = (N + pad) // TILE_ROWS
    if L == 16:
        weight = weight.reshape(N + pad, K // 16, 2, 8).transpose(2, 3)
    return weight.reshape(n4, TILE_ROWS, K // L, L).transpose(1, 2).contiguous()


def unpack(packed: Tensor, N: int) -> Tensor:
    """The inverse of ``pack``: [N, K] in the packed tensor's dtype (a new tensor)."""
    n4, kb, rows, lanes = packed.shape
    w = packed.transpose(1, 2).reshape(n4 * rows, kb, lanes)
    if lanes == 16:
        w = w.reshape(n4 * rows, kb, 8, 2).transpose(2, 3)
    return w.reshape(n4 * rows, kb * lanes)[:N]


def pack_int4(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int4 codes ``q`` [N, K] (int8 in [-8, 7]) and group scales [N, K / 64] -> the int4 tile layout:
    uint8 [N' / 4, K / 8, 4, 4] (row r's 4 bytes of a step hold columns j in the low nibble and j + 4 in
    the high one, as q + 8) and fp32 scales [N' / 4, K / 64, 4]. K must be a multiple of 64."""
    N, K = q.shape
    pad = -N % TILE_ROWS
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    s = scale.float()
    if pad:
        u = torch.cat([u, u.new_full((pad, K), 8)])  # code 8 is the value 0
        s = torch.cat([s, s.new_zeros(pad, s.shape[1])])
    n4 = (N + pad) // TILE_ROWS
    t = u.reshape(n4, TILE_ROWS, K // 8, 8).transpose(1, 2)  # [n4, K / 8, 4, 8]
    packed = (t[..., :4] | (t[..., 4:] << 4)).contiguous()
    scales = s.reshape(n4, TILE_ROWS, K // I4_GROUP).transpose(1, 2).contiguous()
    return packed, scales


def unpack_int4(packed: Tensor, scales: Tensor, N: int) -> tuple[Tensor, Tensor]:
    """The inverse of ``pack_int4``: (codes int8 [N, K], scales fp32 [N, K / 64])."""
    n4, kb = packed.shape[:2]
    t = torch.cat([packed & 15, packed >> 4], dim=-1)  # [n4, K / 8, 4, 8]
    q = (t.transpose(1, 2).reshape(n4 * TILE_ROWS, kb * 8).to(torch.int16) - 8).to(torch.int8)
    s = scales.transpose(1, 2).reshape(n4 * TILE_ROWS, -1)
    return q[:N], s[:N]


def gemv(x: Tensor, packed: Tensor, N: int, scale: Tensor | None = None, isa: str | None = None) -> Tensor:
    """``x`` [M, K] fp32 (unit column stride) times the packed weight (fp32, bf16, int8 with ``scale``
    [N'], one per packed row, or int4 as ``pack_int4`` packs it) -> [M, N] fp32, with the kernels of
    ``isa`` (None: the selected ISA). The caller checks ``available()``, dtypes and devices."""
    lib = _load(isa)[0]
    if lib is None:
        raise RuntimeError(f"the {isa or 'selected'} CPU kernels cannot load: {_load(isa)[1]}")
    M, K = x.shape
    Np = packed.shape[0] * TILE_ROWS
    y = torch.empty(M, Np, dtype=torch.float32)
    lib.rz_gemv(KINDS[packed.dtype], x.data_ptr(), M, K, x.stride(0), packed.data_ptr(),
                None if scale is None else scale.data_ptr(), Np, y.data_ptr(), Np, torch.get_num_threads())
    return y if Np == N else y[:, :N]
