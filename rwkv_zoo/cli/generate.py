"""``rwkv-zoo generate``, ``rwkv-zoo chat`` and ``rwkv-zoo eval`` (also ``score``): inference from the
command line.

MODEL is a checkpoint file (``rwkv_zoo.load``) or a model name such as ``v7-tiny`` (built with random
weights, for trying the commands). The tokenizer defaults to World for 65,536-id models and to bytes
for small test models; Pile models need ``--tokenizer 20B_tokenizer.json``. ``--weights fp32|bf16|int8``
prepares the model for inference with its projections in that format (``rwkv_zoo.load(path, weights=)``).
"""

from __future__ import annotations

import argparse
import sys
import time

from rwkv_zoo.cli._helpers import DTYPES, UsageError, add_weights_arg, load_model, pick_tokenizer

CHAT_HELP = "commands: /reset (forget the conversation), /save-state PATH, /load-state PATH, /quit"


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    stop: list[int | str] = [s.encode().decode("unicode_escape") for s in args.stop or []]
    stop += list(args.stop_token or [])
    top_p = args.top_p if args.top_p is not None else (0.85 if args.temperature != 0 else 1.0)
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=top_p, top_k=args.top_k,
        min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay, stop=stop, ban=args.ban or None, seed=args.seed, chunk_len=args.chunk_len,
    )


def _generate(model, prompt, tokenizer, state, kwargs, stream: bool, out):
    """Run generate, printing as it goes when ``stream``; returns the result. Bad values -> UsageError."""
    from rwkv_zoo.generation import generate

    try:
        res = generate(model, prompt, tokenizer=tokenizer, state=state, stream=stream, **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not stream:
        return res
    for piece in res:
        out.write(piece)
        out.flush()
    return res.result


def cmd_generate(args: argparse.Namespace) -> int:
    from rwkv_zoo.state import RWKVState

    model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed or 0, weights=args.weights)
    tokenizer = pick_tokenizer(model, args.tokenizer)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    state = RWKVState.load(args.load_state, model) if args.load_state else None
    t0 = time.perf_counter()
    res = _generate(model, prompt, tokenizer, state, _sampling_kwargs(args), args.stream, sys.stdout)
    dt = time.perf_counter() - t0
    if not args.stream:
        sys.stdout.write(res.text)
    sys.stdout.write("\n")
    if args.save_state:
        res.state.save(args.save_state)
    if args.verbose:
        print(f"{len(res.prompt_tokens)} prompt + {len(res.tokens)} new tokens in {dt:.2f} s "
              f"({res.finish_reason})", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """One line of stdin per user turn: ``User: LINE\\n\\nAssistant:`` and a reply up to a blank line."""
    from rwkv_zoo.state import RWKVState, StateMismatchError

    model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed or 0, weights=args.weights)
    tokenizer = pick_tokenizer(model, args.tokenizer)
    kwargs = _sampling_kwargs(args)
    kwargs["stop"] = [*kwargs["stop"], "\n\n"]
    out, interactive = sys.stdout, sys.stdin.isatty()

    def prime(_=None):  # the state after the system prompt only (None: the model's own start)
        if not args.system:
            return None
        from rwkv_zoo.generation import _prefill

        return _prefill(model, tokenizer.encode(args.system), None, args.chunk_len, None)[0]

    state, turn = prime(None), 0
    print(f"chatting with {args.model}; {CHAT_HELP}", file=sys.stderr)
    while True:
        if interactive:
            out.write("User: ")
            out.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                state = prime(None)
                print("[conversation reset]", file=out)
            elif cmd == "/save-state":
                if not arg:
                    print("usage: /save-state PATH", file=out)
                    continue
                if state is None:
                    state = RWKVState.zeros(model, 1)
                state.save(arg)
                print(f"[state saved to {arg}]", file=out)
            elif cmd == "/load-state":
                try:
                    state = RWKVState.load(arg, model)
                except (OSError, ValueError, StateMismatchError) as exc:
                    print(f"[cannot load state: {exc}]", file=out)
                    continue
                print(f"[state loaded from {arg}]", file=out)
            else:
                print(f"[unknown command {cmd}; {CHAT_HELP}]", file=out)
            continue
        out.write("Assistant:")
        out.flush()
        turn += 1
        if args.seed is not None:
            kwargs["seed"] = args.seed + 1000 * turn  # reproducible, but not the same draws every turn
        res = _generate(model, f"User: {line}\n\nAssistant:", tokenizer, state, kwargs, True, out)
        state = res.state
        out.write("\n")
        out.flush()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rwkv_zoo.generation import score

    model = load_model(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    tokenizer = pick_tokenizer(model, args.tokenizer)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    try:
        res = score(model, text, tokenizer=tokenizer, bos=args.bos, chunk_len=args.chunk_len)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    dt = time.perf_counter() - t0
    bpb = f"{res.bits_per_byte:.4f}" if res.bits_per_byte is not None else "-"
    print(f"tokens scored   {res.n_tokens}")
    print(f"bytes           {res.n_bytes}")
    print(f"nll (nats)      {res.nll:.4f}")
    print(f"nll / token     {res.nll / res.n_tokens:.4f}")
    print(f"perplexity      {res.perplexity:.4f}")
    print(f"bits per byte   {bpb}")
    print(f"time            {dt:.2f} s ({res.n_tokens / dt:,.0f} tokens/s)")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint file, or a model name such as v7-tiny (random weights)")
    p.add_argument("--tokenizer", help="world, bytes, a tokenizer .json (Pile: 20B_tokenizer.json) or a vocab .txt")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default: the file's)")
    add_weights_arg(p)
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--chunk-len", type=int, default=256, help="prefill chunk length in tokens (default 256)")


def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    g = p.add_argument_group("sampling (BlinkDL PIPELINE semantics; see rwkv_zoo.generation)")
    g.add_argument("--max-new-tokens", type=int, default=max_new, help=f"per reply (default {max_new})")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float, help="nucleus mass (default 0.85, or off when greedy; 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most probable (default 0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="keep p >= min_p * max p (default 0 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="alpha_presence (default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="alpha_frequency (default 0)")
    g.add_argument("--penalty-decay", type=float, default=0.996, help="alpha_decay per token (default 0.996)")
    g.add_argument("--stop", action="append", help="stop string (repeatable; \\n escapes understood)")
    g.add_argument("--stop-token", type=int, action="append", help="stop token id (repeatable)")
    g.add_argument("--ban", type=int, action="append", help="token id never to generate (repeatable)")
    g.add_argument("--seed", type=int, help="random seed (default: a fresh one)")


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt (sampling flags, --stream)")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--escapes", action="store_true", help="interpret \\n, \\t ... in --prompt")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--load-state", metavar="PATH", help="start from a saved state (RWKVState.save)")
    p.add_argument("--save-state", metavar="PATH", help="write the final state (prompt + reply consumed)")
    p.add_argument("-v", "--verbose", action="store_true", help="token counts and time on stderr")
    _sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model on stdin; the state carries the conversation")
    _model_args(p)
    p.add_argument("--system", help="text that starts every conversation (prefilled once)")
    _sampling_args(p, 256)
    p.set_defaults(func=cmd_chat)

    # `score` is the name rwkv_zoo.score and the README use for the same thing.
    p = sub.add_parser("eval", aliases=["score"],
                       help="per-token log-likelihood of a text file: perplexity, bits per byte")
    _model_args(p)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--bos", type=int, help="id put before the text so its first token is scored (World: 0)")
    p.set_defaults(func=cmd_eval)
