"""Command-line front ends of ``rwkv-zoo train``, ``rwkv-zoo ablate`` and ``python -m rwkv_zoo.train``.

``train`` takes a TOML file (a ``[train]`` table, or the fields at top level) and/or flags; ``--set
key=value`` sets any ``TrainConfig`` field (values are TOML: ``--set data='{task="copying"}'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rwkv_zoo.cli._helpers import UsageError
from rwkv_zoo.train._toml import tomllib
from rwkv_zoo.train.trainer import TrainConfig

# Flags that map onto TrainConfig fields (flag -> field); the rest go through --set.
_FLAGS = {
    "model": str, "size": str, "steps": int, "batch_size": int, "ctx_len": int, "chunk_len": int, "lr": float,
    "lr_final": float, "warmup_steps": int, "schedule": str, "weight_decay": float, "grad_clip": float,
    "eval_every": int, "save_every": int, "out_dir": str, "seed": int, "threads": int, "distributed": str,
    "device": str, "backend": str, "init_from": str,
    "lora_r": int, "lora_alpha": float, "lora_dropout": float, "lora_targets": str,
}
_SWITCHES = ("resume", "overwrite", "bf16", "grad_checkpointing", "truncated_bptt", "no_l2wrap",
             "lora_norms", "lora_mixes")
# One sentence per flag; --help adds the default (TrainConfig's, or what None means there).
_HELP = {
    "model": "model to build with random weights: a version or version-size name (v7-tiny, v6-small, hybrid...)",
    "size": "size preset of --model when it names only a version",
    "steps": "optimizer steps to train",
    "batch_size": "sequences per step, over all processes",
    "ctx_len": "sequence length for --text/--binidx data, the longest sample for --sft; a --task sets its own",
    "chunk_len": "train long sequences in chunks of this many tokens with the state carried (infctx)",
    "lr": "peak learning rate, reached after the warmup",
    "lr_final": "learning rate at the last step",
    "warmup_steps": "steps of the linear warmup from 0.01 x lr",
    "schedule": "learning-rate decay after the warmup: cosine, exponential or constant",
    "weight_decay": "AdamW weight decay on the matrices",
    "grad_clip": "clip the gradient norm to this value (0: no clipping)",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "out_dir": "folder for the run's checkpoints, result.json and the tuning mode's files",
    "seed": "seed of the initialisation and of every batch",
    "threads": "CPU threads for torch",
    "distributed": "auto, none, ddp or fsdp (auto: ddp under torchrun)",
    "device": "device to train on (cpu, cuda, cuda:1...)",
    "backend": "kernel backend to run the model with",
    "init_from": "start from this checkpoint instead of random weights: any format rwkv_zoo.load reads, a "
                 "training run folder (its newest checkpoint) or a checkpoint folder; overrides --model",
    "resume": "continue the run in --out-dir from its newest checkpoint (settings must match, see --override)",
    "overwrite": "delete the run already in --out-dir and start over",
    "bf16": "autocast the forward to bfloat16",
    "grad_checkpointing": "recompute each block in backward to save activation memory",
    "truncated_bptt": "with --chunk-len: detach the state between chunks instead of the exact gradient",
    "no_l2wrap": "turn off L2Wrap (RWKV-LM's penalty on the largest logit)",
    "lora_r": "--tune lora: the adapters' rank",
    "lora_alpha": "--tune lora: LoRA alpha; the update is scaled by alpha / rank",
    "lora_dropout": "--tune lora: dropout on the adapters' input",
    "lora_targets": "--tune lora: comma-separated official projection names, e.g. att.key,att.value,ffn.key",
    "lora_norms": "--tune lora: train the LayerNorms/GroupNorms too (saved in the adapter as peft's modules_to_save)",
    "lora_mixes": "--tune lora: train the token-shift mix vectors too (saved beside the adapter)",
}
# What a None default means, for --help.
_NONE_DEFAULTS = {"size": "the name's own", "ctx_len": "512", "chunk_len": "none: whole sequences",
                  "save_every": "a tenth of the run, at most 1000 steps", "out_dir": "none: nothing saved",
                  "threads": "torch's", "backend": "the fastest that can run", "init_from": "none: random weights",
                  "lora_alpha": "2 x rank", "lora_targets": "every att.* and ffn.* projection the model has"}


def _default_text(name: str) -> str:
    if name == "no_l2wrap":
        return "off (L2Wrap on)"
    value = getattr(TrainConfig(), name)
    if value is None:
        return _NONE_DEFAULTS.get(name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class ConfigError(ValueError):
    """A mistake in a config file or flag (printed as one line by the CLI)."""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML file with a [train] table (or TrainConfig fields at top level); "
                                             "flags override it (default: none)")
    for name, typ in _FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None,
                       help=f"{_HELP[name]} (default: {_default_text(name)})")
    from rwkv_zoo.train.tuning import get_mode, mode_names

    modes = "; ".join(f"{n}: {get_mode(n).description}" for n in mode_names())
    p.add_argument("--tune", choices=mode_names(), default=None,
                   help=f"what trains: {modes} (default: {TrainConfig().tune})")
    p.add_argument("--task", help="train on a synthetic task: mqar, copying, selective_copying, as data = {task = ...} "
                                  "(default: mqar when no data is given)")
    p.add_argument("--text", help="train on a text file, byte level, as data = {text = PATH} (default: none)")
    p.add_argument("--binidx", help="train on an RWKV-LM .bin/.idx dataset, as data = {binidx = PREFIX} "
                                    "(default: none)")
    p.add_argument("--sft", metavar="JSONL", help="chat SFT on a jsonl file of {\"text\": ...} or {\"messages\": "
                   "[...]} lines, World tokenizer, loss on the assistant replies only, as data = {sft = PATH} "
                   "(default: none)")
    for s in _SWITCHES:
        p.add_argument(f"--{s.replace('_', '-')}", dest=s, action="store_true", default=None,
                       help=f"{_HELP[s]} (default: {_default_text(s)})")
    p.add_argument("--override", metavar="FIELD[,FIELD]",
                   help="with --resume: let these settings differ from the run's (steps: the learning rate "
                        "follows the new total's schedule from the resume step, without a second warmup) "
                        "(default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any TrainConfig field, value in TOML syntax (repeatable) (default: none)")
    p.add_argument("--quiet", action="store_true", help="show no progress bar (default: off)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: off)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        try:
            raw = tomllib.loads(Path(args.config).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {args.config} is not valid TOML ({exc}); fix it") from exc
        values.update(raw.get("train", raw))
    for name in (*_FLAGS, "tune"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for s in _SWITCHES:
        if getattr(args, s):
            if s == "no_l2wrap":
                values["l2wrap"] = False
            else:
                values[s] = True
    data = [(k, getattr(args, k)) for k in ("task", "text", "binidx", "sft") if getattr(args, k)]
    if len(data) > 1:
        raise ConfigError("give one of --task, --text, --binidx, --sft")
    if data:
        values["data"] = {data[0][0]: data[0][1]}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word: a string
        values[key.strip()] = value
    if getattr(args, "override", None):
        values["override"] = args.override
    if args.quiet:
        values["progress"] = False
    try:
        cfg = TrainConfig.from_dict(values)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from rwkv_zoo.train import distributed
    from rwkv_zoo.train.trainer import Trainer, TrainingInterrupted, lr_at

    cfg = config_from_args(args)
    try:
        trainer = Trainer(cfg)
    except ValueError as exc:  # an unknown model, size or option; data the model cannot hold; another run
        raise ConfigError(str(exc)) from exc
    if trainer.rank == 0 and not args.json:
        m = trainer.module
        data = trainer.data.describe() if hasattr(trainer.data, "describe") else getattr(trainer.data, "name", "")
        trainable = sum(p.numel() for p in trainer.params)
        print(f"training {trainer.model_name} ({m.num_parameters():,} parameters, {trainable:,} trainable) on {data}: "
              f"{cfg.steps} steps x "
              f"{cfg.batch_size} x {trainer.seq_len} tokens, {trainer.world} process(es)"
              + (f", from {cfg.init_from}" if cfg.init_from else "")
              + (f", tuning: {cfg.tune}" if cfg.tune != "full" else "")
              + (f", resumed at step {trainer.step}" if trainer.step else ""), flush=True)
        for name, (old, new) in trainer.overridden.items():
            note = f"note: {name} {old!r} -> {new!r} (--override)"
            if name == "steps" and trainer.step < cfg.steps:
                note += (f"; the learning rate goes on from {lr_at(cfg, trainer.step, trainer.lr_anchor):.3g} at step "
                         f"{trainer.step} and decays to lr_final over the remaining steps")
            print(note, flush=True)
    try:
        result = trainer.fit()
    except TrainingInterrupted as exc:
        if trainer.rank == 0:
            print(f"rwkv-zoo train: {exc}", file=sys.stderr, flush=True)
        distributed.shutdown()
        return 128 + exc.signum
    if trainer.rank == 0:
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final.items())
            print(f"done: {result.tokens:,} tokens in {result.wall_s:.1f} s ({result.tokens_per_s:,.0f} tok/s); "
                  f"eval: {metrics}" + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""))
            for f in result.files:
                print(f"wrote {f}")
        if cfg.out_dir:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out_dir) / "result.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    distributed.shutdown()
    return 0


def add_ablate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML file ([ablate], [train], [[models]], [[tasks]]); "
                                             "default: the quick suite")
    p.add_argument("--suite", help="a built-in suite (see --list-suites; default quick)")
    p.add_argument("--list-suites", action="store_true", help="list the built-in suites and exit")
    p.add_argument("--out", dest="out_dir", help="output folder (default ablate-<name>); finished cells are cached in "
                                                 "OUT/cells and not run again")
    p.add_argument("--jobs", type=int, help="worker processes (default from the config: 2)")
    p.add_argument("--seeds", help="comma-separated seeds, overriding the config")
    p.add_argument("--lrs", help="comma-separated learning rates to sweep, overriding the config")
    p.add_argument("--steps", type=int, help="steps per run, overriding the config (same for every run)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="auto (default): worker i on GPU i mod #GPUs when GPUs are visible, else the CPU")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N of the cells (several machines sharing "
                                                  "--out; e.g. a Slurm job array)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--show-config", action="store_true", help="print the config (file or suite) and exit")


def _numbers(text: str | None, kind: type, flag: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from exc


def cmd_ablate(args: argparse.Namespace) -> int:
    from rwkv_zoo.errors import RWKVZooError
    from rwkv_zoo.train.ablate import SUITES, ablate, list_suites, parse_shard

    try:
        if args.list_suites:
            for name, desc in list_suites().items():
                print(f"{name:8s} {desc}")
            return 0
        if args.show_config:
            if args.config:
                print(Path(args.config).read_text())
            elif (args.suite or "quick") in SUITES:
                print(SUITES[args.suite or "quick"].strip())
            else:
                raise ConfigError(f"unknown suite {args.suite!r}; suites: {', '.join(SUITES)}")
            return 0
        ablate(args.config, suite=args.suite, out_dir=args.out_dir, jobs=args.jobs,
               seeds=_numbers(args.seeds, int, "--seeds"), steps=args.steps, lrs=_numbers(args.lrs, float, "--lrs"),
               device=args.device, shard=parse_shard(args.shard) if args.shard else None, plots=not args.no_plots)
    except FileNotFoundError as exc:
        raise ConfigError(f"no such config file: {exc.filename}") from exc
    except RWKVZooError as exc:
        if getattr(exc, "exit_code", 1) == 2 or isinstance(exc, ValueError):
            raise ConfigError(str(exc)) from exc
        raise
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``train`` and ``ablate`` to the ``rwkv-zoo`` subcommands."""
    p = sub.add_parser("train", help="train a model (synthetic task, text or binidx data; torchrun for more "
                                     "processes)")
    add_train_arguments(p)
    p.set_defaults(func=_usage_errors(cmd_train))
    p = sub.add_parser("ablate", help="versions/hybrids x tasks x seeds with matched budgets: table, CSV/JSON, "
                                      "plots")
    add_ablate_arguments(p)
    p.set_defaults(func=_usage_errors(cmd_ablate))


def _usage_errors(fn):
    """Config mistakes become the CLI's usage errors (one line on stderr, status 2)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc

    return run


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkv_zoo.train`` (what torchrun launches): the same arguments as ``rwkv-zoo train``;
    ``python -m rwkv_zoo.train ablate ...`` is ``rwkv-zoo ablate ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "ablate":
        ab = argparse.ArgumentParser(prog="python -m rwkv_zoo.train ablate", description="Run an ablation grid.")
        add_ablate_arguments(ab)
        try:
            return cmd_ablate(ab.parse_args(argv[1:]))
        except ConfigError as exc:
            print(f"rwkv_zoo.train ablate: error: {exc}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="python -m rwkv_zoo.train", description="Train an RWKV model.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except ConfigError as exc:
        print(f"rwkv_zoo.train: error: {exc}", file=sys.stderr)
        return 2
