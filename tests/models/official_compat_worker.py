"""Run in a subprocess by test_official_compat.py: compare rwkv_zoo with BlinkDL's ``rwkv`` package.

Builds a random model in the official layout, writes it with ``rwkv_zoo.save`` as an official
``.pth``, loads that file both with ``rwkv_zoo.load`` and in the package (strategy ``cpu fp32``), and
prints JSON with the relative logit errors of a prompt and of 8 decode steps with the state carried.
For v5 and v6 (the versions whose package class reads state-tuning keys) a second file carries
random ``blocks.N.att.time_state`` tensors. A subprocess because the package picks v7 with the
``RWKV_V7_ON`` environment variable at import time.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("RWKV_JIT_ON", "0")


def compare(official, ours, vocab: int, prompt_len: int = 40, decode_steps: int = 8, official_state=None) -> dict:
    """Relative errors of our logits against the package's: the prompt on the default inference path
    (the fused step where one applies), on the modules (``fused_step=False``: per-layer kernels from
    dispatch), and with gradients on (the training path: chunked kernels with a backward), then
    ``decode_steps`` tokens one at a time with both states carried."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
    ref_logits, ref_state = official.forward(prompt, official_state, full_output=True)
    rel = lambda a, b: float((a.detach() - b).norm() / b.norm())  # noqa: E731
    ref = ref_logits.float()
    with torch.no_grad():
        logits, state = ours(torch.tensor([prompt]))
        ours.fused_step = False
        modules, _ = ours(torch.tensor([prompt]))
        ours.fused_step = True
    with torch.enable_grad():
        train, _ = ours(torch.tensor([prompt]))
        assert train.requires_grad  # the training path really ran
    result = {"prompt": rel(logits[0].float(), ref), "prompt_modules": rel(modules[0].float(), ref),
              "prompt_train": rel(train[0].float(), ref), "decode": []}
    for _ in range(decode_steps):
        tok = int(torch.randint(0, vocab, (1,), generator=gen))
        ref_out, ref_state = official.forward([tok], ref_state)
        with torch.no_grad():
            out, state = ours(torch.tensor([[tok]]), state)
        result["decode"].append(rel(out[0, -1].float(), ref_out.float()))
    return result


def main(version: str, workdir: str) -> None:
    import rwkv_zoo

    dims = {"n_layer": 3, "n_embd": 128, "vocab_size": 300}
    if version != "v4":
        dims["head_size"] = 64
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, **dims), seed=1).eval()
    path = os.path.join(workdir, f"{version}.pth")
    rwkv_zoo.save(model, path)  # the official layout, written by us
    files = {"plain": path}
    if version in ("v5", "v6", "v7"):
        g = torch.Generator().manual_seed(3)
        tuned = torch.load(path, weights_only=True)
        for i in range(dims["n_layer"]):
            tuned[f"blocks.{i}.att.time_state"] = torch.randn(2, 64, 64, generator=g)
        files["time_state"] = os.path.join(workdir, f"{version}-tuned.pth")
        torch.save(tuned, files["time_state"])

    if version == "v7":
        os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV as OfficialRWKV

    for kind, file in files.items():
        official = OfficialRWKV(model=file[: -len(".pth")], strategy="cpu fp32")
        ours = rwkv_zoo.load(file)
        start = None
        if version == "v7" and kind == "time_state":
            # The package's x070 class ignores time_state keys: hand it the tuned state as its initial
            # state, in its own layout ([H, V, K] per layer, which is how the file stores it).
            tuned = torch.load(file, weights_only=True)
            start = official.generate_zero_state()
            for i in range(dims["n_layer"]):
                start[i * 3 + 1] = tuned[f"blocks.{i}.att.time_state"].float().contiguous()
        result = compare(official, ours, dims["vocab_size"], official_state=start)
        print(f"RESULT {version}/{kind} " + json.dumps(result))


if __name__ == "__main__":
    # v4-v6 share one package class; v7 needs RWKV_V7_ON before import, so it runs in its own process.
    for v in sys.argv[1].split(","):
        main(v, sys.argv[2])
