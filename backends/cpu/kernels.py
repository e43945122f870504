"""CPU matrix-vector kernels for decode, compiled at first use and called through ``ctypes``.

Decode reads every weight once per token, so on a CPU it is bound by memory bandwidth; the kernels
in ``csrc/cpu_gemv.cpp`` stream weights stored ``[out, in]`` in fp32, bf16 or int8 (one fp32 scale
per output row), widen them in registers and accumulate in fp32, for up to a few rows of input at a
time (AVX2 + FMA, OpenMP threads = ``torch.get_num_threads()``).

The libraries (this one, and ``csrc/cpu_wkv.cpp`` for the ``cpu`` backend's WKV recurrences) are
built with the system C++ compiler (``$CXX``, else ``c++``/``g++``) into a cache directory
(``$RWKV_ZOO_CACHE``, else ``~/.cache/rwkv_zoo``), named after a hash of the source and the flags;
a file lock keeps two processes from building at once and the file is renamed into place, so a
reader never sees half a library. No torch headers: building takes ~2 s.

``unavailable_reason()`` says why the kernels cannot run here (not x86-64, no AVX2, no compiler,
the build failed, ``RWKV_ZOO_CPU_KERNELS=0``); callers then fall back to ``torch.nn.functional.linear``.
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
BASE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# name -> (source, extra flags, ABI version). The WKV loops need -ffast-math so expf vectorizes (libmvec);
# the GEMV kernels do not use it, so their sums keep IEEE semantics.
LIBRARIES = {
    "cpu_gemv": ("cpu_gemv.cpp", (), 3),
    "cpu_wkv": ("cpu_wkv.cpp", ("-ffast-math",), 1),
    "cpu_decode": ("cpu_decode.cpp", ("-ffast-math",), 3),
    "cpu_wkv_train": ("cpu_wkv_train.cpp", ("-ffast-math",), 1),
}

_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def cache_dir() -> Path:
    root = os.environ.get("RWKV_ZOO_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "rwkv_zoo"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _static_reason() -> str | None:
    if os.environ.get("RWKV_ZOO_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by RWKV_ZOO_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU kernels are written for x86-64 with AVX2, this is {platform.machine()}"
    if os.name != "posix":
        return "the CPU kernels are built as a POSIX shared library"
    cap = torch.backends.cpu.get_cpu_capability()
    if "AVX2" not in cap and "AVX512" not in cap:
        return f"this CPU has no AVX2 (torch reports {cap})"
    if _compiler() is None:
        return "no C++ compiler found (set CXX, or install g++)"
    return None


def _build(cxx: str, name: str) -> Path:
    source, extra, _ = LIBRARIES[name]
    src_path = CSRC / source
    flags = (*BASE_FLAGS, *extra)
    # The headers count too: cpu_gemv.cpp and cpu_decode.cpp share the tile kernels of cpu_tiles.h.
    text = src_path.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    tag = hashlib.sha256(text + " ".join((cxx, *flags)).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{name}-{tag}.so"
    if lib.exists():
        return lib
    import fcntl

    with open(out_dir / f"{name}-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-", suffix=".so")
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, "-o", tmp, str(src_path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed to build {source}:\n{proc.stderr.strip()[-2000:]}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _open(name: str, abi_symbol: str) -> tuple[ctypes.CDLL | None, str | None]:
    why = _static_reason()
    if why:
        return None, why
    try:
        lib = ctypes.CDLL(str(_build(_compiler(), name)))
    except Exception as exc:  # a broken toolchain must not break inference: report and fall back
        return None, f"building the CPU kernels failed ({type(exc).__name__}: {exc})"
    if getattr(lib, abi_symbol)() != LIBRARIES[name][2]:
        return None, f"the cached {name} library has another ABI version; clear {cache_dir()}"
    return lib, None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = _open("cpu_gemv", "rz_abi_version")
    if lib is None:
        return None, why
    lib.rz_gemv_f32.argtypes = [_P, _I, _I, _I, _P, _I, _P, _I, _INT]
    lib.rz_gemv_bf16.argtypes = [_P, _I, _I, _I, _P, _I, _P, _I, _INT]
    lib.rz_gemv_i8.argtypes = [_P, _I, _I, _I, _P, _P, _I, _P, _I, _INT]
    for fn in (lib.rz_gemv_f32, lib.rz_gemv_bf16, lib.rz_gemv_i8):
        fn.restype = None
    return lib, None


@functools.lru_cache(maxsize=1)
def load_wkv() -> tuple[ctypes.CDLL | None, str | None]:
    """The WKV recurrence library (``csrc/cpu_wkv.cpp``) and None, or None and why it cannot load."""
    lib, why = _open("cpu_wkv", "rz_wkv_abi_version")
    if lib is None:
        return None, why
    lib.rz_wkv4.argtypes = [_P] * 11 + [_I, _I, _I, _INT]
    lib.rz_wkv6.argtypes = [_P, _P, _P, _P, _INT, _P, _P, _P, _P, _I, _I, _I, _I, _INT]
    lib.rz_wkv7.argtypes = [_P] * 9 + [_I, _I, _I, _I, _INT]
    for fn in (lib.rz_wkv4, lib.rz_wkv6, lib.rz_wkv7):
        fn.restype = None
    return lib, None


@functools.lru_cache(maxsize=1)
def load_wkv_train() -> tuple[ctypes.CDLL | None, str | None]:
    """The training WKV library (``csrc/cpu_wkv_train.cpp``: forward with checkpoints, backward) and None,
    or None and why it cannot load."""
    lib, why = _open("cpu_wkv_train", "rz_wkv_train_abi_version")
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


@functools.lru_cache(maxsize=1)
def load_decode() -> tuple[ctypes.CDLL | None, str | None]:
    """The whole-step decode library (``csrc/cpu_decode.cpp``) and None, or None and why it cannot load."""
    lib, why = _open("cpu_decode", "rz_decode_abi_version")
    if lib is None:
        return None, why
    lib.rz_decode.argtypes = [ctypes.POINTER(LayerP), _I, _I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_double,
                              ctypes.POINTER(Lin), _I, _P, ctypes.c_float, _INT]
    lib.rz_decode.restype = None
    return lib, None


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot run here (building them on first call), or None."""
    return _load()[1]


def available() -> bool:
    return _load()[0] is not None


TILE_ROWS, TILE_K = 4, 8  # the packed layout of csrc/cpu_tiles.h: [N / 4, K / 8, 4, 8] (bf16: K / 16 and 16)


def tile_k(dtype: torch.dtype) -> int:
    """Input columns per tile row: 16 for bf16 (one 256-bit load), else 8."""
    return 2 * TILE_K if dtype == torch.bfloat16 else TILE_K


def packable(weight: Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % tile_k(weight.dtype) == 0


def pack(weight: Tensor) -> Tensor:
    """[N, K] -> the kernels' tile layout [N' / 4, K / L, 4, L] (N' = N rounded up to 4, zero rows added).

    L = 8, except bf16: L = 16, stored interleaved (w0, w8, w1, w9, ..., w7, w15) so that the low halves
    of a 256-bit load's 32-bit lanes are columns 0-7 and the high halves 8-15: the kernel widens each
    half to fp32 with one shift or mask instead of a two-step conversion."""
    N, K = weight.shape
    L = tile_k(weight.dtype)
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


def gemv(x: Tensor, packed: Tensor, N: int, scale: Tensor | None = None) -> Tensor:
    """``x`` [M, K] fp32 (unit column stride) times the packed weight (fp32, bf16, or int8 with ``scale``
    [N'], one per packed row) -> [M, N] fp32. The caller checks ``available()``, dtypes and devices."""
    lib = _load()[0]
    M, K = x.shape
    Np = packed.shape[0] * TILE_ROWS
    y = torch.empty(M, Np, dtype=torch.float32)
    nt = torch.get_num_threads()
    if packed.dtype == torch.int8:
        lib.rz_gemv_i8(x.data_ptr(), M, K, x.stride(0), packed.data_ptr(), scale.data_ptr(), Np, y.data_ptr(), Np, nt)
    elif packed.dtype == torch.bfloat16:
        lib.rz_gemv_bf16(x.data_ptr(), M, K, x.stride(0), packed.data_ptr(), Np, y.data_ptr(), Np, nt)
    else:
        lib.rz_gemv_f32(x.data_ptr(), M, K, x.stride(0), packed.data_ptr(), Np, y.data_ptr(), Np, nt)
    return y if Np == N else y[:, :N]
