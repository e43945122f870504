"""The ``rwkv-zoo`` command line (also ``python -m rwkv_zoo``).

Subcommands, one module per group, sharing ``rwkv_zoo.cli._helpers``:

- ``info``: versions of rwkv_zoo, Python and torch, CUDA, CPU threads, and what plugins report
  through the ``rwkv_zoo_update_env_info`` hook;
- ``models [PATTERN] [--released]``: every model name with its dimensions and parameter count
  (counted on the meta device, so nothing is allocated);
- ``backends``: every kernel backend, its provider plugin and distribution, its priority, whether it can
  run here (or why not), its kernels;
- ``plugins``: every plugin seen, where it came from (distribution and version), the hooks it implements,
  and its error if it failed or whether it is blocked;
- ``explain MODEL``: which kernel each layer would run for an input shape, and why (meta device);
- ``demo``: builds every registered version at a small size and checks that the parallel,
  token-by-token and split runs give the same logits (these six: ``rwkv_zoo.cli.info``);
- ``convert``, ``inspect``, ``export`` (a training run in the official layout): checkpoint tools
  (``rwkv_zoo.cli.checkpoint``);
- ``generate``, ``chat``, ``eval`` (alias ``score``): inference (``rwkv_zoo.cli.generate``);
- ``bench``: decode/prefill speed and memory (``rwkv_zoo.cli.bench``, measuring with ``rwkv_zoo.bench``);
- ``train [CONFIG.toml]``: train a model (``rwkv_zoo.train``); ``ablate [CONFIG.toml]``: a grid of
  versions/hybrids x tasks x seeds with matched budgets (default: v4-v7 tiny models on MQAR)
  (``rwkv_zoo.cli.train``, also behind ``python -m rwkv_zoo.train``);
- ``lm-eval MODEL --tasks T1,T2``: EleutherAI lm-evaluation-harness tasks through ``rwkv_zoo.harness``
  (needs ``pip install lm_eval``; ``rwkv_zoo.cli.lm_eval``);
- ``serve MODEL``: an OpenAI-compatible HTTP server with continuous batching (``rwkv_zoo.cli.serve``,
  needs ``pip install 'rwkv-zoo[serve]'``);
- ``merge BASE ADAPTER OUT``: fold a LoRA adapter (peft's format) into BASE, write an official checkpoint
  (``rwkv_zoo.cli.finetune``, through ``rwkv_zoo.lora``; needs ``pip install peft``).

Errors print one line on stderr, ``rwkv-zoo COMMAND: error: ...``, naming the problem and what to do:
exit status 2 for a mistake on the command line (a wrong flag, value or name: argparse's and
``UsageError``), 1 for a failure while running (a file that cannot be read, a state that does not fit, a
backend that cannot run, any other error); ``demo`` exits with 1 when a check fails. ``--debug`` (or
``RWKV_ZOO_DEBUG=1``) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback
from collections.abc import Sequence

from rwkv_zoo.cli._helpers import UsageError, error, read_names_the_same_way
from rwkv_zoo.errors import RWKVZooError

__all__ = ["UsageError", "main", "make_parser"]


def make_parser() -> argparse.ArgumentParser:
    import rwkv_zoo

    # Imported here rather than at the top so that `python -m rwkv_zoo.train` (which imports
    # rwkv_zoo.cli.train, and so this package) does not load every other command as well.
    from rwkv_zoo.cli import bench, checkpoint, finetune, generate, info, lm_eval, serve, train

    parser = argparse.ArgumentParser(
        prog="rwkv-zoo",
        description="Every RWKV generation behind one state interface, with pluggable WKV kernel backends.",
    )
    parser.add_argument("--version", action="version", version=f"rwkv-zoo {rwkv_zoo.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also RWKV_ZOO_DEBUG=1); allowed after COMMAND too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (info, lm_eval, checkpoint, generate, bench, train, finetune, serve):
        group.add_parsers(sub)
    read_names_the_same_way(parser)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parse_args``, except that a flag the subcommand does not know is refused by the subcommand.

    Plain argparse hands a subcommand's unknown flags back to the top-level parser, which then prints
    the top-level usage: no help for someone who mistyped an option of ``generate``.
    """
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # `rwkv-zoo inspect x --debug` reads as naturally as `rwkv-zoo --debug inspect x`
        extra = [a for a in extra if a != "--debug"]
        args.debug = True
    if extra:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        target = subparsers.choices.get(getattr(args, "command", None) or "", parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _message(exc: BaseException) -> str:
    """One line for an error: the library's sentence, or the OS's complaint with the path it was about."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, (RWKVZooError, ValueError)):
        return str(exc) or type(exc).__name__
    # Not a mistake we anticipated: say what it was, and how to see where it came from.
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback; please report it)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = make_parser()
    args = _parse(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = f"rwkv-zoo {args.command}"
    debug = args.debug or os.environ.get("RWKV_ZOO_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rwkv-zoo models | head`: stop quietly, and keep Python's exit flush quiet too
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # every error ends as one line; --debug shows where it came from
        if debug:
            traceback.print_exc()
        status = exc.exit_code if isinstance(exc, RWKVZooError) else 1
        return error(prog, _message(exc), status)
