"""torch.distributed on an existing engine: DDP or FSDP2 (``fully_shard``), launched by torchrun.

``torchrun --nproc_per_node=N -m rwkv_zoo.train ...`` sets ``RANK``/``WORLD_SIZE``; ``init()`` then
starts the process group (gloo on a CPU, nccl on CUDA). Every rank builds the same model from the same
seed and generates the same global batch, then keeps its own rows (``shard_rows``), so a run on N
processes sees exactly the batches of a run on one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "cpu") -> tuple[int, int]:
    """Start the process group when launched by torchrun with more than one process: (rank, world)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if env_world_size() <= 1:
        return 0, 1
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, mode: str) -> tuple[nn.Module, Callable[[bool], Any]]:
    """Wrap ``model`` for ``mode`` (``ddp``, ``fsdp``, ``none``); returns the module to call and
    ``sync(last)``, the context manager that lets only the last backward of a step reduce gradients."""
    if mode not in MODES:
        raise ValueError(f"distributed={mode!r}: use one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "ddp" if active() else "none"
    if mode == "none" and active():
        n = dist.get_world_size()
        raise ValueError(f"distributed='none' with {n} processes would train {n} unsynchronised copies; "
                         f"use 'ddp' or 'fsdp' (or 'auto')")
    if not active():
        return model, lambda last: contextlib.nullcontext()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        return ddp, lambda last: contextlib.nullcontext() if last else ddp.no_sync()
    # FSDP2: shard each block, then the root (embedding, ln_out, head).
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)

    @contextlib.contextmanager
    def sync(last: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(last)
        yield

    return model, sync


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (float64; unchanged without a process group)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def shard_rows(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch (the batch size must divide evenly)."""
    if world == 1:
        return x
    n = x.shape[0]
    if n % world:
        raise ValueError(f"batch size {n} does not divide over {world} processes")
    per = n // world
    return x[rank * per : (rank + 1) * per]
