"""The trainer: official optimizer groups, warmup + cosine/exponential decay, clipping, L2Wrap, bf16
autocast, gradient checkpointing, infctx chunks, evaluation, atomic checkpoints and exact resume.

    from rwkv_zoo.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(model="v7-tiny", data={"task": "mqar"}, steps=300)).fit()
    print(result.final)          # {"loss": ..., "acc": ...}

A step ``s`` (0-based) uses batch ``s`` of the data (a pure function of the seed and ``s``, see
``rwkv_zoo.data``) and the learning rate ``lr_at(s)``; the checkpoint after step ``s`` holds the model,
the optimizer, ``s + 1``, the RNG states and the history, so a resumed run continues the same loss
curve as an uninterrupted one.

A run folder (``out_dir``) belongs to one run. Starting again in a folder that holds one is refused
unless ``resume`` (continue it) or ``overwrite`` (delete it first) says which; resuming with another
model is refused, and so is resuming with other budget, data or optimizer settings (``RESUME_FIELDS``)
unless ``override`` names each changed field. Checkpoints are written every ``save_every`` steps (by
default a tenth of the run, at most 1000 steps apart), and SIGINT/SIGTERM stop the run at the next step
boundary with a checkpoint (a second signal stops at once).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import optimizer as torch_optimizer

import rwkv_zoo
from rwkv_zoo.data import IGNORE, Task, TokenStream, bits_per_byte, make_data
from rwkv_zoo.train import distributed
from rwkv_zoo.train.infctx import chunk_bounds, chunked_backward
from rwkv_zoo.train.l2wrap import l2wrap, l2wrap_scale
from rwkv_zoo.train.tuning import get_mode, mode_names

SCHEDULES = ("cosine", "exponential", "constant")
CHECKPOINT_FORMAT = "rwkv_zoo.train/1"
DEFAULT_CTX_LEN = 512
# What a resumed run must share with the run that wrote the checkpoint for the two to be one run: the
# budget, the data and the optimisation. The rest (evaluation, logging, output, threads, device,
# distributed mode, backend, gradient checkpointing, chunk_len with the full gradient) changes how the run
# is carried out, not what it computes, and may change freely between resumes.
RESUME_FIELDS = ("data", "steps", "batch_size", "ctx_len", "seed", "lr", "lr_final", "warmup_steps", "schedule",
                 "weight_decay", "betas", "eps", "grad_clip", "l2wrap", "bf16", "truncated_bptt", "tune",
                 "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_norms", "lora_mixes")


class ResumeError(ValueError):
    """An ``out_dir`` that does not fit the run asked for: a run there already, another model or settings."""


class TrainingInterrupted(KeyboardInterrupt):
    """``fit()`` stopped early on SIGINT/SIGTERM, after saving a checkpoint when ``out_dir`` is set.

    A KeyboardInterrupt, so code that already stops cleanly on Ctrl-C stops cleanly on this too."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}; resume to continue" if checkpoint else "nothing saved (no out_dir)"
        super().__init__(f"stopped by {name} after step {step}: {where}")


@dataclass
class TrainConfig:
    """Everything a run needs. Field names are the keys of a ``[train]`` TOML table and of ``--set``."""

    # model: rwkv_zoo.build(model, size=size, backend=backend, **model_options)
    model: str = "v7-tiny"
    size: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    # fine-tuning: start from a checkpoint (any format rwkv_zoo.load reads, a run folder too) instead of
    # building ``model``; ``tune`` names a mode of rwkv_zoo.train.tuning (full, state, ...)
    init_from: str | None = None
    tune: str = "full"
    # tune = "lora" (rwkv_zoo.train.lora_mode): rank, alpha (None: 2 * rank), dropout, official projection
    # names (comma-separated; None: all), and whether the norms / token-shift mix vectors train too
    lora_r: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str | None = None
    lora_norms: bool = False
    lora_mixes: bool = False
    # data: {"task": "mqar", ...} | {"text": PATH} | {"binidx": PREFIX, "vocab_size": V} | {"sft": JSONL}
    data: dict[str, Any] = field(default_factory=lambda: {"task": "mqar"})
    # budget
    steps: int = 200
    batch_size: int = 32  # global: split over ranks
    ctx_len: int | None = None  # language-model data (default 512); refused with a task, which sets its own
    chunk_len: int | None = None  # infctx: train in chunks of this many tokens, state carried
    truncated_bptt: bool = False  # infctx: detach the state between chunks
    # optimisation (RWKV-LM defaults: Adam(W) betas (0.9, 0.99), eps 1e-8, clip 1.0, 0.01 + 0.99 ramp)
    lr: float = 3e-3
    lr_final: float = 3e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 turns clipping off
    l2wrap: bool = True
    bf16: bool = False  # autocast to bfloat16 (CPU or CUDA)
    grad_checkpointing: bool = False
    # evaluation and output
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    eval_batch_size: int | None = None  # default: batch_size
    log_every: int = 10
    progress: bool = True
    out_dir: str | None = None
    save_every: int | None = None  # None: a tenth of the run (at most 1000 steps); 0: at the end only
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest checkpoint in out_dir when there is one
    overwrite: bool = False  # delete the run already in out_dir and start over
    override: list[str] = field(default_factory=list)  # RESUME_FIELDS that may differ from the checkpoint's
    # environment
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    distributed: str = "auto"  # auto | none | ddp | fsdp

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown train option(s) {', '.join(unknown)}; options: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @property
    def uses_task(self) -> bool:
        return isinstance(self.data, dict) and "task" in self.data

    def checkpoint_interval(self) -> int:
        """Steps between checkpoints: ``save_every``, or by default a tenth of the run (at most 1000
        steps), so that a run killed late loses at most a tenth of its work."""
        if self.save_every is not None:
            return self.save_every
        return max(1, min(1000, math.ceil(self.steps / 10)))

    def validate(self) -> None:
        """Check (and coerce: an integer where a float goes) every field; raises ValueError naming it."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), hints[f.name]))
        if self.ctx_len is not None and self.uses_task:
            raise ValueError(f"ctx_len={self.ctx_len} does not apply to task {self.data['task']!r}, which sets its "
                             f"own sequence length; drop ctx_len (--ctx-len) or set the task's options in data")
        if self.ctx_len is not None and self.ctx_len < 1:
            raise ValueError(f"ctx_len must be >= 1, got {self.ctx_len}")
        if self.save_every is not None and self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in out_dir, "
                             "overwrite deletes it")
        unknown = [n for n in self.override if n not in RESUME_FIELDS]
        if unknown:
            raise ValueError(f"override names {', '.join(unknown)}, which cannot be overridden; it takes "
                             f"{', '.join(RESUME_FIELDS)}")
        if self.override and not self.resume:
            raise ValueError(f"override={','.join(self.override)} only applies when resuming; add resume "
                             f"(--resume)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps} and {self.batch_size}")
        if self.chunk_len is not None and self.chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1 (or None), got {self.chunk_len}")
        if self.tune not in mode_names():
            raise ValueError(f"tune={self.tune!r}: use one of {', '.join(mode_names())}")
        if self.init_from is not None and not os.path.exists(self.init_from):
            raise ValueError(f"init_from={self.init_from!r}: no such file or folder")
        if self.distributed not in distributed.MODES:
            raise ValueError(f"distributed={self.distributed!r}: use one of {', '.join(distributed.MODES)}")


def lr_at(cfg: TrainConfig, step: int, anchor: tuple[int, float] | None = None) -> float:
    """Learning rate of 0-based ``step``: RWKV-LM's decay from ``lr`` to ``lr_final`` over the steps after
    warmup (cosine, or exponential = linear in log space), times the warmup ramp 0.01 + 0.99 s / w.

    ``anchor = (s0, lr0)``: the run was resumed at step ``s0`` with another number of steps, where its rate
    was ``lr0``; from ``s0`` on the rate decays from ``lr0`` to ``lr_final`` over the remaining steps with
    the same shape, so the schedule goes on from where it was instead of jumping to another curve."""
    if anchor is not None and step >= anchor[0] and cfg.schedule in ("cosine", "exponential"):
        s0, lr0 = anchor
        progress = min(1.0, max(0.0, (step - s0) / max(1, cfg.steps - s0)))
        if cfg.schedule == "cosine":
            return cfg.lr_final + 0.5 * (lr0 - cfg.lr_final) * (1 + math.cos(math.pi * progress))
        return lr0 * math.exp(math.log(cfg.lr_final / lr0) * progress)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    if cfg.schedule == "cosine":
        lr = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "exponential":
        lr = cfg.lr * math.exp(math.log(cfg.lr_final / cfg.lr) * progress)
    else:
        lr = cfg.lr
    if step < cfg.warmup_steps:
        lr *= 0.01 + 0.99 * step / cfg.warmup_steps
    return lr


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward instead of keeping its activations (non-reentrant checkpoint).

    Keys and modules are unchanged (the block's ``forward`` is wrapped on the instance). What a block
    adds to the shared ``Context`` (v7's ``v_first``, ``carry`` entries) is taken from the run, and
    the recomputation sees a copy of the context as it was when the block first ran.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        if getattr(block, "_rwkv_zoo_checkpointed", False):
            continue
        inner = block.forward

        def forward(x, state, ctx, _inner=inner):
            before = ctx.copy()
            ran: list = []

            def run(x, state):
                local = before.copy()
                out = _inner(x, state, local)
                ran[:] = [local]
                return out

            out = checkpoint(run, x, state, use_reentrant=False)
            ctx.absorb(ran[0])
            return out

        block.forward = forward
        block._rwkv_zoo_checkpointed = True


class Progress:
    """A one-line progress bar on a terminal (``\\r``), or a line every ``log_every`` steps elsewhere."""

    def __init__(self, total: int, *, enabled: bool, log_every: int, prefix: str = "", stream=None):
        self.total, self.enabled, self.log_every, self.prefix = total, enabled, max(1, log_every), prefix
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.start_step: int | None = None
        self.open = False

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step = step - 1
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        width = 20
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        line = f"{self.prefix}[{bar}] {step}/{self.total} {text} | {_clock(elapsed)}<{_clock(eta)}"
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(100))
            self.stream.flush()
            self.open = True
        elif step % self.log_every == 0 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}"


@dataclass
class TrainResult:
    """What a run produced: ``history`` has one record per step (step, loss, lr, tokens, grad_norm),
    ``evals`` one per evaluation (step and metrics), ``final`` the last evaluation's metrics."""

    config: dict[str, Any]
    model: str
    identity: str
    params: int
    history: list[dict[str, float]]
    evals: list[dict[str, Any]]
    final: dict[str, float]
    wall_s: float
    tokens: int
    tokens_per_s: float
    checkpoint: str | None = None
    files: list[str] = field(default_factory=list)  # what the tuning mode wrote in out_dir (time_state.pth)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_(params, max_norm, foreach=True)`` with the same result bit for bit, minus its
    multiply of every gradient by exactly 1.0 when the norm is under ``max_norm`` (most steps): at the
    ablation sizes that multiply was about half of the clipping's time."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    coef = max_norm / (total + 1e-6)
    if not bool(coef >= 1.0):  # clip_grad_norm_ scales by min(coef, 1); a NaN norm scales too
        torch._foreach_mul_(grads, coef)
    return float(total)


class Trainer:
    """One training run (see the module docstring). ``fit()`` trains to ``config.steps`` and returns a
    ``TrainResult``; ``train_step()``, ``evaluate()``, ``save_checkpoint()`` and ``load_checkpoint()``
    are the pieces."""

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None):
        config.validate()
        self.config = cfg = config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.rank, self.world = distributed.init(cfg.device)
        self.data = make_data(cfg.data)
        self.is_task = isinstance(self.data, Task)
        self.seq_len = self.data.seq_len if self.is_task else (cfg.ctx_len or DEFAULT_CTX_LEN)
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} does not divide over {self.world} processes")

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.module = model if model is not None else self._build_model()
        self.module.to(cfg.device)
        vocab = self.module.config.vocab_size
        if self.data.vocab_size > vocab:
            raise ValueError(f"the data uses token ids up to {self.data.vocab_size - 1}, but the model's vocabulary "
                             f"has {vocab}; build a model with vocab_size >= {self.data.vocab_size}")
        # Parameters a version keeps only for checkpoint compatibility (v7 layer 0's v0/v1/v2) never
        # get a gradient: freezing them changes nothing and spares DDP an unused-parameter search.
        frozen = set(self.module.unused_parameters())
        for name, p in self.module.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        # The tuning mode decides what trains (rwkv_zoo.train.tuning); ``prepared`` is what is called
        # and wrapped, ``module`` stays the plain RWKV model (identity, config, blocks).
        self.tuning = get_mode(cfg.tune)
        self.tuning.check(self.module, cfg)
        self.prepared = self.tuning.prepare(self.module, cfg)
        self.prepared.to(cfg.device)
        if cfg.grad_checkpointing:
            enable_gradient_checkpointing(self.module)
        # Groups from the unwrapped module (their rules read shapes), then re-pointed by name: FSDP2
        # replaces every parameter with a sharded one.
        groups = self.tuning.param_groups(self.module, self.prepared, cfg)
        self.model, self._sync = distributed.wrap(self.prepared, cfg.distributed)
        current = dict(self.prepared.named_parameters())
        for g in groups:
            g["params"] = [current[n] for n in g["names"]]
        self.params = [p for p in self.prepared.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           fused=_fused_adamw(self.params, cfg.device, self.world))
        # The foreach norm/scale kernels take every gradient in one call (CPU and CUDA); a plain
        # tensor list is all they accept (FSDP's sharded parameters are not).
        self._foreach_clip = self.world == 1 and all(type(p) is nn.Parameter for p in self.params)
        self._direct_adamw = _direct_adamw_ok(self.optimizer)
        self.step = 0
        self.tokens = 0
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        self.elapsed = 0.0  # training seconds, carried over a resume
        self.checkpoint_dir = Path(cfg.out_dir) / "checkpoints" if cfg.out_dir else None
        self.last_checkpoint: str | None = None
        self.overridden: dict[str, tuple[Any, Any]] = {}  # field: (checkpoint's value, this run's)
        self.lr_anchor: tuple[int, float] | None = None  # (step, rate) where a resume changed the steps
        if cfg.out_dir:
            self._prepare_out_dir(Path(cfg.out_dir))
        if cfg.resume:
            latest = self.latest_checkpoint()
            if latest is not None:
                self.load_checkpoint(latest)

    def _prepare_out_dir(self, out: Path) -> None:
        """Refuse a folder that holds another run (unless resume/overwrite), delete it for overwrite,
        remove what a killed save left behind and point ``latest`` at the newest checkpoint."""
        cfg = self.config
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if out.exists() and not out.is_dir():
            raise ResumeError(f"out_dir {out} is a file; give a folder")
        is_run = "checkpoints" in entries or "result.json" in entries
        if entries and not cfg.resume:
            if not is_run:
                raise ResumeError(f"out_dir {out} is not empty and holds no training run; give a new or empty "
                                  f"folder")
            if not cfg.overwrite:
                raise ResumeError(f"out_dir {out} already holds a training run; add --resume to continue it or "
                                  f"--overwrite to delete it and start over")
        if self.rank == 0:
            if cfg.overwrite and entries:
                shutil.rmtree(out)
            ckpts = out / "checkpoints"
            if ckpts.is_dir():
                # Only a save that was killed leaves these: the folder is renamed into place whole.
                for stale in ckpts.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                for stale in ckpts.glob(".latest-*"):
                    stale.unlink(missing_ok=True)
                newest = self.latest_checkpoint()
                if newest is not None:
                    self._point_latest(newest.name)
        distributed.barrier()

    # -- set-up --------------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        cfg = self.config
        if cfg.init_from:
            # fp32 master weights whatever the file holds; train mode (load returns eval mode).
            return rwkv_zoo.load(cfg.init_from, dtype=torch.float32, backend=cfg.backend).train()
        opts = dict(cfg.model_options)
        if self.is_task and cfg.size is None and "-" not in cfg.model and "vocab_size" not in opts:
            opts["vocab_size"] = self.data.vocab_size
        return rwkv_zoo.build(cfg.model, size=cfg.size, backend=cfg.backend, **opts)

    @property
    def model_name(self) -> str:
        size = getattr(self.module, "size_name", None)
        name = self.module.version + (f"-{size}" if size else "")
        if self.module.version == "hybrid":
            name += f"[{self.module.config.describe()}]"
        return name

    # -- data and loss -------------------------------------------------------------------------------
    def global_batch(self, step: int, n: int, split: str = "train") -> tuple[Tensor, Tensor]:
        seed = self.config.seed
        if self.is_task:
            return self.data.batch(seed, step, n, split)
        return self.data.batch(seed, step, n, self.seq_len, split)

    def _forward(self, inputs: Tensor, state):
        dev = torch.device(self.config.device)
        if state is None:  # a sequence's start: the tuning mode's (state tuning: the trained state)
            state = self.tuning.initial_state(self.module, self.prepared, inputs.shape[0])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.model(inputs.to(dev), state)

    def plain_model(self) -> nn.Module:
        """The trained model as a plain ``RWKV`` for evaluation or generation (state tuning: the tuned
        state as its ``initial_state``)."""
        return self.tuning.plain_model(self.module, self.prepared)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on batch ``self.step``; returns its record."""
        cfg = self.config
        lr = lr_at(cfg, self.step, self.lr_anchor)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        inputs, targets = self.global_batch(self.step, cfg.batch_size)
        count = int((targets != IGNORE).sum())
        B, T = inputs.shape
        # Each rank's loss is its share of the global mean; DDP/FSDP average gradients over ranks,
        # hence the factor world.
        ce_scale = self.world / max(1, count)
        l2_scale = l2wrap_scale(B, T) * self.world
        inputs = distributed.shard_rows(inputs, self.rank, self.world)
        targets = distributed.shard_rows(targets, self.rank, self.world).to(cfg.device)

        def loss_fn(logits: Tensor, tgt: Tensor) -> Tensor:
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE,
                                   reduction="sum") * ce_scale
            return l2wrap(loss, logits, l2_scale) if cfg.l2wrap else loss

        total, _ = chunked_backward(self.model, inputs, targets, cfg.chunk_len, loss_fn,
                                    truncated=cfg.truncated_bptt, sync=self._sync, forward=self._forward)
        if cfg.grad_clip > 0 and self._foreach_clip:
            gnorm = _clip_grad_norm(self.params, cfg.grad_clip)
        elif cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=False))
        else:
            gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params
                                                                if p.grad is not None])))
        if not (self._direct_adamw and _fused_adamw_step(self.optimizer)):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        (loss,) = distributed.all_reduce_sum([total])
        self.step += 1
        self.tokens += B * T
        record = {"step": self.step, "loss": loss / self.world, "lr": lr, "tokens": self.tokens, "grad_norm": gnorm}
        self.history.append(record)
        return record

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and accuracy for tasks, bits per byte for text) on held-out batches."""
        cfg = self.config
        n = cfg.eval_batch_size or cfg.batch_size
        was_training = self.module.training
        self.module.eval()
        try:
            if self.is_task:
                metrics = self._eval_task(self.data, n)
                for label, variant in self.data.eval_variants().items():
                    sub = self._eval_task(variant, n)
                    metrics[f"acc@{label}"] = sub["acc"]
            else:
                metrics = self._eval_stream(n)
        finally:
            self.module.train(was_training)
        self.evals.append({"step": self.step, **metrics})
        return metrics

    def _eval_sums(self, inputs: Tensor, targets: Tensor) -> tuple[float, float, float]:
        inputs = distributed.shard_rows(inputs, self.rank, self.world)
        targets = distributed.shard_rows(targets, self.rank, self.world).to(self.config.device)
        loss_sum = correct = count = 0.0
        state = None
        for s, e in chunk_bounds(inputs.shape[1], self.config.chunk_len):
            logits, state = self._forward(inputs[:, s:e], state)
            tgt = targets[:, s:e]
            mask = tgt != IGNORE
            loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE,
                                              reduction="sum"))
            correct += float(((logits.argmax(-1) == tgt) & mask).sum())
            count += float(mask.sum())
        return loss_sum, correct, count

    def _eval_task(self, task: Task, n: int) -> dict[str, float]:
        totals = [0.0, 0.0, 0.0]
        for i in range(self.config.eval_batches):
            inputs, targets = task.batch(self.config.seed, i, n, split="eval")
            totals = [a + b for a, b in zip(totals, self._eval_sums(inputs, targets), strict=True)]
        loss_sum, correct, count = distributed.all_reduce_sum(totals)
        return {"loss": loss_sum / max(1.0, count), "acc": correct / max(1.0, count)}

    def _eval_stream(self, n: int) -> dict[str, float]:
        data: TokenStream = self.data  # type: ignore[assignment]
        totals = [0.0, 0.0, 0.0]
        for i in range(self.config.eval_batches):
            inputs, targets = data.eval_batch(i, n, self.seq_len)
            totals = [a + b for a, b in zip(totals, self._eval_sums(inputs, targets), strict=True)]
        loss_sum, _, count = distributed.all_reduce_sum(totals)
        loss = loss_sum / max(1.0, count)
        out = {"loss": loss}
        bpb = bits_per_byte(loss, data.bytes_per_token)
        if bpb is not None:
            out["bpb"] = bpb
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``step-*`` folder. Found by listing rather than read from the ``latest``
        pointer: a kill between the folder's rename and the pointer's leaves the pointer one behind."""
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return None
        done = [p for p in self.checkpoint_dir.glob("step-*")
                if (p / "trainer.pt").is_file() and (p / "model.safetensors").is_file()]
        return max(done, key=lambda p: p.name) if done else None

    def _point_latest(self, name: str) -> None:
        pointer_tmp = self.checkpoint_dir / f".latest-{os.getpid()}"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, self.checkpoint_dir / "latest")

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-XXXXXXXX/`` (model.safetensors, trainer.pt) atomically: into a
        temporary folder that is renamed into place, then the ``latest`` pointer is replaced."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self.checkpoint_dir is None:
            raise ValueError("save_checkpoint needs out_dir")
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = self.tuning.checkpoint_tensors(self.module, self.prepared,
                                                  get_model_state_dict(self.model, options=opts))
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        name = f"step-{self.step:08d}"
        final = self.checkpoint_dir / name
        if self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            meta = {"format": CHECKPOINT_FORMAT, "version": self.module.version,
                    "identity": self.module.identity.version, "config": json.dumps(self.module.config.to_dict()),
                    "tune": self.config.tune}
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"), metadata=meta)
            self.tuning.save_checkpoint_files(self.module, self.prepared, tmp)
            trainer_state = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "tokens": self.tokens,
                "elapsed": self.elapsed,
                "optimizer": optim_sd,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "history": self.history,
                "evals": self.evals,
                "config": self.config.to_dict(),
                "lr_anchor": list(self.lr_anchor) if self.lr_anchor else None,
            }
            if torch.cuda.is_available():
                trainer_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(trainer_state, tmp / "trainer.pt")
            _usual_permissions(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._point_latest(name)
            self._prune()
        distributed.barrier()
        self.last_checkpoint = str(final)
        return final

    def _prune(self) -> None:
        keep = max(1, self.config.keep_checkpoints)
        steps = sorted(p for p in self.checkpoint_dir.glob("step-*") if p.is_dir())
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, step, RNG states and history from a checkpoint folder."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(path)
        state = torch.load(path / "trainer.pt", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an rwkv_zoo training checkpoint (format {state.get('format')!r})")
        self._check_same_model(path)
        self._check_same_run(path, state)
        model_sd = self.tuning.resume_tensors(self.module, self.prepared, load_file(str(path / "model.safetensors")))
        opts = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.model, model_sd, options=opts)
        except RuntimeError as exc:  # shapes or keys: a checkpoint without the config metadata to compare
            raise ResumeError(f"the checkpoint {path} holds another model's weights ({str(exc).splitlines()[-1]}); "
                              f"resume with its model or start a new out_dir") from exc
        self.tuning.resume_files(self.module, self.prepared, path)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.history, self.evals = list(state["history"]), list(state["evals"])
        if self.lr_anchor is None and state.get("lr_anchor"):  # else this resume changed the steps again
            self.lr_anchor = tuple(state["lr_anchor"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_random_state(state["rng"]["python"]))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.last_checkpoint = str(path)

    def _one_step(self, cfg: TrainConfig, bar: Progress, window: list[tuple[float, int]], target: int,
                  every: int) -> None:
        t0 = time.perf_counter()
        rec = self.train_step()
        dt = time.perf_counter() - t0
        self.elapsed += dt
        window[:] = ([*window, (dt, cfg.batch_size * self.seq_len)])[-20:]
        tok_s = sum(n for _, n in window) / max(1e-9, sum(t for t, _ in window))
        bar.update(self.step, f"loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {tok_s:,.0f} tok/s")
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < target:
            metrics = self.evaluate()
            bar.note(f"{self.model_name} step {self.step}: eval " + _fmt_metrics(metrics))
        if self.checkpoint_dir is not None and every and self.step % every == 0:
            self.save_checkpoint()

    def _stop_requested(self, signum: int | None) -> bool:
        # Every rank must stop at the same step, or the others would wait forever in the next collective.
        if self.world > 1:
            return distributed.all_reduce_sum([1.0 if signum else 0.0])[0] > 0
        return signum is not None

    def _check_same_model(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            return
        old = {"version": meta.get("version"), **json.loads(meta["config"])}
        new = {"version": self.module.version, **json.loads(json.dumps(self.module.config.to_dict()))}
        diff = _differences(old, new, sorted(set(old) | set(new)))
        if diff:
            raise ResumeError(f"the checkpoint {path} holds another model ({diff}); resume with the model it was "
                              f"trained with, or start over with --overwrite or a new out_dir")

    def _check_same_run(self, path: Path, state: dict[str, Any]) -> None:
        cfg = self.config
        old = dict(state.get("config") or {})
        if not old:
            return
        new = cfg.to_dict()
        for d in (old, new):  # ctx_len: the default spelled out; meaningless (refused now) for a task
            d["ctx_len"] = None if cfg.uses_task else (d.get("ctx_len") or DEFAULT_CTX_LEN)
        changed = [n for n in RESUME_FIELDS if n in old and old[n] != new[n]]
        refused = [n for n in changed if n not in cfg.override]
        if refused:
            raise ResumeError(f"the run in {path.parent.parent} was started with other settings "
                              f"({_differences(old, new, refused)}); resume with the same ones, or allow the "
                              f"change with --override {','.join(refused)}")
        if state["step"] > cfg.steps:
            raise ResumeError(f"steps={cfg.steps} is below the {state['step']} steps the checkpoint {path} has "
                              f"done; give steps >= {state['step']}")
        self.overridden = {n: (old[n], new[n]) for n in changed}
        s0 = state["step"]
        if "steps" in changed and s0 >= cfg.warmup_steps:
            # Keep going from the rate the run had at s0 (its old step count, this run's other settings).
            before = replace(cfg, steps=old["steps"], resume=False, override=[], out_dir=None)
            anchor = tuple(state["lr_anchor"]) if state.get("lr_anchor") else None
            self.lr_anchor = (s0, lr_at(before, s0, anchor))

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None) -> TrainResult:
        """Train until ``steps`` (default ``config.steps``) steps are done, evaluating and saving as
        configured; a final evaluation always runs, then the tuning mode writes its files to out_dir."""
        cfg = self.config
        target = cfg.steps if steps is None else steps
        show = cfg.progress and self.rank == 0
        bar = Progress(target, enabled=show, log_every=cfg.log_every, prefix=f"{self.model_name} ")
        t_start = time.perf_counter()
        window: list[tuple[float, int]] = []
        every = cfg.checkpoint_interval()
        with _StopOnSignal() as stop:
            while self.step < target:
                self._one_step(cfg, bar, window, target, every)
                if self._stop_requested(stop.signum):
                    bar.close()
                    saved = self.last_checkpoint is not None and self.last_checkpoint.endswith(f"{self.step:08d}")
                    if self.checkpoint_dir is not None and not saved:
                        self.save_checkpoint()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step,
                                              self.last_checkpoint if self.checkpoint_dir is not None else None)
        bar.close()
        if self.evals and self.evals[-1]["step"] == self.step:
            final = {k: v for k, v in self.evals[-1].items() if k != "step"}
        else:
            final = self.evaluate()
        here = str(self.checkpoint_dir / f"step-{self.step:08d}") if self.checkpoint_dir is not None else None
        saved = self.last_checkpoint == here
        if self.checkpoint_dir is not None and not saved:
            self.save_checkpoint()
        files: list[str] = []
        if cfg.out_dir and self.rank == 0:
            files = [str(p) for p in self.tuning.finish(self.module, self.prepared, Path(cfg.out_dir))]
        distributed.barrier()
        wall = time.perf_counter() - t_start
        return TrainResult(
            config=cfg.to_dict(), model=self.model_name, identity=self.module.identity.version,
            params=self.module.num_parameters(), history=list(self.history), evals=list(self.evals),
            final=final, wall_s=wall, tokens=self.tokens,
            tokens_per_s=self.tokens / self.elapsed if self.elapsed > 0 else 0.0,
            checkpoint=self.last_checkpoint, files=files,
        )


def _fused_adamw(params: list[Tensor], device: str, world: int) -> bool | None:
    """``fused=True`` for a single-process CPU run: one C++ kernel per parameter instead of a dozen
    small ops each (the optimizer was 10-15 % of a step at the ablation shapes); its updates equal the
    for-loop implementation's within fp32 rounding (tests/kernels/test_cpu_train.py). Elsewhere the
    default (CUDA picks foreach itself; sharded parameters keep the reference path)."""
    if world != 1 or torch.device(device).type != "cpu":
        return None
    ok = all(type(p) is nn.Parameter and p.dtype in (torch.float32, torch.float64, torch.bfloat16) for p in params)
    return True if ok else None


def _direct_adamw_ok(opt: torch.optim.Optimizer) -> bool:
    """Whether ``_fused_adamw_step`` may stand in for ``opt.step()``: a fused AdamW on the CPU over fp32
    parameters, without the options it does not pass on."""
    return type(opt) is torch.optim.AdamW and all(
        g.get("fused") and not (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"])
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in g["params"])
        for g in opt.param_groups)


_ONE = torch.ones((), dtype=torch.float32)


def _fused_adamw_step(opt: torch.optim.Optimizer) -> bool:
    """``opt.step()`` then ``opt.zero_grad(set_to_none=True)`` of a fused CPU AdamW (``_direct_adamw_ok``)
    once its state exists: the same ``_fused_adamw_`` call per group after the same increment of the
    step counts, so the same result bit for bit (tests/train/test_train_trainer.py), without
    ``Optimizer.step``'s per-step Python (hooks, profiler scopes, state checks, grouping by device and
    dtype). With the zero_grad: 0.18 ms where they took 0.55 at the 2 x 64 v4 ablation shape, 0.39 where
    0.94 for v6 (one thread, CPU time). Returns False, having done nothing, before the first step
    (``opt.step()`` creates the state) or when a parameter with a gradient has none yet."""
    work = []
    for g in opt.param_groups:
        params = [p for p in g["params"] if p.grad is not None]
        states = [opt.state.get(p) for p in params]
        if not all(states):
            return False
        if params:
            work.append((g, params, states))
    # Optimizer.step's hooks run as there (rwkv_zoo.fused counts fused steps in one: they change the
    # weights without bumping version counters, and a cached inference step must see that)
    for hook in (*getattr(torch_optimizer, "_global_optimizer_pre_hooks", {}).values(),
                 *getattr(opt, "_optimizer_step_pre_hooks", {}).values()):
        hook(opt, (), {})
    for g, params, states in work:
        steps = [s["step"] for s in states]
        # + a list of one-element tensors: the same float32 sums as + 1, at 45 us instead of 180 for v4's
        # 42 step counts (the scalar overload converts the 1 for every tensor)
        torch._foreach_add_(steps, [_ONE] * len(steps))
        torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], steps, lr=g["lr"], beta1=g["betas"][0],
                            beta2=g["betas"][1], weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False,
                            maximize=False)
    for hook in (*getattr(opt, "_optimizer_step_post_hooks", {}).values(),
                 *getattr(torch_optimizer, "_global_optimizer_post_hooks", {}).values()):
        hook(opt, (), {})
    for _, params, _ in work:  # zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
    return True


class _StopOnSignal:
    """While active, SIGINT and SIGTERM ask the loop to stop at the next step boundary (``signum``);
    a second one stops at once, as if the handler were not there. Only the main thread may set signal
    handlers, so elsewhere (a trainer in a worker thread) this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (again to stop at "
              f"once)", file=sys.stderr, flush=True)


def _usual_permissions(folder: Path) -> None:
    """safetensors writes 0600 files; a checkpoint gets what any other file here gets (0666 less umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _differences(old: dict[str, Any], new: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{n} {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n))


def _as_random_state(obj: Any) -> tuple:
    """``random.getstate()`` comes back from ``torch.load`` with lists where it had tuples."""
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as field ``name`` of type ``hint`` takes it, or a ValueError naming field, type and value.

    By hand rather than with a validation library: a dozen plain types, and the one-line message is the
    point (``--set lr=abc`` arrives here as the string 'abc')."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint) or hint
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is dict and isinstance(value, dict):
        return value
    if origin is list:
        if isinstance(value, str):  # --set override=steps,batch_size
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
    if origin is tuple and isinstance(value, list | tuple) and len(value) == len(typing.get_args(hint)) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "a list of names", tuple: f"a list of {len(typing.get_args(hint))} numbers"}
    kind = kinds.get(origin, str(hint))
    if len(args) > 1:
        kind += " (or none)"
    raise ValueError(f"train option {name} must be {kind}, got {value!r}")


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(config: TrainConfig | dict[str, Any], **overrides: Any) -> TrainResult:
    """Train with a config (or a dict of its fields) plus keyword overrides; returns the result."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict({**config, **overrides})
    elif overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    return Trainer(config).fit()
