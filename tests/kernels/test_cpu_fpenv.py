"""Loading the cpu backend's kernels leaves the process's floating-point environment alone.

Built with -ffast-math and linked in the same step, GCC adds crtfastmath.o to a shared library, whose
constructor sets flush-to-zero and denormals-are-zero for the whole process on load: every torch CPU op
afterwards flushes denormals (a silent change of numerics outside our kernels). The kernels are
compiled with it and linked without it.
"""

from __future__ import annotations

import subprocess
import sys

from _deps import CXX, needs

from rwkv_zoo.backends.cpu import kernels

# Run in a fresh interpreter: this test process may have loaded the libraries long before.
_CHECK = r"""
import torch
from rwkv_zoo.backends.cpu import kernels

tiny = torch.tensor([1e-39])  # a float32 denormal
assert (tiny * 1.0).item() != 0.0, "denormals flushed before loading anything"
loaded = []
for name, loader in (("cpu_gemv", kernels._load), ("cpu_wkv", kernels.load_wkv),
                     ("cpu_decode", kernels.load_decode), ("cpu_wkv_train", kernels.load_wkv_train)):
    lib, why = loader()
    assert lib is not None, (name, why)
    loaded.append(name)
    assert (tiny * 1.0).item() != 0.0, f"loading {name} turned on flush-to-zero"
    assert (torch.tensor([1e-30]) * torch.tensor([1e-9])).item() != 0.0, f"{name}: denormal result flushed"
print("ok", *loaded)
"""


@needs(kernels._static_reason(), CXX)
def test_loading_the_kernels_does_not_turn_on_flush_to_zero():
    done = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "cpu_gemv", "cpu_wkv", "cpu_decode", "cpu_wkv_train"]
