"""Training: ``Trainer``/``TrainConfig`` (official optimizer groups, schedules, L2Wrap, infctx, bf16,
checkpoints with exact resume, DDP/FSDP2 under torchrun) and the ``ablate`` harness.

    from rwkv_zoo.train import TrainConfig, train
    result = train(TrainConfig(model="v6-tiny", data={"task": "mqar"}, steps=300))

Command line: ``rwkv-zoo train``, ``rwkv-zoo ablate``; multi-process:
``torchrun --nproc_per_node=N -m rwkv_zoo.train --config run.toml``.
"""

from __future__ import annotations

from rwkv_zoo.train.infctx import chunked_backward
from rwkv_zoo.train.l2wrap import L2Wrap, l2wrap, l2wrap_scale
from rwkv_zoo.train.trainer import (
    TrainConfig,
    Trainer,
    TrainResult,
    enable_gradient_checkpointing,
    lr_at,
    train,
)

__all__ = [
    "L2Wrap",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "chunked_backward",
    "enable_gradient_checkpointing",
    "l2wrap",
    "l2wrap_scale",
    "lr_at",
    "train",
]
