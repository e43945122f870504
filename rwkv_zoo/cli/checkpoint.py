"""``rwkv-zoo convert`` and ``rwkv-zoo inspect``: checkpoint tools of the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rwkv_zoo.cli._helpers import DTYPES, UsageError
from rwkv_zoo.errors import parse_dtype

TARGETS = {"official": "official-pth", "safetensors": "safetensors", "hf": "hf", "fla": "fla", "gguf": "gguf"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # the last two: llama.cpp's quantizer


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


class Progress:
    """A one-line progress bar on stderr, drawn only for large jobs (or when ``force``)."""

    def __init__(self, total: int, label: str, *, force: bool = False, min_bytes: int = 256 << 20):
        self.total, self.done, self.label = max(total, 1), 0, label
        self.show = force or total >= min_bytes
        self.start = self.drawn = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.show and (now - self.drawn >= 0.1 or self.done >= self.total):
            self.drawn = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"\r{self.label} [{bar:<30}] {frac:6.1%} {_human_bytes(rate)}/s", end="", file=sys.stderr)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> int:
    import rwkv_zoo
    from rwkv_zoo.checkpoint import (
        CheckpointError,
        check_save_target,
        export_tensors,
        get_formats,
        model_metadata,
        official_tensors,
    )

    dst = Path(args.dst)
    by_suffix = {".safetensors": "safetensors", ".gguf": "gguf"}
    target = TARGETS[args.to] if args.to else by_suffix.get(dst.suffix, "official-pth")
    fmt = get_formats().get(target)
    if fmt is None or not fmt.writable:
        writable = ", ".join(k for k, v in TARGETS.items() if v in get_formats() and get_formats()[v].writable)
        raise CheckpointError(f"cannot write {args.to or target} (not installed?); writable targets: {writable}")
    if target == "gguf":
        return _convert_gguf(args, dst, fmt)
    dtype = parse_dtype(args.dtype)
    if target not in ("hf", "fla"):  # folder writers make their folder; the others: fail before reading
        check_save_target(dst)
    model = rwkv_zoo.load(args.src)
    # A tuned start state (time_state keys) travels with the weights, except into an HF folder (no such key).
    tensors = official_tensors(model) if target == "hf" else export_tensors(model)
    bar = Progress(sum(t.numel() * (dtype or t.dtype).itemsize for t in tensors.values()), f"converting to {target}",
                   force=args.progress)
    out = {}
    for k, t in tensors.items():
        out[k] = t.to(dtype).contiguous() if dtype is not None and not k.endswith(".att.time_state") else t
        bar.update(out[k].numel() * out[k].element_size())
    bar.close()
    fmt.write(out, dst, model_metadata(model))
    size = sum(p.stat().st_size for p in ([dst] if dst.is_file() else dst.rglob("*") if dst.is_dir() else []))
    print(f"{args.src} ({model.checkpoint_format}, {model.version}) -> {dst} ({target}, "
          f"{str(dtype or model.dtype).removeprefix('torch.')}, {_human_bytes(size)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import rwkv_zoo
    from rwkv_zoo.checkpoint import check_save_target, export_tensors, get_formats, model_metadata, resolve_run_path

    dst = Path(args.dst)
    if dst.suffix not in (".pth", ".safetensors"):
        raise UsageError(f"export writes OUT.pth (official) or OUT.safetensors; got {dst}")
    check_save_target(dst)
    src = resolve_run_path(args.src)
    model = rwkv_zoo.load(src)
    tensors = export_tensors(model, parse_dtype(args.dtype))
    target = "safetensors" if dst.suffix == ".safetensors" else "official-pth"
    get_formats()[target].write(tensors, dst, model_metadata(model))
    note = ", with its tuned time_state" if model.initial_state is not None else ""
    print(f"{src} ({model.version}) -> {dst} ({target}{note}, {_human_bytes(dst.stat().st_size)})")
    return 0


def _convert_gguf(args: argparse.Namespace, dst: Path, fmt) -> int:
    """GGUF takes llama.cpp's file types (f32, f16, bf16, q8_0; q4_0, q4_k_m) rather than a torch dtype."""
    import torch

    import rwkv_zoo
    from rwkv_zoo.checkpoint import CheckpointError, check_save_target, model_metadata, official_tensors
    from rwkv_zoo.errors import UsageError

    from_dtype = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    file_type = args.gguf_type
    if args.dtype is not None:  # already a torch.dtype (the shared --dtype parser)
        as_type = from_dtype.get(args.dtype)
        if as_type is None or (file_type and file_type != as_type):
            raise UsageError(f"--dtype {str(args.dtype).removeprefix('torch.')}: a GGUF file is one of "
                             f"{', '.join(GGUF_TYPES)} (--gguf-type)")
        file_type = as_type
    if args.gguf_pure and file_type not in ("q4_0", "q4_k_m"):
        raise UsageError("--gguf-pure is llama-quantize's --pure: it goes with --gguf-type q4_0 or q4_k_m")
    if file_type in ("q4_0", "q4_k_m"):
        from rwkv_zoo.plugins.formats.gguf_format import check_quantizer

        check_quantizer(file_type, args.gguf_pure)  # before reading the weights
    check_save_target(dst)
    model = rwkv_zoo.load(args.src)
    if model.version not in ("v6", "v7"):
        raise CheckpointError(f"{args.src} is a {model.version} model; llama.cpp (GGUF) has RWKV-6 and RWKV-7 only")
    metadata = model_metadata(model)
    metadata["gguf_file_type"] = file_type or {"torch.float16": "f16", "torch.bfloat16": "bf16"}.get(
        str(model.dtype), "f32")
    if args.gguf_pure:
        metadata["gguf_pure"] = "1"
    fmt.write(official_tensors(model), dst, metadata)
    pure = ", pure" if args.gguf_pure else ""
    print(f"{args.src} ({model.checkpoint_format}, {model.version}) -> {dst} (gguf, "
          f"{metadata['gguf_file_type'].upper()}{pure}, {_human_bytes(dst.stat().st_size)})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rwkv_zoo.checkpoint import detect_format, infer_model, resolve_run_path
    from rwkv_zoo.registry import build

    path = resolve_run_path(args.path)  # a training run or checkpoint folder: its model.safetensors
    fmt = detect_format(path)
    header = fmt.read_shapes(path)
    how = "header only, no weights read"
    if header is None:
        ckpt = fmt.read(path, mmap=True)
        header = ({k: (tuple(v.shape), v.dtype) for k, v in ckpt.tensors.items()}, ckpt.metadata)
        how = "memory-mapped, weights not copied" if fmt.name == "official-pth" else "weights loaded"
    shapes, meta = header
    time_state = sorted(k for k in shapes if k.endswith(".att.time_state"))
    model_shapes = {k: s for k, (s, _) in shapes.items() if k not in time_state}
    version, dims = infer_model(model_shapes)
    params = sum(_numel(s) for s in model_shapes.values())
    dtypes = sorted({str(d).removeprefix("torch.") for _, d in shapes.values()})
    expected = build(version, device="meta", init=False, **dims).num_parameters()
    rows = [
        ("path", str(path)),
        ("format", f"{fmt.name}; {how}"),
        ("version", version),
        *((k, str(v)) for k, v in dims.items() if v is not None),
        ("parameters", f"{params:,}" + ("" if params == expected else f" (a {version} of these dims: {expected:,})")),
        ("dtype", ", ".join(dtypes)),
        ("time_state", f"{len(time_state)} layers (state-tuned)" if time_state else "none"),
    ]
    rows += [(f"metadata.{k}", v if len(v) < 200 else v[:197] + "...") for k, v in sorted(meta.items())]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def add_parsers(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between formats and dtypes")
    p.add_argument("src", help="a checkpoint file or folder in any format rwkv_zoo reads")
    p.add_argument("dst", help="output path (.safetensors, .pth, .gguf, or a folder for --to hf / fla)")
    p.add_argument("--to", choices=sorted(TARGETS), help="output format (default: from the extension)")
    p.add_argument("--dtype", help=f"output dtype: {', '.join(DTYPES)} or torch's names (default: keep); "
                                   f"for GGUF see --gguf-type")
    p.add_argument("--gguf-type", choices=GGUF_TYPES,
                   help="GGUF tensor type for the matrices (default: the --dtype / the model's dtype); llama.cpp's "
                        "converter keeps norms, mixes, decay and LoRA-mix matrices F32 whatever this is; q4_0 and "
                        "q4_k_m are made by llama.cpp's quantizer from the F32 file (needs llama-cpp-python), "
                        "as llama-quantize makes them")
    p.add_argument("--gguf-pure", action="store_true",
                   help="as llama-quantize --pure: every tensor the quantizer touches gets --gguf-type (no Q6_K "
                        "output); q4_0 pure is written without llama-cpp-python")
    p.add_argument("--progress", action="store_true", help="always show the progress bar (default: files > 256 MB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a training run (its newest checkpoint), a checkpoint folder or any "
                                      "checkpoint in the official layout, a tuned state as time_state keys")
    p.add_argument("src", help="a training run folder (out_dir), a checkpoints/step-N folder, or a checkpoint")
    p.add_argument("dst", help="OUT.pth (official layout, what BlinkDL's rwkv package loads) or OUT.safetensors")
    p.add_argument("--dtype", help=f"output dtype: {', '.join(DTYPES)} or torch's names (default: keep; "
                                   "time_state stays fp32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="format, version, dimensions, parameters, dtype and metadata of a checkpoint")
    p.add_argument("path", help="a checkpoint file or folder")
    p.set_defaults(func=cmd_inspect)
