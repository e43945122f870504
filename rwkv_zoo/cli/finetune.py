"""``rwkv-zoo merge``: fold a LoRA adapter (peft's format) into its base model and write an official checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from rwkv_zoo.cli._helpers import DTYPES, UsageError


def cmd_merge(args: argparse.Namespace) -> int:
    import rwkv_zoo
    from rwkv_zoo import lora
    from rwkv_zoo.checkpoint import check_save_target

    adapter = Path(args.adapter)
    if not adapter.is_dir() or not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"{adapter} is not an adapter folder (it needs adapter_config.json, as "
                         "peft's save_pretrained and rwkv-zoo train --tune lora write)")
    out = Path(args.out)
    if out.suffix not in (".pth", ".safetensors"):
        raise UsageError(f"OUT must end in .pth (official layout) or .safetensors, got {out.name!r}")
    check_save_target(out)
    model = rwkv_zoo.load(args.base, dtype="fp32")  # merge in fp32: W + B A rounds once, at the end
    merged = lora.merge(lora.load_adapter(model, adapter))
    rwkv_zoo.save(merged, out, dtype=args.dtype)
    print(f"{args.base} + {adapter} -> {out} ({merged.version}, "
          f"{str(args.dtype or model.dtype).removeprefix('torch.')})")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model; write an official checkpoint",
                       description="Fold a LoRA adapter (peft's adapter_config.json + adapter_model.safetensors, "
                                   "with trained norms and mix vectors if it has them) into BASE and write OUT: "
                                   ".pth in the official layout, or rwkv_zoo .safetensors.")
    p.add_argument("base", help="the base checkpoint the adapter was trained on (any format rwkv_zoo reads)")
    p.add_argument("adapter", help="the adapter folder")
    p.add_argument("out", help="output file: .pth (official) or .safetensors")
    p.add_argument("--dtype", help=f"output dtype: {', '.join(DTYPES)} (default: fp32, the dtype of the merge)")
    p.set_defaults(func=cmd_merge)
