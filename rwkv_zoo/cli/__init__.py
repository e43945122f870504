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
- ``convert``, ``inspect``: checkpoint tools (``rwkv_zoo.cli.checkpoint``);
- ``generate``, ``chat``, ``eval`` (alias ``score``): inference (``rwkv_zoo.cli.generate``);
- ``bench``: decode/prefill speed and memory (``rwkv_zoo.cli.bench``, measuring with ``rwkv_zoo.bench``);
- ``train [CONFIG.toml]``: train a model (``rwkv_zoo.train``); ``ablate [CONFIG.toml]``: a grid of
  versions/hybrids x tasks x seeds with matched budgets (default: v4-v7 tiny models on MQAR)
  (``rwkv_zoo.cli.train``, also behind ``python -m rwkv_zoo.train``);
- ``lm-eval MODEL --tasks T1,T2``: EleutherAI lm-evaluation-harness tasks through ``rwkv_zoo.harness``
  (needs ``pip install lm_eval``; ``rwkv_zoo.cli.lm_eval``).

Errors the user can fix (an unknown model, a backend that cannot run the call) print one message to
stderr and exit with status 2; ``demo`` exits with 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence

from rwkv_zoo.checkpoint import CheckpointError
from rwkv_zoo.cli._helpers import UsageError, error

__all__ = ["UsageError", "main", "make_parser"]


def make_parser() -> argparse.ArgumentParser:
    import rwkv_zoo

    # Imported here rather than at the top so that `python -m rwkv_zoo.train` (which imports
    # rwkv_zoo.cli.train, and so this package) does not load every other command as well.
    from rwkv_zoo.cli import bench, checkpoint, generate, info, lm_eval, train

    parser = argparse.ArgumentParser(
        prog="rwkv-zoo",
        description="Every RWKV generation behind one state interface, with pluggable WKV kernel backends.",
    )
    parser.add_argument("--version", action="version", version=f"rwkv-zoo {rwkv_zoo.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (info, lm_eval, checkpoint, generate, bench, train):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = f"rwkv-zoo {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        return error(prog, str(exc))
    except (CheckpointError, FileNotFoundError) as exc:  # a file the user named is missing or unusable
        return error(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rwkv-zoo models | head`: stop quietly, and keep Python's exit flush quiet too
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
