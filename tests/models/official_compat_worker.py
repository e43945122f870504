"""Run in a subprocess by test_official_compat.py: compare rwkv_zoo with BlinkDL's ``rwkv`` package.

Builds a random checkpoint in the official layout with rwkv_zoo, saves it as an official ``.pth``,
loads it in the package (strategy ``cpu fp32``), and prints JSON with the relative logit errors of a
prompt and of 8 decode steps with the state carried. A subprocess because the package picks v7 with
the ``RWKV_V7_ON`` environment variable at import time.
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("RWKV_JIT_ON", "0")


def main(version: str, workdir: str, prompt_len: int = 40, decode_steps: int = 8) -> None:
    import rwkv_zoo

    torch.manual_seed(0)
    dims = {"n_layer": 3, "n_embd": 128, "vocab_size": 300}
    if version != "v4":
        dims["head_size"] = 64
    model = rwkv_zoo.build(version, **dims)
    rwkv_zoo.randomize_(model, seed=1)
    model.eval()
    path = os.path.join(workdir, f"{version}.pth")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)

    if version == "v7":
        os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV as OfficialRWKV

    official = OfficialRWKV(model=path[: -len(".pth")], strategy="cpu fp32")
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, dims["vocab_size"], (prompt_len,), generator=gen).tolist()

    ref_logits, ref_state = official.forward(prompt, None, full_output=True)
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt]))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    result = {"prompt": rel(logits[0].float(), ref_logits.float()), "decode": []}
    for _ in range(decode_steps):
        tok = int(torch.randint(0, dims["vocab_size"], (1,), generator=gen))
        ref_out, ref_state = official.forward([tok], ref_state)
        with torch.no_grad():
            out, state = model(torch.tensor([[tok]]), state)
        result["decode"].append(rel(out[0, -1].float(), ref_out.float()))
    print(f"RESULT {version} " + json.dumps(result))


if __name__ == "__main__":
    # v4-v6 share one package class; v7 needs RWKV_V7_ON before import, so it runs in its own process.
    for v in sys.argv[1].split(","):
        main(v, sys.argv[2])
