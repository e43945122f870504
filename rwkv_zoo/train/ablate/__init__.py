"""``rwkv-zoo ablate``: grids of versions/hybrids x tasks x learning rates x seeds with matched budgets.

A grid is a TOML config (``config``); the built-in suites (``suites``: quick, recall, text, hybrids) are
such configs, so a suite and a file take one path. Every run of the grid trains with the same
``[train]`` budget; each model is reported at its best learning rate of the ``lrs`` sweep (the same
sweep and budget for every model). Each run is a cell cached under ``OUT/cells/`` by a hash of its full
config (``cells``): an interrupted grid resumes, a repeated command trains only what is missing, and
``shard=(i, n)`` splits the cells over machines sharing ``OUT``. The harness writes ``results.json``,
``results.csv``, PNG plots and ``report.md`` (``report``; schema in docs/ablations.md) and prints the
table (``stats``: mean ± sd and a t-based 95 % interval over seeds).

Runs go to ``jobs`` worker processes with ``threads`` torch threads each (on a small shared CPU, two
single-threaded runs side by side beat one run on two threads: these models are too small for intra-op
parallelism to pay), or round-robin to the visible GPUs (``device = "auto"``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rwkv_zoo.train.ablate.cells import assign_device, load_cells, run_cells, run_one, shard_of, state_size
from rwkv_zoo.train.ablate.config import (
    AblateConfig,
    AblateConfigError,
    ModelEntry,
    TaskEntry,
    cell_key,
    check_config,
    parse_config,
    run_specs,
)
from rwkv_zoo.train.ablate.stats import describe, format_table, select_lr, summarize, t_quantile_975
from rwkv_zoo.train.ablate.suites import DEFAULT_SUITE, SUITES

DEFAULT_CONFIG = SUITES[DEFAULT_SUITE]

__all__ = [
    "DEFAULT_CONFIG",
    "SUITES",
    "AblateConfig",
    "AblateConfigError",
    "ModelEntry",
    "TaskEntry",
    "ablate",
    "assign_device",
    "cell_key",
    "check_config",
    "describe",
    "format_table",
    "list_suites",
    "load_config",
    "parse_config",
    "run_one",
    "run_specs",
    "select_lr",
    "shard_of",
    "state_size",
    "summarize",
    "t_quantile_975",
]


def list_suites() -> dict[str, str]:
    """Suite name -> its one-line description."""
    return {name: parse_config(text, f"<suite {name}>").description for name, text in SUITES.items()}


def load_config(config_path: str | None = None, suite: str | None = None) -> AblateConfig:
    """The config of a file or a suite (default: the ``quick`` suite)."""
    if config_path is not None and suite is not None:
        raise AblateConfigError("give a config file or --suite, not both")
    if config_path is not None:
        try:
            text = Path(config_path).read_text()
        except FileNotFoundError as exc:
            raise AblateConfigError(f"no such config file: {config_path}") from exc
        return parse_config(text, str(config_path))
    suite = suite or DEFAULT_SUITE
    if suite not in SUITES:
        raise AblateConfigError(f"unknown suite {suite!r}; suites: {', '.join(SUITES)}")
    return parse_config(SUITES[suite], f"<suite {suite}>")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) for ``--shard``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise AblateConfigError(f"--shard takes I/N (e.g. 0/4), got {text!r}") from exc
    if not (n >= 1 and 0 <= i < n):
        raise AblateConfigError(f"--shard {text}: need 0 <= I < N")
    return i, n


def ablate(config_path: str | None = None, *, suite: str | None = None, out_dir: str | None = None,
           jobs: int | None = None, seeds: list[int] | None = None, steps: int | None = None,
           lrs: list[float] | None = None, device: str | None = None, shard: tuple[int, int] | None = None,
           plots: bool = True, log: Callable[[str], None] = print,
           runner: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run a grid (a config file, a suite, default ``quick``), reusing cached cells in ``OUT/cells``;
    returns the summary rows, the per-run results, the files written, the wall time, and how many
    cells ran now and came from the cache. Config mistakes raise ``AblateConfigError`` before any run."""
    cfg = load_config(config_path, suite)
    if jobs is not None:
        if jobs < 1:
            raise AblateConfigError(f"--jobs must be >= 1, got {jobs}")
        cfg.jobs = jobs
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise AblateConfigError(f"--seeds must be distinct integers, got {seeds}")
        cfg.seeds = seeds
    if steps is not None:
        if steps < 1:
            raise AblateConfigError(f"--steps must be >= 1, got {steps}")
        cfg.train["steps"] = steps
    if lrs is not None:
        if not lrs or not all(lr > 0 for lr in lrs):
            raise AblateConfigError(f"--lrs must be positive, got {lrs}")
        cfg.lrs = sorted(lrs)
        cfg.train.pop("lr", None)
        if cfg.lr_final_ratio is None:
            cfg.lr_final_ratio = 0.1
            cfg.train.pop("lr_final", None)
    if device is not None:
        cfg.device = device
    check_config(cfg)
    target = Path(out_dir or cfg.out_dir or f"ablate-{cfg.name}")
    specs = run_specs(cfg)
    mine = shard_of(specs, shard)
    cached = load_cells(target, specs)
    todo = [r for r in mine if r["key"] not in cached]
    t0 = time.perf_counter()
    log(f"rwkv-zoo ablate: {cfg.name} ({cfg.source}); results in {target}/")
    if cfg.skipped:
        log(f"left out: {'; '.join(cfg.skipped)}")
    log(f"{len(specs)} cells ({len(cfg.models)} models x {len(cfg.tasks)} tasks x {len(cfg.lrs)} learning rates x "
        f"{len(cfg.seeds)} seeds)" + (f", shard {shard[0]}/{shard[1]}: {len(mine)}" if shard else "")
        + f"; {len(cached)} cached, {len(todo)} to run, {min(cfg.jobs, max(1, len(todo)))} at a time, "
        f"{cfg.threads} torch thread(s) each")
    new = run_cells(todo, target, jobs=cfg.jobs, device=cfg.device, log=log, runner=runner)
    wall = time.perf_counter() - t0
    by_key = {**cached, **{r["key"]: r for r in new}}
    results = []
    for spec in sorted(specs, key=lambda r: r["index"]):
        rec = by_key.get(spec["key"])
        if rec is not None:  # labels come from this config (a cell's key ignores them)
            results.append({**rec, "model": spec["model"], "family": spec["family"], "task": spec["task"]})
    missing = len(specs) - len(results)
    from rwkv_zoo.train.ablate import report

    rows = summarize(cfg, results)
    files = report.write_results(target, cfg, results, rows, wall, missing)
    pngs: list[Path] = []
    if plots and rows:
        pngs = report.plot(target, cfg, results, rows)
    tr = {**cfg.train}
    header = (f"Every run: {tr.get('steps')} steps x {tr.get('batch_size')} sequences (matched tokens); each model "
              f"at its best learning rate of {', '.join(f'{lr:g}' for lr in cfg.lrs)}; {len(cfg.seeds)} seed(s) "
              f"per rate.")
    files += [*pngs, report.write_report(target, cfg, rows, pngs, wall, len(new), len(cached), missing, header)]
    log(f"\n{cfg.name}: {header}")
    log(format_table(rows))
    for w in report.warnings_for(rows):
        log(f"warning: {w}")
    if missing:
        log(f"note: {missing} of {len(specs)} cells are missing (other shards?); re-run without --shard once all "
            f"shards finished to complete the report")
    log(f"\nwall time {wall:.0f} s ({len(new)} cells run, {len(cached)} cached); wrote "
        f"{', '.join(str(f) for f in files)}")
    sys.stdout.flush()
    return {"rows": rows, "results": results, "files": [str(f) for f in files], "wall_s": wall, "ran": len(new),
            "cached": len(cached), "missing": missing, "config": cfg}
