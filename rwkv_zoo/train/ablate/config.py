"""Ablation configs: parsing, expansion into cells, and the checks that run before any training.

A config has ``[ablate]`` (name, description, seeds, lrs, lr_final_ratio, jobs, threads, device,
out_dir), ``[train]`` (any ``TrainConfig`` field: one budget for every run), ``[[models]]`` (``model``
plus ``build()`` options; ``label``; ``optional = true`` drops an entry whose version is not
registered; a list for ``n_embd``, ``n_layer`` or ``head_size`` expands into one model per value) and
``[[tasks]]`` (a data table: ``task = "mqar"``, ``text = PATH``, ``binidx = PREFIX`` or ``corpus =
"stdlib"`` with its options; ``label``; ``extrapolate = [4, 16]`` for language-model data: also
evaluate windows of 4 and 16 times ``ctx_len`` with the state carried).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwkv_zoo.errors import ConfigError
from rwkv_zoo.train._toml import tomllib
from rwkv_zoo.train.trainer import TrainConfig

# Bumped when what a cell computes changes, so old cached cells are not reused. 2: attn's fan-in init,
# and the CPU training path (C++ layer ops, fused AdamW) that rounds differently.
CELL_FORMAT = 2
EXPANDABLE = ("n_layer", "n_embd", "head_size")
ABLATE_KEYS = ("name", "description", "seeds", "lrs", "lr_final_ratio", "jobs", "threads", "device", "out_dir")
DATA_KINDS = ("task", "text", "binidx", "corpus")


class AblateConfigError(ConfigError):
    """A mistake in an ablation config, found before any run starts (one line)."""


@dataclass
class ModelEntry:
    label: str
    model: str
    size: str | None
    options: dict[str, Any]
    family: str = ""  # the entry before expansion (curves over width group by it)


@dataclass
class TaskEntry:
    label: str
    data: dict[str, Any]
    extrapolate: list[int] = field(default_factory=list)


@dataclass
class AblateConfig:
    name: str
    seeds: list[int]
    lrs: list[float]
    lr_final_ratio: float | None
    jobs: int
    threads: int
    device: str
    out_dir: str | None
    train: dict[str, Any]
    models: list[ModelEntry]
    tasks: list[TaskEntry]
    description: str = ""
    source: str = "<default>"
    raw: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # optional models left out, with why


def _registered(model: str) -> bool:
    from rwkv_zoo.registry import resolve

    try:
        resolve(model)
    except ValueError:
        return False
    return True


def parse_config(text: str, source: str = "<string>") -> AblateConfig:
    """Parse an ablation config (TOML text); errors (``AblateConfigError``) name the offending key."""

    def fail(msg: str) -> AblateConfigError:
        return AblateConfigError(f"{source}: {msg}")

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"not valid TOML: {exc}") from exc
    unknown = sorted(set(raw) - {"ablate", "train", "models", "tasks"})
    if unknown:
        raise fail(f"unknown section(s) {', '.join(unknown)}; use [ablate], [train], [[models]], [[tasks]]")
    ab = dict(raw.get("ablate", {}))
    if set(ab) - set(ABLATE_KEYS):
        raise fail(f"unknown [ablate] key(s) {', '.join(sorted(set(ab) - set(ABLATE_KEYS)))}; keys: "
                   f"{', '.join(ABLATE_KEYS)}")
    train = dict(raw.get("train", {}))
    for k in ("model", "size", "model_options", "data", "seed", "out_dir", "resume", "device"):
        if k in train:
            raise fail(f"[train] sets {k!r}, which the grid decides per run (models, tasks, seeds, [ablate] device)")
    try:  # the per-run data is checked with each run (check_config); ctx_len only applies to text
        TrainConfig.from_dict({**train, "data": {"text": "-"} if "ctx_len" in train else {"task": "mqar"}}).validate()
    except (TypeError, ValueError) as exc:
        raise fail(f"[train]: {exc}") from exc
    lrs = ab.get("lrs")
    if lrs is not None:
        if "lr" in train or "lr_final" in train:
            raise fail("[ablate] lrs (a learning-rate sweep) and [train] lr/lr_final exclude each other; the sweep "
                       "sets lr_final = lr * lr_final_ratio")
        if not isinstance(lrs, list) or not lrs or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
            raise fail(f"[ablate] lrs must be a non-empty list of positive numbers, got {lrs!r}")
        lrs = sorted(float(x) for x in lrs)
    else:
        lrs = [float(train.get("lr", TrainConfig.lr))]
    ratio = ab.get("lr_final_ratio", 0.1 if "lrs" in ab else None)
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 <= ratio <= 1):
        raise fail(f"[ablate] lr_final_ratio must be a number in [0, 1], got {ratio!r}")
    seeds = ab.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise fail(f"[ablate] seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise fail(f"[ablate] seeds repeat: {seeds}")
    for key in ("jobs", "threads"):
        v = ab.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise fail(f"[ablate] {key} must be an integer >= 1, got {v!r}")
    device = str(ab.get("device", "auto"))
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"[ablate] device must be auto, cpu or cuda, got {device!r}")

    models: list[ModelEntry] = []
    skipped: list[str] = []
    for i, m in enumerate(raw.get("models", [])):
        m = dict(m)
        if "model" not in m:
            raise fail(f"[[models]] entry {i + 1} needs model = \"v6-tiny\" (or a version + size)")
        model, size, label = str(m.pop("model")), m.pop("size", None), m.pop("label", None)
        optional = m.pop("optional", False)
        if not isinstance(optional, bool):
            raise fail(f"[[models]] entry {i + 1}: optional must be true or false, got {optional!r}")
        if not _registered(model):
            if optional:
                skipped.append(f"{label or model} (version {model!r} is not registered)")
                continue
            from rwkv_zoo.registry import list_versions

            raise fail(f"[[models]] entry {i + 1}: unknown model {model!r}; versions: {', '.join(list_versions())}")
        family = label or _model_label(model, size, m)
        lists = [k for k in EXPANDABLE if isinstance(m.get(k), list)]
        bad = [k for k, v in m.items() if isinstance(v, list) and k not in EXPANDABLE]
        if bad:
            raise fail(f"[[models]] {family}: {bad[0]} is a list; only {', '.join(EXPANDABLE)} expand over values")
        combos: list[dict[str, Any]] = [{}]
        for k in lists:
            if not m[k]:
                raise fail(f"[[models]] {family}: {k} = [] is empty")
            combos = [{**c, k: v} for c in combos for v in m[k]]
        for c in combos:
            opts = {**m, **c}
            suffix = ",".join(f"{_SHORT.get(k, k)}={v}" for k, v in c.items())
            models.append(ModelEntry(f"{family} {suffix}" if suffix else family, model, size, opts, family))
    tasks: list[TaskEntry] = []
    for i, t in enumerate(raw.get("tasks", [])):
        t = dict(t)
        label = t.pop("label", None)
        extrapolate = t.pop("extrapolate", [])
        kinds = [k for k in DATA_KINDS if k in t]
        if len(kinds) != 1:
            raise fail(f"[[tasks]] entry {i + 1} needs exactly one of task = \"mqar\", text =, binidx =, corpus = "
                       f"\"stdlib\"; got {', '.join(kinds) or 'none'}")
        if not isinstance(extrapolate, list) or not all(isinstance(x, int) and x >= 2 for x in extrapolate):
            raise fail(f"[[tasks]] entry {i + 1}: extrapolate must be a list of integers >= 2 (multiples of ctx_len), "
                       f"got {extrapolate!r}")
        if extrapolate and "task" in t:
            raise fail(f"[[tasks]] entry {i + 1}: extrapolate applies to language-model data (text, binidx, corpus), "
                       f"not to task {t['task']!r}")
        name = str(t.get("task") or t.get("corpus") or Path(str(t.get("text") or t.get("binidx"))).name)
        tasks.append(TaskEntry(label or name, t, sorted(extrapolate)))
    if not models or not tasks:
        why = f" (left out: {'; '.join(skipped)})" if skipped else ""
        raise fail(f"needs at least one [[models]] and one [[tasks]] entry{why}")
    for kind, labels in (("model", [m.label for m in models]), ("task", [t.label for t in tasks])):
        if len(set(labels)) != len(labels):
            raise fail(f"{kind} labels must be distinct, got {labels}; add label = \"...\"")
    return AblateConfig(
        name=str(ab.get("name", "ablation")), seeds=[int(s) for s in seeds], lrs=lrs,
        lr_final_ratio=None if ratio is None else float(ratio), jobs=int(ab.get("jobs", min(2, os.cpu_count() or 1))),
        threads=int(ab.get("threads", 1)), device=device, out_dir=ab.get("out_dir"), train=train, models=models,
        tasks=tasks, description=str(ab.get("description", "")), source=source, raw=raw, skipped=skipped,
    )


_SHORT = {"n_embd": "d", "n_layer": "L", "head_size": "h"}


def _model_label(model: str, size: str | None, options: dict[str, Any]) -> str:
    label = model + (f"-{size}" if size else "")
    extra = ",".join(f"{k}={v}" for k, v in options.items() if k in ("time_mix", "channel_mix", "layers"))
    return f"{label}[{extra}]" if extra else label


# ---------------------------------------------------------------------------------------------------
# Cells


def cell_key(train: dict[str, Any], extrapolate: list[int]) -> str:
    """The cache key of a run: a hash of everything that decides its numbers (the full training config,
    the extra evaluations, the cell format), not of labels, threads or device."""
    keep = {k: v for k, v in train.items() if k not in ("progress", "threads", "device", "out_dir")}
    blob = json.dumps({"format": CELL_FORMAT, "train": TrainConfig.from_dict(keep).to_dict(),
                       "extrapolate": extrapolate}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_specs(cfg: AblateConfig) -> list[dict[str, Any]]:
    """One dict per cell of the grid (task x model x learning rate x seed), longest runs first."""
    runs = []
    for task in cfg.tasks:
        for model in cfg.models:
            for lr in cfg.lrs:
                for seed in cfg.seeds:
                    train = {**cfg.train, "model": model.model, "size": model.size, "model_options": model.options,
                             "data": task.data, "seed": seed, "progress": False, "out_dir": None,
                             "threads": cfg.threads, "lr": lr}
                    if cfg.lr_final_ratio is not None:
                        train["lr_final"] = lr * cfg.lr_final_ratio
                    runs.append({"model": model.label, "family": model.family, "task": task.label, "seed": seed,
                                 "lr": lr, "train": train, "extrapolate": task.extrapolate,
                                 "key": cell_key(train, task.extrapolate)})
    runs.sort(key=lambda r: -_run_cost(r))
    for i, r in enumerate(runs):
        r["index"] = i
    return runs


def _run_cost(run: dict[str, Any]) -> float:
    from rwkv_zoo.registry import resolve

    opts = run["train"]["model_options"]
    try:
        name = resolve(run["train"]["model"])[0].name
    except ValueError:
        name = run["train"]["model"]
    if "layers" in opts:
        parts = [e.split("/")[0] for e in str(opts["layers"]).split(",")]
        rel = sum(_cost(p) for p in parts) / len(parts)
    else:
        rel = _cost(opts.get("time_mix", name))
    width = float(opts.get("n_embd", 64)) * float(opts.get("n_layer", 2))
    return rel * width


def _cost(version: str) -> float:
    from rwkv_zoo.registry import get_version

    try:
        return get_version(version.strip()).relative_cost
    except ValueError:
        return 2.0


def check_config(cfg: AblateConfig) -> None:
    """Everything that can be checked without training, before any run starts: every training config
    validates, every task's data loads, every model builds (on the meta device) with the vocabulary
    its data needs. Raises ``AblateConfigError`` with one line."""
    import rwkv_zoo
    from rwkv_zoo.data import Task, make_data

    vocab: dict[str, int] = {}
    for task in cfg.tasks:
        try:
            data = make_data(task.data)
        except (TypeError, ValueError, OSError) as exc:
            raise AblateConfigError(f"{cfg.source}: [[tasks]] {task.label}: {_one_line(exc)}") from exc
        if task.extrapolate and isinstance(data, Task):
            raise AblateConfigError(f"{cfg.source}: [[tasks]] {task.label}: extrapolate needs language-model data")
        vocab[task.label] = data.vocab_size
    seen = set()
    for run in run_specs(cfg):
        tr = run["train"]
        try:
            TrainConfig.from_dict(tr).validate()
        except (TypeError, ValueError) as exc:
            raise AblateConfigError(f"{cfg.source}: {run['model']} on {run['task']}: {_one_line(exc)}") from exc
        sig = (run["model"], run["task"])
        if sig in seen:
            continue
        seen.add(sig)
        opts = dict(tr["model_options"])
        is_task = "task" in tr["data"]
        if is_task and tr["size"] is None and "-" not in tr["model"] and "vocab_size" not in opts:
            opts["vocab_size"] = vocab[run["task"]]
        try:
            m = rwkv_zoo.build(tr["model"], size=tr["size"], device="meta", **opts)
        except (TypeError, ValueError, KeyError) as exc:
            raise AblateConfigError(f"{cfg.source}: [[models]] {run['model']}: {_one_line(exc)}") from exc
        if m.config.vocab_size < vocab[run["task"]]:
            raise AblateConfigError(f"{cfg.source}: [[models]] {run['model']}: vocab_size {m.config.vocab_size} is "
                                    f"smaller than task {run['task']}'s {vocab[run['task']]}; set vocab_size")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
