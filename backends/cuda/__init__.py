"""The ``cuda`` backend: hand-written CUDA C++ WKV kernels, compiled on first use.

Kernels (``csrc/``, our own code; the per-thread arithmetic in ``wkv_math.cuh``):
- ``wkv4`` recurrent: a thread per (batch, channel), the stable running-maximum recurrence, state
  ``(a, b, p)`` in and out, no compile-time length limit; the forward saves the state entering each
  step when a gradient is needed and the backward walks back through it.
- ``wkv5`` / ``wkv6`` recurrent: a block per (batch, head), a thread per value column, fp32 state in
  registers; the backward is exact under any decay strength: its own forward pass keeps the state
  every 16 steps in a scratch buffer and each S_{t-1} is rebuilt forward from there (never dividing
  by the decay); every gradient, the initial state's included. The forward stores nothing.
- ``wkv7`` recurrent: the same layout; the backward rebuilds earlier states from checkpoints taken
  every 16 steps, inverting the update in between (accurate for v7's decay, >= 0.545 per step).
- ``wkv7`` chunk: 16-step chunks; forward on tensor cores (fp16 pairwise products, tf32 products with
  the fp32 state; sm_80+), backward in fp32 on CUDA cores from the state the forward keeps at every
  chunk start (``wkv7_chunk_bwd.cuh``; its block products on tensor cores, tf32, with
  ``RWKV_ZOO_CUDA_CHUNK_BWD_TC=1`` until a GPU run has checked them). bf16/fp16 inputs, head
  sizes 32 and 64; error ~3e-4 relative from the operand rounding (5e-4 on gradients). It assumes
  v7's decay bound (w >= -exp(-0.5), as the model produces): far stronger decay would overflow its
  factored decays.
- Decode (T = 1) runs the recurrent kernels, one block per (batch, head).
Recurrent inputs fp32, bf16 or fp16 (decay and bonus fp32 alongside), fp32 state, ``y`` in the input dtype.
Head sizes 32, 64, 128 (the state of a head lives in one block's registers: N floats per thread,
3N in the wkv7 backward, which spills at N = 128).

Loading: ``loader.extension()`` builds ``csrc/binding.cpp`` and the ``.cu`` files with
``torch.utils.cpp_extension.load`` (ninja) into a cache directory (``RWKV_ZOO_CUDA_CACHE``) under a
file lock, on the first kernel call. The kernels are ``torch.library`` custom ops with registered
autograd and fake implementations (``_ops.py``), so autograd and ``torch.compile`` see them.

Availability (``unavailable_reason``): a CUDA build of torch, a visible GPU of compute capability
>= 7.0, ``nvcc`` (``CUDA_HOME``/``CUDA_PATH`` or on ``PATH``) and ``ninja``; read without compiling
or importing anything heavy. Priority 8 where available (above ``triton``'s 5).

What is verified where (no GPU was available when these kernels were written):
- nvcc: every ``.cu`` compiles for sm_80 and sm_90 (``tests/kernels/test_cuda.py``, slow); the torch
  binding is parsed against the installed torch's headers.
- The arithmetic: the CPU emulator (``csrc/emulate.cpp``) runs the kernels' per-thread functions
  (``wkv_math.cuh``, ``wkv7_chunk.cuh``) through this backend's custom ops and autograd and passes
  ``check_backend`` against the fp64 reference (fp32 worst 3e-6 on wkv7 gradients, <= 1e-6 elsewhere,
  also under x10 / x0.1 decay).
- The kernels themselves: ``csrc/kernels_host.cpp`` compiles the real ``.cu`` bodies (fp32) with g++,
  a CPU thread per CUDA thread with a barrier for ``__syncthreads`` (``host_threads.h``), and they pass
  the same suite: indexing, chunk staging, checkpoints and barrier placement are exercised (a removed
  barrier gives O(1) errors there). In ``wkv7_chunk.cu`` the wmma calls are swapped for loops with the
  same operand rounding.
- Only a GPU run checks: the bf16/fp16 load and store conversions, the wmma fragment code, races the
  OS scheduling did not expose, the extension build, and speed (tests marked ``gpu``).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.hookspecs import hookimpl

from .recurrent import wkv4_recurrent, wkv5_recurrent, wkv6_recurrent, wkv7_chunk, wkv7_recurrent

HEAD_SIZES = (32, 64, 128)
CHUNK_HEAD_SIZES = (32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK_DTYPES = (torch.bfloat16, torch.float16)  # tensor-core precision: not an fp32 kernel
MIN_CAPABILITY = (7, 0)
CHUNK_MIN_CAPABILITY = (8, 0)
PRIORITY_GPU, PRIORITY_CPU = 8, -10


def nvcc_path() -> str | None:
    """``nvcc`` from ``CUDA_HOME``/``CUDA_PATH``, else from ``PATH``, else ``/usr/local/cuda``; or None."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(env)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def ninja_path() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:  # the pip package puts its binary next to the module, not always on PATH
        import ninja

        return os.path.join(ninja.BIN_DIR, "ninja")
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _toolchain_missing() -> tuple[str, ...]:
    missing = []
    if nvcc_path() is None:
        missing.append("nvcc (install the CUDA toolkit, or set CUDA_HOME)")
    if ninja_path() is None:
        missing.append("ninja (pip install ninja)")
    return tuple(missing)


def unavailable_reason() -> str | None:
    """Every missing piece in one sentence, or None. Compiles nothing and imports nothing heavy."""
    missing = []
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (this is torch {torch.__version__}, built without CUDA)")
    elif not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    else:
        cap = torch.cuda.get_device_capability()
        if cap < MIN_CAPABILITY:
            missing.append(f"a GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                           f"(this one is {cap[0]}.{cap[1]})")
    missing.extend(_toolchain_missing())
    if not missing:
        return None
    return "the cuda backend needs " + "; ".join(missing)


def _check(call) -> list[str]:
    return []


# Shared memory per block of the chunk kernels' backward (sizeof(Smem7Bwd<N>) in wkv7_chunk.cu): it fits
# A100 / H100 (163 / 227 KiB opt-in), not GPUs with ~100 KiB per block (sm_86, sm_89).
CHUNK_BWD_SMEM = {32: 73984, 64: 156160}


def _check_chunk(call) -> list[str]:
    if call.device == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if cap < CHUNK_MIN_CAPABILITY:
            return [f"its tensor-core chunk kernel needs compute capability >= 8.0 (this GPU is {cap[0]}.{cap[1]})"]
        need = CHUNK_BWD_SMEM.get(call.N)
        have = getattr(torch.cuda.get_device_properties(), "shared_memory_per_block_optin", None)
        if call.requires_grad and need and have is not None and have < need:
            return [f"its chunk backward needs {need} bytes of shared memory per block, this GPU allows {have}"]
    return []


def make_backend(*, emulated: bool = False) -> Backend:
    """The ``cuda`` backend; ``emulated=True`` gives ``cuda-emulated``, the same kernels on CPU tensors.

    ``cuda-emulated`` runs the CUDA kernels' arithmetic in the CPU emulator (``emulate.py``) through
    the same custom ops and autograd: a test double for machines without a GPU, never registered by
    default (``rwkv_zoo.testing.registered_plugin`` registers it in tests).
    """
    if emulated:
        from . import emulate

        common = dict(devices=("cpu",), dtypes=DTYPES, check=_check)
        chunk = dict(devices=("cpu",), dtypes=CHUNK_DTYPES, check=_check_chunk)
        sizes = tuple(n for n in emulate.HEAD_SIZES)
        name, priority, availability = "cuda-emulated", -100, emulate.unavailable_reason
        description = "the cuda backend's kernels run by its CPU emulator (tests only)"
    else:
        common = dict(devices=("cuda",), dtypes=DTYPES, check=_check)
        chunk = dict(devices=("cuda",), dtypes=CHUNK_DTYPES, check=_check_chunk)
        sizes = HEAD_SIZES
        name = "cuda"
        priority = PRIORITY_GPU if torch.cuda.is_available() else PRIORITY_CPU
        availability = unavailable_reason
        description = ("CUDA C++ kernels: recurrent wkv4-7 fwd+bwd, fp32 state; wkv7 chunk fwd (tensor cores)+bwd; "
                       "compiled on first use (nvcc, ninja)")
    kernels = [
        Kernel("wkv4", "recurrent", wkv4_recurrent, **common),
        Kernel("wkv5", "recurrent", wkv5_recurrent, head_sizes=sizes, **common),
        Kernel("wkv6", "recurrent", wkv6_recurrent, head_sizes=sizes, **common),
        Kernel("wkv7", "recurrent", wkv7_recurrent, head_sizes=sizes, **common),
        Kernel("wkv7", "chunk", wkv7_chunk, head_sizes=CHUNK_HEAD_SIZES, **chunk),
    ]
    return Backend(name=name, kernels=kernels, priority=priority, description=description,
                   availability=availability)


@hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@hookimpl
def rwkv_zoo_update_env_info(info):
    why = unavailable_reason()
    info["cuda backend"] = why or "available (kernels compile on first use)"
