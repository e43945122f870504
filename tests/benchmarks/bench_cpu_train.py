"""CPU training speed: the ``cpu`` backend's C++ WKV training kernels against the ``reference`` backend.

Not a test (pytest does not collect it): run it by hand and read the table::

    python tests/benchmarks/bench_cpu_train.py            # both shapes
    python tests/benchmarks/bench_cpu_train.py --quick    # fewer repeats
    python tests/benchmarks/bench_cpu_train.py --suite quick   # the ablation suite's cells, old vs new
    python tests/benchmarks/bench_cpu_train.py --suite quick --clock thread   # the same on a loaded machine

Rows: tokens/s of one training step (forward, loss, backward; ``+adamw``: and the optimizer step) for
each version at two shapes, with the model forced onto ``backend="cpu"`` and ``backend="reference"``
(the pure-PyTorch chunk kernels: the old path) in the same run, and their ratio.

- ``issue``: batch 16, T = 512, 4 layers x 256, head size 64, fp32, 2 threads. Its GEMM-bound limit is
  the fp32 GEMM rate measured here (``torch.matmul`` of [B*T, 256] by the model's projection shapes,
  the best of several trials each) divided by 6 x the parameters without the embedding; ``of limit`` is tok/s
  over that limit.
- ``ablation``: the default ``rwkv-zoo ablate`` grid's models (``vN-tiny``: 2 layers x 64, head size
  16) at its batch (16) and MQAR sequence length (32), one thread (each ablation worker runs one).

``--suite quick``: the real cell training loop of ``rwkv-zoo ablate --suite quick`` (``Trainer.train_step``:
MQAR batch, forward, loss with L2Wrap, backward, clipping, AdamW, zero_grad) for each of its RWKV models
at its config (1 thread), today's path against the old one in the same process: the old path is the
model forced onto ``backend="reference"`` (pure-PyTorch WKV chunk kernels, token shift and lerps as
PyTorch ops) with the for-loop AdamW and per-tensor clipping the trainer used before.

Each time is the best of several repeats after a warm-up, and the two backends alternate, so a machine
shared with other work still gives fair ratios (the absolute numbers are then low). On a heavily loaded
machine ``--suite quick --clock thread`` times the suite by the CPU time of the training thread
(``time.thread_time``: with one torch thread all the work runs on it) over more, shorter blocks, which
leaves out the time other processes hold the core (not their effect on caches).
"""

from __future__ import annotations

import argparse
import time

import torch

import rwkv_zoo


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: builds the C++ kernels on first use, allocator, autograd caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(M: int, C: int, F: int, repeats: int) -> float:
    """The fp32 GEMM rate on the model's own projection shapes ([M, C] x [C, C], [M, C] x [C, F] and
    [M, F] x [F, C], M = batch x T): total flops over the sum of each shape's best time of several
    trials, so one slow trial on a shared machine does not lower the limit."""
    flops, seconds = 0.0, 0.0
    for k, n in ((C, C), (C, F), (F, C)):
        a, b = torch.randn(M, k), torch.randn(k, n)
        flops += 2 * M * k * n
        seconds += _best(lambda a=a, b=b: torch.matmul(a, b), max(8, repeats * 4))
    return flops / seconds / 1e9


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("emb."))


def train_step(model, tokens, opt=None):
    def step():
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        if opt is not None:
            opt.step()

    return step


def bench(name: str, B: int, T: int, threads: int, repeats: int, adamw: bool, **build) -> dict:
    torch.set_num_threads(threads)
    model = rwkv_zoo.randomize_(rwkv_zoo.build(name, **build), seed=0)
    vocab = model.head.weight.shape[0]
    tokens = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if adamw else None
    times = {"cpu": float("inf"), "reference": float("inf")}
    for _ in range(2):  # alternate, so both see the same machine load
        for backend in times:
            model.backend = backend
            times[backend] = min(times[backend], _best(train_step(model, tokens, opt), max(1, repeats // 2)))
    return {"tok/s": {b: B * T / t for b, t in times.items()}, "params": non_embedding_params(model)}


def suite_trainers(name: str = "quick"):
    """(label, new Trainer, old Trainer) for each RWKV model of suite ``name`` (its first lr, seed 0)."""
    from rwkv_zoo.train.ablate.config import parse_config, run_specs
    from rwkv_zoo.train.ablate.suites import SUITES
    from rwkv_zoo.train.trainer import TrainConfig, Trainer

    cfg = parse_config(SUITES[name], f"suite {name}")
    seen = {}
    for run in run_specs(cfg):
        if run["train"]["model"].startswith("v") and run["model"] not in seen:
            seen[run["model"]] = run
    for label, run in sorted(seen.items(), reverse=True):
        train = {**run["train"], "steps": 10**6, "progress": False}
        new = Trainer(TrainConfig.from_dict(train))
        old = Trainer(TrainConfig.from_dict({**train, "backend": "reference"}))
        # The optimizer and clipping the trainer used before: the for-loop AdamW, per-tensor norms.
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in old.optimizer.param_groups]
        old.optimizer = torch.optim.AdamW(groups, fused=False, foreach=False)
        old._foreach_clip = False
        yield label, new, old, run["train"]["threads"] or 1


def bench_suite(name: str, blocks: int, steps: int, clock=time.perf_counter) -> None:
    what = "thread CPU time" if clock is time.thread_time else "wall time"
    print(f"suite {name}: tokens/s of Trainer.train_step (the cell loop), best of {blocks} blocks of {steps} steps "
          f"({what})")
    print(f"{'model':12} {'new tok/s':>10} {'old tok/s':>10} {'new/old':>8}")
    for label, new, old, threads in suite_trainers(name):
        torch.set_num_threads(threads)
        tokens = new.config.batch_size * new.seq_len
        best = {"new": float("inf"), "old": float("inf")}
        for tr in (new, old):
            for _ in range(3):
                tr.train_step()  # warm-up: kernels built, allocator, autograd caches
        for _ in range(blocks):  # alternate, so both see the same machine load
            for key, tr in (("new", new), ("old", old)):
                t0 = clock()
                for _ in range(steps):
                    tr.train_step()
                best[key] = min(best[key], (clock() - t0) / steps)
        n, o = tokens / best["new"], tokens / best["old"]
        print(f"{label:12} {n:10.0f} {o:10.0f} {n / o:8.2f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--versions", default="v7,v6,v5,v4")
    ap.add_argument("--skip-issue", action="store_true", help="only the ablation shape")
    ap.add_argument("--suite", help="instead: the cell training loop of this ablation suite (quick), new vs old")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="--suite: wall time (default), or the training thread's CPU time over 30 blocks of 2 "
                    "steps (for a loaded machine)")
    args = ap.parse_args(argv)
    if args.suite:
        if args.clock == "thread":
            bench_suite(args.suite, blocks=30, steps=2, clock=time.thread_time)
        else:
            bench_suite(args.suite, blocks=3 if args.quick else 5, steps=10)
        return
    repeats = 2 if args.quick else 4
    versions = args.versions.split(",")
    torch.set_num_threads(2)
    gf = gemm_gflops(16 * 512, 256, 1024, repeats)
    print(f"fp32 GEMM, 2 threads: {gf:.1f} GFLOP/s (torch.matmul, [8192, 256] x the model's [256, 256], "
          f"[256, 1024], [1024, 256]; best of several trials each)", flush=True)
    print(f"{'shape':40} {'cpu tok/s':>10} {'ref tok/s':>10} {'cpu/ref':>8} {'GEMM limit':>11} {'of limit':>9}")

    def row(label, r, limit):
        c, ref = r["tok/s"]["cpu"], r["tok/s"]["reference"]
        lim = f"{limit:11.0f}" if limit else f"{'':11}"
        of = f"{c / limit:9.2f}" if limit else f"{'':9}"
        print(f"{label:40} {c:10.0f} {ref:10.0f} {c / ref:8.2f} {lim} {of}", flush=True)

    if not args.skip_issue:
        for v in versions:
            r = bench(v, 16, 512, 2, repeats, False, n_layer=4, n_embd=256, head_size=64, vocab_size=256)
            row(f"{v} issue 16x512 4x256 h64 2thr", r, gf * 1e9 / (6 * r["params"]))
    for v in versions:
        r = bench(f"{v}-tiny", 16, 32, 1, repeats * 4, True)
        row(f"{v} ablation 16x32 2x64 h16 1thr +adamw", r, None)


if __name__ == "__main__":
    main()
