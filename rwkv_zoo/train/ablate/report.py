"""What a grid writes: ``results.json``, ``results.csv``, PNG plots and ``report.md`` (schema in
docs/ablations.md)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from rwkv_zoo.train.ablate.cells import atomic_write_text
from rwkv_zoo.train.ablate.stats import fmt_ci, fmt_stat, format_table

SCHEMA = 2
RECORD_FIELDS = ["model", "family", "task", "seed", "lr", "selected", "name", "params", "state_size", "steps",
                 "tokens", "tokens_per_s", "wall_s", "cpu_s", "device", "threads", "key"]


def flat_record(rec: dict[str, Any], selected: bool) -> dict[str, Any]:
    """One run as a flat record: identity fields, then every final metric by name."""
    out = {k: rec.get(k) for k in RECORD_FIELDS if k != "selected"}
    out["selected"] = selected
    out.update(rec["final"])
    return out


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_results(out_dir: Path, cfg, results: list[dict[str, Any]], rows: list[dict[str, Any]], wall_s: float,
                  missing: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = {(r["task"], r["model"]): r["lr"] for r in rows}
    runs = []
    for rec in results:
        flat = flat_record(rec, chosen.get((rec["task"], rec["model"])) == rec["lr"])
        flat["loss_curve"] = rec["loss_curve"]
        flat["evals"] = rec["evals"]
        runs.append(flat)
    doc = {
        "schema": SCHEMA, "name": cfg.name, "description": cfg.description, "source": cfg.source, "config": cfg.raw,
        "left_out": cfg.skipped, "wall_s": wall_s, "missing_cells": missing,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "summary": rows, "runs": runs,
    }
    paths = [out_dir / "results.json", out_dir / "results.csv"]
    atomic_write_text(paths[0], json.dumps(_clean(doc), indent=1, default=str) + "\n")
    metric_keys: list[str] = []
    for r in results:
        metric_keys += [k for k in r["final"] if k not in metric_keys]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*RECORD_FIELDS, *metric_keys])
    for r in runs:
        w.writerow([_csv(r.get(k)) for k in [*RECORD_FIELDS, *metric_keys]])
    atomic_write_text(paths[1], buf.getvalue())
    return paths


def _csv(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ---------------------------------------------------------------------------------------------------
# Plots


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(out_dir: Path, cfg, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[Path]:
    """Loss curves (chosen learning rate), accuracy against state size, accuracy against pairs, bits per
    byte against context length: the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        with _atomic(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(path)

    chosen = {(r["task"], r["model"]): r["lr"] for r in rows}
    tasks = [t for t in cfg.tasks if any(r["task"] == t.label for r in rows)]
    # 1. Training loss at each model's chosen learning rate: mean over seeds, min-max band.
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for model in cfg.models:
            lr = chosen.get((task.label, model.label))
            curves = [r["loss_curve"] for r in results
                      if r["task"] == task.label and r["model"] == model.label and r["lr"] == lr and r["loss_curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            lo = [min(c[i] for c in curves) for i in range(n)]
            hi = [max(c[i] for c in curves) for i in range(n)]
            steps = list(range(1, n + 1))
            (line,) = ax.plot(steps, _smooth(mean), label=f"{model.label} (lr {lr:g})", lw=1.2)
            ax.fill_between(steps, _smooth(lo), _smooth(hi), color=line.get_color(), alpha=0.15, lw=0)
        ax.set(title=f"{task.label}: training loss", xlabel="step", ylabel="loss (smoothed)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "loss_curves.png")

    # 2. Accuracy against recurrent state size: one line per model family (over widths), per task.
    acc_tasks = [t for t in tasks if any("acc" in r["metrics"] for r in rows if r["task"] == t.label)]
    if acc_tasks:
        fig, axes = plt.subplots(1, len(acc_tasks), figsize=(6 * len(acc_tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], acc_tasks, strict=True):
            fams: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                if r["task"] == task.label and r["state_size"]:
                    fams.setdefault(r["family"], []).append(r)
            for fam, rs in fams.items():
                rs.sort(key=lambda r: r["state_size"])
                xs = [r["state_size"] for r in rs]
                ys = [r["metrics"]["acc"]["mean"] for r in rs]
                err = [r["metrics"]["acc"]["sd"] or 0.0 for r in rs]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=fam)
                if len(rs) == 1:
                    ax.annotate(fam, (xs[0], ys[0]), textcoords="offset points", xytext=(5, 3), fontsize=7)
            ax.set(title=f"{task.label}: accuracy against state size", xlabel="recurrent state floats per sequence",
                   ylabel="held-out accuracy", xscale="log", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "accuracy_vs_state.png")

    # 3. Accuracy against the number of key-value pairs (a task trained on a mixture of counts).
    var_tasks = [t for t in tasks if any(k.startswith("acc@pairs=") for r in rows if r["task"] == t.label
                                         for k in r["metrics"])]
    if var_tasks:
        fig, axes = plt.subplots(1, len(var_tasks), figsize=(6 * len(var_tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], var_tasks, strict=True):
            for r in (r for r in rows if r["task"] == task.label):
                pts = sorted((int(k.split("=")[1]), v["mean"], v["sd"] or 0.0) for k, v in r["metrics"].items()
                             if k.startswith("acc@pairs="))
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=r["model"])
            ax.set(title=f"{task.label}: accuracy by number of key-value pairs", xlabel="key-value pairs",
                   ylabel="accuracy", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "accuracy_vs_pairs.png")

    # 4. Bits per byte against context length (training length T and the extrapolated 4T, 16T ...).
    lm_tasks = [t for t in tasks if any(k.startswith("bpb@") for r in rows if r["task"] == t.label
                                        for k in r["metrics"])]
    if lm_tasks:
        fig, axes = plt.subplots(1, len(lm_tasks), figsize=(6 * len(lm_tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], lm_tasks, strict=True):
            ctxs: set[int] = set()
            for r in (r for r in rows if r["task"] == task.label):
                pts = sorted((int(k.split("@")[1]), v["mean"], v["sd"] or 0.0) for k, v in r["metrics"].items()
                             if k.startswith("bpb@") and v["mean"] is not None)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=r["model"])
                ctxs.update(p[0] for p in pts)
            ax.set(title=f"{task.label}: held-out bits per byte by context (state carried)",
                   xlabel="context length (tokens; trained at the first)", ylabel="bits per byte", xscale="log")
            # a log axis labels its minor ticks too (overlapping "3x10^2 4x10^2"); label the contexts measured
            ax.minorticks_off()
            ax.set_xticks(sorted(ctxs), [str(c) for c in sorted(ctxs)])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "bpb_vs_context.png")
    return written


class _atomic:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> str:
        from rwkv_zoo.fileio import atomic_path

        self._cm = atomic_path(self.path, suffix=".png")
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self._cm.__exit__(*exc)


# ---------------------------------------------------------------------------------------------------
# report.md


def warnings_for(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["lr_edge"]:
            out.append(f"{r['model']} on {r['task']}: the best learning rate {r['lr']:g} is at the edge of the sweep "
                       f"({', '.join(f'{lr:g}' for lr in r['lr_sweep'])}); a wider grid may find a better one")
        m = r["metrics"].get(r["metric"])
        if m is not None and m["mean"] is not None and not math.isfinite(m["mean"]):
            out.append(f"{r['model']} on {r['task']}: a run diverged (non-finite {r['metric']})")
    return out


def write_report(out_dir: Path, cfg, rows: list[dict[str, Any]], plots: list[Path], wall_s: float, ran: int,
                 cached: int, missing: int, header: str) -> Path:
    lines = [f"# Ablation: {cfg.name}", "", cfg.description, "", header, ""]
    if missing:
        lines += [f"**Incomplete: {missing} cell(s) of this grid are missing** (another shard, or an interrupted run):"
                  " the rows below use the cells present.", ""]
    lines += [format_table(rows, markdown=True), "",
              "`lr`: the learning rate each model got, the best mean of its sweep (`*`: at the edge of the sweep). "
              "`mean ± sd` over seeds at that rate, `95% CI` t-based (`–` for one seed). `state`: recurrent state "
              "floats per sequence. `tokens`: training tokens per run (the same for every model). `wall`: mean "
              "seconds per run.", ""]
    sweep = [r for r in rows if len(r["lr_sweep"]) > 1]
    if sweep:
        lrs = sorted({lr for r in sweep for lr in r["lr_sweep"]})
        lines += ["## Learning-rate sweep (mean primary metric per rate)", "",
                  "| task | model | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                  "|---|---|" + "---|" * len(lrs)]
        for r in sweep:
            vals = [r["lr_sweep"].get(lr) for lr in lrs]
            lines.append(f"| {r['task']} | {r['model']} | " + " | ".join(
                "–" if v is None else (f"**{v:.3f}**" if lr == r["lr"] else f"{v:.3f}")
                for lr, v in zip(lrs, vals, strict=True)) + " |")
        lines.append("")
    warns = warnings_for(rows)
    if warns:
        lines += ["## Warnings", "", *(f"- {w}" for w in warns), ""]
    if cfg.skipped:
        lines += ["Left out: " + "; ".join(cfg.skipped) + ".", ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    extra = [k for r in rows for k in r["metrics"] if "@" in k]
    if extra:
        lines += ["## Other metrics (chosen learning rate)", ""]
        for r in rows:
            parts = [f"{k} {fmt_stat(v)} {fmt_ci(v)}" for k, v in r["metrics"].items() if "@" in k]
            if parts:
                lines.append(f"- {r['model']} on {r['task']}: " + "; ".join(parts))
        lines.append("")
    lines += [f"Cells: {ran} run now, {cached} from the cache in cells/; wall time of this invocation {wall_s:.0f} s.",
              ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
