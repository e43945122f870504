"""``rwkv-zoo bench``: decode and prefill speed and peak memory on this machine, optionally side by side
with BlinkDL's ``rwkv`` package on the same checkpoint file, and with llama.cpp (llama-cpp-python) on
GGUF files converted from it (``--compare-llamacpp``).

Every configuration runs in a fresh subprocess, so its peak RSS is its own and one run's caches do not
help the next. The parent measures the machine first (fp32 GEMM throughput at the model's FFN shape
and the memory read bandwidth) and reports each result against the floor it implies:

- decode floor = bytes of weights read per token (every matrix except the embedding, which is a row
  lookup) / read bandwidth; ``x floor`` = measured time / floor (1.0 is the hardware limit);
- prefill ``% GEMM`` = (2 x matrix parameters per token) x tokens/s / measured GEMM FLOP/s.

Prefill runs one forward of ``--prefill`` tokens from the empty state and keeps the last logits (what
the package's ``forward`` returns); decode feeds the argmax token back for ``--decode`` steps after a
warm-up, at each ``--batch``. ``--kl`` adds the mean KL divergence of each weight format's next-token
distribution from fp32 (bf16, int8, int4) over a prompt and its continuation, and of llama.cpp's on each
``--compare-llamacpp`` GGUF (e.g. Q4_0) over the same tokens, against the same fp32 reference. The CPU
kernels' instruction set (``RWKV_ZOO_CPU_ISA``, inherited by the workers) is named in the header. Times
are medians over ``--repeat`` rounds (odd rounds run the configurations in reverse order); ratios are only
meaningful within one run (shared machines drift), and those against llama.cpp are paired by round: each
of our weight formats over the llama.cpp file of the same precision (``LLAMACPP_COUNTERPART``).

This module measures and reports; ``rwkv_zoo.cli.bench`` turns the command's flags into ``report``'s
arguments. ``python -m rwkv_zoo.bench KIND JSON`` is the worker entry point.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

RESULT = "RESULT "


# ---------------------------------------------------------------------------------------------------
# Measurements (run inside worker subprocesses)


def load_model(spec: str):
    """A checkpoint path, or a model name built with random weights (seed 0, as the CLI builds it)."""
    import rwkv_zoo

    if os.path.exists(spec):
        return rwkv_zoo.load(spec)
    return rwkv_zoo.randomize_(rwkv_zoo.build(spec), 0).eval()


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer except the embedding table."""
    total = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if not name.startswith("emb."):
            total += t.numel() * t.element_size()
    return total


def _matrix_params(model) -> int:
    n = 0
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.dim() >= 2 and not name.startswith(("emb.", "head.")) and not name.endswith("scale"):
            n += 2 * t.numel() if t.dtype == torch.uint8 else t.numel()  # uint8: packed int4, 2 per byte
    return n


def ours(spec: str, weights: str, batches: list[int], prefill: int, decode: int, threads: int,
         long_steps: int = 0) -> dict:
    from rwkv_zoo.inference import prepare_inference

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # "default": the model as rwkv_zoo.load gives it (fp32 parameters, the fused step built on first use)
    model = load_model(spec) if weights == "default" else prepare_inference(load_model(spec), weights)
    out: dict = {"impl": "rwkv_zoo", "weights": weights, "load_s": time.perf_counter() - t0}
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    out["weight_bytes"] = _weight_bytes(model)
    out["matrix_params"] = _matrix_params(model)
    with torch.no_grad():
        if prefill:
            toks = torch.randint(0, V, (1, prefill), generator=g)
            model(toks[:, :16], logits_to_keep=1)  # warm-up
            out["prefill_s"] = _timed(lambda: model(toks, logits_to_keep=1), 3)
        out["decode"] = {}
        for B in batches:
            logits, state = model(torch.randint(0, V, (B, 8), generator=g), logits_to_keep=1)
            tok = logits[:, -1:].argmax(-1)
            for _ in range(4):
                logits, state = model(tok, state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(decode):
                t = time.perf_counter()
                logits, state = model(tok, state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t)
            out["decode"][str(B)] = statistics.median(times)
        if long_steps:
            tok, state = tok[:1], state.select(0)
            rss = {}
            for i in range(1, long_steps + 1):
                logits, state = model(tok, state)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                if i in (100, long_steps):
                    rss[str(i)] = _rss_now()
            out["rss_after"] = rss
    from rwkv_zoo import fused

    out["step"] = fused.select(model, fused.StepCall("cpu", model.dtype, 1, 1)).describe()
    out["peak_rss"] = _peak_rss()
    return out


def official(path: str, version: str, vocab: int, weights: str, prefill: int, decode: int, threads: int) -> dict:
    """BlinkDL's ``rwkv`` package (strategy ``cpu fp32`` / ``cpu bf16``, JIT on), batch 1."""
    os.environ.setdefault("RWKV_JIT_ON", "1")
    if version == "v7":
        os.environ["RWKV_V7_ON"] = "1"
    torch.set_num_threads(threads)
    from rwkv.model import RWKV

    t0 = time.perf_counter()
    model = RWKV(model=path.removesuffix(".pth"), strategy=f"cpu {weights}")
    out: dict = {"impl": "rwkv package", "weights": weights, "load_s": time.perf_counter() - t0}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if prefill:
            toks = torch.randint(0, vocab, (prefill,), generator=g).tolist()
            model.forward(toks[:16], None)
            out["prefill_s"] = _timed(lambda: model.forward(toks, None), 3)
        logits, state = model.forward(torch.randint(0, vocab, (8,), generator=g).tolist(), None)
        tok = int(logits.argmax())
        for _ in range(4):
            logits, state = model.forward([tok], state)
            tok = int(logits.argmax())
        times = []
        for _ in range(decode):
            t = time.perf_counter()
            logits, state = model.forward([tok], state)
            tok = int(logits.argmax())
            times.append(time.perf_counter() - t)
        out["decode"] = {"1": statistics.median(times)}
    out["peak_rss"] = _peak_rss()
    return out


def llamacpp(path: str, prefill: int, decode: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python on a GGUF file (``rwkv-zoo convert MODEL out.gguf``), batch 1,
    measured as ``ours`` is: prefill = one evaluation of ``prefill`` tokens from an empty state (median
    of 3 after a 16-token warm-up), decode = the argmax fed back one token at a time after an 8-token
    prompt and 4 warm-up steps. ``n_threads`` and ``n_threads_batch`` are ``threads``, as torch's are."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(prefill, 16 + decode) + 64, n_batch=max(prefill, 16),
                          n_ubatch=max(prefill, 16), n_threads=threads, n_threads_batch=threads, verbose=False)
    out: dict = {"impl": "llama.cpp", "weights": _gguf_file_type(path), "load_s": time.perf_counter() - t0,
                 "weight_bytes": _gguf_step_bytes(path), "file": os.path.basename(path)}
    V = llm.n_vocab()
    g = torch.Generator().manual_seed(0)

    def run(tokens: list[int]) -> int:
        llm.eval(tokens)
        # llm.scores is filled only with logits_all=True (every position's logits copied): read the last
        # position's row from llama.cpp directly, as ours keeps only the last logits
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(V,))
        return int(np.argmax(last))

    def from_empty(tokens: list[int]) -> int:
        llm.reset()  # the next eval removes the sequence, so the recurrent state starts empty
        return run(tokens)

    if prefill:
        toks = torch.randint(0, V, (prefill,), generator=g).tolist()
        from_empty(toks[:16])
        out["prefill_s"] = _timed(lambda: from_empty(toks), 3)
    tok = from_empty(torch.randint(0, V, (8,), generator=g).tolist())
    for _ in range(4):
        tok = run([tok])
    times = []
    for _ in range(decode):
        t = time.perf_counter()
        tok = run([tok])
        times.append(time.perf_counter() - t)
    out["decode"] = {"1": statistics.median(times)}
    out["peak_rss"] = _peak_rss()
    return out


def _gguf_file_type(path: str) -> str:
    """The file type a GGUF's matrices have (``general.file_type``), e.g. F32 or Q8_0; else the file name."""
    try:
        import gguf

        ftype = gguf.GGUFReader(path).fields["general.file_type"].contents()
        return gguf.LlamaFileType(ftype).name.removeprefix("ALL_").removeprefix("MOSTLY_")
    except Exception:  # an older gguf package or a file without the key: the row still gets a label
        return os.path.basename(path)[:7]


def _gguf_step_bytes(path: str) -> int:
    """Bytes a decode step reads from a GGUF: every tensor but the embedding (a row lookup), as
    ``_weight_bytes`` counts ours; 0 when the gguf package is missing (no ``x floor`` then)."""
    try:
        import gguf
    except ImportError:
        return 0
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def kl(spec: str, weights: list[str], tokens: int, threads: int, gguf: list[str] = ()) -> dict:
    """Mean KL(fp32 || weights) of the next-token distributions over a prompt and its greedy continuation;
    each of ``gguf`` (llama.cpp through llama-cpp-python) is measured against the same fp32 reference on
    the same tokens, keyed ``"llama.cpp TYPE (file name)"``."""
    from rwkv_zoo.inference import prepare_inference

    torch.set_num_threads(threads)
    base = load_model(spec)
    V = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (1, tokens), generator=g)

    def run(model):
        # The prompt in one forward, then the same tokens again one at a time (the decode path).
        with torch.no_grad():
            full, _ = model(prompt)
            state, steps = None, []
            for t in range(prompt.shape[1]):
                lo, state = model(prompt[:, t : t + 1], state)
                steps.append(lo)
        return torch.log_softmax(full[0].float(), -1), torch.log_softmax(torch.cat(steps, 1)[0].float(), -1)

    def divergence(ref, other) -> float:
        return (ref.exp() * (ref - other)).sum(-1).mean().item()

    ref_full, ref_step = run(prepare_inference(base, "fp32"))
    out = {}
    for w in weights:
        if w == "fp32":
            continue
        model = prepare_inference(load_model(spec), w)
        full, step = run(model)
        out[w] = {"prefill": divergence(ref_full, full), "decode": divergence(ref_step, step)}
        del model
    for path in gguf:
        full, step = _llamacpp_logprobs(path, prompt[0].tolist(), V, threads)
        out[f"llama.cpp {_gguf_file_type(path)} ({os.path.basename(path)})"] = {
            "prefill": divergence(ref_full, full), "decode": divergence(ref_step, step)}
    return out


def _llamacpp_logprobs(path: str, tokens: list[int], vocab: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's next-token log-probabilities [T, V] at every position of ``tokens``: the prompt in one
    evaluation, then one token at a time from an empty state (as ``kl`` runs ours)."""
    import llama_cpp
    import numpy as np

    T = len(tokens)
    # logits_all: llama-cpp-python copies every position's logits into llm.scores (row i = after token i)
    llm = llama_cpp.Llama(model_path=path, n_ctx=T + 16, n_batch=T, n_ubatch=T, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    if llm.n_vocab() != vocab:
        raise ValueError(f"{path}: llama.cpp's vocabulary is {llm.n_vocab()} tokens, the model's {vocab}; "
                         f"convert the GGUF from the benchmarked checkpoint")
    llm.eval(tokens)
    full = np.array(llm.scores[:T], dtype=np.float32)
    llm.reset()  # the next eval removes the sequence: the recurrent state starts empty
    for t in tokens:
        llm.eval([t])
    step = np.array(llm.scores[:T], dtype=np.float32)
    return (torch.log_softmax(torch.from_numpy(full), -1), torch.log_softmax(torch.from_numpy(step), -1))


def machine(C: int, F: int, threads: int) -> dict:
    """fp32 GEMM FLOP/s at the prefill FFN shape [512, C] x [C, F], and read bandwidth (sum of 1 GiB)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, C), torch.randn(C, F)
    torch.mm(a, b)
    t = _timed(lambda: torch.mm(a, b), 7)
    big = torch.ones(1 << 28)  # 1 GiB of fp32
    big.sum()
    r = _timed(lambda: big.sum(), 5)
    return {"gemm_flops": 2 * 512 * C * F / t, "read_bytes_per_s": big.numel() * 4 / r}


# ---------------------------------------------------------------------------------------------------
# The report (``rwkv-zoo bench``, rwkv_zoo.cli.bench, parses the flags into BenchOptions)


@dataclass(frozen=True)
class BenchOptions:
    """What ``report`` measures besides the model and weight formats; the fields are the CLI's flags."""

    model: str  # as the user named it (the report's title)
    threads: int
    prefill: int = 512
    decode: int = 64
    long: int = 0
    repeat: int = 1
    compare_official: bool = False
    compare_llamacpp: tuple[str, ...] = ()  # GGUF files llama.cpp runs in the same table
    kl: bool = False
    json: str | None = None


def _run_worker(kind: str, kwargs: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "rwkv_zoo.bench", kind, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    raise RuntimeError(f"bench worker {kind} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(args: BenchOptions, spec: str, weights: list[str], batches: list[int]) -> int:
    """Measure the machine, run every configuration ``args.repeat`` times and print the table.

    ``spec`` is a checkpoint path or a model name; ``args.compare_official`` needs a path (the package
    reads files only).
    """
    import rwkv_zoo
    from rwkv_zoo.backends.cpu import kernels as cpu_kernels

    meta = rwkv_zoo.load(spec) if os.path.exists(spec) else rwkv_zoo.build(spec, device="meta")  # mmap: cheap
    c = meta.config
    print(f"model {args.model}: {meta.version}, {c.n_layer} x {c.n_embd}, vocab {c.vocab_size}; "
          f"threads {args.threads}; CPU kernels: {cpu_kernels.unavailable_reason() or cpu_kernels.describe_isa()}")
    mach = _run_worker("machine", {"C": c.n_embd, "F": c.dim_ffn, "threads": args.threads}, 600)
    print(f"machine: fp32 GEMM {mach['gemm_flops'] / 1e9:.0f} GFLOP/s at [512, {c.n_embd}] x "
          f"[{c.n_embd}, {c.dim_ffn}]; read bandwidth {mach['read_bytes_per_s'] / 1e9:.1f} GB/s")
    common = {"prefill": args.prefill, "decode": args.decode, "threads": args.threads}
    jobs = [("ours", {"spec": spec, "weights": w, "batches": batches, "long_steps": args.long, **common})
            for w in weights]
    if args.compare_official:
        jobs += [("official", {"path": spec, "version": meta.version, "vocab": c.vocab_size, "weights": w, **common})
                 for w in ("fp32", "bf16") if w in weights or w == "fp32"]
    jobs += [("llamacpp", {"path": f, **common}) for f in args.compare_llamacpp]
    # Round-robin repeats: on a shared machine load drifts over minutes, so every configuration gets
    # samples from every period, and each number is the median over repeats. Odd rounds run the jobs in
    # reverse order, so a drift inside a round favours neither the first configurations nor the last.
    runs: list[list[dict]] = [[] for _ in jobs]
    for rnd in range(args.repeat):
        order = range(len(jobs)) if rnd % 2 == 0 else reversed(range(len(jobs)))
        for i in order:
            kind, kwargs = jobs[i]
            runs[i].append(_run_worker(kind, kwargs, 3600))
    rows = [_merge(r) for r in runs]
    pairs = paired_ratios(jobs, runs)
    kls = _run_worker("kl", {"spec": spec, "weights": weights, "tokens": 64, "threads": args.threads,
                             "gguf": list(args.compare_llamacpp)}, 3600) if args.kl else {}
    _print_table(rows, mach, batches, kls, args)
    _print_pairs(pairs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "rows": rows, "kl": kls, "model": args.model, "vs_llamacpp": pairs},
                      f, indent=1)
    return 0


# Which llama.cpp file types answer which of our weight formats (same bits per weight, roughly).
LLAMACPP_COUNTERPART = {"fp32": ("F32",), "bf16": ("BF16", "F16"), "int8": ("Q8_0",),
                        "int4": ("Q4_0", "Q4_1", "Q4_K_M", "Q4_K_S")}


def paired_ratios(jobs: list[tuple[str, dict]], runs: list[list[dict]]) -> list[dict]:
    """Speed of each of our weight formats over llama.cpp's same-precision file, paired by round.

    Rounds run every configuration once, one after another, so a round's two samples share the
    machine's load of that minute; the ratio of a pair is steadier than the ratio of two medians taken
    over different minutes. For each pair: the median of the per-round ratios and their range
    (> 1: rwkv_zoo faster). ``default`` weights are fp32.
    """
    out = []
    for i, (kind, _) in enumerate(jobs):
        if kind != "ours":
            continue
        ours_w = runs[i][0]["weights"]
        for j, (kind2, _) in enumerate(jobs):
            if kind2 != "llamacpp" or runs[j][0]["weights"] not in LLAMACPP_COUNTERPART.get(
                    "fp32" if ours_w == "default" else ours_w, ()):
                continue
            rec = {"ours": ours_w, "llamacpp": runs[j][0]["weights"], "file": runs[j][0].get("file", ""),
                   "rounds": len(runs[i])}
            for key, get in (("decode", lambda s: s["decode"]["1"]), ("prefill", lambda s: s.get("prefill_s"))):
                ratios = [get(b) / get(a) for a, b in zip(runs[i], runs[j], strict=True) if get(a) and get(b)]
                if ratios:
                    rec[key] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            out.append(rec)
    return out


def _print_pairs(pairs: list[dict]) -> None:
    if not pairs:
        return
    n = pairs[0]["rounds"]
    print(f"rwkv_zoo over llama.cpp, same precision, paired by round (median of {n} per-round ratio(s), "
          f"min-max; > 1 = rwkv_zoo faster):")
    for p in pairs:
        parts = [f"{k} {p[k]['median']:.2f}x ({p[k]['min']:.2f}-{p[k]['max']:.2f})" for k in ("decode", "prefill")
                 if k in p]
        print(f"  {p['ours']:<7} vs {p['llamacpp']:<6} ({p['file']}): " + ", ".join(parts))


def _merge(samples: list[dict]) -> dict:
    out = dict(samples[-1])
    if len(samples) > 1:
        out["decode"] = {B: statistics.median(s["decode"][B] for s in samples) for B in out["decode"]}
        if "prefill_s" in out:
            out["prefill_s"] = statistics.median(s["prefill_s"] for s in samples)
        out["peak_rss"] = max(s["peak_rss"] for s in samples)
    out["repeats"] = len(samples)
    return out


def _print_table(rows, mach, batches, kls, args) -> None:
    base = {r["weights"]: r for r in rows if r["impl"] == "rwkv package"}
    ref32 = base.get("fp32")
    head = (f"{'implementation':<14} {'weights':<7} {'B':>3} {'prefill tok/s':>13} {'% GEMM':>6} "
            f"{'decode ms':>9} {'tok/s':>8} {'x floor':>7} {'vs pkg fp32':>11} {'vs pkg same':>11} {'peak RSS':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        matrix = r.get("matrix_params") or next((x["matrix_params"] for x in rows if "matrix_params" in x), 0)
        wbytes = r.get("weight_bytes") or next(
            (x["weight_bytes"] for x in rows if x.get("weights") == r["weights"] and "weight_bytes" in x), 0)
        for i, (B, dt) in enumerate(sorted(r["decode"].items(), key=lambda kv: int(kv[0]))):
            B = int(B)
            pre, eff = "", ""
            if i == 0 and r.get("prefill_s"):
                tps = args.prefill / r["prefill_s"]
                pre = f"{tps:.0f}"
                eff = f"{100 * 2 * matrix * tps / mach['gemm_flops']:.0f}%" if matrix else ""
            floor = wbytes / mach["read_bytes_per_s"] if wbytes else 0
            xf = f"{dt / floor:.2f}" if floor else ""
            tok_s = B / dt
            vs32 = f"{tok_s * ref32['decode']['1']:.2f}x" if ref32 and r is not ref32 else ""
            same = base.get(r["weights"])
            vss = f"{tok_s * same['decode']['1']:.2f}x" if same and r is not same else ""
            rss = _fmt_bytes(r["peak_rss"]) if i == 0 else ""
            print(f"{r['impl']:<14} {r['weights']:<7} {B:>3} {pre:>13} {eff:>6} {dt * 1e3:>9.1f} {tok_s:>8.1f} "
                  f"{xf:>7} {vs32:>11} {vss:>11} {rss:>9}")
        if ref32 and r is not ref32 and r.get("prefill_s") and ref32.get("prefill_s"):
            print(f"{'':<14} prefill vs package fp32: {ref32['prefill_s'] / r['prefill_s']:.2f}x")
        if r.get("rss_after"):
            a = r["rss_after"]
            n0, n1 = sorted(a, key=int)
            print(f"{'':<14} RSS after {n0} decode steps {_fmt_bytes(a[n0])}, after {n1}: {_fmt_bytes(a[n1])} "
                  f"({100 * (a[n1] / a[n0] - 1):+.2f}%)")
    for r in rows:
        if r.get("step"):
            print(f"rwkv_zoo {r['weights']}: {r['step']}")
        if r.get("file"):  # two GGUFs may share a file type (a Q4_0 and a pure Q4_0)
            print(f"llama.cpp {r['weights']}: {r['file']}")
    for w, v in kls.items():
        print(f"mean KL(fp32 || {w}) of next-token distributions: prefill {v['prefill']:.2e}, "
              f"decode {v['decode']:.2e}")
    print("(decode ms = median per step; tok/s = B / step time; x floor = step time / (weight bytes / read "
          "bandwidth); vs pkg = tokens/s over the package's batch-1 tokens/s)")


def _main() -> None:
    kind, kwargs = sys.argv[1], json.loads(sys.argv[2])
    fn = {"ours": ours, "official": official, "llamacpp": llamacpp, "kl": kl, "machine": machine}[kind]
    print(RESULT + json.dumps(fn(**kwargs)), flush=True)


if __name__ == "__main__":
    _main()
