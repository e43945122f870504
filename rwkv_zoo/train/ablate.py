"""``rwkv-zoo ablate [CONFIG.toml]``: a grid of versions/hybrids x tasks x seeds with matched budgets.

Every run of the grid trains with the same ``[train]`` settings (steps, batch, learning-rate schedule:
the same tokens for every model), then evaluates. The harness writes ``results.json`` (everything,
loss curves included), ``results.csv`` (one row per run) and PNG plots (loss curves; accuracy against
the number of key-value pairs and against the state size, when the task has them), and prints a
table with the mean ± standard deviation over seeds. Runs go to ``jobs`` worker processes with
``threads`` torch threads each (on a small shared CPU, two single-threaded runs side by side beat one
run on two threads: these models are too small for intra-op parallelism to pay).

A config file has ``[ablate]`` (name, seeds, jobs, threads, out_dir), ``[train]`` (any
``TrainConfig`` field), ``[[models]]`` (``model`` plus ``build()`` options, e.g. ``time_mix``,
``layers``; optional ``label``) and ``[[tasks]]`` (a data table: ``task = "mqar"`` and its options,
``text = PATH`` or ``binidx = PREFIX``; optional ``label``). With no file, ``DEFAULT_CONFIG`` runs.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rwkv_zoo.train._toml import tomllib
from rwkv_zoo.train.trainer import TrainConfig

# The embedded default: v4, v5, v6 and v7 at the same tiny shape (2 layers x 64, head size 16) on
# multi-query associative recall, identical budgets. Tuned to finish in about 5 minutes on 2 busy
# CPU cores; see README "Training and ablations" for what it shows.
DEFAULT_CONFIG = """
[ablate]
name = "versions-on-mqar"
seeds = [0, 1]
jobs = 2        # worker processes
threads = 1     # torch threads per worker

[train]
steps = 600
batch_size = 16
lr = 2e-3
lr_final = 2e-4
warmup_steps = 20
schedule = "cosine"
weight_decay = 0.0
grad_clip = 1.0
eval_batches = 4
eval_batch_size = 64

[[models]]
model = "v4-tiny"

[[models]]
model = "v5-tiny"

[[models]]
model = "v6-tiny"

[[models]]
model = "v7-tiny"

[[tasks]]
label = "mqar"
task = "mqar"
num_pairs = 8
num_keys = 32
num_values = 32
seq_len = 32
"""

def _cost(version: str) -> float:
    """A version's declared training cost per token relative to v4 (``VersionSpec.relative_cost``), to
    start long runs first; 2.0 for a name that is not a registered version."""
    from rwkv_zoo.registry import get_version

    try:
        return get_version(version.strip()).relative_cost
    except ValueError:
        return 2.0


@dataclass
class ModelEntry:
    label: str
    model: str
    size: str | None
    options: dict[str, Any]


@dataclass
class TaskEntry:
    label: str
    data: dict[str, Any]


@dataclass
class AblateConfig:
    name: str
    seeds: list[int]
    jobs: int
    threads: int
    out_dir: str | None
    train: dict[str, Any]
    models: list[ModelEntry]
    tasks: list[TaskEntry]
    source: str = "<default>"
    raw: dict[str, Any] = field(default_factory=dict)


def parse_config(text: str, source: str = "<string>") -> AblateConfig:
    """Parse and check an ablation config (TOML text); errors name the offending key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - {"ablate", "train", "models", "tasks"})
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {', '.join(unknown)}; use [ablate], [train], [[models]], "
                         f"[[tasks]]")
    ab = dict(raw.get("ablate", {}))
    known_ab = {"name", "seeds", "jobs", "threads", "out_dir"}
    if set(ab) - known_ab:
        raise ValueError(f"{source}: unknown [ablate] key(s) {', '.join(sorted(set(ab) - known_ab))}; "
                         f"keys: {', '.join(sorted(known_ab))}")
    train = dict(raw.get("train", {}))
    for k in ("model", "size", "model_options", "data", "seed", "out_dir", "resume"):
        if k in train:
            raise ValueError(f"{source}: [train] sets {k!r}, which the grid decides per run "
                             f"(models, tasks, seeds)")
    TrainConfig.from_dict(train).validate()  # fail before any run starts
    models = []
    for i, m in enumerate(raw.get("models", [])):
        m = dict(m)
        if "model" not in m:
            raise ValueError(f"{source}: [[models]] entry {i + 1} needs model = \"v6-tiny\" (or a version + size)")
        model, size, label = m.pop("model"), m.pop("size", None), m.pop("label", None)
        models.append(ModelEntry(label or _model_label(model, size, m), model, size, m))
    tasks = []
    for i, t in enumerate(raw.get("tasks", [])):
        t = dict(t)
        label = t.pop("label", None)
        if not ({"task", "text", "binidx"} & set(t)):
            raise ValueError(f"{source}: [[tasks]] entry {i + 1} needs task = \"mqar\" (or text = / binidx =)")
        tasks.append(TaskEntry(label or str(t.get("task") or Path(str(t.get("text") or t.get("binidx"))).name), t))
    if not models or not tasks:
        raise ValueError(f"{source}: needs at least one [[models]] and one [[tasks]] entry")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{source}: model labels must be distinct, got {labels}; add label = \"...\"")
    seeds = [int(s) for s in ab.get("seeds", [0])]
    return AblateConfig(
        name=str(ab.get("name", "ablation")), seeds=seeds, jobs=int(ab.get("jobs", min(2, os.cpu_count() or 1))),
        threads=int(ab.get("threads", 1)), out_dir=ab.get("out_dir"), train=train, models=models, tasks=tasks,
        source=source, raw=raw,
    )


def _model_label(model: str, size: str | None, options: dict[str, Any]) -> str:
    label = model + (f"-{size}" if size else "")
    extra = ",".join(f"{k}={v}" for k, v in options.items() if k in ("time_mix", "channel_mix", "layers"))
    return f"{label}[{extra}]" if extra else label


def run_specs(cfg: AblateConfig) -> list[dict[str, Any]]:
    """One dict per run of the grid (model x task x seed), longest runs first."""
    runs = []
    for task in cfg.tasks:
        for model in cfg.models:
            for seed in cfg.seeds:
                train = {**cfg.train, "model": model.model, "size": model.size, "model_options": model.options,
                         "data": task.data, "seed": seed, "progress": False, "out_dir": None,
                         "threads": cfg.threads}
                runs.append({"model": model.label, "task": task.label, "seed": seed, "train": train})

    def cost(run):
        from rwkv_zoo.registry import resolve

        opts = run["train"]["model_options"]
        try:
            name = resolve(run["train"]["model"])[0].name
        except ValueError:
            name = run["train"]["model"]
        if "layers" in opts:
            parts = [e.split("/")[0] for e in str(opts["layers"]).split(",")]
            return sum(_cost(p) for p in parts) / len(parts)
        return _cost(opts.get("time_mix", name))

    runs.sort(key=cost, reverse=True)
    for i, r in enumerate(runs):
        r["index"] = i
    return runs


def state_size(model) -> int:
    """Floats of recurrent state per sequence (every layer's shifts and WKV state)."""
    st = model.zero_state(1)
    return sum(t.numel() for ls in st.layers for t in ls.tensors())


def run_one(run: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one run of the grid (in a worker process); returns a JSON-able record."""
    from rwkv_zoo.train.trainer import Trainer

    torch.set_num_threads(max(1, int(run["train"].get("threads") or 1)))
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig.from_dict(run["train"]))
    result = trainer.fit()
    return {
        "index": run["index"], "model": run["model"], "task": run["task"], "seed": run["seed"],
        "name": result.model, "identity": result.identity, "params": result.params,
        "state_size": state_size(trainer.module), "final": result.final, "evals": result.evals,
        "loss_curve": [h["loss"] for h in result.history], "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "wall_s": time.perf_counter() - t0,
    }


def _pool_worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_grid(cfg: AblateConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    runs = run_specs(cfg)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def done(rec: dict[str, Any]) -> None:
        results.append(rec)
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in rec["final"].items() if "@" not in k)
        log(f"[{len(results)}/{len(runs)}] {rec['model']} on {rec['task']}, seed {rec['seed']}: {metrics} "
            f"({rec['wall_s']:.0f} s, {rec['tokens_per_s']:,.0f} tok/s; {time.perf_counter() - t0:.0f} s elapsed)")

    jobs = max(1, min(cfg.jobs, len(runs)))
    log(f"{len(runs)} runs ({len(cfg.models)} models x {len(cfg.tasks)} tasks x {len(cfg.seeds)} seeds), "
        f"{jobs} at a time, {cfg.threads} torch thread(s) each")
    if jobs == 1:
        for run in runs:
            done(run_one(run))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs, initializer=_pool_worker_init, maxtasksperchild=None) as pool:
            for rec in pool.imap_unordered(run_one, runs):
                done(rec)
    return sorted(results, key=lambda r: r["index"])


# ---------------------------------------------------------------------------------------------------
# Summaries


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(cfg: AblateConfig, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, model): params, state size, and mean/sd of every final metric over seeds."""
    rows = []
    for task in cfg.tasks:
        for model in cfg.models:
            recs = [r for r in results if r["task"] == task.label and r["model"] == model.label]
            if not recs:
                continue
            keys = list(recs[0]["final"])
            metrics = {k: _mean_sd([r["final"][k] for r in recs if k in r["final"]]) for k in keys}
            rows.append({"task": task.label, "model": model.label, "name": recs[0]["name"],
                         "params": recs[0]["params"], "state_size": recs[0]["state_size"], "seeds": len(recs),
                         "metrics": {k: {"mean": m, "sd": s} for k, (m, s) in metrics.items()},
                         "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in recs),
                         "wall_s": statistics.fmean(r["wall_s"] for r in recs)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    from rwkv_zoo.formatting import human_count, table

    metric_keys: list[str] = []
    for r in rows:
        for k in r["metrics"]:
            if k not in metric_keys:
                metric_keys.append(k)
    order = ["acc"] + [k for k in metric_keys if k.startswith("acc@")] + ["bpb", "loss"]
    cols = [k for k in order if k in metric_keys] + [k for k in metric_keys if k not in order]
    headers = ["task", "model", "params", "state", *cols, "tok/s"]
    out = []
    for r in rows:
        cells = [r["task"], r["model"], human_count(r["params"]), human_count(r["state_size"])]
        for k in cols:
            m = r["metrics"].get(k)
            cells.append("-" if m is None else f"{m['mean']:.3f} ± {m['sd']:.3f}")
        cells.append(f"{r['tokens_per_s']:,.0f}")
        out.append(cells)
    return table(headers, out, "<<>>" + ">" * len(cols) + ">")


def write_results(out_dir: Path, cfg: AblateConfig, results: list[dict[str, Any]], rows: list[dict[str, Any]],
                  wall_s: float) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": cfg.name, "source": cfg.source, "config": cfg.raw, "wall_s": wall_s,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "summary": rows, "runs": results,
    }
    paths = [out_dir / "results.json", out_dir / "results.csv"]
    _atomic_write(paths[0], json.dumps(doc, indent=1, default=_json_default) + "\n")
    metric_keys: list[str] = []
    for r in results:
        metric_keys += [k for k in r["final"] if k not in metric_keys]
    lines: list[list[Any]] = [["task", "model", "name", "seed", "params", "state_size", *metric_keys, "tokens",
                               "tokens_per_s", "wall_s"]]
    for r in results:
        lines.append([r["task"], r["model"], r["name"], r["seed"], r["params"], r["state_size"],
                      *(r["final"].get(k, "") for k in metric_keys), r["tokens"], f"{r['tokens_per_s']:.1f}",
                      f"{r['wall_s']:.2f}"])
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    _atomic_write(paths[1], buf.getvalue())
    return paths


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Plots


def plot(out_dir: Path, cfg: AblateConfig, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[Path]:
    """PNG plots; returns the files written (none, with a note, when matplotlib is missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # 1. Training loss curves, one panel per task, mean over seeds with the min-max band.
    fig, axes = plt.subplots(1, len(cfg.tasks), figsize=(6 * len(cfg.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], cfg.tasks, strict=True):
        for model in cfg.models:
            curves = [r["loss_curve"] for r in results if r["task"] == task.label and r["model"] == model.label]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            lo = [min(c[i] for c in curves) for i in range(n)]
            hi = [max(c[i] for c in curves) for i in range(n)]
            steps = list(range(1, n + 1))
            (line,) = ax.plot(steps, _smooth(mean), label=model.label, lw=1.5)
            ax.fill_between(steps, _smooth(lo), _smooth(hi), color=line.get_color(), alpha=0.15, lw=0)
        ax.set(title=f"{task.label}: training loss", xlabel="step", ylabel="loss (smoothed)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "loss_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 2. Accuracy against the number of key-value pairs (tasks evaluated at several counts).
    var_tasks = [t for t in cfg.tasks if any(k.startswith("acc@pairs=") for r in rows if r["task"] == t.label
                                             for k in r["metrics"])]
    if var_tasks:
        fig, axes = plt.subplots(1, len(var_tasks), figsize=(6 * len(var_tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], var_tasks, strict=True):
            for r in (r for r in rows if r["task"] == task.label):
                pts = sorted((int(k.split("=")[1]), v["mean"], v["sd"]) for k, v in r["metrics"].items()
                             if k.startswith("acc@pairs="))
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=r["model"])
            ax.set(title=f"{task.label}: accuracy by number of key-value pairs", xlabel="key-value pairs",
                   ylabel="accuracy", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "accuracy_vs_pairs.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 3. Accuracy against the recurrent state size (tasks with an accuracy).
    acc_rows = [r for r in rows if "acc" in r["metrics"]]
    if acc_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task in cfg.tasks:
            for r in (r for r in acc_rows if r["task"] == task.label):
                m = r["metrics"]["acc"]
                ax.errorbar([r["state_size"]], [m["mean"]], yerr=[m["sd"]], marker="o", capsize=3,
                            label=f"{r['model']} ({task.label})")
                ax.annotate(r["model"], (r["state_size"], m["mean"]), textcoords="offset points", xytext=(5, 3),
                            fontsize=8)
        ax.set(title="accuracy against state size", xlabel="state floats per sequence", ylabel="accuracy",
               xscale="log", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "accuracy_vs_state.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ---------------------------------------------------------------------------------------------------
# Entry point


def ablate(config_path: str | None = None, *, out_dir: str | None = None, jobs: int | None = None,
           seeds: list[int] | None = None, steps: int | None = None, plots: bool = True,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run an ablation (the embedded default when ``config_path`` is None); returns the summary rows,
    the per-run results, the files written and the wall time."""
    if config_path is None:
        cfg = parse_config(DEFAULT_CONFIG, "<default>")
    else:
        cfg = parse_config(Path(config_path).read_text(), str(config_path))
    if jobs is not None:
        cfg.jobs = jobs
    if seeds is not None:
        cfg.seeds = seeds
    if steps is not None:
        cfg.train["steps"] = steps
    target = Path(out_dir or cfg.out_dir or f"ablate-{cfg.name}")
    t0 = time.perf_counter()
    log(f"rwkv-zoo ablate: {cfg.name} ({cfg.source}); results in {target}/")
    results = run_grid(cfg, log)
    wall = time.perf_counter() - t0
    rows = summarize(cfg, results)
    files = write_results(target, cfg, results, rows, wall)
    if plots:
        try:
            files += plot(target, cfg, results, rows)
        except ImportError as exc:
            log(f"(no plots: {exc}; pip install matplotlib)")
    tr = TrainConfig.from_dict(cfg.train)
    log(f"\n{cfg.name}: every run {tr.steps} steps x {tr.batch_size} sequences (matched budget); "
        f"mean ± sd over {len(cfg.seeds)} seed(s); state = recurrent state floats per sequence")
    log(format_table(rows))
    log(f"\nwall time {wall:.0f} s; wrote {', '.join(str(f) for f in files)}")
    sys.stdout.flush()
    return {"rows": rows, "results": results, "files": [str(f) for f in files], "wall_s": wall}
