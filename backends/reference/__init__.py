"""The ``reference`` backend: pure PyTorch, any device, every op in both modes.

``recurrent`` kernels are the literal per-step formulas (the oracle, fp64-capable); ``chunk`` kernels
are the matrix form over chunks (exact to rounding, the fast default on a CPU). Lowest priority among
real backends, so any specialised backend that can run a call wins, and this one is always there.

Its kernels are the registered ops' own references (``OpSpec.recurrent`` and ``OpSpec.chunk``), so an op
a plugin registers with its recurrence runs here with no other code. The built-in ops are declared in
``specs.py`` (a plugin of its own).
"""

from __future__ import annotations

from rwkv_zoo.backend import Backend, Kernel
from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.opspec import get_ops

PRIORITY = 0


def make_backend() -> Backend:
    kernels = []
    for spec in get_ops().values():
        kernels.append(Kernel(spec.name, "recurrent", spec.recurrent))
        if spec.chunk is not None:
            kernels.append(Kernel(spec.name, "chunk", spec.chunk))
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
