"""CPU training speed: the ``cpu`` backend's C++ WKV training kernels against the ``reference`` backend.

Not a test (pytest does not collect it): run it by hand and read the table::

    python tests/benchmarks/bench_cpu_train.py            # both shapes
    python tests/benchmarks/bench_cpu_train.py --quick    # fewer repeats
    python tests/benchmarks/bench_cpu_train.py --suite quick   # the ablation suite's cells, old vs new
    python tests/benchmarks/bench_cpu_train.py --suite quick --clock thread   # the same on a loaded machine
    python tests/benchmarks/bench_cpu_train.py --suite quick --against 27e747a  # against an older commit's code
    python tests/benchmarks/bench_cpu_train.py --suite quick --against --clock thread --procs 5  # 5 process pairs

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

``--suite quick --against REV``: the same cells, today's code against the code of git revision ``REV``
(extracted with ``git archive`` into a temporary folder), each in its own worker process, the two
alternating block by block. The default REV, ``27e747a``, is the last commit before the work on the
ablation issue began: the code whose ~5,000 tokens/s per worker that issue measured, when there were no
training kernels in the ``cpu`` backend and the blocks' token shifts and lerps were separate PyTorch ops.
Forcing ``backend="reference"`` (the plain ``--suite`` comparison) keeps every improvement made since
outside the kernels (stacked lerps, the trainer), so it understates how much faster a cell got.

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


def suite_cells(name: str) -> dict[str, dict]:
    """label -> the train options of the first cell (first lr, seed 0) of each RWKV model of suite
    ``name``, with steps enough for any benchmark and no progress bar; labels in descending order."""
    from rwkv_zoo.train.ablate.config import parse_config, run_specs
    from rwkv_zoo.train.ablate.suites import SUITES

    cells = {}
    for run in run_specs(parse_config(SUITES[name], f"suite {name}")):
        if run["train"]["model"].startswith("v") and run["model"] not in cells:
            cells[run["model"]] = {**run["train"], "steps": 10**6, "progress": False}
    return dict(sorted(cells.items(), reverse=True))


def suite_trainers(name: str = "quick"):
    """(label, new Trainer, old Trainer) for each RWKV model of suite ``name`` (its first lr, seed 0)."""
    from rwkv_zoo.train.trainer import TrainConfig, Trainer

    for label, train in suite_cells(name).items():
        new = Trainer(TrainConfig.from_dict(train))
        old = Trainer(TrainConfig.from_dict({**train, "backend": "reference"}))
        # The optimizer and clipping the trainer used before: the for-loop AdamW, per-tensor norms.
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in old.optimizer.param_groups]
        old.optimizer = torch.optim.AdamW(groups, fused=False, foreach=False)
        old._foreach_clip = False
        yield label, new, old, train["threads"] or 1


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


# The worker of ``--against``: builds one cell's Trainer with whatever ``rwkv_zoo`` its sys.path finds, then
# answers "N" on stdin with the seconds N train steps took ("wall thread"). Only API that both old and new
# code have: TrainConfig's fields, Trainer(config).train_step().
_WORKER = r"""
import dataclasses, json, sys, time
import torch
from rwkv_zoo.train.trainer import Trainer, TrainConfig
train = json.loads(sys.argv[1])
names = {f.name for f in dataclasses.fields(TrainConfig)}
tr = Trainer(TrainConfig(**{k: v for k, v in train.items() if k in names}))
torch.set_num_threads(train.get("threads") or 1)
for _ in range(3):
    tr.train_step()
params = sum(p.numel() for p in tr.model.parameters())
print(json.dumps({"params": params, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    n = int(line)
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        tr.train_step()
    print(time.perf_counter() - w0, time.thread_time() - c0, flush=True)
"""


def _extract(rev: str, dest: str) -> None:
    """``rev``'s tree in ``dest``, importable as ``rwkv_zoo`` from there (the package maps backends/ and
    plugins/ into rwkv_zoo, so they are linked in)."""
    import io
    import os
    import subprocess
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = subprocess.run(["git", "-C", str(root), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    for sub in ("backends", "plugins"):
        if (Path(dest) / sub).is_dir() and not (Path(dest) / "rwkv_zoo" / sub).exists():
            os.symlink(Path(dest) / sub, Path(dest) / "rwkv_zoo" / sub)


def bench_against(rev: str, name: str, rounds: int, steps: int, thread_clock: bool, procs: int = 1,
                  models: list[str] | None = None) -> None:
    import json
    import os
    import statistics
    import subprocess
    import sys
    import tempfile

    what = "thread CPU time" if thread_clock else "wall time"
    print(f"suite {name}: tokens/s of Trainer.train_step, this code against {rev}'s, {procs} pair(s) of worker "
          f"processes per model, each the best of {rounds} alternating blocks of {steps} steps ({what})")
    if procs > 1:
        print("(identical code in two processes differs by up to ~10 % on a VM: memory placement; the ratio "
              "column is the median over the pairs, with their range)")
    print(f"{'model':12} {'now tok/s':>10} {rev + ' tok/s':>14} {'now/' + rev:>14}  range")
    with tempfile.TemporaryDirectory() as old_root:
        _extract(rev, old_root)
        env_old = {**os.environ, "PYTHONPATH": old_root}
        for label, train in suite_cells(name).items():
            if models and label not in models:
                continue
            tokens = train["batch_size"] * train["data"]["seq_len"]
            pairs = []
            for _ in range(procs):
                workers = {}
                for key, env, cwd in (("now", os.environ, None), ("old", env_old, old_root)):
                    workers[key] = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(train)], env=env,
                                                    cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                    stderr=subprocess.DEVNULL, text=True)
                info = {k: json.loads(p.stdout.readline()) for k, p in workers.items()}
                if info["now"]["params"] != info["old"]["params"]:
                    raise SystemExit(f"{label}: the two codes built different models ({info})")
                best = {"now": float("inf"), "old": float("inf")}
                for r in range(rounds):
                    order = ("now", "old") if r % 2 == 0 else ("old", "now")
                    for key in order:
                        workers[key].stdin.write(f"{steps}\n")
                        workers[key].stdin.flush()
                        wall, cpu = map(float, workers[key].stdout.readline().split())
                        best[key] = min(best[key], (cpu if thread_clock else wall) / steps)
                for p in workers.values():
                    p.stdin.close()
                    p.wait()
                pairs.append((tokens / best["now"], tokens / best["old"]))
            ratios = sorted(n / o for n, o in pairs)
            n = statistics.median(p[0] for p in pairs)
            o = statistics.median(p[1] for p in pairs)
            spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if procs > 1 else ""
            print(f"{label:12} {n:10.0f} {o:14.0f} {statistics.median(ratios):14.2f}  {spread}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--versions", default="v7,v6,v5,v4")
    ap.add_argument("--skip-issue", action="store_true", help="only the ablation shape")
    ap.add_argument("--suite", help="instead: the cell training loop of this ablation suite (quick), new vs old")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="--suite: wall time (default), or the training thread's CPU time over 30 blocks of 2 "
                    "steps (for a loaded machine)")
    ap.add_argument("--against", metavar="REV", nargs="?", const="27e747a",
                    help="--suite: compare with the code of git revision REV (default 27e747a: before the "
                    "training kernels) instead of backend='reference'")
    ap.add_argument("--procs", type=int, default=1,
                    help="--against: pairs of worker processes per model (the median ratio over them)")
    args = ap.parse_args(argv)
    if args.suite and args.against:
        models = args.versions.split(",") if args.versions != ap.get_default("versions") else None
        if args.clock == "thread":
            bench_against(args.against, args.suite, rounds=30, steps=2, thread_clock=True, procs=args.procs,
                          models=models)
        else:
            bench_against(args.against, args.suite, rounds=6 if args.quick else 10, steps=10, thread_clock=False,
                          procs=args.procs, models=models)
        return
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
