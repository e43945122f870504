"""Fused decode on the CPU: this code's decode library against another revision's, in one process.

Not a test (pytest does not collect it): run it by hand and read the lines::

    python tests/benchmarks/bench_cpu_decode.py --model m.pth                 # against HEAD's sources
    python tests/benchmarks/bench_cpu_decode.py --model m.pth --against REV --rounds 10 --threads 1,2

Decode steps (batch 1, one token) of the checkpoint's fp32 fused step, this code ("new") against REV's
``backends/cpu/csrc/cpu_decode.cpp`` ("old"), alternating by round (20 steps a round), wall time per step:
median, 90th percentile and mean. Meant for a machine with other work running (the barrier question in
docs/cpu.md, "Decode on a busy machine"), as well as a quiet one (nothing may get slower there).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_cpu_prefill import _lib, _old_sources

from rwkv_zoo.backends.cpu import kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", metavar="FILE", required=True)
    ap.add_argument("--against", metavar="REV", default="HEAD")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    import rwkv_zoo
    from rwkv_zoo.backends.cpu import fused as cpu_fused
    from rwkv_zoo.inference import prepare_inference
    from rwkv_zoo.state import RWKVState

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        old_dir = _old_sources(args.against, tmp)
        new = kernels.load_decode()[0]
        old = _lib(old_dir / "cpu_decode.cpp", tmp / "old_decode.so", "cpu_decode")
        old.rz_decode.argtypes, old.rz_decode.restype = new.rz_decode.argtypes, None
        model = prepare_inference(rwkv_zoo.load(args.model).eval(), "fp32")
        kinds, why = cpu_fused._kinds(model)
        assert not why, why
        steps = {"new": cpu_fused.FusedDecode(model, kinds, new), "old": cpu_fused.FusedDecode(model, kinds, old)}
        with torch.no_grad():
            x = model.emb(torch.tensor([[5]]))
            for nt in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(nt)
                times: dict[str, list[float]] = {k: [] for k in steps}
                for r in range(args.rounds):
                    for k in ("new", "old") if r % 2 == 0 else ("old", "new"):
                        state = model.zero_state(1, wkv=False)
                        for i in range(20):
                            t0 = time.perf_counter()
                            _, layers = steps[k](x, state, i == 0, 1)
                            times[k].append(time.perf_counter() - t0)
                            state = RWKVState(layers, state.identity)
                line = []
                for k, v in times.items():
                    v = sorted(v)
                    line.append(f"{k} median {v[len(v) // 2] * 1e3:.1f} ms, p90 {v[int(len(v) * 0.9)] * 1e3:.1f}, "
                                f"mean {statistics.mean(v) * 1e3:.1f}")
                print(f"decode, {nt} thread(s): " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main()
