"""fp32 prefill on the CPU: this code's kernels against another revision's, in one process.

Not a test (pytest does not collect it): run it by hand and read the lines::

    python tests/benchmarks/bench_cpu_prefill.py                  # against b98c531 (gemm_fp32, tile fused step)
    python tests/benchmarks/bench_cpu_prefill.py --against REV --rounds 15
    python tests/benchmarks/bench_cpu_prefill.py --model /path/to/m.pth   # also the fused 512-token prefill

``products``: ``rz_gemv`` on fp32 weights at the 0.1B model's prefill shapes (512 x 768 x 768, 512 x 768 x
3072, 512 x 3072 x 768), this code ("new") against REV's ``backends/cpu/csrc/cpu_gemv.cpp`` ("old"),
this code built with ``-DRZ_DOT_MIN_ROWS=1000000`` ("tiles": the tile kernels at every row count) and
``torch.matmul``, alternating, medians of the rounds; one thread in thread CPU time (a loaded machine
steals time slices, which wall time would count), two in wall time.

``--model FILE``: the fused step's fp32 prefill of 512 tokens of that checkpoint, this code's decode library
against REV's, alternating, per-round ratio (median and range), and the largest logit difference.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from rwkv_zoo.backends.cpu import kernels

REPO = Path(__file__).resolve().parents[2]
CSRC = "backends/cpu/csrc"


def _lib(src: Path, out: Path, name: str, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    cxx = kernels._compiler()
    flags = kernels.build_flags(name, kernels.select_isa()[0])
    subprocess.run([cxx, *flags, *extra, "-c", "-o", f"{out}.o", str(src)], check=True)
    subprocess.run([cxx, *kernels.LINK_FLAGS, "-o", str(out), f"{out}.o"], check=True)
    return ctypes.CDLL(str(out))


def _old_sources(rev: str, tmp: Path) -> Path:
    for f in ("cpu_gemv.cpp", "cpu_decode.cpp", "cpu_tiles.h"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{CSRC}/{f}"], check=True,
                              capture_output=True, text=True).stdout
        (tmp / f).write_text(text)
    return tmp


def products(old_dir: Path, tmp: Path, rounds: int) -> None:
    new = kernels._load()[0]
    libs = {"old": _lib(old_dir / "cpu_gemv.cpp", tmp / "old_gemv.so", "cpu_gemv"),
            "tiles": _lib(kernels.CSRC / "cpu_gemv.cpp", tmp / "tiles_gemv.so", "cpu_gemv",
                          ("-DRZ_DOT_MIN_ROWS=1000000",))}
    for lib in libs.values():
        lib.rz_gemv.argtypes, lib.rz_gemv.restype = new.rz_gemv.argtypes, None
    for nt in (1, 2):
        torch.set_num_threads(nt)
        clock = time.thread_time if nt == 1 else time.perf_counter
        for M, K, N in ((512, 768, 768), (512, 768, 3072), (512, 3072, 768)):
            x, w = torch.randn(M, K), torch.randn(N, K)
            p = kernels.pack(w)
            y = torch.empty(M, N)

            def via(lib, p=p, x=x, y=y, M=M, K=K, N=N, nt=nt):
                return lambda: lib.rz_gemv(0, x.data_ptr(), M, K, K, p.data_ptr(), None, N, y.data_ptr(), N, nt)

            fns = {"new": lambda p=p, x=x, N=N: kernels.gemv(x, p, N), "old": via(libs["old"]),
                   "tiles": via(libs["tiles"]), "torch": lambda x=x, w=w: torch.matmul(x, w.t())}
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(rounds):
                for k, f in fns.items():
                    t0 = clock()
                    f()
                    times[k].append(clock() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rates = ", ".join(f"{k} {2 * M * K * N / v / 1e9:.0f}" for k, v in med.items())
            print(f"{M} x {K} x {N}, {nt} thread(s), {'CPU' if nt == 1 else 'wall'} time: {rates} GFLOP/s; new over "
                  f"old {med['old'] / med['new']:.2f}, tiles {med['tiles'] / med['new']:.2f}, "
                  f"torch {med['torch'] / med['new']:.2f}", flush=True)


def fused(old_dir: Path, tmp: Path, model_path: str, rounds: int) -> None:
    import rwkv_zoo
    from rwkv_zoo.backends.cpu import fused as cpu_fused
    from rwkv_zoo.inference import prepare_inference

    new = kernels.load_decode()[0]
    old = _lib(old_dir / "cpu_decode.cpp", tmp / "old_decode.so", "cpu_decode")
    old.rz_decode.argtypes, old.rz_decode.restype = new.rz_decode.argtypes, None
    model = prepare_inference(rwkv_zoo.load(model_path).eval(), "fp32")
    kinds, why = cpu_fused._kinds(model)
    assert not why, why
    steps = {"new": cpu_fused.FusedDecode(model, kinds, new), "old": cpu_fused.FusedDecode(model, kinds, old)}
    toks = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.emb(toks)
        for nt in (1, 2):
            torch.set_num_threads(nt)
            clock = time.thread_time if nt == 1 else time.perf_counter
            times: dict[str, list[float]] = {k: [] for k in steps}
            outs = {}
            for r in range(rounds):
                for k in ("new", "old") if r % 2 == 0 else ("old", "new"):
                    t0 = clock()
                    outs[k], _ = steps[k](x, model.zero_state(1, wkv=False), True, 1)
                    times[k].append(clock() - t0)
            ratios = [o / n for o, n in zip(times["old"], times["new"], strict=True)]
            rate = {k: 512 / statistics.median(v) for k, v in times.items()}
            print(f"fused fp32 prefill of 512 tokens, {nt} thread(s), {'CPU' if nt == 1 else 'wall'} time: new "
                  f"{rate['new']:.0f} tok/s, old {rate['old']:.0f}; "
                  f"new over old per round {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); "
                  f"logits max abs difference {float((outs['new'] - outs['old']).abs().max()):.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", metavar="REV", default="b98c531",
                    help="git revision whose kernels are 'old' (default b98c531: gemm_fp32 in rz_gemv only)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--model", metavar="FILE", help="also time the fused step's 512-token prefill of this checkpoint")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"the CPU kernels cannot load: {kernels.unavailable_reason()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old_dir = _old_sources(args.against, tmp)
        products(old_dir, tmp, args.rounds)
        if args.model:
            fused(old_dir, tmp, args.model, args.rounds)


if __name__ == "__main__":
    main()
