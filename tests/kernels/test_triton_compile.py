"""The triton backend's kernels compiled for real GPUs, on a machine without one (``triton/aot.py``).

The interpreter tests (``test_triton*.py``) check the arithmetic; only Triton's compiler checks what a
GPU needs (types, layouts, ``tl.dot`` rules, shared memory per block). Here every kernel launch the
autograd wrappers make for training at the standard head size (N=64, bf16: the no-grad forwards differ
only in the SAVE flag) is compiled for sm_80, whose 163 KiB of shared memory per block is the tightest
of the data-centre GPUs, in a subprocess without ``TRITON_INTERPRET`` (these test modules set it), and
must compile and fit. The command prints each kernel's registers, spills and shared memory.

Which (dtype, head size) pairs, for sm_80 only: each pair is one compiler run, and CI has 2 cores.
Measured with ``time`` and a fresh TRITON_CACHE_DIR on the 2-core machine (other jobs running):

  ======  ====  ===========  ===========================================
  dtype   N     ops          seconds
  ======  ====  ===========  ===========================================
  bf16    64    all (10)     55-64  (the original check; always run)
  fp32    64    wkv6, wkv7   41-43  (all ops: 54-124)
  bf16    128   wkv6, wkv7   40-43  (all ops: 54-126)
  fp16    64    all          86 (loaded; wkv6, wkv7: 52)  not run
  bf16    32    all          55     not run
  fp16    32    wkv6, wkv7   run: fp16 and the smallest standard head size in one compiler run
  fp32    32 / 128, fp16 32  all          141-151 (loaded)  not run
  ======  ====  ===========  ===========================================

So the three dtypes and head sizes 32, 64 and 128 are each compiled (not every pair). The fp32 and
N=128 runs are the ones most likely not to fit: fp32 doubles the bytes of every
tile (and ``tl.dot`` takes the TF32 path), and N=128 is the largest head size, whose shared memory
and registers grow with N^2. fp16 has bf16's sizes and instruction shapes, and N=32 needs less of
everything than N=64. wkv4 (2 simple recurrent kernels) and wkv5 (it runs the wkv6 kernels) are
left to the bf16/N=64 run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from _deps import require

require("triton")  # in the test extra; before the imports below, which need it

from rwkv_zoo.backends.triton import aot  # noqa: E402

pytestmark = pytest.mark.kernel

KERNELS = ("wkv4_fwd_kernel", "wkv4_bwd_kernel", "wkv6_fwd_kernel", "wkv6_bwd_kernel", "wkv7_fwd_kernel",
           "wkv7_bwd_kernel", "wkv6_chunk_fwd_kernel", "wkv6_chunk_bwd_kernel", "wkv7_chunk_fwd_kernel",
           "wkv7_chunk_bwd_kernel")


def test_launches_are_those_the_wrappers_make():
    # Runs the wrappers on meta tensors: the launches come from the code that runs on a GPU.
    got = aot.launches("wkv7", "chunk", torch.bfloat16, 64, H=3, B=2, T=40)
    assert [x.kernel for x in got] == ["wkv7_chunk_fwd_kernel", "wkv7_chunk_fwd_kernel", "wkv7_chunk_bwd_kernel"]
    assert [dict(x.constexprs)["SAVE"] for x in got[:2]] == [False, True]  # no-grad, then training
    assert all(x.grid == (6, 1) and dict(x.constexprs)["N"] == 64 for x in got)  # whole heads off a GPU
    sig = dict(got[2].signature)
    assert sig["r_ptr"] == "*bf16" and sig["w_ptr"] == "*fp32" and sig["dr_ptr"] == "*fp32" and sig["T"] == "i32"
    wkv5 = aot.launches("wkv5", "chunk", torch.float32, 128, backward=False)
    assert [x.kernel for x in wkv5] == ["wkv6_chunk_fwd_kernel"]  # wkv5 runs the wkv6 kernel
    assert wkv5[0].grid[1] == 128 // dict(wkv5[0].constexprs)["BV"]  # a head split over programs
    with pytest.raises(ValueError, match="no wkv7 bogus kernel"):
        aot.launches("wkv7", "bogus", torch.float32)


def test_problems_name_what_does_not_fit():
    fits = aot.Resources(registers=255, local_bytes=0, shared_bytes=160 * 1024, threads=256)
    assert aot.problems(fits, 80) == []
    big = aot.Resources(registers=255, local_bytes=0, shared_bytes=170 * 1024, threads=256)
    assert "shared memory" in aot.problems(big, 80)[0] and aot.problems(big, 90) == []
    wide = aot.Resources(registers=255, local_bytes=0, shared_bytes=0, threads=512)
    assert "registers" in aot.problems(wide, 90)[0]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "N", "ops"), [("bf16", 64, None), ("fp32", 64, "wkv6,wkv7"),
                                                 ("bf16", 128, "wkv6,wkv7"), ("fp16", 32, "wkv6,wkv7")])
def test_every_training_kernel_compiles_and_fits_sm80(dtype, N, ops):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    cmd = [sys.executable, "-m", "rwkv_zoo.backends.triton.aot", "--archs", "80", "--dtypes", dtype,
           "--head-sizes", str(N), "--training-only", "--jobs", "2", *(["--ops", ops] if ops else [])]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    rows = [line for line in run.stdout.splitlines() if "_kernel(" in line]
    want = {k for k in KERNELS if ops is None or k.split("_")[0] in ops.split(",")}
    assert {line.split()[2].split("(")[0] for line in rows} == want, run.stdout
    assert all(re.search(f"; {dtype}[/;]", line) for line in rows), run.stdout
    assert all(f"N={N}," in line for line in rows if "N=" in line), run.stdout  # wkv4 names its BLOCK
    assert "all" in run.stdout.splitlines()[-1] and "FAILED" not in run.stdout, run.stdout
