"""Peak memory of loading a large checkpoint, against its file size (a script, not a test).

    python tests/benchmarks/load_rss.py make v6-1.5B /tmp/ckpt        # writes .pth and .safetensors (bf16)
    python tests/benchmarks/load_rss.py load /tmp/ckpt/v6-1.5B.pth     # prints peak RSS / file size

``load`` runs in a fresh process so ``ru_maxrss`` is the load's own peak. With mmap and
``assign=True`` the weights should exist once: the ratio should stay near 1 (plus torch itself).
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch


def make(name: str, out: str) -> None:
    import rwkv_zoo

    os.makedirs(out, exist_ok=True)
    model = rwkv_zoo.build(name, device="meta")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k, p in model.state_dict().items():
        tensors[k] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
    torch.save(tensors, os.path.join(out, f"{name}.pth"))
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(out, f"{name}.safetensors"), metadata={"format": "pt"})


def load(path: str) -> None:
    import rwkv_zoo

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = rwkv_zoo.load(path)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = os.path.getsize(path)
    print(f"{os.path.basename(path)}: file {size / 2**30:.2f} GiB, load {dt:.1f} s, peak RSS {peak / 2**30:.2f} GiB "
          f"(before load {base / 2**30:.2f} GiB), peak/file = {peak / size:.2f}, "
          f"(peak - before)/file = {(peak - base) / size:.2f}")


if __name__ == "__main__":
    {"make": make, "load": load}[sys.argv[1]](*sys.argv[2:])
