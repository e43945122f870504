"""GGUF files for llama.cpp (``rwkv-zoo convert MODEL out.gguf``): RWKV-6 and RWKV-7, write only.

llama.cpp has RWKV-6 (``LLM_ARCH_RWKV6``, architecture ``"rwkv6"``) and RWKV-7 (``"rwkv7"``); its other
RWKV architectures (``rwkv6qwen2``, ``arwkv7``) are Qwen2 hybrids, and it has no RWKV-4 or RWKV-5. Its
converter ``convert_hf_to_gguf.py`` reads RWKV-6 from the RWKV org's remote-code folders
(``Rwkv6ForCausalLM``, ``rwkv.blocks.*``: the official shapes) and RWKV-7 from fla-hub folders
(``RWKV7ForCausalLM``, ``model.layers.*``) or official-named ones. This writer produces the file that
converter produces, from the official tensors directly: the same tensor names, shapes (numpy order;
GGUF stores the reverse), tensor types and metadata keys.

RWKV-6, official -> GGUF (N = layer; C = n_embd, D = mix-LoRA rank, Dd = decay-LoRA rank, A = attention
size, H x S = heads x head size)::

    emb.weight (V, C)                  token_embd.weight
    blocks.0.ln0.*                     token_embd_norm.*
    blocks.N.ln1.* / ln2.*             blk.N.attn_norm.* / blk.N.attn_norm_2.*
    att.time_maa_x (1, 1, C)           blk.N.time_mix_lerp_x.weight (C)
    att.time_maa_{w,k,v,r,g}           blk.N.time_mix_lerp_fused.weight (5, 1, 1, C), rows w, k, v, r, g
    att.time_maa_w1 (C, 5D)            blk.N.time_mix_w1.weight (5D, C)       transposed
    att.time_maa_w2 (5, D, C)          blk.N.time_mix_w2.weight (5, C, D)     last two dims swapped
    att.time_decay (1, 1, A)           blk.N.time_mix_decay.weight (A)
    att.time_decay_w1 (C, Dd)          blk.N.time_mix_decay_w1.weight (Dd, C) transposed
    att.time_decay_w2 (Dd, A)          blk.N.time_mix_decay_w2.weight (A, Dd) transposed
    att.time_faaaa (H, S)              blk.N.time_mix_first.weight (H, S)
    att.{key,value,receptance,gate,output}.weight   blk.N.time_mix_{key,value,receptance,gate,output}.weight
    att.ln_x.*                         blk.N.time_mix_ln.*
    ffn.time_maa_{k,r} (1, 1, C)       blk.N.channel_mix_lerp_{k,r}.weight (C)
    ffn.{key,receptance,value}.weight  blk.N.channel_mix_{key,receptance,value}.weight
    ln_out.* / head.weight             output_norm.* / output.weight

Values are unchanged (llama.cpp computes ``exp(-exp(time_decay + lora))`` and uses ``time_first`` as
the bonus, as the official code does). llama.cpp's converter divides ``time_mix_output`` and
``channel_mix_value`` by ``2**(N // rescale_every)`` when the HF config asks for fp16 rescaling and
halves the residual every ``rescale_every_n_layers`` layers; this writer always writes
``rescale_every_n_layers = 0`` and the weights un-rescaled, which is the same function without the
rounding (llama.cpp computes activations in fp32).

RWKV-7, official -> GGUF (Dw, Da, Dv, Dg = the decay, in-context-learning-rate, value-residual and
gate LoRA ranks)::

    att.x_{r,w,k,v,a,g} (1, 1, C)      blk.N.time_mix_lerp_fused.weight (6, 1, 1, C), rows r, w, k, v, a, g
    att.{w,a,v}0 (1, 1, C)             blk.N.time_mix_{w,a,v}0.weight (C)
    att.{w,a,v,g}1 (C, D)              blk.N.time_mix_{w,a,v,g}1.weight (D, C)  transposed
    att.{w,a,v,g}2 (D, C)              blk.N.time_mix_{w,a,v,g}2.weight (C, D)  transposed
    att.k_k, att.k_a (1, 1, C)         blk.N.time_mix_k_k.weight, blk.N.time_mix_k_a.weight (C)
    att.r_k (H, S)                     blk.N.time_mix_r_k.weight (H*S)
    att.{key,value,receptance,output}.weight, att.ln_x.*   as for RWKV-6 (no gate matrix)
    ffn.x_k (1, 1, C)                  blk.N.channel_mix_lerp_k.weight (C)
    ffn.{key,value}.weight             blk.N.channel_mix_{key,value}.weight

Layer 0 never uses its value-residual LoRA; llama.cpp still loads ``blk.0.time_mix_v{0,1,2}`` with the
in-context-learning-rate rank, and its converter fills them with copies of ``time_mix_a{0,1,2}``: so
does this writer.

Tensor types, as the converter picks them: 1-D tensors, norms, ``time_mix_first``, ``time_mix_w1``,
``time_mix_w2``, ``time_mix_decay_w1/_w2`` and ``time_mix_lerp_fused`` are always F32; every other
matrix (embedding and head included) takes the file type: F32, F16, BF16 or Q8_0. A matrix whose rows
are not a multiple of Q8_0's 32-value block falls back to F16, as the converter does.

4-bit files (``q4_0``, ``q4_k_m``): llama.cpp's converter writes none; its users run ``llama-quantize``
on the F32 file, which picks each tensor's type itself (head Q6_K, LoRAs and mixes untouched, per-shape
fallbacks) in ways that change between versions. So this writer writes the F32 file and runs that
quantizer (``llama_model_quantize`` through llama-cpp-python) rather than imitating it. ``pure`` is
``llama-quantize --pure``; a pure Q4_0 needs no llama.cpp: ``tensor_type`` follows the quantizer's
rules (``quantizer_keeps``, from ``llama-quant.cpp``) and gguf's numpy Q4_0 is bit-identical to
``quantize_row_q4_0_ref``.

Metadata: ``general.architecture``, ``general.type``, ``general.name``, ``general.file_type``,
``general.quantization_version``; ``{arch}.context_length`` (1048576: RWKV has no context limit),
``embedding_length``, ``block_count``, ``feed_forward_length``, ``attention.head_count`` (0: llama.cpp
requires it and derives heads from ``wkv.head_size``), ``attention.layer_norm_epsilon`` (1e-5),
``wkv.head_size``; RWKV-6: ``time_mix_extra_dim`` (D), ``time_decay_extra_dim`` (Dd),
``rescale_every_n_layers``; RWKV-7: ``attention.decay_lora_rank``, ``attention.iclr_lora_rank``,
``attention.value_residual_mix_lora_rank``, ``attention.gate_lora_rank``. The ranks are read from the
weights (llama.cpp's converter hard-codes the RWKV-6 ones for the released sizes, where they agree).
Tokenizer: ``tokenizer.ggml.model = "rwkv"``, ``tokenizer.ggml.tokens`` = ``<s>`` then the World
vocabulary's entries by id, each written as the escaped text of its bytes (Python's ``repr`` of the
bytes without ``b'...'``, which llama.cpp's RWKV tokenizer un-escapes), ``[PAD{i}]`` for ids the
vocabulary lacks; ``tokenizer.ggml.token_type`` CONTROL for id 0, NORMAL, UNUSED for pads;
``bos``/``eos`` id 0, ``eot`` id 261 (``"\\n\\n"``, as the converter sets it), ``chat_template``
``"rwkv-world"``. A model with fewer rows than the World vocabulary (a test model) gets its first
``vocab_size`` entries.

Sources read (ggml-org/llama.cpp as vendored by llama-cpp-python 0.3.36): ``conversion/rwkv.py``
(``Rwkv6Model``, ``Rwkv7Model``), ``conversion/base.py`` (``prepare_tensors``: the F32 rules and the
Q8_0 fallback; ``_set_vocab_rwkv_world``), ``gguf-py/gguf/constants.py`` and ``tensor_mapping.py``,
``src/models/rwkv6.cpp``, ``rwkv6-base.cpp``, ``rwkv7.cpp`` (the shapes llama.cpp loads).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, infer_model
from rwkv_zoo.fileio import atomic_path

ARCH = {"v6": "rwkv6", "v7": "rwkv7"}
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's convert_hf_to_gguf.py writes
QUANTIZE_TYPES = ("q4_0", "q4_k_m")  # what llama.cpp's llama-quantize makes from an F32 GGUF
FILE_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES
TYPE_KEY = "gguf_file_type"  # in ``write``'s metadata: which file type to write (else from the dtype)
PURE_KEY = "gguf_pure"  # in ``write``'s metadata: "1" for llama-quantize's --pure
CONTEXT_LENGTH = 1048576
EOT_TOKEN = 261  # "\n\n" in the World vocabulary
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_V6_LERPS = "wkvrg"
_V7_LERPS = "rwkvag"


def file_type_of(name: str) -> str:
    """``f32``/``f16``/``bf16``/``q8_0``/``q4_0``/``q4_k_m`` from what a user types (torch dtype names included)."""
    key = name.strip().lower().replace("-", "_").removeprefix("torch.")
    aliases = {"fp32": "f32", "float32": "f32", "float": "f32", "fp16": "f16", "float16": "f16",
               "half": "f16", "bfloat16": "bf16", "q8": "q8_0", "int8": "q8_0", "q4": "q4_0",
               "q4_k": "q4_k_m"}
    key = aliases.get(key, key)
    if key not in FILE_TYPES:
        raise CheckpointError(f"GGUF file type {name!r} is not one of {', '.join(FILE_TYPES)}")
    return key


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _common(t: Mapping[str, Tensor], out: dict[str, Tensor], L: int) -> None:
    out["token_embd.weight"] = t["emb.weight"]
    for p in ("weight", "bias"):
        out[f"token_embd_norm.{p}"] = t[f"blocks.0.ln0.{p}"]
        out[f"output_norm.{p}"] = t[f"ln_out.{p}"]
        for i in range(L):
            b = f"blocks.{i}."
            out[f"blk.{i}.attn_norm.{p}"] = t[b + f"ln1.{p}"]
            out[f"blk.{i}.attn_norm_2.{p}"] = t[b + f"ln2.{p}"]
            out[f"blk.{i}.time_mix_ln.{p}"] = t[b + f"att.ln_x.{p}"]
    out["output.weight"] = t["head.weight"]


def v6_tensors(t: Mapping[str, Tensor], L: int) -> dict[str, Tensor]:
    """Official RWKV-6 tensors -> llama.cpp's names and layouts (see the module docstring)."""
    out: dict[str, Tensor] = {}
    _common(t, out, L)
    for i in range(L):
        a, f, g = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        out[g + "time_mix_lerp_x.weight"] = _flat(t[a + "time_maa_x"])
        # [5, 1, 1, C]: llama.cpp adds all five mixes in one broadcast op
        out[g + "time_mix_lerp_fused.weight"] = torch.stack([_flat(t[a + f"time_maa_{n}"]) for n in _V6_LERPS]
                                                            ).reshape(5, 1, 1, -1)
        out[g + "time_mix_w1.weight"] = t[a + "time_maa_w1"].t()
        out[g + "time_mix_w2.weight"] = t[a + "time_maa_w2"].permute(0, 2, 1)
        out[g + "time_mix_decay.weight"] = _flat(t[a + "time_decay"])
        out[g + "time_mix_decay_w1.weight"] = t[a + "time_decay_w1"].t()
        out[g + "time_mix_decay_w2.weight"] = t[a + "time_decay_w2"].t()
        out[g + "time_mix_first.weight"] = t[a + "time_faaaa"]
        for n in ("key", "value", "receptance", "gate", "output"):
            out[g + f"time_mix_{n}.weight"] = t[a + f"{n}.weight"]
        out[g + "channel_mix_lerp_k.weight"] = _flat(t[f + "time_maa_k"])
        out[g + "channel_mix_lerp_r.weight"] = _flat(t[f + "time_maa_r"])
        for n in ("key", "receptance", "value"):
            out[g + f"channel_mix_{n}.weight"] = t[f + f"{n}.weight"]
    return out


def v7_tensors(t: Mapping[str, Tensor], L: int) -> dict[str, Tensor]:
    """Official RWKV-7 tensors -> llama.cpp's names and layouts (see the module docstring)."""
    out: dict[str, Tensor] = {}
    _common(t, out, L)
    for i in range(L):
        a, f, g = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blk.{i}."
        out[g + "time_mix_lerp_fused.weight"] = torch.stack([_flat(t[a + f"x_{n}"]) for n in _V7_LERPS]
                                                            ).reshape(6, 1, 1, -1)
        for n in "wavg":
            src = "a" if (n == "v" and i == 0) else n  # layer 0's unused v LoRA: copies of a's, as llama.cpp's
            if n != "g":
                out[g + f"time_mix_{n}0.weight"] = _flat(t[a + f"{src}0"])
            out[g + f"time_mix_{n}1.weight"] = t[a + f"{src}1"].t()
            out[g + f"time_mix_{n}2.weight"] = t[a + f"{src}2"].t()
        out[g + "time_mix_k_k.weight"] = _flat(t[a + "k_k"])
        out[g + "time_mix_k_a.weight"] = _flat(t[a + "k_a"])
        out[g + "time_mix_r_k.weight"] = _flat(t[a + "r_k"])
        for n in ("key", "value", "receptance", "output"):
            out[g + f"time_mix_{n}.weight"] = t[a + f"{n}.weight"]
        out[g + "channel_mix_lerp_k.weight"] = _flat(t[f + "x_k"])
        for n in ("key", "value"):
            out[g + f"channel_mix_{n}.weight"] = t[f + f"{n}.weight"]
    return out


# Matrices llama.cpp's converter keeps in F32 whatever the file type (its prepare_tensors list).
_ALWAYS_F32 = re.compile(r"\.(time_mix_first|time_mix_w1|time_mix_w2|time_mix_decay_w1|time_mix_decay_w2"
                         r"|time_mix_lerp_fused)\.weight$")


# What llama.cpp's quantizer (llama-quant.cpp, tensor_allows_quantization) leaves as it is in the file it
# quantizes, besides 1-D tensors and norms: every RWKV LoRA, the decay/value/iclr biases, the mixes.
_QUANTIZER_KEEPS = re.compile(r"\.time_mix_(first|w0|w1|w2|v0|v1|v2|a0|a1|a2|g1|g2|decay_w1|decay_w2|lerp_fused)"
                              r"\.weight$")


def quantizer_keeps(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer copies tensor ``name`` unchanged (F32 in a file made from F32)."""
    return (len(shape) < 2 or not name.endswith("weight") or name.endswith("_norm.weight")
            or bool(_QUANTIZER_KEEPS.search(name)))


def tensor_type(name: str, shape: tuple[int, ...], file_type: str):
    """The GGML type ``name`` of ``shape`` gets in a ``file_type`` file: llama.cpp's converter's choice for
    f32/f16/bf16/q8_0; for q4_0, ``llama-quantize --pure``'s (every tensor it quantizes Q4_0, F16 where
    rows do not split into 32-value blocks). Mixed files (plain q4_0, q4_k_m) are llama.cpp's to choose."""
    from gguf import GGMLQuantizationType as Q

    if file_type == "q4_0":
        if quantizer_keeps(name, shape):
            return Q.F32
        return Q.F16 if shape[-1] % 32 else Q.Q4_0
    if file_type not in CONVERTER_TYPES:
        raise CheckpointError(f"GGUF {file_type} tensor types are chosen by llama.cpp's quantizer")
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or _ALWAYS_F32.search(name):
        return Q.F32
    if file_type == "q8_0" and shape[-1] % 32:
        return Q.F16  # the converter's fallback when rows do not split into 32-value blocks
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[file_type]


def gguf_tensors(tensors: Mapping[str, Tensor], version: str | None = None) -> tuple[str, dict[str, Tensor]]:
    """``(architecture, {gguf name: tensor})`` for official ``tensors`` (fp32 copies are not made here)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    version = version or infer_model(shapes)[0]
    if version not in ARCH:
        raise CheckpointError(f"llama.cpp has RWKV-6 and RWKV-7 only (architectures rwkv6, rwkv7); a {version} "
                              f"model cannot be written as GGUF")
    stray = sorted(k for k in tensors if k.endswith(".att.time_state"))
    if stray:
        raise CheckpointError(f"llama.cpp's GGUF has no place for a tuned state ({stray[0]}, ...)")
    L = 1 + max(int(m.group(1)) for k in tensors if (m := _BLOCK.match(k)))
    fn = v6_tensors if version == "v6" else v7_tensors
    try:
        return ARCH[version], fn(tensors, L)
    except KeyError as exc:
        raise CheckpointError(f"a {version} model without {exc.args[0]}; cannot write GGUF") from None


@functools.lru_cache(maxsize=1)
def _world_vocab() -> dict[int, bytes]:
    from rwkv_zoo.tokenizers import find_world_vocab, read_world_vocab

    return read_world_vocab(find_world_vocab())


def _tokens(vocab_size: int) -> tuple[list[bytes], list[int]]:
    from gguf import TokenType

    vocab = _world_vocab()
    tokens, types = [b"<s>"], [int(TokenType.CONTROL)]
    for i in range(1, vocab_size):
        if i in vocab:
            tokens.append(repr(vocab[i])[2:-1].encode("utf-8"))  # b'\xff' -> "\xff": llama.cpp un-escapes
            types.append(int(TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(TokenType.UNUSED))
    return tokens, types


def _metadata(w, arch: str, t: Mapping[str, Tensor], out: Mapping[str, Tensor], file_type: str) -> None:
    import gguf

    L = 1 + max(int(m.group(1)) for k in t if (m := _BLOCK.match(k)))
    V, C = t["emb.weight"].shape
    _, S = t["blocks.0.att.time_faaaa" if arch == "rwkv6" else "blocks.0.att.r_k"].shape
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(C)
    w.add_block_count(L)
    w.add_feed_forward_length(t["blocks.0.ffn.key.weight"].shape[0])
    w.add_head_count(0)  # llama.cpp requires the key; heads come from wkv.head_size
    w.add_layer_norm_eps(1e-5)
    w.add_wkv_head_size(S)
    if arch == "rwkv6":
        w.add_rescale_every_n_layers(0)
        w.add_time_mix_extra_dim(t["blocks.0.att.time_maa_w1"].shape[1] // 5)
        w.add_time_decay_extra_dim(t["blocks.0.att.time_decay_w1"].shape[1])
    else:
        w.add_decay_lora_rank(t["blocks.0.att.w1"].shape[1])
        w.add_iclr_lora_rank(t["blocks.0.att.a1"].shape[1])
        v_layer = 1 if L > 1 else 0  # layer 0's v LoRA is written with the iclr rank
        w.add_value_residual_mix_lora_rank(out[f"blk.{v_layer}.time_mix_v1.weight"].shape[0])
        w.add_gate_lora_rank(t["blocks.0.att.g1"].shape[1])
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[file_type]
    w.add_file_type(int(ftype))
    tokens, types = _tokens(V)
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    if V > EOT_TOKEN:
        w.add_eot_token_id(EOT_TOKEN)
    w.add_chat_template("rwkv-world")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(tensors: Mapping[str, Tensor], path: str | Path, *, file_type: str = "f32",
               version: str | None = None, name: str | None = None, pure: bool = False) -> dict[str, str]:
    """Write official ``tensors`` (un-rescaled) as a llama.cpp GGUF file; returns ``{gguf name: type}``.

    f32/f16/bf16/q8_0 are what llama.cpp's converter writes. q4_0 and q4_k_m are what ``llama-quantize``
    makes from the F32 file: this writes that F32 file to a temporary folder next to ``path`` and runs
    llama.cpp's own quantizer on it through llama-cpp-python, so its per-tensor choices (output in Q6_K,
    LoRAs kept F32, fallbacks) are llama.cpp's of the installed version. ``pure=True`` with q4_0 is
    ``llama-quantize --pure``: every tensor it quantizes becomes Q4_0, written here with gguf's numpy
    quantizer (bit-identical to llama.cpp's ``quantize_row_q4_0_ref``; tests/formats/test_gguf.py checks
    it against llama.cpp), so it needs no llama-cpp-python.

    Written to a temporary name next to ``path`` and renamed over it when complete."""
    try:
        import gguf
        from gguf import quants  # noqa: F401
    except ImportError:
        raise CheckpointError("writing GGUF needs the gguf package: pip install 'rwkv-zoo[gguf]'") from None
    file_type = file_type_of(file_type)
    if pure and file_type not in QUANTIZE_TYPES:
        raise CheckpointError(f"a pure GGUF is a quantizer's option ({', '.join(QUANTIZE_TYPES)}), not {file_type}'s")
    llama_cpp = _llama_cpp(file_type) if needs_llama_cpp(file_type, pure) else None
    arch, out = gguf_tensors(tensors, version)
    path = Path(path)
    name = name or path.stem
    if llama_cpp is None:
        with atomic_path(path, suffix=".gguf") as tmp:
            return _write_file(tmp, arch, tensors, out, file_type, name)
    import tempfile

    import gguf

    with atomic_path(path, suffix=".gguf") as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{path.name}.f32-", dir=path.parent) as folder:
        f32 = Path(folder) / "f32.gguf"
        _write_file(str(f32), arch, tensors, out, "f32", name)
        _llama_quantize(llama_cpp, f32, Path(tmp), file_type, pure)
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp).tensors}


def _write_file(tmp: str, arch: str, tensors: Mapping[str, Tensor], out: Mapping[str, Tensor], file_type: str,
                name: str) -> dict[str, str]:
    import gguf
    from gguf import quants

    types: dict[str, str] = {}
    w = gguf.GGUFWriter(tmp, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    _metadata(w, arch, tensors, out, file_type)
    for key, t in out.items():
        data = t.detach().to(torch.float32).contiguous().numpy()
        qtype = tensor_type(key, data.shape, file_type)
        try:
            w.add_tensor(key, quants.quantize(data, qtype), raw_dtype=qtype)
        except NotImplementedError:  # older gguf releases quantize BF16 and Q8_0 only
            raise CheckpointError(f"this gguf package cannot write {qtype.name}: pip install -U gguf") from None
        types[key] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def needs_llama_cpp(file_type: str, pure: bool = False) -> bool:
    """Whether a ``file_type`` (``pure``) file is made by llama.cpp's quantizer (llama-cpp-python)."""
    return file_type in QUANTIZE_TYPES and not (pure and file_type == "q4_0")


def check_quantizer(file_type: str, pure: bool = False) -> None:
    """Raise the one-line error ``write_gguf`` would, before any weights are read."""
    if needs_llama_cpp(file_type, pure):
        _llama_cpp(file_type)


def _llama_cpp(file_type: str):
    try:
        import llama_cpp
    except ImportError:
        hint = " (or a pure Q4_0 without it: --gguf-pure)" if file_type == "q4_0" else ""
        raise CheckpointError(f"GGUF {file_type} is made by llama.cpp's quantizer, which needs llama-cpp-python: "
                              f"pip install llama-cpp-python{hint}") from None
    return llama_cpp


def _llama_quantize(llama_cpp, src: Path, dst: Path, file_type: str, pure: bool) -> None:
    """``llama-quantize [--pure] src dst FILE_TYPE`` through llama-cpp-python's binding of the same function."""
    import ctypes
    import os
    import tempfile

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[file_type]
    params.pure = pure
    # llama.cpp logs a line per tensor on stderr (fd 2, from C): kept aside, shown only if it fails
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        try:
            os.dup2(log.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if rc != 0:
            log.seek(0)
            tail = [x for x in log.read().decode(errors="replace").splitlines() if x.strip()][-1:]
            raise CheckpointError(f"llama.cpp's quantizer failed ({file_type}, code {rc}): {' '.join(tail)}")


class GGUFFormat(CheckpointFormat):
    name = "gguf"
    description = "llama.cpp GGUF (RWKV-6 / RWKV-7; F32, F16, BF16, Q8_0; Q4_0, Q4_K_M by llama.cpp), write only"
    writable = True

    def detect(self, path: Path) -> bool:
        if not Path(path).is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"

    def read(self, path: Path, *, mmap: bool = True) -> Checkpoint:
        raise CheckpointError(f"{path}: a GGUF file (llama.cpp); rwkv_zoo writes GGUF but does not read it back. "
                              f"Load the checkpoint it was converted from.")

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        dtypes = {t.dtype for t in tensors.values()}
        default = "f16" if dtypes == {torch.float16} else "bf16" if dtypes == {torch.bfloat16} else "f32"
        write_gguf(tensors, path, file_type=metadata.get(TYPE_KEY) or default, version=metadata.get("version"),
                   pure=metadata.get(PURE_KEY) == "1")
