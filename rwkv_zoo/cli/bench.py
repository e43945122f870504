"""``rwkv-zoo bench``: the flags and checks of the command; ``rwkv_zoo.bench`` does the measuring."""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from rwkv_zoo.cli._helpers import WEIGHTS, UsageError, load_model


def cmd_bench(args: argparse.Namespace) -> int:
    from rwkv_zoo.bench import BenchOptions, report

    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    batches = sorted({int(b) for b in args.batch.split(",")})
    for w in weights:
        if w != "default" and w not in WEIGHTS:
            raise UsageError(f"--weights takes default, {', '.join(WEIGHTS)}; got {w!r}")
    if any(b < 1 for b in batches) or args.prefill < 0 or args.decode < 1 or args.repeat < 1:
        raise UsageError("--batch values, --decode and --repeat must be >= 1, --prefill >= 0")
    opts = BenchOptions(model=args.model, threads=args.threads, prefill=args.prefill, decode=args.decode,
                        long=args.long, repeat=args.repeat, compare_official=args.compare_official, kl=args.kl,
                        json=args.json, compare_llamacpp=_llamacpp_files(args.compare_llamacpp or []))
    spec, tmp = args.model, None
    if args.compare_official and not os.path.exists(spec):
        # Both implementations must read the same file: write the random model once.
        import rwkv_zoo

        tmp = tempfile.TemporaryDirectory(prefix="rwkv-zoo-bench-")
        path = os.path.join(tmp.name, "model.pth")
        rwkv_zoo.save(load_model(spec), path)
        spec = path
    try:
        return report(opts, spec, weights, batches)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _llamacpp_files(files: list[str]) -> tuple[str, ...]:
    """--compare-llamacpp: GGUF files that exist, and llama-cpp-python to run them."""
    if not files:
        return ()
    for f in files:
        if not os.path.isfile(f):
            raise UsageError(f"--compare-llamacpp {f}: no such file (write one with: rwkv-zoo convert MODEL {f})")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UsageError("--compare-llamacpp needs llama-cpp-python, which is not installed "
                         "(pip install llama-cpp-python; it compiles llama.cpp)") from None
    return tuple(os.path.abspath(f) for f in files)


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="decode/prefill tok/s and peak RSS; --compare-official runs the rwkv package too")
    p.add_argument("model", help="checkpoint file, or a model name (random weights, e.g. v4-pile-169M)")
    p.add_argument("--weights", default="default",
                   help="comma list of default (the model as loaded: fused step from fp32 weights), fp32, bf16, "
                        "int8, int4 (prepare_inference)")
    p.add_argument("--batch", default="1", help="comma list of decode batch sizes (default 1)")
    p.add_argument("--prefill", type=int, default=512, help="prefill length (0 skips it)")
    p.add_argument("--decode", type=int, default=64, help="decode steps timed per batch size")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compare-official", action="store_true", help="also run BlinkDL's rwkv package (cpu fp32/bf16)")
    p.add_argument("--compare-llamacpp", action="append", metavar="FILE.gguf",
                   help="also run llama.cpp (llama-cpp-python) on this GGUF, same threads, batch 1; repeatable "
                        "(e.g. F32, Q8_0 and Q4_0 files from `rwkv-zoo convert MODEL out.gguf --gguf-type q4_0`)")
    p.add_argument("--kl", action="store_true", help="mean next-token KL of bf16/int8/int4 weights against fp32, "
                                                     "and of llama.cpp on each --compare-llamacpp file")
    p.add_argument("--long", type=int, default=0, metavar="N",
                   help="decode N more steps at batch 1 and report RSS after 100 and after N")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every configuration N times, round-robin, and report medians (noisy machines)")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=cmd_bench)
