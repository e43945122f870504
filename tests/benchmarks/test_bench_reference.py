"""Reference kernel and model benchmarks (pytest-benchmark; skipped in the default run).

Run: ``python -m pytest tests/benchmarks --benchmark-enable --benchmark-only``. Groups are named
``<op>-<mode>-<dtype>`` so chunk and recurrent of one op sit side by side; compare ratios within
one run, never absolute times across runs (shared, noisy machines).
"""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo

B, T, H, N = 1, 256, 4, 64


def _inputs(op: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if op == "wkv4":
        C = H * N
        return (-torch.exp(rnd(C)), rnd(C), rnd(B, T, C), rnd(B, T, C))
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    if op == "wkv5":
        return (r, k, v, -torch.exp(rnd(H, N)), rnd(H, N))
    if op == "wkv6":
        return (r, k, v, -torch.exp(rnd(B, T, H, N)), rnd(H, N))
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a = torch.sigmoid(rnd(B, T, H, N))
    return (r, -0.6065 * torch.sigmoid(rnd(B, T, H, N)), k, v, -kk, kk * a)


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("op", ["wkv4", "wkv5", "wkv6", "wkv7"])
def test_reference_forward(benchmark, op, mode):
    benchmark.group = f"{op}-{mode}-float32"
    fn = rwkv_zoo.ops.OP_FUNCTIONS[op]
    args = _inputs(op)
    with torch.no_grad():
        benchmark(lambda: fn(*args, mode=mode, backend="reference"))


@pytest.mark.benchmark
@pytest.mark.parametrize("version", ["v4", "v5", "v6", "v7"])
def test_small_model_prefill_and_decode(benchmark, version):
    benchmark.group = f"model-small-{version}"
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="small"), seed=0).eval()
    toks = torch.randint(0, 1024, (1, 128))

    def run():
        with torch.no_grad():
            _, state = model(toks)
            for t in range(8):
                _, state = model(toks[:, t : t + 1], state)

    benchmark(run)
