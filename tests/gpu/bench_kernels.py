"""GPU check and benchmark of the ``triton`` and ``cuda`` backends, one command (well under 10 minutes on an H100):

    python tests/gpu/bench_kernels.py                      # correctness, then timings; prints one table
    python tests/gpu/bench_kernels.py --quick              # S-small only (a smoke run)
    python tests/gpu/bench_kernels.py --skip-correctness --cuda-chunk-bwd-tc   # the tensor-core chunk backward
    python tests/gpu/bench_kernels.py --skip-correctness --quick --sweep        # + other triton launch settings

1. Correctness on the GPU: ``rwkv_zoo.testing.check_backend(name, device="cuda")`` for ``triton`` and
   ``cuda`` (fp32 and bf16, every op and mode the backend has, N=64, lengths across the 64-token
   boundary; y, final state and every gradient against the fp64 reference recurrence), then their
   kernels against the ``reference`` backend's chunk kernels (fp32, on the GPU) at the S-small shape.
   The cuda backend compiles on its first call (minutes; set ``RWKV_ZOO_CUDA_CACHE`` to keep the build
   and ``TORCH_CUDA_ARCH_LIST=9.0`` on an H100); that happens here, outside the timings.
2. Timings (``triton.testing.do_bench``, median ms, CUDA events) of fwd and fwd+bwd at S-std
   (B=8, T=4096, H=64, N=64, bf16; the wkv7 recurrent kernels and triton chunk also in fp32), S-small
   (B=8, T=1024, H=8, N=64) and Decode-B (B=256, T=1, forward with state) of the triton, cuda, fla
   and reference kernels in one table; fla (``chunk_rwkv6`` / ``chunk_rwkv7`` through rwkv_zoo's
   ``fla`` backend) when importable. wkv4 runs with C = H * N channels.
   A cell is "n/a" where dispatch refuses the call, with the reason listed under the table (e.g. a
   backend that lacks the op, mode or head size).

Without a CUDA GPU it prints what it would run and exits 0 (``--dry-run`` does the same anywhere).
``--smoke`` runs the whole script on the CPU instead, in Triton's interpreter at a tiny shape with a
wall-clock timer: no number it prints means anything, but every step (conformance, the comparisons,
refusals, the table) runs, so a GPU session's minutes are not spent on a bug in this script (CI runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"S-std": (8, 4096, 64, 64), "S-small": (8, 1024, 8, 64), "Decode-B": (256, 1, 64, 64)}
SMOKE_SHAPES = {"tiny": (1, 20, 1, 16), "Decode-B": (2, 1, 1, 16)}  # --smoke: the CPU, the interpreter
DEVICE = "cuda"  # "cpu" with --smoke
FORWARD_ONLY = {"Decode-B"}  # batched decode: one step with state, no gradients
BACKENDS_CHECKED = ("triton", "cuda")  # conformance on the GPU for each that is available
# (op, backend, mode): the rows of the timing table.
RUNS = [
    ("wkv6", "triton", "chunk"),
    ("wkv6", "triton", "recurrent"),
    ("wkv6", "fla", "chunk"),
    ("wkv6", "reference", "chunk"),
    ("wkv7", "triton", "chunk"),
    ("wkv7", "triton", "recurrent"),
    ("wkv7", "fla", "chunk"),
    ("wkv7", "reference", "chunk"),
    ("wkv5", "triton", "chunk"),
    ("wkv5", "triton", "recurrent"),
    ("wkv4", "triton", "recurrent"),
    ("wkv4", "reference", "chunk"),
    ("wkv7", "cuda", "chunk"),
    ("wkv7", "cuda", "recurrent"),
    ("wkv6", "cuda", "recurrent"),
    ("wkv5", "cuda", "recurrent"),
    ("wkv4", "cuda", "recurrent"),
]
# fp32 rows at S-std: the official fp32-state wkv7 kernel's anchor is 17 ms fwd+bwd (PERF.md).
FP32_RUNS = [("wkv7", "cuda", "recurrent"), ("wkv7", "triton", "recurrent"), ("wkv7", "triton", "chunk")]


def make_args(op: str, B: int, T: int, H: int, N: int, dtype: torch.dtype, device: str, seed: int = 0) -> list:
    """Random inputs in the distributions of ``rwkv_zoo.testing.make_inputs``, made on ``device``.

    Activations in ``dtype``; the decay ``w`` (and ``u``) fp32 as the models make them; state fp32.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    if op == "wkv4":
        C = H * N
        w = -torch.exp(rn(C, dt=torch.float32))
        state = (rn(B, C, dt=torch.float32), 0.5 + torch.rand(B, C, generator=g, device=device),
                 rn(B, C, dt=torch.float32))
        return [w, rn(C, dt=torch.float32), rn(B, T, C), rn(B, T, C), state]
    if op in ("wkv5", "wkv6"):
        w = F.logsigmoid(rn(H, N, dt=torch.float32) if op == "wkv5" else rn(B, T, H, N, dt=torch.float32))
        return [rn(B, T, H, N), rn(B, T, H, N), rn(B, T, H, N), w, rn(H, N, dt=torch.float32),
                rn(B, H, N, N, dt=torch.float32)]
    if op == "wkv7":
        w = -math.exp(-0.5) * torch.sigmoid(rn(B, T, H, N, dt=torch.float32))
        kh = F.normalize(rn(B, T, H, N, dt=torch.float32), dim=-1)
        a, b = (-kh).to(dtype), (kh * torch.sigmoid(rn(B, T, H, N, dt=torch.float32))).to(dtype)
        return [rn(B, T, H, N), w, rn(B, T, H, N), rn(B, T, H, N), a, b, rn(B, H, N, N, dt=torch.float32)]
    raise ValueError(op)


def _flat(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, tuple) else [a])
    return out


def _leaves(args, grad: bool):
    """Fresh leaf copies of ``args`` (tuples kept), requiring grad when ``grad``."""
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.append(tuple(x.detach().clone().requires_grad_(grad) for x in a))
        else:
            out.append(a.detach().clone().requires_grad_(grad))
    return out


def _call(op, backend, mode, args):
    import rwkv_zoo

    return rwkv_zoo.ops.OP_FUNCTIONS[op](*args[:-1], args[-1], mode=mode, backend=backend)


def refusal(op, backend, mode, args, grad: bool) -> str | None:
    """Why dispatch would not run this (backend, mode) for these inputs, or None."""
    from rwkv_zoo import dispatch

    backends = dispatch.get_backends()
    if backend not in backends:
        return f"backend {backend!r} is not registered"
    b = backends[backend]
    x = args[2] if op == "wkv4" else args[0]
    if op == "wkv4":
        B, T, C = x.shape
        H, N = 1, C
    else:
        B, T, H, N = x.shape
    call = dispatch.KernelCall(op, mode, x.device.type, x.dtype, B, T, H, N, grad, True)
    why = b.reasons(call)
    return "; ".join(why) if why else None


def bench(op, backend, mode, args, grad: bool) -> float:
    """Median ms of one forward (``grad``: forward + backward of a sum over y and the final state)."""
    leaves = _leaves(args, grad)
    if not grad:
        def fn():
            with torch.no_grad():
                _call(op, backend, mode, leaves)
    else:
        flat = _flat(leaves)

        def fn():
            for x in flat:
                x.grad = None
            y, s = _call(op, backend, mode, leaves)
            states = s if isinstance(s, tuple) else (s,)
            loss = y.float().sum() + sum(t.sum() for t in states)
            loss.backward()
    if DEVICE == "cpu":  # --smoke: a plain timer (do_bench needs CUDA)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return sorted(times)[1]
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def correctness(quick: bool, smoke: bool = False) -> list[str]:
    """The conformance suite on the GPU per backend, then each vs reference chunk at S-small; failure lines."""
    from rwkv_zoo import dispatch
    from rwkv_zoo.testing import check_backend, rel_err

    failures = []
    checked = [n for n in BACKENDS_CHECKED if n in dispatch.get_backends()
               and dispatch.get_backends()[n].unavailable_reason() is None]
    for name in checked:
        t0 = time.time()
        if smoke:
            kw = dict(dtypes=(torch.float32,), Ts=(1, 17), B=1, H=1, N=16)
        else:
            kw = dict(dtypes=(torch.float32, torch.bfloat16), Ts=(1, 15, 64, 65, 130), B=2, H=2, N=64)
        report = check_backend(name, device=DEVICE, raise_on_fail=False, **kw)
        print(report.summary())
        print(f"({name} conformance, including any first-use compilation: {time.time() - t0:.1f} s)")
        failures += [f"{name} conformance {r.op} {r.mode} {r.dtype} T={r.T}: {r.message}" for r in report.failures]

    B, T, H, N = SMOKE_SHAPES["tiny"] if smoke else SHAPES["S-small"]
    if quick and not smoke:
        T = 256
    print(f"\nGPU backends vs reference chunk (fp32, GPU) at B={B} T={T} H={H} N={N}:")
    pairs = [("triton", op, m) for op, m in (("wkv4", "recurrent"), ("wkv5", "recurrent"), ("wkv5", "chunk"),
                                            ("wkv6", "recurrent"), ("wkv6", "chunk"), ("wkv7", "recurrent"),
                                            ("wkv7", "chunk"))]
    pairs += [("cuda", op, "recurrent") for op in ("wkv4", "wkv5", "wkv6", "wkv7")]
    for tb, op, tmode in pairs:
        if tb not in checked:
            continue
        args = make_args(op, B, T, H, N, torch.float32, DEVICE, seed=1)
        outs = []
        for backend, mode in ((tb, tmode), ("reference", "chunk")):
            leaves = _leaves(args, True)
            y, s = _call(op, backend, mode, leaves)
            states = s if isinstance(s, tuple) else (s,)
            g = torch.Generator(device=DEVICE).manual_seed(2)
            up = [torch.randn(t.shape, generator=g, device=DEVICE) for t in (y, *states)]
            loss = sum((t * u).sum() for t, u in zip((y, *states), up, strict=True))
            loss.backward()
            outs.append([y, *states] + [x.grad for x in _flat(leaves)])
        errs = [rel_err(a, b) for a, b in zip(*outs, strict=True)]
        worst = max(errs)
        print(f"  {op} {tb}/{tmode}: worst relative difference over y, state and every gradient {worst:.2e}")
        if not worst <= 1e-4:
            failures.append(f"{op} {tb}/{tmode} vs reference chunk at S-small: {worst:.2e}")
    return failures


def timings(quick: bool, smoke: bool = False) -> None:
    rows = [("shape", "op", "backend/mode", "fwd ms", "fwd+bwd ms")]
    notes = []
    for shape, (B, T, H, N) in (SMOKE_SHAPES if smoke else SHAPES).items():
        if quick and shape != "S-small" and not smoke:
            continue
        runs = [(*r, torch.bfloat16) for r in RUNS]
        if shape == "S-std":
            runs += [(*r, torch.float32) for r in FP32_RUNS]
        for op, dtype in dict.fromkeys((r[0], r[3]) for r in runs):
            args = make_args(op, B, T, H, N, dtype, DEVICE)
            for op_, backend, mode, dt in runs:
                if (op_, dt) != (op, dtype):
                    continue
                cells = []
                for grad in (False, True):
                    if grad and shape in FORWARD_ONLY:
                        cells.append("-")
                        continue
                    why = refusal(op, backend, mode, args, grad)
                    if why:
                        cells.append("n/a")
                        notes.append(f"{shape} {op} {backend}/{mode} {'fwd+bwd' if grad else 'fwd'}: {why}")
                        continue
                    try:
                        cells.append(f"{bench(op, backend, mode, args, grad):.3f}")
                    except Exception as exc:  # report and go on: one table at the end
                        cells.append("error")
                        notes.append(f"{shape} {op} {backend}/{mode}: {type(exc).__name__}: {exc}"[:300])
                    if DEVICE == "cuda":
                        torch.cuda.empty_cache()
                rows.append((shape, op, f"{backend}/{mode}" + ("" if dtype == torch.bfloat16 else " fp32"), *cells))
                print(f"  {rows[-1]}", flush=True)
            del args
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    for n in dict.fromkeys(notes):
        print(f"  - {n}")


def _variants():
    """(op, mode, label, patches) for ``--sweep``: launch settings of the triton kernels to time against
    the defaults at N=64, each a list of (module, attribute, value) to patch while it runs."""
    from rwkv_zoo.backends.triton import chunk, chunk7, recurrent

    out = []
    for bl in (chunk.BLOCKS[64], chunk.Blocks(16, 32, 4, 8), chunk.Blocks(16, 32, 8, 8), chunk.Blocks(16, 16, 4, 8),
               chunk.Blocks(16, 64, 4, 4), chunk.Blocks(32, 64, 8, 8), chunk.Blocks(16, 64, 8, 16)):
        label = f"bk={bl.bk} bv={bl.bv} warps={bl.fwd_warps}/{bl.bwd_warps}"
        out.append(("wkv6", "chunk", label, [(chunk, "BLOCKS", {**chunk.BLOCKS, 64: bl})]))
    for bk, bv, warps in ((chunk7.BK, chunk7.BV, chunk7._warps(64)), (16, 64, 4), (16, 64, 16), (8, 64, 8),
                          (32, 64, 8), (16, 32, 8), (16, 16, 8), (16, 16, 4)):
        out.append(("wkv7", "chunk", f"bk={bk} bv={bv or 'auto'} warps={warps}",
                    [(chunk7, "BK", bk), (chunk7, "BV", bv), (chunk7, "_warps", lambda N, w=warps: w)]))
    for fw, bw in ((recurrent._warps(64, False), recurrent._warps(64, True)), (8, 8), (4, 4), (8, 16)):
        for op in ("wkv6", "wkv7"):
            out.append((op, "recurrent", f"warps={fw}/{bw}",
                        [(recurrent, "_warps", lambda N, backward, f=fw, b=bw: b if backward else f)]))
    return out


def sweep(smoke: bool = False) -> None:
    """Times each launch variant of the triton kernels (the first of each kernel is the default) at S-std,
    bf16, and checks its y against the default's: the data to pick the defaults on a new GPU."""
    from unittest import mock

    from rwkv_zoo.testing import rel_err

    B, T, H, N = (1, 20, 1, 64) if smoke else SHAPES["S-std"]
    print(f"\nLaunch-setting sweep of the triton kernels at B={B} T={T} H={H} N={N} bf16 (first row: the default):")
    rows = [("op", "mode", "variant", "fwd ms", "fwd+bwd ms", "y vs default")]
    args, default_y = {}, {}
    for op, mode, label, patches in _variants():
        if op not in args:
            args[op] = make_args(op, B, T, H, N, torch.bfloat16, DEVICE)
        with contextlib.ExitStack() as stack:
            for mod, name, value in patches:
                stack.enter_context(mock.patch.object(mod, name, value))
            try:
                with torch.no_grad():
                    y = _call(op, "triton", mode, _leaves(args[op], False))[0].float()
                key = (op, mode)
                diff = "-" if key not in default_y else f"{rel_err(y, default_y[key]):.1e}"
                default_y.setdefault(key, y)
                cells = [f"{bench(op, 'triton', mode, args[op], g):.3f}" for g in (False, True)]
            except Exception as exc:  # one bad setting must not end the sweep
                cells, diff = ["error", "error"], f"{type(exc).__name__}: {exc}"[:120]
        rows.append((op, mode, label, *cells, diff))
        print(f"  {rows[-1]}", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)


def print_table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="S-small only, shorter correctness run")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--sweep", action="store_true",
                   help="after the timings, time other launch settings of the triton kernels (S-std, bf16)")
    p.add_argument("--smoke", action="store_true",
                   help="run every step on the CPU in Triton's interpreter at a tiny shape (checks the script)")
    p.add_argument("--cuda-chunk-bwd-tc", action="store_true",
                   help="time the cuda wkv7 chunk backward on tensor cores (RWKV_ZOO_CUDA_CHUNK_BWD_TC=1)")
    a = p.parse_args(argv)
    if a.cuda_chunk_bwd_tc:
        os.environ["RWKV_ZOO_CUDA_CHUNK_BWD_TC"] = "1"  # read when the extension is built, before any kernel
    global DEVICE
    if a.smoke:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before the first kernel is imported
    plan = [f"{s} {shape}" for s, shape in SHAPES.items()] + [f"{o} {b}/{m}" for o, b, m in RUNS]
    if a.dry_run or not (a.smoke or torch.cuda.is_available()):
        if not a.dry_run:
            print("no CUDA GPU: nothing to run.")
        print("plan (B, T, H, N):\n  " + "\n  ".join(plan))
        return 0
    import rwkv_zoo
    from rwkv_zoo import dispatch

    where = "CPU (--smoke: Triton's interpreter)" if a.smoke else torch.cuda.get_device_name()
    print(f"GPU: {where}; torch {torch.__version__}; rwkv_zoo {rwkv_zoo.__version__}")
    import triton

    print(f"triton {triton.__version__}")
    for name, b in sorted(dispatch.get_backends().items()):
        print(f"  backend {name}: {b.unavailable_reason() or 'available'}")
    failures = [] if a.skip_correctness else correctness(a.quick, a.smoke)
    timings(a.quick, a.smoke)
    if a.sweep:
        sweep(a.smoke)
    if failures:
        print("\nCORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
