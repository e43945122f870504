"""``rwkv-zoo info``, ``models``, ``backends``, ``plugins``, ``explain`` and ``demo``: what is installed,
what it would run, and whether the versions agree with themselves."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from rwkv_zoo.cli._helpers import UsageError, human_count, table

DEMO_TOLERANCE = 1e-5


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:,.0f}" if seconds > 0 else "-"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------------
# info


def env_info() -> dict[str, str]:
    """The environment report of ``rwkv-zoo info``: core lines, then what plugins add."""
    import rwkv_zoo
    from rwkv_zoo import pluginmanager

    cuda = torch.cuda.is_available()
    if cuda:
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        cuda_line = f"yes: {len(names)} kind(s) of device, {', '.join(names)}; CUDA {torch.version.cuda}"
    elif torch.version.cuda:
        cuda_line = f"no (torch built with CUDA {torch.version.cuda}, but no device is usable)"
    else:
        cuda_line = "no (CPU-only torch)"
    info: dict[str, str] = {
        "rwkv_zoo": f"{rwkv_zoo.__version__} ({os.path.dirname(rwkv_zoo.__file__)})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda available": cuda_line,
        "cpu threads": f"torch uses {torch.get_num_threads()} of {os.cpu_count()} logical CPUs",
    }
    plugin_info: dict[str, str] = {}
    pluginmanager.get_plugin_manager().hook.rwkv_zoo_update_env_info(info=plugin_info)
    for key, value in plugin_info.items():
        info.setdefault(key, str(value))

    backends = rwkv_zoo.list_backends()
    plugins = rwkv_zoo.list_plugins()
    failed = [p["name"] for p in plugins if p["error"]]
    disabled = [p["name"] for p in plugins if p["disabled"]]
    info["versions"] = f"{len(rwkv_zoo.list_versions())}: {', '.join(rwkv_zoo.list_versions())}"
    info["backends"] = f"{len(backends)} ({sum(b['available'] for b in backends)} available here)"
    extra = (f", {len(failed)} failed: {', '.join(failed)}" if failed else "") + (
        f", {len(disabled)} disabled" if disabled else ""
    )
    info["plugins"] = f"{len(plugins)} loaded{extra}"
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = env_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key.ljust(width)}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------------
# models


def cmd_models(args: argparse.Namespace) -> int:
    import rwkv_zoo
    from rwkv_zoo.registry import resolve

    names = rwkv_zoo.list_models(args.pattern, released_only=args.released)
    if not names:
        what = f"matching {args.pattern!r}" if args.pattern else ""
        print(f"no models {what}; see `rwkv-zoo models` for all of them", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        spec, size = resolve(name)
        preset = spec.preset(size)
        model = rwkv_zoo.build(name, device="meta")
        cfg = model.config
        rows.append([
            name, cfg.n_layer, cfg.n_embd, cfg.vocab_size,
            cfg.head_size if type(cfg).has_heads else "-",
            human_count(model.num_parameters()), preset.params or "-",
            ", ".join(preset.aliases), preset.note,
            ("" if not preset.released else preset.source if preset.verified else "[unverified]"),
        ])
    headers = ["model", "L", "C", "V", "head", "params", "published", "aliases", "note", "shape source"]
    print(table(headers, rows, "<>>>>>><<<"))
    print(f"\n{len(rows)} models; params counted on the meta device; `published` is the release's label (as the "
          "README formula gives it); `shape source` says where a release's dimensions are attested")
    return 0


# ---------------------------------------------------------------------------------------------------
# backends and plugins


def _format_ops(ops: dict[str, list[str]]) -> str:
    by_modes: dict[tuple[str, ...], list[str]] = {}
    for op, modes in ops.items():
        by_modes.setdefault(tuple(modes), []).append(op)
    return "; ".join(f"{','.join(op_names)}: {'+'.join(modes)}" for modes, op_names in by_modes.items())


def cmd_backends(args: argparse.Namespace) -> int:
    import rwkv_zoo

    rows = []
    for b in rwkv_zoo.list_backends():
        status = "available" if b["available"] else f"unavailable: {b['reason']}"
        provider = f"{b['provider']} ({b['distribution']})" if b.get("distribution") else b["provider"]
        rows.append([b["name"], provider, b["priority"], _format_ops(b["ops"]), status])
    print(table(["backend", "provider", "priority", "ops: modes", "status"], rows, "<<><<"))
    if any(b["name"] == "cpu" for b in rwkv_zoo.list_backends()):
        print(f"\n{_cpu_isa_line()}")
    return 0


def _cpu_isa_line() -> str:
    """Which build of the cpu backend's C++ kernels this process uses (the instruction set), and why."""
    from rwkv_zoo.backends.cpu import kernels

    return f"cpu kernels: {kernels.describe_isa()}"


def cmd_plugins(args: argparse.Namespace) -> int:
    import rwkv_zoo

    # Collect the registries first: a plugin whose register hook raises is only marked failed then.
    rwkv_zoo.list_versions()
    rwkv_zoo.list_backends()
    rows = []
    for p in rwkv_zoo.list_plugins():
        if p["error"]:
            status = f"ERROR {p['error']}"
        elif p["disabled"]:
            status = "blocked (RWKV_ZOO_DISABLE_PLUGINS)"
        else:
            status = "ok"
        hooks = ", ".join(h.removeprefix("rwkv_zoo_") for h in p["hooks"]) or "-"
        rows.append([p["name"], p["source"], p["distribution"] or "-", hooks, status])
    print(table(["plugin", "source", "distribution", "hooks", "status"], rows))
    return 0


# ---------------------------------------------------------------------------------------------------
# explain


def cmd_explain(args: argparse.Namespace) -> int:
    import rwkv_zoo
    from rwkv_zoo.dispatch import BackendError

    if args.T < 1 or args.batch < 1:
        raise UsageError(f"--T and --batch must be >= 1, got T={args.T}, batch={args.batch}")
    try:
        # build(backend=) sets model.backend after checking that the name is registered.
        model = rwkv_zoo.build(args.model, device="meta", backend=args.backend)
        text = rwkv_zoo.explain(
            model, (args.batch, args.T), device=args.device, dtype=args.dtype,
            requires_grad=args.train, has_state=args.state,
        )
    except (ValueError, BackendError) as exc:  # unknown model/size/backend, or the backend cannot run it
        raise UsageError(str(exc)) from exc
    print(text)
    if "cpu" in text.backends or (text.execution and "'cpu-fused'" in text.execution):
        print(_cpu_isa_line())
    return 0


# ---------------------------------------------------------------------------------------------------
# demo


def rel_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Relative errors of logits ``a`` against ``b`` [B, T, V], in fp64.

    Returns ``(max over sequences of ||a - b|| / ||b||, max over tokens of ||a_t - b_t|| / ||b_t||)``.
    """
    a, b = a.double(), b.double()
    tiny = torch.finfo(torch.float64).tiny
    per_seq = (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(tiny)
    per_token = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(tiny)
    return float(per_seq.max()), float(per_token.max())


def _used(model, T: int) -> str:
    """``backend/mode`` that ``explain`` reports for a [1, T] call carrying a state (as the model does)."""
    import rwkv_zoo

    ex = rwkv_zoo.explain(model, (1, T), requires_grad=False, has_state=True)
    used = {f"{sel.backend}/{sel.mode}" for _, sel in ex.selections}
    if ex.no_kernel:  # layers that call no dispatched kernel (an attention time-mix)
        used.add("modules (no WKV kernel)")
    return ", ".join(sorted(used))


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def demo_version(version: str, size: str, T: int, seed: int) -> tuple[list[list[Any]], str, bool]:
    """Run the three passes for one version; returns the table rows, a title and whether all passed."""
    import rwkv_zoo

    model = rwkv_zoo.build(version, size=size)
    rwkv_zoo.randomize_(model, seed)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    split = int(torch.randint(1, T, (1,), generator=g)) if T > 1 else 1

    def parallel():
        model.mode = "chunk"
        try:
            return model(tokens)[0]
        finally:
            model.mode = None

    def recurrent():
        model.mode = "recurrent"
        try:
            state, outs = None, []
            for t in range(T):
                out, state = model(tokens[:, t : t + 1], state)
                outs.append(out)
            return torch.cat(outs, dim=1)
        finally:
            model.mode = None

    def split_run():
        first, state = model(tokens[:, :split])
        if split == T:
            return first
        second, _ = model(tokens[:, split:], state)
        return torch.cat([first, second], dim=1)

    with torch.no_grad():
        model(tokens[:, :1])  # warm-up: lazy imports and caches stay out of the timings
        ref, t_par = _timed(parallel)
        rec, t_rec = _timed(recurrent)
        spl, t_spl = _timed(split_run)

    model.mode = "chunk"
    used_par = _used(model, T)
    model.mode = "recurrent"
    used_rec = _used(model, 1)
    model.mode = None
    used_spl = _used(model, split) + ("" if split == T else " | " + _used(model, T - split))

    (err_rec, tok_rec), (err_spl, tok_spl) = rel_errors(rec, ref), rel_errors(spl, ref)
    ok_rec, ok_spl = err_rec <= DEMO_TOLERANCE, err_spl <= DEMO_TOLERANCE
    rows = [
        ["parallel", f"[1, {T}]", used_par, "-", "-", _rate(T, t_par), ""],
        ["recurrent", f"{T} x [1, 1]", used_rec, f"{err_rec:.2e}", f"{tok_rec:.2e}", _rate(T, t_rec),
         _verdict(ok_rec)],
        ["split", f"[1, {split}] + [1, {T - split}]", used_spl, f"{err_spl:.2e}", f"{tok_spl:.2e}",
         _rate(T, t_spl), _verdict(ok_spl)],
    ]
    cfg = model.config
    title = (f"{version}-{model.size_name}: {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, "
             f"{model.num_parameters():,} parameters ({human_count(model.num_parameters())})")
    return rows, title, ok_rec and ok_spl


def _has_size(version: str, size: str) -> bool:
    from rwkv_zoo.registry import get_version

    try:
        get_version(version).preset(size)
    except ValueError:
        return False
    return True


def cmd_demo(args: argparse.Namespace) -> int:
    import rwkv_zoo

    known = rwkv_zoo.list_versions()
    # Every registered version by default, so a version that a plugin adds is checked too.
    versions = known if args.versions is None else [v.strip() for v in args.versions.split(",") if v.strip()]
    unknown = [v for v in versions if v not in known]
    if unknown or not versions:
        given = ", ".join(unknown) or "(none given)"
        raise UsageError(f"unknown version(s) {given}; versions: {', '.join(known)}")
    if args.T < 2:
        raise UsageError(f"--T must be >= 2 to split the sequence, got {args.T}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")

    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    failed: list[str] = []
    try:
        print(f"rwkv-zoo demo: size={args.size}, T={args.T}, seed={args.seed}, "
              f"{args.threads} torch thread(s)\n"
              f"each run is compared with the parallel one: rel. error = ||a-b||/||b|| over all its logits "
              f"(PASS <= {DEMO_TOLERANCE:g}); worst token = the same per position")
        skipped = [v for v in versions if not _has_size(v, args.size)]
        for version in skipped:
            print(f"\nskipped {version}: it has no {args.size!r} size preset")
        versions = [v for v in versions if v not in skipped]
        if not versions:
            raise UsageError(f"no version to run: none of them has a {args.size!r} size preset")
        for version in versions:
            rows, title, ok = demo_version(version, args.size, args.T, args.seed)
            print(f"\n{title}")
            headers = ["run", "input", "backend/mode", "rel. error", "worst token", "tokens/s", "check"]
            print(table(headers, rows, "<<<>>><"))
            if not ok:
                failed.append(version)
    finally:
        torch.set_num_threads(old_threads)
    elapsed = time.perf_counter() - start
    if failed:
        print(f"\nFAIL: {', '.join(failed)} ({elapsed:.1f} s)")
        return 1
    print(f"\nPASS: {', '.join(versions)} ({elapsed:.1f} s)")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="versions, CUDA, threads and what plugins report about the environment")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="every model name with its dimensions and parameter count")
    p.add_argument("pattern", nargs="?", help="wildcard filter, e.g. 'v6-*' or '*-1.5B'")
    p.add_argument("--released", action="store_true", help="only officially released sizes")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("backends", help="kernel backends: priority, availability, ops and modes")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("plugins", help="plugins seen: source, version, hooks, errors")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("explain", help="which kernel each layer would run for an input, and why (no weights)")
    p.add_argument("model", help="a model name such as v6-1.5B or v7-tiny (see `rwkv-zoo models`)")
    p.add_argument("--T", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", default="float32",
                   help="activation dtype: fp32/float32, bf16/bfloat16, fp16/float16/half, fp64 (default float32)")
    p.add_argument("--device", default="cpu",
                   help="device to explain for: cpu, cuda, cuda:N, mps, ... (default cpu; need not be present)")
    p.add_argument("--backend", help="force a backend, as build(..., backend=NAME) does")
    p.add_argument("--train", action="store_true", help="the call needs gradients (training)")
    p.add_argument("--state", action="store_true",
                   help="the call carries an initial state (what model(tokens, state) does)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("demo", help="check parallel = token-by-token = split-and-carry for every version")
    p.add_argument("--versions", help="comma-separated versions (default: every registered version that has "
                                      "the --size preset)")
    p.add_argument("--size", choices=("tiny", "small"), default="small", help="size preset (default small)")
    p.add_argument("--T", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, tokens and the split point")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads while the demo runs (default 1: these models are too small to "
                        "gain from more, and a busy machine makes extra OpenMP threads much slower)")
    p.set_defaults(func=cmd_demo)
