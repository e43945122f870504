"""``rwkv-zoo serve MODEL``: an OpenAI-compatible HTTP server (``rwkv_zoo.serve``, docs/serving.md).

FastAPI under uvicorn; one engine thread runs every request in one continuously batched decode loop.
It listens on 127.0.0.1 unless ``--host`` says otherwise; ``--api-key`` (or ``RWKV_ZOO_API_KEY``)
requires ``Authorization: Bearer KEY``. Ctrl-C or SIGTERM stops taking connections, lets running
requests finish for up to ``--shutdown-timeout`` seconds, then stops the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys

from rwkv_zoo.cli._helpers import DTYPES, UsageError, add_weights_arg, command_tokenizer, load_model


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    for flag in ("max_batch", "chunk_len", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0 or args.cache_mb < 0 or not 0 <= args.port <= 65535:
        raise UsageError("--max-queue and --cache-mb must be >= 0 and --port in 0..65535")
    try:
        import uvicorn

        from rwkv_zoo.serve.app import create_app
    except ImportError as exc:
        raise RuntimeError(f"serving needs FastAPI and uvicorn ({exc}): pip install 'rwkv-zoo[serve]'") from exc
    from rwkv_zoo.serve.engine import Engine

    keys = list(args.api_key or [])
    if not keys and os.environ.get("RWKV_ZOO_API_KEY"):
        keys = [os.environ["RWKV_ZOO_API_KEY"]]
    if not _is_loopback(args.host) and not keys:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed, weights=args.weights)
    tokenizer = command_tokenizer(model, args.tokenizer)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, chunk_len=args.chunk_len,
                    cache_bytes=args.cache_mb << 20, batching=args.batching)
    name = args.served_model_name or os.path.basename(args.model.rstrip("/\\"))
    app = create_app(engine, model_name=name, tokenizer=tokenizer, api_keys=keys,
                     max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens,
                     default_max_tokens=min(args.default_max_tokens, args.max_tokens))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    sock.listen(2048)  # connections made from here on wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"serving {name!r} at http://{shown}:{port}/v1 ({engine.describe()}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout,
                            access_log=args.log_level == "debug")
    # uvicorn raises Ctrl-C's signal again once it has shut down gracefully: that is a normal stop.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    print("server stopped", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("model", help="a checkpoint file, or a model name such as v7-0.1B (random weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--tokenizer", help="world, bytes, a tokenizer .json or a vocab .txt (default: the model's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default: the file's)")
    add_weights_arg(p)
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a model name (default 0)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoding at once (default 32)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row; more get 503 with Retry-After (default 64)")
    p.add_argument("--chunk-len", type=int, default=256, help="prefill chunk length in tokens (default 256)")
    p.add_argument("--cache-mb", type=int, default=256, help="prefix-state cache size in MiB (default 256; 0 = off)")
    p.add_argument("--batching", choices=("auto", "batched", "rows"), default="auto",
                   help="auto (default): batch rows where that is bit-exact, else one row at a time")
    p.add_argument("--max-prompt-tokens", type=int, default=16384, help="longest prompt accepted (default 16384)")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens accepted (default 4096)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="a chat reply's max_tokens when the request gives none (default 256; completions: 16)")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="require Authorization: Bearer KEY (repeatable; also RWKV_ZOO_API_KEY)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients use (default: MODEL's name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on Ctrl-C/SIGTERM (default 30)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=cmd_serve)
