"""Hugging Face folders: transformers' RWKV-4 (``model_type: "rwkv"``, read and write) and the RWKV
org's remote-code RWKV-5/6 folders (``"rwkv5"``, ``"rwkv6"`` with ``rwkv.blocks.*`` keys; read and
write). Writing a RWKV-7 model gives the fla-hub folder (``fla.py``).

Which layout each version gets on writing, and who reads it: v4 -> transformers' ``RwkvForCausalLM``;
v5/v6 -> the RWKV org's remote-code layout (``RWKV/v6-Finch-*-HF``, ``Rwkv6ForCausalLM``: the layout
llama.cpp's ``convert_hf_to_gguf.py`` reads for RWKV-6; its converter has no fla RWKV-6 names);
v7 -> fla-hub (``fla-hub/rwkv7-*``, ``RWKV7ForCausalLM``: what fla and llama.cpp read). The remote-code
folders carry no modeling code (``auto_map``): transformers needs the RWKV org's
``modeling_rwkv{5,6}.py``/``configuration_rwkv{5,6}.py`` copied in to load them; llama.cpp and
rwkv_zoo need only the config, the weights and (World models) ``rwkv_vocab_v20230424.txt``.

Name mapping, HF -> official (the inverse is used for writing)::

    rwkv.embeddings.weight                  emb.weight
    rwkv.blocks.0.pre_ln.{weight,bias}      blocks.0.ln0.{weight,bias}
    rwkv.blocks.N.ln1 / ln2                 blocks.N.ln1 / ln2
    rwkv.blocks.N.attention.*               blocks.N.att.*
    rwkv.blocks.N.feed_forward.*            blocks.N.ffn.*
    ...time_mix_key / _value / _receptance  ...time_mix_k / _v / _r
    ...attention.time_mix_gate  (v5)        ...att.time_mix_g
    rwkv.ln_out.{weight,bias}               ln_out.{weight,bias}
    head.weight                             head.weight          (no ``rwkv.`` prefix)

Everything else keeps its official name and shape: v4 ``time_decay``/``time_first`` (A) are stored
**raw** (transformers applies ``-exp(time_decay)`` at run time and adds ``time_first`` in the exponent,
as the official code does); v5 ``time_decay``/``time_faaaa`` (H, N), ``gate``, ``ln_x``; v6 keeps all
``time_maa_*`` (x, w, k, v, r, g, w1 (C, 5·D), w2 (5, D, C)), ``time_decay`` (1, 1, A),
``time_decay_w1/w2``, ``time_faaaa`` (H, N) untouched, also raw. No tensor is transposed or
transformed; the keys are only renamed.

``rescale_every`` in an HF config is a run-time switch (transformers divides ``attention.output`` and
``feed_forward.value`` by ``2**(layer // rescale_every)`` in memory when the model enters eval mode);
the weights on disk are un-rescaled, so it is not applied here. Writing puts ``rescale_every: 6`` in
the config for fp16 weights (as the official package rescales fp16 only) and ``0`` otherwise, so that
transformers' fp32/bf16 numerics equal the official ones exactly.

Sources read (verified against, not copied):

- huggingface/transformers ``src/transformers/models/rwkv/convert_rwkv_checkpoint_to_hf.py``
  (``convert_state_dict``: the renames above);
- huggingface/transformers ``src/transformers/models/rwkv/modeling_rwkv.py`` and
  ``configuration_rwkv.py`` (transformers 5.24.0 as installed): parameter names and shapes,
  raw ``time_decay``/``time_first``, ``_rescale_layers``, config fields (``hidden_size``,
  ``attention_hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``vocab_size``,
  ``context_length``, ``layer_norm_epsilon``, ``rescale_every``, ``tie_word_embeddings``,
  ``bos/eos_token_id``; ``architectures: ["RwkvForCausalLM"]``);
- BBuf/RWKV-World-HF-Tokenizer ``scripts/convert_rwkv5_checkpoint_to_hf.py`` (adds
  ``time_mix_g -> time_mix_gate``), ``scripts/convert_rwkv6_checkpoint_to_hf.py`` (prefix renames only:
  its ``time_maa_*`` renames are commented out), ``rwkv5_model/modeling_rwkv5.py``,
  ``rwkv6_model/modeling_rwkv6.py`` (remote code of RWKV/rwkv-5-world-1b5 and RWKV/rwkv-6-world-1b6:
  same shapes as official, ``exp(-exp(time_decay))`` at run time, ``time_faaaa`` used directly),
  ``rwkv6_model/configuration_rwkv6.py`` and ``rwkv{5,6}_model/config.json``
  (``model_type`` ``rwkv5``/``rwkv6``, ``architectures`` ``Rwkv5ForCausalLM``/``Rwkv6ForCausalLM``,
  ``head_size``, ``auto_map``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, infer_model

from . import _folders

MODEL_TYPES = {"rwkv": "v4", "rwkv5": "v5", "rwkv6": "v6"}

_TIME_MIX_TO_OFFICIAL = {"key": "k", "value": "v", "receptance": "r", "gate": "g"}
_TIME_MIX_TO_HF = {v: k for k, v in _TIME_MIX_TO_OFFICIAL.items()}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def hf_to_official(name: str) -> str:
    """One HF key -> its official name (keys that match no rule are returned as they are)."""
    name = name.removeprefix("rwkv.")
    if name.startswith("embeddings."):
        return "emb." + name.removeprefix("embeddings.")
    name = re.sub(r"^blocks\.0\.pre_ln\.", "blocks.0.ln0.", name)
    name = re.sub(r"^blocks\.(\d+)\.attention\.", r"blocks.\1.att.", name)
    name = re.sub(r"^blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn.", name)
    m = re.match(r"^(blocks\.\d+\.(?:att|ffn)\.time_mix_)(key|value|receptance|gate)$", name)
    if m:
        name = m.group(1) + _TIME_MIX_TO_OFFICIAL[m.group(2)]
    return name


def official_to_hf(name: str) -> str:
    """One official key -> its transformers name (the inverse of ``hf_to_official``)."""
    if name == "head.weight":
        return name
    if name.startswith("emb."):
        return "rwkv.embeddings." + name.removeprefix("emb.")
    name = re.sub(r"^blocks\.0\.ln0\.", "blocks.0.pre_ln.", name)
    name = re.sub(r"^blocks\.(\d+)\.att\.", r"blocks.\1.attention.", name)
    name = re.sub(r"^blocks\.(\d+)\.ffn\.", r"blocks.\1.feed_forward.", name)
    m = re.match(r"^(blocks\.\d+\.(?:attention|feed_forward)\.time_mix_)([kvrg])$", name)
    if m:
        name = m.group(1) + _TIME_MIX_TO_HF[m.group(2)]
    return "rwkv." + name


def _is_hf_layout(keys: list[str]) -> bool:
    return any(k.startswith(("rwkv.embeddings.", "rwkv.blocks.")) for k in keys) or (
        "embeddings.weight" in keys and any(k.startswith("blocks.") for k in keys)  # an RwkvModel (no head)
    )


class HFFolder(CheckpointFormat):
    name = "hf"
    description = ("Hugging Face folder: transformers RWKV-4, RWKV org remote-code RWKV-5/6 (read/write), "
                   "fla-hub RWKV-7 (write); config.json + model.safetensors / pytorch_model.bin, sharded or not")
    writable = True

    def detect(self, path: Path) -> bool:
        def config_says(cfg: dict) -> bool:
            archs = cfg.get("architectures") or []
            return any(a in ("RwkvForCausalLM", "Rwkv5ForCausalLM", "Rwkv6ForCausalLM") for a in archs)

        return _folders.detect_folder(path, MODEL_TYPES, _is_hf_layout, config_says)

    def _convert(self, folder: Path, tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        cfg = _folders.read_config(folder)
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{folder}: config model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
        out: dict[str, Tensor] = {}
        for k, v in tensors.items():
            name = hf_to_official(k)
            if name in out:
                raise CheckpointError(f"{folder}: {k} and another key both map to {name}")
            out[name] = v
        if "head.weight" not in out and cfg.get("tie_word_embeddings") and "emb.weight" in out:
            out["head.weight"] = out["emb.weight"].clone()  # tied in HF; two parameters here
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        if eps != 1e-5:
            warnings.warn(f"{folder}: layer_norm_epsilon={eps} in config.json; rwkv_zoo (like the official "
                          f"package) uses 1e-5, so logits will differ slightly", stacklevel=3)
        meta = {"format": self.name, "hf_model_type": model_type, "hf_config": json.dumps(cfg, sort_keys=True)}
        return out, meta

    def read(self, path: Path, *, mmap: bool = True) -> Checkpoint:
        folder = _folders.folder_of(Path(path))
        if folder is None:
            raise CheckpointError(f"{path}: not an HF model folder (no config.json)")
        tensors, meta = self._convert(folder, _folders.load_tensors(folder, mmap=mmap))
        return Checkpoint(tensors, self.name, str(folder), meta)

    def read_shapes(self, path: Path):
        folder = _folders.folder_of(Path(path))
        if folder is None:
            return None
        tensors, meta = self._convert(folder, _folders.load_meta(folder))
        return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, meta

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        version = metadata.get("version") or infer_model(shapes)[0]
        if version == "v7":
            from .fla import write_fla_v7

            write_fla_v7(tensors, Path(path), metadata)
            return
        if version not in ("v4", "v5", "v6"):
            raise CheckpointError(
                f"an HF folder holds RWKV-4 (transformers), RWKV-5/6 (the RWKV org's remote-code layout) or "
                f"RWKV-7 (fla-hub); a {version} model has none. Write official or safetensors."
            )
        stray = [k for k in tensors if k.endswith(".att.time_state")]
        if stray:
            raise CheckpointError(f"an HF {version} folder has no place for a tuned state ({stray[0]}, ...)")
        if version != "v4":
            _write_remote_code(tensors, Path(path), metadata, version)
            return
        hf = {official_to_hf(k): v.contiguous() for k, v in tensors.items()}
        V, C = shapes["emb.weight"]
        dtype = tensors["emb.weight"].dtype
        L = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        config = {
            "architectures": ["RwkvForCausalLM"],
            "model_type": "rwkv",
            "vocab_size": V,
            "hidden_size": C,
            "attention_hidden_size": shapes["blocks.0.att.key.weight"][0],
            "intermediate_size": shapes["blocks.0.ffn.key.weight"][0],
            "num_hidden_layers": L,
            "context_length": 4096,  # only sizes transformers' CUDA kernel (longest single forward)
            "layer_norm_epsilon": 1e-5,
            "rescale_every": 6 if dtype == torch.float16 else 0,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": True,
            "dtype": _DTYPE_NAMES.get(dtype, "float32"),
        }

        def fill(tmp: Path) -> None:
            from safetensors.torch import save_file

            # transformers refuses safetensors without metadata format "pt"
            st_meta = {"format": "pt"}
            if metadata.get("rwkv_zoo_version"):
                st_meta["rwkv_zoo_version"] = metadata["rwkv_zoo_version"]
            save_file(hf, str(tmp / _folders.SAFETENSORS), metadata=st_meta)
            (tmp / _folders.CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        _folders.write_folder_atomically(
            Path(path), fill, keep=lambda name: name != _folders.CONFIG and not _folders.is_weight_file(name)
        )


def _write_remote_code(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str], version: str) -> None:
    """The RWKV org's remote-code RWKV-5/6 folder: official tensors renamed, no values changed."""
    hf = {official_to_hf(k): v.contiguous() for k, v in tensors.items()}
    V, C = tensors["emb.weight"].shape
    key = "time_faaaa" if version == "v6" else "time_decay"
    H, N = tensors[f"blocks.0.att.{key}"].shape
    dtype = tensors["emb.weight"].dtype
    L = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    model_type = "rwkv5" if version == "v5" else "rwkv6"
    config = {
        "architectures": [f"Rwkv{version[1]}ForCausalLM"],
        "model_type": model_type,
        "vocab_size": V,
        "hidden_size": C,
        "num_hidden_layers": L,
        "attention_hidden_size": tensors["blocks.0.att.key.weight"].shape[0],
        "head_size": N,
        "num_attention_heads": H,
        "intermediate_size": tensors["blocks.0.ffn.key.weight"].shape[0],
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 0,  # the weights are un-rescaled; llama.cpp's converter divides by this if set
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
        "context_length": 4096,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }
    _folders.write_hf_folder(path, hf, config, metadata)
