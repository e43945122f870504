"""CPU stand-ins for the CUDA kernels, built with the host C++ compiler: the emulator and the threaded host build.

The emulator runs the kernels' per-thread arithmetic (``csrc/wkv_math.cuh``, the same functions the
``.cu`` kernels call) one emulated thread after another between the kernels' barrier points, in fp32.
It exists so a machine without a GPU can check the CUDA backend's numerics and its Python glue (the
custom ops, autograd, the reductions of shared parameters' gradients): on CPU tensors the backend's ops
run this emulator instead of the extension. It is a pure C++ shared library loaded with ``ctypes`` (no
torch headers: it builds in about a second). Not checked by it: the CUDA-side indexing, dtype loads
and races, which only a GPU run checks.

``threaded_library()`` goes further: it compiles the real kernel files (``wkv4.cu``, ``wkv6.cu``,
``wkv7.cu``; fp32, without their launchers) with g++ and runs each CUDA thread as a CPU thread, with a
barrier for ``__syncthreads`` and function statics for ``__shared__`` (``csrc/host_threads.h``), so the
kernels' own indexing, chunk staging and barrier placement are exercised too. ``THREADED`` drives it
with the same interface as ``EMULATOR``. In ``wkv7_chunk.cu`` only the two tensor-core phases (wmma
fragment loads, mma, stores) are swapped for loops there: they alone are left to a GPU run.

The libraries are built once per source hash into ``$RWKV_ZOO_CUDA_CACHE/emulator`` (default: the cuda
backend's cache directory), under the same file lock as the extension build.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("emulate.cpp", "wkv_math.cuh", "wkv7_chunk.cuh")
THREADED_SOURCES = ("kernels_host.cpp", "host_threads.h", "wkv_cuda_common.cuh", "wkv_math.cuh", "wkv7_chunk.cuh",
                    "wkv7_chunk_bwd.cuh", "wkv4.cu", "wkv6.cu", "wkv7.cu", "wkv7_chunk.cu")
HEAD_SIZES = (16, 32, 64)


def compiler() -> str | None:
    """The host C++ compiler the emulator builds with (``$CXX``, else ``c++``/``g++``/``clang++``), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason() -> str | None:
    if compiler() is None:
        return "no host C++ compiler (c++, g++ or clang++; or set CXX) to build the CPU emulator of the CUDA kernels"
    return None


def _digest(sources) -> str:
    h = hashlib.sha256()
    for name in sources:
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def _build(stem: str, main: str, sources, flags) -> ctypes.CDLL:
    from .loader import cache_dir, file_lock

    why = unavailable_reason()
    if why:
        raise RuntimeError(why)
    out_dir = cache_dir() / "emulator"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{stem}_{_digest(sources)}.so"
    with file_lock(out_dir / "build.lock"):
        if not lib.exists():
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            cmd = [compiler(), *flags, "-shared", "-fPIC", "-I", str(CSRC), str(CSRC / main), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building {main} failed:\n{' '.join(cmd)}\n{done.stderr}")
            os.replace(tmp, lib)  # atomic: a reader never sees a half-written library
    return ctypes.CDLL(str(lib))


@functools.cache
def library() -> ctypes.CDLL:
    """Build (once per source hash, under the cache lock) and load the emulator library."""
    return _build("rwkv_zoo_cuda_emulator", "emulate.cpp", SOURCES, ["-O2", "-std=c++17"])


@functools.cache
def threaded_library(chunk_bwd_tc: bool = False) -> ctypes.CDLL:
    """Build and load the real kernels compiled for the CPU, a thread per CUDA thread (C++20, pthreads).

    ``chunk_bwd_tc`` builds the wkv7 chunk backward as ``RWKV_C7_BWD_TC=1`` does on a GPU (its products
    with tf32-rounded operands), the variant ``RWKV_ZOO_CUDA_CHUNK_BWD_TC=1`` selects.
    """
    tc = int(chunk_bwd_tc)
    return _build(f"rwkv_zoo_cuda_host_threads_tc{tc}", "kernels_host.cpp", THREADED_SOURCES,
                  ["-O1", "-std=c++20", "-pthread", "-DRWKV_HOST_THREADS", f"-DRWKV_C7_BWD_TC={tc}"])


class _Args:
    """fp32 contiguous copies of inputs, and fp32 buffers for outputs copied back after the call."""

    def __init__(self) -> None:
        self.back: list[tuple[Tensor, Tensor]] = []

    def inp(self, t: Tensor) -> ctypes.c_void_p:
        t = t.detach().to(torch.float32).contiguous()
        self.back.append((t, t))  # keep it alive during the call
        return ctypes.c_void_p(t.data_ptr())

    def out(self, t: Tensor) -> ctypes.c_void_p:
        if t.numel() == 0:
            return ctypes.c_void_p(0)
        buf = t if (t.dtype == torch.float32 and t.is_contiguous()) else torch.empty(t.shape, dtype=torch.float32)
        self.back.append((buf, t))
        return ctypes.c_void_p(buf.data_ptr())

    def finish(self, rc: int, what: str) -> None:
        if rc != 0:
            raise ValueError(f"the emulator has no {what} for this head size (it has N in {HEAD_SIZES})")
        for buf, t in self.back:
            if buf is not t:
                t.copy_(buf)


_L = ctypes.c_long


class Emulator:
    """The extension's interface (see ``binding.cpp``) on CPU tensors, run by a CPU library."""

    def __init__(self, lib=library, chunk_bwd=threaded_library) -> None:
        self._lib = lib
        self._chunk_bwd = chunk_bwd

    def wkv4_fwd(self, w, u, k, v, a0, b0, p0, y, aT, bT, pT, sa, sb, sp, save: bool) -> None:
        B, T, C = k.shape
        x = _Args()
        args = [x.inp(t) for t in (w, u, k, v, a0, b0, p0)] + [x.out(t) for t in (y, aT, bT, pT, sa, sb, sp)]
        x.finish(self._lib().emu_wkv4_fwd(B, T, C, *args, int(save)), "wkv4")

    def wkv4_bwd(self, w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT, dk, dv, dw, du, da0, db0, dp0) -> None:
        B, T, C = k.shape
        x = _Args()
        args = ([x.inp(t) for t in (w, u, k, v, sa, sb, sp, dy, daT, dbT, dpT)]
                + [x.out(t) for t in (dk, dv, dw, du, da0, db0, dp0)])
        x.finish(self._lib().emu_wkv4_bwd(B, T, C, *args), "wkv4")

    def wkv6_fwd(self, r, k, v, w, w_sb: int, w_st: int, u, s0, y, sT) -> None:
        B, T, H, N = r.shape
        x = _Args()
        args = [x.inp(r), x.inp(k), x.inp(v), x.inp(w), _L(w_sb), _L(w_st), x.inp(u), x.inp(s0), x.out(y), x.out(sT)]
        x.finish(self._lib().emu_wkv6_fwd(B, T, H, N, *args), "wkv6 kernel")

    def wkv6_bwd(self, r, k, v, w, w_sb: int, w_st: int, u, s0, dy, dsT, dr, dk, dv, dw, du, ds0, ck) -> None:
        # ck: the CUDA kernel's checkpoint scratch; the emulator keeps its own.
        B, T, H, N = r.shape
        x = _Args()
        args = ([x.inp(r), x.inp(k), x.inp(v), x.inp(w), _L(w_sb), _L(w_st), x.inp(u), x.inp(s0), x.inp(dy),
                 x.inp(dsT)] + [x.out(t) for t in (dr, dk, dv, dw, du, ds0)])
        x.finish(self._lib().emu_wkv6_bwd(B, T, H, N, *args), "wkv6 kernel")

    def wkv7_fwd(self, r, w, k, v, a, b, s0, y, sT, sa, ck, save: bool) -> None:
        B, T, H, N = r.shape
        x = _Args()
        args = [x.inp(t) for t in (r, w, k, v, a, b, s0)] + [x.out(t) for t in (y, sT, sa, ck)]
        x.finish(self._lib().emu_wkv7_fwd(B, T, H, N, *args, int(save)), "wkv7 kernel")

    def wkv7_chunk_fwd(self, r, w, k, v, a, b, s0, y, sT, ck) -> None:
        B, T, H, N = r.shape
        x = _Args()
        args = [x.inp(t) for t in (r, w, k, v, a, b, s0)] + [x.out(t) for t in (y, sT, ck)]
        x.finish(self._lib().emu_wkv7_chunk_fwd(B, T, H, N, *args), "wkv7 chunk kernel")

    def wkv7_chunk_bwd(self, r, w, k, v, a, b, ck, dy, dsT, dr, dw, dk, dv, da, db, ds0) -> None:
        # The chunk backward's phases run only in the threaded build of the real kernel (which runs
        # wkv7_chunk_bwd.cuh verbatim), whichever library drives the rest.
        B, T, H, N = r.shape
        x = _Args()
        args = ([x.inp(t) for t in (r, w, k, v, a, b, ck, dy, dsT)]
                + [x.out(t) for t in (dr, dw, dk, dv, da, db, ds0)])
        x.finish(self._chunk_bwd().emu_wkv7_chunk_bwd(B, T, H, N, *args), "wkv7 chunk kernel")

    def wkv7_bwd(self, r, w, k, v, a, b, sa, ck, sT, dy, dsT, dr, dw, dk, dv, da, db, ds0) -> None:
        B, T, H, N = r.shape
        x = _Args()
        args = ([x.inp(t) for t in (r, w, k, v, a, b, sa, ck, sT, dy, dsT)]
                + [x.out(t) for t in (dr, dw, dk, dv, da, db, ds0)])
        x.finish(self._lib().emu_wkv7_bwd(B, T, H, N, *args), "wkv7 kernel")


EMULATOR = Emulator()
THREADED = Emulator(threaded_library)
