"""The ``reference`` backend: pure PyTorch, any device, every op in both modes.

``recurrent`` kernels are the literal per-step formulas (the oracle, fp64-capable); ``chunk`` kernels
are the matrix form over chunks (exact to rounding, the fast default on a CPU). Lowest priority among
real backends, so any specialised backend that can run a call wins, and this one is always there.
"""

from __future__ import annotations

from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.hookspecs import hookimpl

from .chunk import wkv4_chunk, wkv5_chunk, wkv6_chunk, wkv7_chunk
from .recurrent import wkv4_recurrent, wkv5_recurrent, wkv6_recurrent, wkv7_recurrent

PRIORITY = 0


def make_backend() -> Backend:
    kernels = [
        Kernel("wkv4", "recurrent", wkv4_recurrent),
        Kernel("wkv5", "recurrent", wkv5_recurrent),
        Kernel("wkv6", "recurrent", wkv6_recurrent),
        Kernel("wkv7", "recurrent", wkv7_recurrent),
        Kernel("wkv4", "chunk", wkv4_chunk),
        Kernel("wkv5", "chunk", wkv5_chunk),
        Kernel("wkv6", "chunk", wkv6_chunk),
        Kernel("wkv7", "chunk", wkv7_chunk),
    ]
    return Backend(
        name="reference",
        kernels=kernels,
        priority=PRIORITY,
        description="pure PyTorch: literal recurrences (fp64 oracle) and chunked matrix form; any device",
    )


@hookimpl
def rwkv_zoo_register_backends(register):
    register(make_backend())


@hookimpl
def rwkv_zoo_update_env_info(info):
    info["reference backend"] = "always available (pure PyTorch)"
