"""Compile the triton backend's kernels for NVIDIA GPUs on a machine without one, and report what they need.

Triton's interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels) executes them with numpy and never
meets the compiler, so what only the compiler checks (types, layouts, ``tl.dot`` shape rules, shared
memory beyond an SM's, register spills) would first show on a GPU. This module finds every launch the
backend's autograd wrappers make, for a given op, mode, dtype and head size, by running the wrappers on
``meta`` tensors with the kernel modules swapped for recorders (nothing computes, nothing is allocated),
then compiles each launch ahead of time with Triton's own compiler for a chosen compute capability
(Triton to PTX, then the ``ptxas`` shipped with Triton; no GPU and no driver involved) and reads the
cubin's resource usage (``cuobjdump``, also shipped with Triton): registers per thread, local memory per
thread (spills) and shared memory per program.

    python -m rwkv_zoo.backends.triton.aot                     # every kernel, N=64, bf16 and fp32, sm_80 and sm_90
    python -m rwkv_zoo.backends.triton.aot --head-sizes 16,32,64,128 --dtypes bf16 --archs 90

Pointers are compiled as 16-byte aligned, as the JIT specializes torch's allocations; integer arguments
(``T``, ``C``) as generic, so one binary serves every length.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import inspect
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from unittest import mock

import torch

# Most shared memory one thread block may use, per compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability"); a kernel asking for more fails at launch.
MAX_SHARED = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                  torch.int32: "i32", torch.int64: "i64"}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as a wrapper makes it: what Triton needs to compile it."""

    kernel: str  # the @triton.jit function's name
    module: str  # "_kernels" or "_kernels7"
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type), constexprs as "constexpr"
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    grid: tuple[int, ...]
    num_stages: int | None = None  # None: Triton's default

    def label(self) -> str:
        cst = ", ".join(f"{k}={v}" for k, v in self.constexprs if k not in ("H",))
        dtypes = sorted({t for _, t in self.signature if t.startswith("*")})
        stages = "" if self.num_stages is None else f", {self.num_stages} stages"
        return f"{self.kernel}({cst}; {'/'.join(d[1:] for d in dtypes)}; {self.num_warps} warps{stages})"


class _Recorder:
    """Stands in for a kernel module: ``module.kernel[grid](*args, **kw)`` records a Launch and returns."""

    def __init__(self, real, name: str, out: list[Launch]):
        self._real, self._name, self._out = real, name, out

    def __getattr__(self, kernel: str):
        fn = getattr(self._real, kernel)
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, num_warps: int = 4, num_stages: int | None = None, **kwargs):
                    recorder._out.append(_launch(fn, recorder._name, grid, args, kwargs, num_warps, num_stages))

                return launch

        return _Grid()


def _constexprs(fn) -> set[str]:
    # The raw function's annotations: the JIT and the interpreter wrap it alike (``fn.fn``); with
    # postponed annotations they are the strings "tl.constexpr".
    params = inspect.signature(fn.fn).parameters.values()
    return {p.name for p in params if "constexpr" in str(p.annotation)}


def _launch(fn, module: str, grid, args, kwargs, num_warps: int, num_stages: int | None) -> Launch:
    names = fn.arg_names
    values = dict(zip(names, args, strict=False))  # the rest come as keywords
    values.update(kwargs)
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"launch of {fn.__name__} misses {', '.join(missing)}")
    sig, cst = [], []
    for n in names:
        x = values[n]
        if n in _constexprs(fn):
            sig.append((n, "constexpr"))
            cst.append((n, x))
        elif isinstance(x, torch.Tensor):
            sig.append((n, "*" + _TRITON_DTYPES[x.dtype]))
        elif isinstance(x, bool):
            sig.append((n, "i1"))
        elif isinstance(x, int):
            sig.append((n, "i32" if -(2**31) <= x < 2**31 else "i64"))
        elif isinstance(x, float):
            sig.append((n, "fp32"))
        else:
            raise TypeError(f"argument {n} of {fn.__name__} is a {type(x).__name__}")
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    return Launch(fn.__name__, module, tuple(sig), tuple(cst), num_warps, grid, num_stages)


def _meta_inputs(op: str, dtype: torch.dtype, B: int, T: int, H: int, N: int) -> list:
    from rwkv_zoo.testing import cast_inputs, make_inputs

    cpu = cast_inputs(op, make_inputs(op, B, T, H, N, generator=torch.Generator().manual_seed(0)), dtype, "cpu")

    def meta(x):
        return tuple(meta(y) for y in x) if isinstance(x, tuple) else x.to("meta").requires_grad_()

    return [meta(x) for x in cpu]


def _flat(args: Sequence) -> list[torch.Tensor]:
    out = []
    for x in args:
        out.extend(x if isinstance(x, tuple) else (x,))
    return out


def launches(op: str, mode: str, dtype: torch.dtype, N: int = 64, *, H: int = 2, B: int = 1, T: int = 33,
             backward: bool = True) -> list[Launch]:
    """The kernel launches of the triton backend's ``(op, mode)`` kernel: a no-grad forward (the inference
    form), then a forward that keeps what the backward needs and the backward itself (unless ``backward``
    is False). Runs the backend's own wrappers on ``meta`` tensors; ``N`` is the head size (wkv4: C = H * N).
    """
    from . import _kernels, _kernels7, chunk, chunk7, make_backend, recurrent

    fn = {(k.op, k.mode): k.fn for k in make_backend().kernels}.get((op, mode))
    if fn is None:
        raise ValueError(f"the triton backend has no {op} {mode} kernel")
    out: list[Launch] = []
    rec = _Recorder(_kernels, "_kernels", out)
    rec7 = _Recorder(_kernels7, "_kernels7", out)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(recurrent, "_k", lambda: rec))
        stack.enter_context(mock.patch.object(chunk, "_k", lambda: rec))
        stack.enter_context(mock.patch.object(chunk7, "_k7", lambda: rec7))
        args = _meta_inputs(op, dtype, B, T, H, N)
        fn(*[tuple(y.detach() for y in x) if isinstance(x, tuple) else x.detach() for x in args])
        if backward:
            y, state = fn(*args)
            outs = [y, *(state if isinstance(state, tuple) else (state,))]
            torch.autograd.grad([o.sum() for o in outs], _flat(args), allow_unused=True)
    return out


def compile_launch(launch: Launch, arch: int):
    """Compile ``launch`` for compute capability ``arch`` (80, 90, ...) with Triton; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _kernels, _kernels7

    fn = getattr({"_kernels": _kernels, "_kernels7": _kernels7}[launch.module], launch.kernel)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("the triton kernels were defined for the interpreter (TRITON_INTERPRET=1 was set "
                           "when they were imported); compile in a process without it")
    sig = dict(launch.signature)
    # torch's allocations are 256-byte aligned: the JIT would mark every pointer divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, t) in enumerate(launch.signature) if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(launch.constexprs), attrs=attrs)
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@dataclasses.dataclass
class Resources:
    registers: int  # per thread
    local_bytes: int  # local memory per thread: register spills (and stack)
    shared_bytes: int  # per program: Triton's dynamic shared memory plus the kernel's static
    threads: int


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def resources(compiled) -> Resources:
    """Registers, local memory (spills) and shared memory of a compiled kernel, read from its cubin."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    fields = {}
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    if not fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    md = compiled.metadata
    return Resources(registers=int(fields["REG"]), local_bytes=int(fields["LOCAL"]) + int(fields["STACK"]),
                     shared_bytes=int(md.shared) + int(fields["SHARED"]), threads=32 * md.num_warps)


def problems(res: Resources, arch: int) -> list[str]:
    """What would stop this kernel from launching on a GPU of compute capability ``arch``."""
    out = []
    limit = MAX_SHARED.get(arch)
    if limit is not None and res.shared_bytes > limit:
        out.append(f"needs {res.shared_bytes} bytes of shared memory, sm_{arch} gives a block {limit}")
    if res.registers * res.threads > 65536:
        out.append(f"needs {res.registers} registers x {res.threads} threads, an SM has 65536")
    return out


def all_launches(dtypes: Sequence[torch.dtype], head_sizes: Sequence[int], ops: Sequence[str] | None = None,
                 inference: bool = True) -> list[tuple[str, str, Launch]]:
    """(op, mode, launch) for every kernel of the backend (of ``ops``), dtype and declared head size,
    without repeats; ``inference=False`` leaves out the no-grad forwards (kept only for training)."""
    from . import make_backend

    rows: dict[tuple, list] = {}  # one row per distinct launch, naming every (op, mode) that makes it
    for k in make_backend().kernels:
        if ops is not None and k.op not in ops:
            continue
        for dtype in dtypes:
            for N in head_sizes:
                if k.op != "wkv4" and k.head_sizes is not None and N not in k.head_sizes:
                    continue
                for x in launches(k.op, k.mode, dtype, N):
                    if not inference and ("SAVE", False) in x.constexprs:
                        continue
                    row = rows.setdefault((x.kernel, x.signature, x.constexprs, x.num_warps, x.num_stages),
                                          [[], [], x])
                    for i, name in enumerate((k.op, k.mode)):
                        if name not in row[i]:
                            row[i].append(name)
    return [(",".join(o), ",".join(m), x) for o, m, x in rows.values()]


def _compile_row(launch: Launch, arch: int) -> tuple[Resources | None, str]:
    try:
        return resources(compile_launch(launch, arch)), ""
    except Exception as exc:  # reported in the table; the run fails at the end
        return None, f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_zoo.backends.triton.aot", description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--dtypes", default="bf16,fp32", help="input dtypes: fp32, bf16, fp16 (default bf16,fp32)")
    p.add_argument("--head-sizes", default="64", help="head sizes N (wkv4: C = 2 N), default 64")
    p.add_argument("--ops", default=None, help="ops, comma-separated (default: all)")
    p.add_argument("--training-only", action="store_true", help="leave out the no-grad forwards")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
        p.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    archs = [int(x) for x in a.archs.split(",")]
    dtypes = [DTYPE_NAMES[x] for x in a.dtypes.split(",")]
    ops = a.ops.split(",") if a.ops else None
    rows = all_launches(dtypes, [int(x) for x in a.head_sizes.split(",")], ops, inference=not a.training_only)
    tasks = [(op, mode, launch, arch) for op, mode, launch in rows for arch in archs]
    print(f"{'op':9} {'mode':15} {'kernel':80} {'sm':>3} {'regs':>5} {'spill B':>8} {'smem KiB':>9}", flush=True)
    bad = 0
    with concurrent.futures.ProcessPoolExecutor(max(1, a.jobs)) as pool:
        futures = [pool.submit(_compile_row, launch, arch) for _, _, launch, arch in tasks]
        for (op, mode, launch, arch), fut in zip(tasks, futures, strict=True):
            res, err = fut.result()
            head = f"{op:9} {mode:15} {launch.label():80} {arch:>3}"
            if res is None:
                bad += 1
                print(f"{head} FAILED: {err}", flush=True)
                continue
            why = problems(res, arch)
            bad += bool(why)
            print(f"{head} {res.registers:>5} {res.local_bytes:>8} {res.shared_bytes / 1024:>9.1f}"
                  + (f"  CANNOT LAUNCH: {'; '.join(why)}" if why else ""), flush=True)
    print(f"{len(tasks) - bad} of {len(tasks)} compiled and fit their GPU" if bad else f"all {len(tasks)} compiled "
          "and fit their GPU (registers per thread, local memory = spills per thread, shared memory per program)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
