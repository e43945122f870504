"""``rwkv-zoo generate``, ``rwkv-zoo chat`` and ``rwkv-zoo eval`` (also ``score``): inference from the
command line.

MODEL is a checkpoint file (``rwkv_zoo.load``) or a model name such as ``v7-tiny`` (built with random
weights, for trying the commands). The tokenizer defaults to ``rwkv_zoo.tokenizers.default_tokenizer``'s
choice, as in Python: World for 65,536-id models, bytes for small test models (only byte ids are
sampled); Pile models need ``--tokenizer 20B_tokenizer.json`` unless a package ships it. Text written
to a terminal shows control characters as escapes (``\\x1b``); newlines and tabs stay. ``--weights fp32|bf16|int8|int4``
prepares the model for inference with its projections in that format (``rwkv_zoo.load(path, weights=)``).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time

from rwkv_zoo.cli._helpers import DTYPES, UsageError, add_weights_arg, command_tokenizer, load_model
from rwkv_zoo.data.sft import chat_prompt

CHAT_COMMANDS = (
    ("/help", "show these commands"),
    ("/reset", "forget the conversation (back to --system, if given)"),
    ("/save-state PATH", "write the conversation's state to a file"),
    ("/load-state PATH", "continue from a saved state (of this model, batch 1)"),
    ("/quit", "leave (also /exit, Ctrl-D, or Ctrl-C twice at the prompt)"),
)
CHAT_HELP = "commands: /help, /reset, /save-state PATH, /load-state PATH, /quit; Ctrl-C stops a reply"

# C0 and C1 controls and DEL as visible escapes (\x1b, \r): a random or byte-level model emits them,
# and written raw to a terminal they move the cursor, clear the screen or change its settings.
_CONTROL_ESCAPES = {
    c: chr(c).encode("unicode_escape").decode("ascii") for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (9, 10)
}


def _for_terminal(text: str) -> str:
    return text.translate(_CONTROL_ESCAPES)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    stop: list[int | str] = [s.encode().decode("unicode_escape") for s in args.stop or []]
    stop += list(args.stop_token or [])
    top_p = args.top_p if args.top_p is not None else (0.85 if args.temperature != 0 else 1.0)
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=top_p, top_k=args.top_k,
        min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        penalty_decay=args.penalty_decay, stop=stop, ban=args.ban or None, seed=args.seed, chunk_len=args.chunk_len,
    )


@contextlib.contextmanager
def _ctrl_c_sets(flag: list[bool]):
    """While inside, Ctrl-C sets ``flag[0]`` instead of raising, so a reply stops between two tokens and
    never inside a kernel or a half-written line (signals can only be handled on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        flag[0] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _generate(model, prompt, tokenizer, state, kwargs, stream: bool, out, stopped: list[bool] | None = None):
    """Run generate, printing as it goes when ``stream``; returns the result, or None when ``stopped[0]``
    was set while streaming. Bad values -> UsageError."""
    from rwkv_zoo.generation import generate

    try:
        res = generate(model, prompt, tokenizer=tokenizer, state=state, stream=stream, **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not stream:
        return res
    show = _for_terminal if out.isatty() else str
    for piece in res:
        if stopped is not None and stopped[0]:
            return None
        out.write(show(piece))
        out.flush()
    return res.result


def _load_state(path: str, model, batch_size: int | None = None):
    from rwkv_zoo.state import RWKVState

    try:
        return RWKVState.load(path, model, batch_size=batch_size)
    except ValueError as exc:  # StateFileError, StateMismatchError
        raise UsageError(str(exc)) from exc


def _save_state(state, path: str) -> None:
    try:
        state.save(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed or 0, weights=args.weights)
    tokenizer = command_tokenizer(model, args.tokenizer)
    prompt = args.prompt.encode().decode("unicode_escape") if args.escapes else args.prompt
    state = _load_state(args.load_state, model, 1) if args.load_state else None
    t0 = time.perf_counter()
    res = _generate(model, prompt, tokenizer, state, _sampling_kwargs(args), args.stream, sys.stdout)
    dt = time.perf_counter() - t0
    if not args.stream:
        sys.stdout.write(_for_terminal(res.text) if sys.stdout.isatty() else res.text)
    sys.stdout.write("\n")
    if args.save_state:
        _save_state(res.state, args.save_state)
    if args.verbose:
        print(f"{len(res.prompt_tokens)} prompt + {len(res.tokens)} new tokens in {dt:.2f} s "
              f"({res.finish_reason})", file=sys.stderr)
    return 0


class _Chat:
    """The conversation of ``rwkv-zoo chat``: its state, and what each line of input does to it.

    A failed command or turn prints one bracketed line and leaves the state as it was, so no mistake
    costs the conversation. A reply stopped with Ctrl-C is forgotten (the state is the one from before
    that turn), because a state holding half a reply would make the next turn continue it.
    """

    def __init__(self, args: argparse.Namespace, out):
        self.args, self.out = args, out
        self.model = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed or 0,
                                weights=args.weights)
        self.tokenizer = command_tokenizer(self.model, args.tokenizer)
        self.kwargs = _sampling_kwargs(args)
        self.kwargs["stop"] = [*self.kwargs["stop"], "\n\n"]
        # Generation options are checked now rather than at the first turn, which would end the chat.
        _generate(self.model, "\n", self.tokenizer, None, {**self.kwargs, "max_new_tokens": 1}, False, out)
        self.state = self.prime()
        self.turn = 0

    def prime(self):
        """The state after the system prompt only (None: the model's own start)."""
        if not self.args.system:
            return None
        from rwkv_zoo.generation import _prefill

        return _prefill(self.model, self.tokenizer.encode(self.args.system), None, self.args.chunk_len, None)[0]

    def say(self, text: str) -> None:
        print(text, file=self.out)
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False when it asks to leave."""
        from rwkv_zoo.state import RWKVState

        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            width = max(len(name) for name, _ in CHAT_COMMANDS)
            for name, what in CHAT_COMMANDS:
                self.say(f"  {name:<{width}}  {what}")
            self.say("  anything else is your next turn; Ctrl-C stops a reply")
        elif cmd == "/reset":
            self.state, self.turn = self.prime(), 0
            self.say("[conversation reset]")
        elif cmd in ("/save-state", "/load-state") and not arg:
            self.say(f"[usage: {cmd} PATH]")
        elif cmd == "/save-state":
            state = self.state if self.state is not None else RWKVState.zeros(self.model, 1)
            _save_state(state, arg)
            self.say(f"[state saved to {arg}]")
        elif cmd == "/load-state":
            state = _load_state(arg, self.model)
            if state.batch_size != 1:
                raise UsageError(f"{arg} holds {state.batch_size} sequences but chat needs a state of batch size 1: "
                                 "save one of them with state.select(i).save(PATH)")
            self.state = state
            self.say(f"[state loaded from {arg}]")
        else:
            self.say(f"[unknown command {cmd}; {CHAT_HELP}]")
        return True

    def reply(self, line: str) -> None:
        self.out.write("Assistant:")
        self.out.flush()
        kwargs = dict(self.kwargs)
        if self.args.seed is not None:
            kwargs["seed"] = self.args.seed + 1000 * (self.turn + 1)  # reproducible, not the same draws each turn
        stopped = [False]
        with _ctrl_c_sets(stopped):
            # The one renderer of the World chat format, shared with SFT data (rwkv_zoo.data.sft).
            res = _generate(self.model, chat_prompt(line), self.tokenizer, self.state, kwargs, True, self.out,
                            stopped)
        if res is None:
            self.say("\n[reply stopped; the conversation goes on from before this turn]")
            return
        self.state, self.turn = res.state, self.turn + 1
        self.out.write("\n")
        self.out.flush()


def cmd_chat(args: argparse.Namespace) -> int:
    """One line of stdin per user turn: ``User: LINE\\n\\nAssistant:`` and a reply up to a blank line."""
    out, interactive = sys.stdout, sys.stdin.isatty()
    chat = _Chat(args, out)
    print(f"chatting with {args.model}; {CHAT_HELP}", file=sys.stderr)
    interrupted = False  # the last thing at the prompt was Ctrl-C
    while True:
        if interactive:
            out.write("User: ")
            out.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            if interrupted:
                out.write("\n")
                return 0
            interrupted = True
            chat.say("\n[press Ctrl-C again, Ctrl-D or type /quit to leave]")
            continue
        interrupted = False
        if not line:
            if interactive:  # Ctrl-D: end the prompt's line, so the shell's prompt starts on its own
                out.write("\n")
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not chat.command(line):
                    return 0
            else:
                chat.reply(line)
        except (UsageError, ValueError, OSError) as exc:
            chat.say(f"[{exc}]")
        except KeyboardInterrupt:  # during a command (a turn catches its own)
            chat.say("\n[stopped]")


def cmd_eval(args: argparse.Namespace) -> int:
    from rwkv_zoo.generation import score

    model = load_model(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    tokenizer = command_tokenizer(model, args.tokenizer)
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
