"""What every command module of ``rwkv_zoo.cli`` shares: the usage error, dtype and weight-format names,
loading a model or a tokenizer named on the command line, and the flags that several commands take.

Command modules import from here and never from each other, so each can be read (and changed) alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from rwkv_zoo.formatting import human_count, table

__all__ = [
    "DTYPES", "FULL_DTYPES", "WEIGHTS", "UsageError", "add_weights_arg", "error", "human_count", "load_model",
    "pick_tokenizer", "table",
]

# Short names, as checkpoint tools and BlinkDL's strategies write them (convert, generate, lm-eval).
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch's own names, for `explain`, which describes activations rather than stored weights.
FULL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# The formats rwkv_zoo.inference.prepare_inference accepts; spelled out here because argparse needs the
# choices when the parser is built, and importing the inference module for that would slow every command.
WEIGHTS = ("fp32", "bf16", "int8")


class UsageError(Exception):
    """A mistake on the command line: printed as one message, exit status 2."""


def error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def load_model(spec: str, *, dtype: str | None = None, device: str | None = None, seed: int = 0,
               weights: str | None = None):
    """A checkpoint path, or a model name built with random weights (said on stderr).

    ``weights`` (fp32, bf16, int8) prepares the model for inference with its projections in that format;
    None keeps the weights as loaded or built.
    """
    import rwkv_zoo

    torch_dtype = DTYPES[dtype] if dtype else None
    if os.path.exists(spec):
        return rwkv_zoo.load(spec, dtype=torch_dtype, device=device, weights=weights)
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
