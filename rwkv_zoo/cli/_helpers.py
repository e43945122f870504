"""What every command module of ``rwkv_zoo.cli`` shares: the usage error, dtype, device and weight-format
names, loading a model or a tokenizer named on the command line, and the flags that several commands take.

Command modules import from here and never from each other, so each can be read (and changed) alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from rwkv_zoo.errors import UsageError, parse_device, parse_dtype
from rwkv_zoo.formatting import human_count, table

__all__ = [
    "DTYPES", "WEIGHTS", "UsageError", "add_weights_arg", "command_tokenizer", "device_arg", "dtype_arg", "error",
    "human_count", "load_model", "pick_tokenizer", "read_names_the_same_way", "table",
]

# The short names, for help texts. Every --dtype flag accepts every name rwkv_zoo.errors.parse_dtype
# knows (bfloat16, half, torch.float32, ...): read_names_the_same_way installs the parser on each.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The formats rwkv_zoo.inference.prepare_inference accepts; spelled out here because argparse needs the
# choices when the parser is built, and importing the inference module for that would slow every command.
WEIGHTS = ("fp32", "bf16", "int8", "int4")


def error(prog: str, message: str, status: int = 2) -> int:
    # One line whatever the message holds: a wrapped library message must not look like a traceback.
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return status


def dtype_arg(text: str) -> torch.dtype:
    """argparse ``type=`` for a dtype flag: a refused name becomes the subcommand's usage error."""
    try:
        return parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device_arg(text: str) -> str:
    """argparse ``type=`` for a device flag; the name is kept as given once torch knows it."""
    try:
        parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def read_names_the_same_way(parser: argparse.ArgumentParser) -> None:
    """Give every ``--dtype`` and ``--device`` flag of every subcommand the shared parsers.

    Done once over the finished parser rather than in each command module so that no command (a new
    one included) can accept a narrower or different set of names than ``build``/``load`` do.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                read_names_the_same_way(sub)
        elif "--dtype" in action.option_strings:
            action.type, action.choices = dtype_arg, None
            action.metavar = action.metavar or "DTYPE"
            if action.default is not None:
                action.default = parse_dtype(action.default)
        elif "--device" in action.option_strings:
            action.type, action.choices = device_arg, None
            action.metavar = action.metavar or "DEVICE"


def load_model(spec: str, *, dtype: str | None = None, device: str | None = None, seed: int = 0,
               weights: str | None = None):
    """A checkpoint path, or a model name built with random weights (said on stderr).

    ``weights`` (fp32, bf16, int8, int4) prepares the model for inference with its projections in that format;
    None keeps the weights as loaded or built.
    """
    import rwkv_zoo

    torch_dtype = parse_dtype(dtype)
    if os.path.exists(spec):
        return rwkv_zoo.load(spec, dtype=torch_dtype, device=device, weights=weights)
    if os.sep in spec or os.path.splitext(spec)[1] in (".pth", ".pt", ".safetensors", ".bin"):
        # It reads as a path, so "unknown version" would answer the wrong question.
        raise UsageError(f"no such file: {spec} (give a checkpoint file, or a model name such as v7-0.1B)")
    try:
        model = rwkv_zoo.build(spec, dtype=torch_dtype, device=device)
    except ValueError as exc:
        raise UsageError(f"{spec!r} is neither a checkpoint file nor a model name: {exc}") from exc
    print(f"note: {spec} has random weights (seed {seed}); give a checkpoint file for real text", file=sys.stderr)
    model = rwkv_zoo.randomize_(model, seed).eval()
    if weights is not None:
        from rwkv_zoo.inference import prepare_inference

        model = prepare_inference(model, weights)
    return model


def pick_tokenizer(model, name: str | None):
    from rwkv_zoo.tokenizers import WORLD_VOCAB_SIZE, TokenizerError, get_tokenizer

    V = model.config.vocab_size
    try:
        if name:
            tok = get_tokenizer(name)
        elif V == WORLD_VOCAB_SIZE:
            tok = get_tokenizer("world")
        elif V >= 50277:
            raise UsageError(f"the model's vocabulary is {V} (Pile?): pass --tokenizer PATH/20B_tokenizer.json")
        elif V >= 256:
            tok = get_tokenizer("bytes")
        else:
            raise UsageError(f"no tokenizer fits a vocabulary of {V}: pass --tokenizer")
    except TokenizerError as exc:
        raise UsageError(str(exc)) from exc
    if tok.vocab_size > V:
        raise UsageError(f"tokenizer {tok!r} has {tok.vocab_size} ids but the model's vocabulary is {V}")
    return tok


def add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=WEIGHTS,
                   help="prepare for inference with the projection weights in this format (activations and "
                        "state stay fp32; default: the weights as loaded)")


def command_tokenizer(model, name: str | None):
    """The tokenizer named on the command line, else the one ``generate`` takes in Python for this model."""
    from rwkv_zoo.tokenizers import TokenizerError, default_tokenizer

    if name:
        return pick_tokenizer(model, name)
    try:
        return default_tokenizer(model.config.vocab_size)
    except TokenizerError as exc:
        raise UsageError(str(exc)) from exc
