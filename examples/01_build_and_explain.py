"""Build every RWKV version and ask which kernels it would run.

Shows:
- ``rwkv_zoo.build("v6-tiny")``: a small real model of each version (v4, v5, v6, v7), with its
  parameter count, and a forward pass;
- ``rwkv_zoo.build("v6-1.5B", device="meta")``: the 24 x 2048 shape of every version, built on the
  meta device in a fraction of a second with no memory for weights, and its parameter count;
- ``rwkv_zoo.explain(model, (B, T))``: the kernel each layer would run, who decided and why,
  for a training-length input on the CPU and for one decoding step.

Run: ``python examples/01_build_and_explain.py``
"""

from __future__ import annotations

import time

import torch

import rwkv_zoo


def main() -> None:
    print(f"rwkv_zoo {rwkv_zoo.__version__}; versions: {', '.join(rwkv_zoo.list_versions())}\n")

    print("== tiny models (real weights, official initialisation) ==")
    for version in rwkv_zoo.list_versions():
        model = rwkv_zoo.build(f"{version}-tiny")
        tokens = torch.randint(0, model.config.vocab_size, (2, 20))
        with torch.no_grad():
            logits, state = model(tokens)
        print(f"{version}-tiny: {model.num_parameters():,} parameters; tokens {list(tokens.shape)} -> "
              f"logits {list(logits.shape)}; state {state}")

    print("\n== 1.5B shapes on the meta device (no weights allocated) ==")
    for version in rwkv_zoo.list_versions():
        if not any(p.name == "1.5B" for p in rwkv_zoo.registry.get_version(version).sizes):
            print(f"{version}: no 1.5B preset (its releases are other sizes)")
            continue
        t0 = time.perf_counter()
        model = rwkv_zoo.build(version, size="1.5B", device="meta")
        ms = (time.perf_counter() - t0) * 1e3
        cfg = model.config
        print(f"{version}-{model.size_name}: {cfg.n_layer} x {cfg.n_embd}, vocab {cfg.vocab_size}: "
              f"{model.num_parameters() / 1e9:.3f}B parameters (built in {ms:.0f} ms)")

    print("\n== explain: a 4 x 1024 training batch in bfloat16, on the CPU ==")
    model = rwkv_zoo.build("v7-1.5B", device="meta")
    print(rwkv_zoo.explain(model, (4, 1024), device="cpu", dtype=torch.bfloat16, requires_grad=True))

    print("\n== explain: one decoding step carrying a state ==")
    print(rwkv_zoo.explain(model, (1, 1), device="cpu", requires_grad=False, has_state=True))


if __name__ == "__main__":
    main()
