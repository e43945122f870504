"""Statistics of a grid: the learning rate picked per (task, model), mean, standard deviation and a
t-based 95 % interval over seeds, and the summary table."""

from __future__ import annotations

import math
import statistics
from typing import Any

# Two-sided 95 % quantiles of Student's t, t_{0.975}(df), df = 1..30 (standard tables); beyond, the
# nearest larger-df entry below is used, conservative.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
_T975_LARGE = [(40, 2.021), (60, 2.000), (120, 1.980)]


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30:
        return _T975[df - 1]
    for limit, t in _T975_LARGE:
        if df <= limit:
            return t
    return 1.960


def describe(values: list[float]) -> dict[str, Any]:
    """``n``, ``mean``, ``sd`` (None for n = 1) and the 95 % interval ``ci95`` = mean ± t sd / sqrt(n)
    (None for n = 1). Non-finite values (a diverged run) make the mean non-finite."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1 or not all(math.isfinite(v) for v in values):
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(values)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def primary_metric(metrics: dict[str, Any]) -> tuple[str, bool]:
    """The metric that picks the learning rate and heads the table: ``(name, higher_is_better)``."""
    if "acc" in metrics:
        return "acc", True
    if "bpb" in metrics:
        return "bpb", False
    return "loss", False


def _score(value: float | None, higher: bool) -> float:
    if value is None or not math.isfinite(value):
        return -math.inf
    return value if higher else -value


def select_lr(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The learning rate with the best mean primary metric over seeds among ``records`` (one model on
    one task); ties go to the lower mean loss. Returns ``lr``, ``metric``, ``by_lr`` (lr -> mean) and
    ``edge`` (the best is the smallest or largest rate tried, while several were: widen the grid)."""
    metric, higher = primary_metric(records[0]["final"])
    by_lr: dict[float, list[dict[str, Any]]] = {}
    for r in records:
        by_lr.setdefault(float(r["lr"]), []).append(r)

    def mean(recs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r["final"].get(key) for r in recs]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    lrs = sorted(by_lr)
    best = max(lrs, key=lambda lr: (_score(mean(by_lr[lr], metric), higher),
                                    _score(mean(by_lr[lr], "loss"), False), -lr))
    return {"lr": best, "metric": metric, "higher_is_better": higher,
            "by_lr": {lr: mean(by_lr[lr], metric) for lr in lrs},
            "edge": len(lrs) > 1 and best in (lrs[0], lrs[-1])}


def summarize(cfg, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, model) present in ``results``: the chosen learning rate and, at that rate,
    every final metric described over seeds, params, state size, tokens, tokens/s and wall time."""
    rows = []
    for task in cfg.tasks:
        for model in cfg.models:
            recs = [r for r in results if r["task"] == task.label and r["model"] == model.label]
            if not recs:
                continue
            pick = select_lr(recs)
            chosen = [r for r in recs if float(r["lr"]) == pick["lr"]]
            keys: list[str] = []
            for r in chosen:
                keys += [k for k in r["final"] if k not in keys]
            metrics = {k: describe([r["final"][k] for r in chosen if r["final"].get(k) is not None]) for k in keys}
            rows.append({
                "task": task.label, "model": model.label, "family": model.family, "name": chosen[0]["name"],
                "lr": pick["lr"], "lr_edge": pick["edge"], "lr_sweep": pick["by_lr"], "metric": pick["metric"],
                "params": chosen[0]["params"], "state_size": chosen[0]["state_size"],
                "n_embd": model.options.get("n_embd"), "seeds": len(chosen), "metrics": metrics,
                "tokens": chosen[0]["tokens"], "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in chosen),
                "wall_s": statistics.fmean(r["wall_s"] for r in chosen),
                "cpu_s": sum(r.get("cpu_s", 0.0) for r in recs),
                "runs": len(recs),
            })
    return rows


def fmt_stat(m: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± sd``; ``mean (n=1)`` for one seed (never a made-up ``± 0``)."""
    if m is None or m["mean"] is None:
        return "–"
    if m["sd"] is None:
        return f"{m['mean']:.{digits}f} (n={m['n']})"
    return f"{m['mean']:.{digits}f} ± {m['sd']:.{digits}f}"


def fmt_ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    if m is None or m.get("ci95") is None:
        return "–"
    lo, hi = m["ci95"]
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    from rwkv_zoo.formatting import human_count, table

    extra: list[str] = []
    for r in rows:
        extra += [k for k in r["metrics"] if k.startswith("bpb@") and k not in extra]
    extra.sort(key=lambda k: int(k.split("@")[1]))
    headers = ["task", "model", "lr", "params", "state", "metric", "mean ± sd", "95% CI", "loss", *extra,
               "tokens", "tok/s", "wall"]
    out = []
    for r in rows:
        name = r["metric"]
        lr = f"{r['lr']:g}" + ("*" if r["lr_edge"] else "")
        state = "–" if r["state_size"] is None else human_count(r["state_size"])
        cells = [r["task"], r["model"], lr, human_count(r["params"]), state, name, fmt_stat(r["metrics"].get(name)),
                 fmt_ci(r["metrics"].get(name)), fmt_stat(r["metrics"].get("loss")) if name != "loss" else "",
                 *(fmt_stat(r["metrics"].get(k)) for k in extra), human_count(r["tokens"]),
                 f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:.0f} s"]
        out.append(cells)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in out]
        return "\n".join(lines)
    return table(headers, out, "<<>>><<>>" + ">" * len(extra) + ">>>")
