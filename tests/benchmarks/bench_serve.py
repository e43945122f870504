"""Serving throughput and latency: ``rwkv-zoo serve``'s engine behind its HTTP API at 1, 8 and 32
concurrent streaming clients, against ``generate`` called one request at a time.

A script, not a test (pytest does not collect it: its name does not start with ``test_``)::

    python tests/benchmarks/bench_serve.py [--model v7-0.1B] [--weights fp32,int8] [--clients 1,8,32]
                                           [--requests 32] [--prompt-tokens 32] [--max-tokens 16]

Random weights in the official layout, the World tokenizer, prompts of random token ids. Every
configuration serves the same ``--requests`` requests (sampling, temperature 1, seeded): each client
sends its share one after the other, streaming, with ``return_token_ids`` so that every token arrives
as its own event. Time to first token (TTFT) is measured by the client from sending the request to its
first token; per-token latency is the gap between two tokens of one request. The ``generate`` row runs
the same requests one at a time in this process (``stream=True``; TTFT from the call).

On a machine shared with other work give ``--threads 1``: with two OpenMP threads a busy machine
deschedules one of them and the other spins at every barrier, which slowed ``generate`` on the main
thread up to 50x here (a 2-core machine at load 27) while the engine's own thread was barely touched.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import rwkv_zoo
from rwkv_zoo.generation import generate


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


@contextlib.contextmanager
def serving(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)


def bench_generate(model, prompts, max_tokens):
    ttft, itl, tokens = [], [], 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        start = last = time.perf_counter()
        for j, _ in enumerate(generate(model, p, max_new_tokens=max_tokens, temperature=1.0, seed=i, stream=True)):
            now = time.perf_counter()
            (ttft if j == 0 else itl).append(now - (start if j == 0 else last))
            last = now
            tokens += 1
    return tokens, time.perf_counter() - t0, ttft, itl


def bench_server(url, prompts, max_tokens, clients):
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", timeout=600, max_retries=0)
    ttft, itl, tokens = [], [], [0]
    lock = threading.Lock()

    def one(i):
        start = last = time.perf_counter()
        first = True
        mine_ttft, mine_itl, n = [], [], 0
        stream = client.completions.create(model="bench", prompt=prompts[i], max_tokens=max_tokens, temperature=1.0,
                                           seed=i, stream=True, extra_body={"return_token_ids": True})
        for chunk in stream:
            for c in chunk.choices:
                for _ in c.model_extra.get("token_ids") or ():
                    now = time.perf_counter()
                    (mine_ttft if first else mine_itl).append(now - (start if first else last))
                    first, last = False, now
                    n += 1
        with lock:
            ttft.extend(mine_ttft)
            itl.extend(mine_itl)
            tokens[0] += n

    def worker(c):
        for i in range(c, len(prompts), clients):
            one(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return tokens[0], time.perf_counter() - t0, ttft, itl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="v7-0.1B")
    ap.add_argument("--weights", default="fp32,int8")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rwkv_zoo.inference import prepare_inference
    from rwkv_zoo.serve import Engine, create_app
    from rwkv_zoo.tokenizers import default_tokenizer

    clients = [int(c) for c in args.clients.split(",")]
    t0 = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)

    base = rwkv_zoo.randomize_(rwkv_zoo.build(args.model, init=False), 0).eval()  # random: skip the official init
    tok = default_tokenizer(base.config.vocab_size)
    progress(f"built {args.model}")
    g = torch.Generator().manual_seed(0)
    V = min(base.config.vocab_size, tok.vocab_size)
    prompts = [torch.randint(1, V, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.requests)]
    rows = []
    for w in args.weights.split(","):
        model = prepare_inference(base, w) if w != "fp32" else base
        with torch.no_grad():
            generate(model, prompts[0], max_new_tokens=4, seed=0)  # warm-up: kernels built, weights packed
        progress(f"{w}: warmed up")
        rows.append((w, "generate, one at a time", 1, *bench_generate(model, prompts, args.max_tokens)))
        progress(f"{rows[-1][:3]}: {rows[-1][3] / rows[-1][4]:.1f} tok/s")
        engine = Engine(model, tok, max_batch=max(clients), max_queue=4 * max(clients))
        app = create_app(engine, model_name="bench", tokenizer=tok, max_tokens_limit=args.max_tokens)
        with serving(app) as url:
            for c in clients:
                rows.append((w, "serve, streaming clients", c, *bench_server(url, prompts, args.max_tokens, c)))
                progress(f"{rows[-1][:3]}: {rows[-1][3] / rows[-1][4]:.1f} tok/s")
    print(f"\n{args.model} random weights, {args.requests} requests x {args.prompt_tokens} prompt tokens -> "
          f"{args.max_tokens} new tokens (temperature 1, seeded), torch threads {args.threads}\n")
    head = ("weights", "how", "clients", "tokens", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
            "per-token p50 ms", "per-token p99 ms")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for w, how, c, n, wall, ttft, itl in rows:
        cells = (w, how, c, n, f"{wall:.1f}", f"{n / wall:.1f}", f"{1e3 * statistics.median(ttft):.0f}",
                 f"{1e3 * pct(ttft, 99):.0f}", f"{1e3 * statistics.median(itl):.0f}", f"{1e3 * pct(itl, 99):.0f}")
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
