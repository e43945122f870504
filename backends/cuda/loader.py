"""Builds the CUDA extension on first use and caches it.

``extension()`` compiles ``csrc/binding.cpp`` and the kernel files with
``torch.utils.cpp_extension.load`` (ninja) into ``cache_dir() / "ext_<hash>"``, where the hash covers
every source file, the torch version and the CUDA version, so a changed kernel or a new torch rebuilds
instead of loading a stale library. A file lock around the build keeps two processes (say, the ranks
of a distributed job starting together) from compiling into the same directory at once; the second
waits and then loads what the first built.

Environment: ``RWKV_ZOO_CUDA_CACHE`` (the cache directory; default ``<torch extensions dir>/rwkv_zoo``),
``RWKV_ZOO_CUDA_VERBOSE=1`` (show the compiler's output), ``RWKV_ZOO_CUDA_CHUNK_BWD_TC=1`` (run the
wkv7 chunk backward's block products on tensor cores, tf32; off by default until a GPU run has checked
it against the default fp32 CUDA-core path), ``TORCH_CUDA_ARCH_LIST`` (as torch reads it:
the architectures to build for; by default the visible GPUs').
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
KERNEL_SOURCES = ("wkv4.cu", "wkv6.cu", "wkv7.cu", "wkv7_chunk.cu")
HEADERS = ("wkv_math.cuh", "wkv7_chunk.cuh", "wkv7_chunk_bwd.cuh", "wkv_cuda_common.cuh", "wkv_launch.h")
BINDING = "binding.cpp"
# Exact expf (no --use_fast_math): the recurrent kernels promise fp32-reference accuracy, and the
# exponentials are one per element per step, not the bottleneck.
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def nvcc_flags() -> list[str]:
    flags = list(NVCC_FLAGS)
    if _flag("RWKV_ZOO_CUDA_CHUNK_BWD_TC"):
        flags.append("-DRWKV_C7_BWD_TC=1")
    return flags


def cache_dir() -> Path:
    """``$RWKV_ZOO_CUDA_CACHE``, else ``rwkv_zoo`` under torch's extensions directory."""
    env = os.environ.get("RWKV_ZOO_CUDA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return Path(base) / "rwkv_zoo"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (``fcntl.flock``; a no-op where it is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: torch's own build baton still guards its build directory
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def source_hash() -> str:
    h = hashlib.sha256()
    for name in (BINDING, *KERNEL_SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{os.environ.get('TORCH_CUDA_ARCH_LIST', '')}".encode())
    h.update(" ".join(nvcc_flags()).encode())
    return h.hexdigest()[:16]


@functools.cache
def extension():
    """The compiled extension module (built on the first call in a process, then cached on disk)."""
    from torch.utils.cpp_extension import load  # heavy: only when a kernel is first needed

    name = f"rwkv_zoo_cuda_{source_hash()}"
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    verbose = _flag("RWKV_ZOO_CUDA_VERBOSE")
    with file_lock(cache_dir() / f"{name}.lock"):
        if verbose:
            print(f"rwkv_zoo: building/loading the CUDA kernels in {build}", file=sys.stderr)
        return load(
            name=name,
            sources=[str(CSRC / BINDING), *(str(CSRC / s) for s in KERNEL_SOURCES)],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=nvcc_flags(),
            build_directory=str(build),
            verbose=verbose,
        )
