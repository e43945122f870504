"""CPU training throughput (forward + backward) of tiny rwkv_zoo models against HF transformers' RWKV-4.

    python tests/train/bench_train_vs_hf.py [--T 512] [--batch 4] [--threads 1] [--reps 5]

Same width and depth for every model (the tiny preset: 2 layers x 64, vocabulary 256); HF's
``RwkvForCausalLM`` runs its CPU path, which loops over time in Python. Median of ``reps`` timed
steps after two warm-up steps, all in one process on the same machine (PERF.md: compare ratios from one
run). Not collected by pytest (a measurement, not a test); needs ``transformers``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def step_time(forward, tokens: torch.Tensor, params, reps: int) -> float:
    def step():
        logits = forward(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
        for p in params:
            p.grad = None

    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import RwkvConfig, RwkvForCausalLM

    import rwkv_zoo

    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.T))
    rows = []
    for name in ("v6-tiny", "v4-tiny", "v7-tiny"):
        model = rwkv_zoo.randomize_(rwkv_zoo.build(name), 0)
        dt = step_time(lambda x, m=model: m(x)[0], tokens, list(model.parameters()), args.reps)
        rows.append((f"rwkv_zoo {name}", model.num_parameters(), dt))
    cfg = rwkv_zoo.build("v4-tiny").config
    hf = RwkvForCausalLM(RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                    num_hidden_layers=cfg.n_layer, attention_hidden_size=cfg.n_embd,
                                    intermediate_size=cfg.dim_ffn, context_length=args.T))
    hf.train()
    dt = step_time(lambda x: hf(x).logits, tokens, list(hf.parameters()), max(1, args.reps // 2))
    rows.append((f"HF transformers {transformers.__version__} RwkvForCausalLM (RWKV-4)",
                 sum(p.numel() for p in hf.parameters()), dt))
    ntok = args.batch * args.T
    base = rows[-1][2]
    print(f"fwd+bwd, B={args.batch}, T={args.T}, {args.threads} torch thread(s), torch {torch.__version__}")
    print(f"{'model':58s} {'params':>8s} {'ms/step':>9s} {'tokens/s':>9s} {'vs HF':>6s}")
    for label, n, dt in rows:
        print(f"{label:58s} {n:8,d} {dt * 1e3:9.1f} {ntok / dt:9,.0f} {base / dt:5.1f}x")


if __name__ == "__main__":
    main()
