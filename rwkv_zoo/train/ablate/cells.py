"""Running the cells of a grid: a cache on disk, worker processes, devices, shards.

Each cell (one model x task x learning rate x seed) is written, when it finishes, to
``OUT/cells/<key>.json`` (temp file + rename: never half-written), where ``<key>`` hashes the cell's
full training config (``config.cell_key``). A run of the grid first reads the cells already there and
trains only the missing ones, so an interrupted grid resumes where it stopped, and several machines
sharing ``OUT`` can each take a shard of the cells (``shard=(i, n)``: the cells whose position in the
key-sorted list is i mod n).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rwkv_zoo.fileio import atomic_path
from rwkv_zoo.train.trainer import TrainConfig


def assign_device(worker: int, n_gpus: int, wanted: str = "auto") -> str:
    """The device of worker ``worker``: round-robin over ``n_gpus`` visible GPUs, else the CPU."""
    if wanted == "cpu" or (wanted == "auto" and n_gpus == 0):
        return "cpu"
    if n_gpus == 0:
        raise RuntimeError("device = 'cuda' but no GPU is visible")
    return f"cuda:{worker % n_gpus}"


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def shard_of(runs: list[dict[str, Any]], shard: tuple[int, int] | None) -> list[dict[str, Any]]:
    if shard is None:
        return runs
    i, n = shard
    order = sorted(runs, key=lambda r: r["key"])
    mine = {r["key"] for j, r in enumerate(order) if j % n == i}
    return [r for r in runs if r["key"] in mine]


def cell_path(out_dir: Path, key: str) -> Path:
    return out_dir / "cells" / f"{key}.json"


def load_cells(out_dir: Path, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The finished cells among ``runs`` (unreadable files count as missing and are run again)."""
    found = {}
    for r in runs:
        p = cell_path(out_dir, r["key"])
        if p.is_file():
            try:
                found[r["key"]] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return found


def state_size(model) -> int | None:
    """Floats of recurrent state per sequence (every layer's tensors), None when the model has none."""
    try:
        st = model.zero_state(1)
        return sum(t.numel() for ls in st.layers for t in ls.tensors())
    except (AttributeError, NotImplementedError, TypeError):
        return None


@torch.no_grad()
def extrapolation(trainer, factors: list[int]) -> dict[str, float]:
    """Held-out bits per byte of the same held-out bytes read in windows of T, and of f x T for each
    factor f, each window in chunks of T with the state carried (``bpb@<length>``)."""
    import torch.nn.functional as F

    from rwkv_zoo.data.tokens import bits_per_byte

    data, T, cfg = trainer.data, trainer.seq_len, trainer.config
    longest = T * max(factors)
    lo = data.split_point(T)
    n_rows = min(cfg.eval_batches * (cfg.eval_batch_size or cfg.batch_size) // max(factors),
                 (len(data) - lo - 1) // longest)
    n_rows = max(1, n_rows)
    span = n_rows * longest
    import numpy as np

    seq = torch.from_numpy(np.asarray(data.tokens[lo : lo + span + 1], dtype=np.int64))
    dev = torch.device(cfg.device)
    out = {}
    trainer.module.eval()
    for f in [1, *factors]:
        L = T * f
        inputs = seq[:-1].reshape(-1, L)
        targets = seq[1:].reshape(-1, L)
        state, total = None, 0.0
        for s in range(0, L, T):
            logits, state = trainer.module(inputs[:, s : s + T].to(dev), state)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), targets[:, s : s + T].flatten().to(dev),
                                           reduction="sum"))
        loss = total / targets.numel()
        out[f"bpb@{L}"] = bits_per_byte(loss, data.bytes_per_token) or loss / math.log(2)
    return out


def run_one(run: dict[str, Any], out_dir: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Train and evaluate one cell; writes ``OUT/cells/<key>.json`` when ``out_dir`` is given."""
    from rwkv_zoo.train.trainer import Trainer

    torch.set_num_threads(max(1, int(run["train"].get("threads") or 1)))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(TrainConfig.from_dict({**run["train"], "device": device}))
    result = trainer.fit()
    final = dict(result.final)
    if run.get("extrapolate"):
        final.update(extrapolation(trainer, run["extrapolate"]))
    rec = {
        "key": run["key"], "model": run["model"], "family": run["family"], "task": run["task"], "seed": run["seed"],
        "lr": run["lr"], "name": result.model, "identity": result.identity, "params": result.params,
        "state_size": state_size(trainer.module), "final": final, "evals": result.evals,
        "loss_curve": [h["loss"] for h in result.history], "steps": len(result.history), "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0, "device": device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if out_dir is not None:
        path = cell_path(Path(out_dir), run["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rec, default=_json_default) + "\n")
    return rec


def _json_default(obj: Any) -> Any:
    return str(obj)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


_WORKER_DEVICE = "cpu"


def _worker_init(counter, n_gpus: int, wanted: str) -> None:
    global _WORKER_DEVICE
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    _WORKER_DEVICE = assign_device(index, n_gpus, wanted)


def _finished_meanwhile(run: dict[str, Any], out_dir: str | None) -> dict[str, Any] | None:
    """The cell's record when another process (another shard, a second invocation) wrote it since this
    grid started."""
    if out_dir is None:
        return None
    found = load_cells(Path(out_dir), [run])
    return found.get(run["key"])


def _worker_run(args: tuple[dict[str, Any], str | None]) -> dict[str, Any]:
    run, out_dir = args
    return _finished_meanwhile(run, out_dir) or run_one(run, out_dir, _WORKER_DEVICE)


def run_cells(runs: list[dict[str, Any]], out_dir: Path | None, *, jobs: int, device: str = "auto",
              log: Callable[[str], None] = print, runner: Callable[..., dict[str, Any]] | None = None
              ) -> list[dict[str, Any]]:
    """Run ``runs`` (the missing cells) in ``jobs`` processes; returns their records as they finish.
    ``runner`` replaces ``run_one`` in-process (``jobs = 1``), for tests."""
    done: list[dict[str, Any]] = []
    if not runs:
        return done
    t0 = time.perf_counter()
    n_gpus = _visible_gpus()
    target = str(out_dir) if out_dir is not None else None

    def finished(rec: dict[str, Any]) -> None:
        done.append(rec)
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in rec["final"].items() if "@" not in k)
        log(f"[{len(done)}/{len(runs)}] {rec['model']} on {rec['task']}, lr {rec['lr']:g}, seed {rec['seed']}: "
            f"{metrics} ({rec['wall_s']:.0f} s, {rec['tokens_per_s']:,.0f} tok/s; {time.perf_counter() - t0:.0f} s "
            f"elapsed)")

    jobs = max(1, min(jobs, len(runs)))
    if jobs == 1 or runner is not None:
        dev = assign_device(0, n_gpus, device)
        for run in runs:
            finished(_finished_meanwhile(run, target) or (runner or run_one)(run, target, dev))
    else:
        ctx = multiprocessing.get_context("spawn")
        counter = ctx.Value("i", 0)
        with ctx.Pool(jobs, initializer=_worker_init, initargs=(counter, n_gpus, device)) as pool:
            for rec in pool.imap_unordered(_worker_run, [(r, target) for r in runs]):
                finished(rec)
    return done
