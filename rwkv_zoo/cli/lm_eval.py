"""``rwkv-zoo lm-eval``: EleutherAI lm-evaluation-harness tasks through ``rwkv_zoo.harness`` (needs
``pip install lm_eval``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rwkv_zoo.cli._helpers import DTYPES, UsageError


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import importlib.util

    # lm_eval is optional and heavy: looked for only here, so the rest of the CLI never needs it.
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("lm-eval needs EleutherAI's lm-evaluation-harness: pip install lm_eval")
    try:
        return _run(args)
    except ValueError as exc:  # an unknown model or task, a tokenizer that does not fit
        raise UsageError(str(exc)) from exc


def _run(args: argparse.Namespace) -> int:
    """Run the tasks, print lm_eval's table, optionally write the results JSON."""
    from lm_eval.utils import make_table

    from rwkv_zoo.harness import evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    kw: dict[str, Any] = {}
    if args.include_path:
        from lm_eval.tasks import TaskManager

        kw["task_manager"] = TaskManager(include_path=args.include_path)
    if args.bootstrap_iters is not None:
        kw["bootstrap_iters"] = args.bootstrap_iters
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm_eval reads a float as a fraction of each task's documents
    results = evaluate(args.model, tasks, limit=limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, backend=args.backend,
                       chunk_len=args.chunk_len, prefix=args.prefix, log_samples=False, **kw)
    if results is None:  # lm_eval returns None on non-zero ranks; there is one rank here
        return 1
    print(make_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}, f,
                      indent=2, default=str)
        print(f"results written to {args.output}", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks (LAMBADA, ...) on a model; needs lm_eval")
    p.add_argument("model", help="a checkpoint file, or a model name such as v7-tiny (random weights)")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names, e.g. lambada_openai")
    p.add_argument("--limit", type=float, help="at most N documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    p.add_argument("--tokenizer", help="world, bytes, a tokenizer .json (Pile: 20B_tokenizer.json) or a vocab .txt")
    p.add_argument("--dtype", help=f"weights: {', '.join(DTYPES)} or torch's names (default: the file's)")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--backend", help="force a WKV kernel backend")
    p.add_argument("--chunk-len", type=int, default=1024, help="prefill chunk length in tokens (default 1024)")
    p.add_argument("--prefix", choices=("eod", "newline", "none"), default="eod",
                   help="before every context: token 0 (default, as BlinkDL's LAMBADA check), '\\n' (as his "
                        "lm_eval scripts) or nothing; see rwkv_zoo.harness")
    p.add_argument("--include-path", help="a folder of extra task YAML files")
    p.add_argument("--bootstrap-iters", type=int, help="stderr bootstrap iterations (default 0: none)")
    p.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=cmd_lm_eval)
