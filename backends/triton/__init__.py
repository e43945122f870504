"""The ``triton`` backend: Triton kernels for wkv4-wkv7 on CUDA GPUs (and on the CPU in Triton's interpreter).

Kernels (``recurrent.py`` wrapping ``_kernels.py``): ``recurrent`` mode for every op, forward and
backward, with gradients for every input, the initial state included, and for the final state's
upstream gradient. One program per (batch, head) keeps the fp32 [K, V] state in registers and loops
over t (wkv4: one per (batch, block of 64 channels)); wkv5 runs the wkv6 kernel with its decay
broadcast over time (exact: the same arithmetic). The wkv5-7 forward keeps the state entering every
16th step; the backward recomputes each block of 16 states from its checkpoint and walks it in
reverse, so gradients need (T / 16 + 16) states per head and have no length limit.
``chunk`` kernels (``chunk.py``): wkv6 and wkv5, forward and backward, the matrix form over 16-token
chunks with fp32 accumulation and chunk-local log-decay sums, each exponent summed over its own span
(every exponent <= 0: no overflow under strong decay, and no digits lost to differences of prefix
sums: fp32 <= 2e-6 relative on every quantity with the decay scaled x10); the backward keeps only the
state entering each chunk. Heads are split over programs (value columns forward, keys backward) and
the pairwise-decay tiles built 16 keys at a time, so head sizes 128 and 256 fit.
wkv7 ``chunk`` (``chunk7.py``, ``_kernels7.py``): forward and backward over 16-token chunks, a chunk's
removal reads from one unit-lower-triangular solve, every decay exponent summed over its own span
inside the chunk (<= 0 for any decay strength: fp32 <= 3e-7 relative with the decay scaled x10).
wkv4 ``chunk`` is the recurrent kernel itself, registered under both modes: wkv4 is a per-channel
recurrence with three scalars of state per channel and no matrix state, so there is no matrix form
to gain; one program per (batch, 64 channels) stepping through t already exposes B * C / 64-way
parallelism, as much as a chunked kernel would, and its backward (every step's state stored, the size
of the inputs) has no length limit. Registering it lets dispatch keep wkv4 training (chunk) calls on
this backend instead of handing them to another one.

Availability (``unavailable_reason``, read at every call, environment included): Triton must import,
and there must be a CUDA GPU or ``TRITON_INTERPRET=1`` (the interpreter runs the same kernels on CPU
tensors, slowly: that is how CI tests them). Nothing of Triton is imported when this package is.
``TRITON_INTERPRET`` must be set before the first kernel runs (Triton reads it when the kernels are
defined). Priority: 5 on a machine with a CUDA GPU (above ``reference``, below ``fla``'s chunked
kernels); -10 without one, so the interpreter only runs when asked for (``backend="triton"``).

Capabilities: head sizes 16, 32, 64, 128 (powers of two; the recurrent kernels hold a head's whole
state in one program's registers; chunk wkv5/6 split a head over programs and also take 256, see
``chunk.BLOCKS``; chunk wkv7 takes 16-128, see ``chunk7``); fp32, bf16 and fp16 inputs (``w``, ``u``
may be fp32 alongside), fp32 state; ``y`` in the input dtype. Accuracy (fp32) is that of the literal
recurrence: ~1e-7 relative to fp64.

``aot.py`` compiles every launch for a chosen GPU generation without a GPU and reports registers,
spills and shared memory (``python -m rwkv_zoo.backends.triton.aot``); CI runs it for sm_80.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.hookspecs import hookimpl

from .chunk import wkv5_chunk, wkv6_chunk
from .chunk7 import wkv7_chunk
from .recurrent import wkv4_recurrent, wkv5_recurrent, wkv6_recurrent, wkv7_recurrent

HEAD_SIZES = (16, 32, 64, 128)
CHUNK7_HEAD_SIZES = (16, 32, 64, 128)  # N=128 in blocks of 16 value columns (chunk7.MAX_BV)
# chunk wkv5/6 split heads above 64 over programs and decay tiles over key blocks (chunk.blocks)
CHUNK6_HEAD_SIZES = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRIORITY_GPU, PRIORITY_CPU = 5, -10


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or rwkv-zoo[triton])"
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # a broken install: say so instead of failing inside a kernel
        return f"triton is installed but fails to import ({type(exc).__name__}: {exc})"
    return None


def unavailable_reason() -> str | None:
    """Why the triton backend cannot run here, or None. Triton's import is cached; the rest is read now."""
    why = _import_error()
    if why:
        return why
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU, and TRITON_INTERPRET=1 is not set (Triton's interpreter runs the kernels on the CPU)"
    return None


def _check(call) -> list[str]:
    out = []
    if call.device == "cpu":
        if not interpreting():
            out.append("runs on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    elif call.device != "cuda":
        out.append(f"runs on cuda (cpu under TRITON_INTERPRET=1), not {call.device}")
    return out


def make_backend() -> Backend:
    common = dict(devices=("cuda", "cpu"), dtypes=DTYPES, check=_check)
    kernels = [
        Kernel("wkv4", "recurrent", wkv4_recurrent, **common),
        Kernel("wkv4", "chunk", wkv4_recurrent, **common),  # the same kernel: see the module docstring
        Kernel("wkv5", "recurrent", wkv5_recurrent, head_sizes=HEAD_SIZES, **common),
        Kernel("wkv6", "recurrent", wkv6_recurrent, head_sizes=HEAD_SIZES, **common),
        Kernel("wkv7", "recurrent", wkv7_recurrent, head_sizes=HEAD_SIZES, **common),
        Kernel("wkv5", "chunk", wkv5_chunk, head_sizes=CHUNK6_HEAD_SIZES, **common),
        Kernel("wkv6", "chunk", wkv6_chunk, head_sizes=CHUNK6_HEAD_SIZES, **common),
        Kernel("wkv7", "chunk", wkv7_chunk, head_sizes=CHUNK7_HEAD_SIZES, **common),
    ]
    return Backend(
        name="triton",
        kernels=kernels,
        priority=PRIORITY_GPU if torch.cuda.is_available() else PRIORITY_CPU,
        description=(
            "Triton kernels: recurrent and chunk wkv4-7, fwd+bwd; fp32 state; "
            "CUDA (CPU via TRITON_INTERPRET=1)"
        ),
        availability=unavailable_reason,
    )


@hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@hookimpl
def rwkv_zoo_update_env_info(info):
    why = unavailable_reason()
    info["triton backend"] = why or ("available (interpreter)" if interpreting() else "available")
