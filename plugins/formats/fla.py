"""flash-linear-attention (fla) model folders for RWKV-6 and RWKV-7 (``config.json`` with
``model_type`` ``"rwkv6"``/``"rwkv7"`` and ``model.layers.*`` keys): read both; write RWKV-7 (the
fla-hub layout of ``fla-hub/rwkv7-*``, which fla's models and llama.cpp's ``convert_hf_to_gguf.py``
read; ``--to hf`` writes it too).

Writing is the inverse of the RWKV-7 mapping below, in the layout of fla's
``utils/convert_from_rwkv7.py``: separate ``attn.x_{r,w,k,v,a,g}`` of shape (1, 1, C) (llama.cpp stacks
them into its fused (6, 1, 1, C) tensor, so they must keep that shape), everything else as listed, no
``v_lora`` in layer 0, untied ``lm_head``. The config carries what fla's ``RWKV7Config`` and llama.cpp's
converter read: ``hidden_size``, ``num_hidden_layers``, ``head_dim``, ``num_heads``,
``intermediate_size``, ``{decay,a,v,gate}_low_rank_dim``, ``norm_eps``, ``vocab_size``, ...
A World-vocabulary model (65536 rows) also gets ``rwkv_vocab_v20230424.txt``, which llama.cpp's
converter requires next to the weights.

fla's ``model_type "rwkv6"`` is also used by the RWKV org's remote-code folders (``rwkv.blocks.*``
keys, see ``hf.py``); the two are told apart by the stored key names (``model.embeddings.weight`` /
``model.layers.*`` here), and by the config (``attn_mode``, architectures ``RWKV6ForCausalLM`` /
``RWKV7ForCausalLM``, upper case) when the weights cannot be listed.

Names common to both versions (fla -> official)::

    model.embeddings.weight                    emb.weight
    model.layers.0.pre_norm.{weight,bias}      blocks.0.ln0.*       (fla norm_first=True; required)
    model.layers.N.attn_norm / ffn_norm        blocks.N.ln1 / ln2
    model.layers.N.attn.g_norm.{weight,bias}   blocks.N.att.ln_x.*
    model.norm.{weight,bias}                   ln_out.*
    lm_head.weight                             head.weight          (emb.weight if tied and absent)

A norm saved without bias (fla ``norm_bias=False``) gets a zero bias, which is what it computes.

RWKV-6 (``fla/layers/rwkv6.py``; N = layer, D = mix-LoRA rank, C = hidden size)::

    attn.x_proj.0.mu                (C)        att.time_maa_x            (1, 1, C)
    attn.x_proj.0.linear.weight     (5D, C)    att.time_maa_w1           (C, 5D)   see below
    attn.x_proj.2.weight            (C, 5D)    att.time_maa_w2           (5, D, C) see below
    attn.x_bias                     (5, C)     att.time_maa_{r,w,k,v,g}  rows in that order
    attn.{r,k,v,g}_proj.linear.weight          att.{receptance,key,value,gate}.weight
    attn.w_proj.linear.lora.0.weight (Dd, C)   att.time_decay_w1 = transpose  (C, Dd)
    attn.w_proj.linear.lora.2.weight (A, Dd)   att.time_decay_w2 = transpose  (Dd, A)
    attn.w_proj.linear.lora.2.bias  (A)        att.time_decay            (1, 1, A)
    attn.bonus                      (H, N)     att.time_faaaa
    attn.o_proj.weight                         att.output.weight
    ffn.key.linear.weight / ffn.key.mu         ffn.key.weight / ffn.time_maa_k (1, 1, C)
    ffn.receptance.linear.weight / .mu         ffn.receptance.weight / ffn.time_maa_r
    ffn.value.weight                           ffn.value.weight

The five data-dependent-mix blocks are stored in the order **r, w, k, v, g** in fla and **w, k, v, r, g**
officially (SPEC §5.4). fla's ``x_proj.0.linear.weight`` is ``cat([W1_r, W1_w, W1_k, W1_v, W1_g], -1).T``
where ``W1_* = time_maa_w1.view(C, 5, D)[:, n_*]``; ``x_proj.2.weight`` is
``cat([W2_r, W2_w, W2_k, W2_v, W2_g], 0).T`` where ``W2_* = time_maa_w2[n_*]``; here both are transposed
back and re-ordered. Nothing else changes value: fla's decay is ``w = -exp(lora(x))`` (a log decay)
with ``lora.2.bias`` = the official ``time_decay`` (official: ``exp(-exp(d + lora))``), and the bonus is
used as is, like ``time_faaaa``. (fla's own GroupNorm uses ``norm_eps`` = 1e-5 where the official model
uses 64e-5; rwkv_zoo computes the official way.)

RWKV-7 (``fla/layers/rwkv7.py``)::

    attn.x_{r,w,k,v,a,g}            (1, 1, C)  att.x_{r,w,k,v,a,g}       (1, 1, C)
    attn.x_x  (Feb-Apr 2025 fla)    (6, C)     att.x_{r,w,k,v,a,g}       rows in that order
    attn.k_k, attn.k_a              (C)        att.k_k, att.k_a          (1, 1, C)  (Jan 2025: (1, 1, C))
    attn.r_k                        (H, N)     att.r_k
    attn.{r,k,v,o}_proj.weight                 att.{receptance,key,value,output}.weight
    attn.{w,a,v,g}_lora.lora.0.weight (D, C)   att.{w,a,v,g}1 = transpose  (C, D)
    attn.{w,a,v,g}_lora.lora.2.weight (C, D)   att.{w,a,v,g}2 = transpose  (D, C)
    attn.{w,a,v}_lora.lora.2.bias   (C)        att.{w,a,v}0              (1, 1, C)
    ffn.x_k                         (C)        ffn.x_k                   (1, 1, C)
    ffn.key.weight, ffn.value.weight           ffn.key.weight, ffn.value.weight

fla builds no ``v_lora`` for layer 0 (the official layer 0 never uses v0/v1/v2), so those keys are
absent and ``rwkv_zoo.load`` fills them. Values are unchanged: fla's log decay
``-e^{-1/2} sigmoid(w0 + lora)`` (Jan 2025: ``-softplus(-z) - 0.5``, the same function) is the official
one, ``a = sigmoid(a0 + ...)``, ``v`` lerps to ``v_first`` by ``sigmoid(v0 + ...)``, the gate LoRA is
``sigmoid(x g1) g2`` with no bias, token shift is ``x + (x_prev - x) * mu`` and the bonus is
``((r * k * r_k).sum(-1) * v)`` added after the GroupNorm.

Sources read (fla-org/flash-linear-attention at bc3b101d, Aug 2026, and its history of
``fla/layers/rwkv7.py``, commits 7997f2fa, 86cc3f5c, 0fc7945b, 6b673e6b, 0d815aa2):
``fla/layers/rwkv6.py`` (``RWKV6Attention``, ``LoRA``, ``LerpLinear``, ``DDLerpLinear``),
``fla/layers/rwkv7.py`` (``RWKV7Attention``), ``fla/models/rwkv6/modeling_rwkv6.py`` and
``fla/models/rwkv7/modeling_rwkv7.py`` (feed-forward, block, model and LM-head names),
``fla/models/rwkv{6,7}/configuration_rwkv{6,7}.py``, ``fla/modules/token_shift.py``,
``fla/ops/rwkv7/gate_output_correction.py``, and the converters ``utils/convert_from_rwkv6.py``
(remote-code RWKV-6 -> fla: the r,w,k,v,g re-ordering and transposes above) and
``utils/convert_from_rwkv7.py`` (official x070 .pth -> fla: the LoRA triplet naming
``{0: lora.2.bias, 1: lora.0.weight^T, 2: lora.2.weight^T}`` and the squeezes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rwkv_zoo.checkpoint import Checkpoint, CheckpointError, CheckpointFormat, infer_model

from . import _folders

MODEL_TYPES = {"rwkv6": "v6", "rwkv7": "v7"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class _Source:
    """The fla tensors, consumed by name; whatever is left over is passed on under its fla name, so
    that the loader's strict check names it."""

    def __init__(self, tensors: dict[str, Tensor], where: str):
        self.tensors = dict(tensors)
        self.where = where

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> Tensor:
        try:
            return self.tensors.pop(name)
        except KeyError:
            raise CheckpointError(f"{self.where}: missing fla key {name}") from None

    def norm(self, src: str, dst: str, out: dict[str, Tensor]) -> None:
        weight = self.tensors.pop(f"{src}.weight", None)
        bias = self.tensors.pop(f"{src}.bias", None)
        if weight is None and bias is None:
            raise CheckpointError(f"{self.where}: missing fla keys {src}.weight/.bias")
        ref = weight if weight is not None else bias
        out[f"{dst}.weight"] = weight if weight is not None else torch.ones_like(ref)  # affine=False
        out[f"{dst}.bias"] = bias if bias is not None else torch.zeros_like(ref)  # norm_bias=False


def _mix(t: Tensor) -> Tensor:
    return t.reshape(1, 1, -1)


def _common(s: _Source, L: int, out: dict[str, Tensor]) -> None:
    out["emb.weight"] = s.take("model.embeddings.weight")
    if not (s.has("model.layers.0.pre_norm.weight") or s.has("model.layers.0.pre_norm.bias")):
        raise CheckpointError(
            f"{s.where}: no model.layers.0.pre_norm (an fla model with norm_first=False); the official "
            f"architecture always normalises the embedding (ln0), so this model has no official equivalent"
        )
    s.norm("model.layers.0.pre_norm", "blocks.0.ln0", out)
    for i in range(L):
        s.norm(f"model.layers.{i}.attn_norm", f"blocks.{i}.ln1", out)
        s.norm(f"model.layers.{i}.ffn_norm", f"blocks.{i}.ln2", out)
        s.norm(f"model.layers.{i}.attn.g_norm", f"blocks.{i}.att.ln_x", out)
    s.norm("model.norm", "ln_out", out)


def _v6(s: _Source, L: int, out: dict[str, Tensor]) -> None:
    for i in range(L):
        a, f, o = f"model.layers.{i}.attn.", f"model.layers.{i}.ffn.", f"blocks.{i}."
        out[o + "att.time_maa_x"] = _mix(s.take(a + "x_proj.0.mu"))
        w1 = s.take(a + "x_proj.0.linear.weight")  # (5D, C), blocks r, w, k, v, g
        C, D = w1.shape[1], w1.shape[0] // 5
        r, w, k, v, g = w1.t().reshape(C, 5, D).unbind(1)
        out[o + "att.time_maa_w1"] = torch.stack((w, k, v, r, g), 1).reshape(C, 5 * D)
        w2 = s.take(a + "x_proj.2.weight")  # (C, 5D), blocks r, w, k, v, g
        r, w, k, v, g = w2.t().reshape(5, D, C).unbind(0)
        out[o + "att.time_maa_w2"] = torch.stack((w, k, v, r, g), 0)
        bias = s.take(a + "x_bias")  # (5, C), rows r, w, k, v, g
        for n, row in zip("rwkvg", bias.unbind(0), strict=True):
            out[o + f"att.time_maa_{n}"] = _mix(row.clone())
        for fla, off in (("r", "receptance"), ("k", "key"), ("v", "value"), ("g", "gate")):
            out[o + f"att.{off}.weight"] = s.take(a + f"{fla}_proj.linear.weight")
        out[o + "att.time_decay_w1"] = s.take(a + "w_proj.linear.lora.0.weight").t().contiguous()
        out[o + "att.time_decay_w2"] = s.take(a + "w_proj.linear.lora.2.weight").t().contiguous()
        out[o + "att.time_decay"] = _mix(s.take(a + "w_proj.linear.lora.2.bias"))
        out[o + "att.time_faaaa"] = s.take(a + "bonus")
        out[o + "att.output.weight"] = s.take(a + "o_proj.weight")
        out[o + "ffn.key.weight"] = s.take(f + "key.linear.weight")
        out[o + "ffn.time_maa_k"] = _mix(s.take(f + "key.mu"))
        out[o + "ffn.receptance.weight"] = s.take(f + "receptance.linear.weight")
        out[o + "ffn.time_maa_r"] = _mix(s.take(f + "receptance.mu"))
        out[o + "ffn.value.weight"] = s.take(f + "value.weight")


def _v7(s: _Source, L: int, out: dict[str, Tensor]) -> None:
    for i in range(L):
        a, f, o = f"model.layers.{i}.attn.", f"model.layers.{i}.ffn.", f"blocks.{i}."
        if s.has(a + "x_x"):  # fla Feb-Apr 2025: the six token-shift mixes fused, rows r, w, k, v, a, g
            for n, row in zip("rwkvag", s.take(a + "x_x").unbind(0), strict=True):
                out[o + f"att.x_{n}"] = _mix(row.clone())
        else:
            for n in "rwkvag":
                out[o + f"att.x_{n}"] = _mix(s.take(a + f"x_{n}"))
        out[o + "att.k_k"] = _mix(s.take(a + "k_k"))
        out[o + "att.k_a"] = _mix(s.take(a + "k_a"))
        out[o + "att.r_k"] = s.take(a + "r_k")
        for fla, off in (("r", "receptance"), ("k", "key"), ("v", "value"), ("o", "output")):
            out[o + f"att.{off}.weight"] = s.take(a + f"{fla}_proj.weight")
        for n in "wavg":
            lora = a + f"{n}_lora.lora."
            if n == "v" and not s.has(lora + "0.weight"):
                continue  # fla has no v_lora in layer 0 (unused officially); load() fills v0/v1/v2
            out[o + f"att.{n}1"] = s.take(lora + "0.weight").t().contiguous()
            out[o + f"att.{n}2"] = s.take(lora + "2.weight").t().contiguous()
            if n != "g":  # the gate LoRA has no bias, officially or in fla
                out[o + f"att.{n}0"] = _mix(s.take(lora + "2.bias"))
        out[o + "ffn.x_k"] = _mix(s.take(f + "x_k"))
        out[o + "ffn.key.weight"] = s.take(f + "key.weight")
        out[o + "ffn.value.weight"] = s.take(f + "value.weight")


def fla_to_official(tensors: dict[str, Tensor], cfg: dict, where: str) -> dict[str, Tensor]:
    """fla tensors -> official names and layouts (works on meta tensors too, for shapes)."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: fla model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    if cfg.get("attn"):
        raise CheckpointError(f"{where}: an fla hybrid model (softmax attention in layers {cfg['attn']}); only "
                              f"pure RWKV models have an official layout")
    act = cfg.get("hidden_act", "sqrelu")
    if act != "sqrelu":
        raise CheckpointError(f"{where}: fla hidden_act {act!r}; RWKV's channel mix is squared ReLU (sqrelu)")
    layers = {int(m.group(1)) for k in tensors if (m := _LAYER.match(k))}
    if not layers:
        raise CheckpointError(f"{where}: no model.layers.N.* keys")
    L = max(layers) + 1
    s = _Source(tensors, where)
    out: dict[str, Tensor] = {}
    _common(s, L, out)
    (_v6 if model_type == "rwkv6" else _v7)(s, L, out)
    if s.has("lm_head.weight"):
        out["head.weight"] = s.take("lm_head.weight")
    elif cfg.get("tie_word_embeddings"):
        out["head.weight"] = out["emb.weight"].clone()  # tied in fla; two parameters here
    out.update(s.tensors)  # leftovers keep their fla names: the loader reports them as unexpected
    return out


def _is_fla_layout(keys: list[str]) -> bool:
    return "model.embeddings.weight" in keys or any(k.startswith("model.layers.") for k in keys)


def official_to_fla_v7(t: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official RWKV-7 tensors -> fla names and layouts (the inverse of ``fla_to_official``)."""
    L = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blocks."))
    out = {"model.embeddings.weight": t["emb.weight"], "lm_head.weight": t["head.weight"]}
    for p in ("weight", "bias"):
        out[f"model.layers.0.pre_norm.{p}"] = t[f"blocks.0.ln0.{p}"]
        out[f"model.norm.{p}"] = t[f"ln_out.{p}"]
    for i in range(L):
        a, f, o = f"model.layers.{i}.attn.", f"model.layers.{i}.ffn.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"model.layers.{i}.attn_norm.{p}"] = t[o + f"ln1.{p}"]
            out[f"model.layers.{i}.ffn_norm.{p}"] = t[o + f"ln2.{p}"]
            out[a + f"g_norm.{p}"] = t[o + f"att.ln_x.{p}"]
        for n in "rwkvag":
            out[a + f"x_{n}"] = _mix(t[o + f"att.x_{n}"])
        out[a + "k_k"] = t[o + "att.k_k"].reshape(-1)
        out[a + "k_a"] = t[o + "att.k_a"].reshape(-1)
        out[a + "r_k"] = t[o + "att.r_k"]
        for fla, off in (("r", "receptance"), ("k", "key"), ("v", "value"), ("o", "output")):
            out[a + f"{fla}_proj.weight"] = t[o + f"att.{off}.weight"]
        for n in "wavg":
            if n == "v" and i == 0:
                continue  # unused officially; fla builds no v_lora in layer 0
            lora = a + f"{n}_lora.lora."
            out[lora + "0.weight"] = t[o + f"att.{n}1"].t()
            out[lora + "2.weight"] = t[o + f"att.{n}2"].t()
            if n != "g":
                out[lora + "2.bias"] = t[o + f"att.{n}0"].reshape(-1)
        out[f + "x_k"] = t[o + "ffn.x_k"].reshape(-1)
        out[f + "key.weight"] = t[o + "ffn.key.weight"]
        out[f + "value.weight"] = t[o + "ffn.value.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def fla_v7_config(t: Mapping[str, Tensor]) -> dict:
    """The config.json of an fla-hub RWKV-7 folder for official tensors ``t``."""
    V, C = t["emb.weight"].shape
    H, N = t["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blocks."))
    v_rank = t[f"blocks.{1 if L > 1 else 0}.att.v1"].shape[1]
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "attn_mode": "chunk",
        "vocab_size": V,
        "hidden_size": C,
        "num_hidden_layers": L,
        "head_dim": N,
        "num_heads": H,
        "hidden_ratio": 4,
        "intermediate_size": t["blocks.0.ffn.key.weight"].shape[0],
        "decay_low_rank_dim": t["blocks.0.att.w1"].shape[1],
        "a_low_rank_dim": t["blocks.0.att.a1"].shape[1],
        "v_low_rank_dim": v_rank,
        "gate_low_rank_dim": t["blocks.0.att.g1"].shape[1],
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "attn": None,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "fuse_norm": True,
        "fuse_cross_entropy": True,
        "max_position_embeddings": 4096,
        "torch_dtype": str(t["emb.weight"].dtype).removeprefix("torch."),
    }


def write_fla_v7(tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """An fla-hub RWKV-7 folder (config.json, model.safetensors, the World vocabulary where it fits),
    written atomically; other files of an existing folder (README, tokenizer files) are kept."""
    stray = [k for k in tensors if k.endswith(".att.time_state")]
    if stray:
        raise CheckpointError(f"an fla folder has no place for a tuned state ({stray[0]}, ...)")
    fla = official_to_fla_v7(tensors)
    config = fla_v7_config(tensors)
    _folders.write_hf_folder(path, fla, config, metadata)


class FlaFolder(CheckpointFormat):
    name = "fla"
    description = ("flash-linear-attention RWKV-6 / RWKV-7 folder (config.json + safetensors/bin): read; "
                   "RWKV-7 write (the fla-hub layout)")
    writable = True

    def write(self, tensors: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str]) -> None:
        version = metadata.get("version") or infer_model({k: tuple(v.shape) for k, v in tensors.items()})[0]
        if version != "v7":
            raise CheckpointError(f"rwkv_zoo writes fla folders for RWKV-7 only; write a {version} model with "
                                  f"--to hf (v4: transformers; v5/v6: the RWKV org's remote-code layout)")
        write_fla_v7(tensors, Path(path), metadata)

    def detect(self, path: Path) -> bool:
        def config_says(cfg: dict) -> bool:
            archs = cfg.get("architectures") or []
            return "attn_mode" in cfg or any(a in ("RWKV6ForCausalLM", "RWKV7ForCausalLM") for a in archs)

        return _folders.detect_folder(path, MODEL_TYPES, _is_fla_layout, config_says)

    def _meta(self, cfg: dict) -> dict[str, str]:
        return {"format": self.name, "fla_model_type": str(cfg.get("model_type")),
                "fla_config": json.dumps(cfg, sort_keys=True)}

    def read(self, path: Path, *, mmap: bool = True) -> Checkpoint:
        folder = _folders.folder_of(Path(path))
        if folder is None:
            raise CheckpointError(f"{path}: not an fla model folder (no config.json)")
        cfg = _folders.read_config(folder)
        tensors = fla_to_official(_folders.load_tensors(folder, mmap=mmap), cfg, str(folder))
        return Checkpoint(tensors, self.name, str(folder), self._meta(cfg))

    def read_shapes(self, path: Path):
        folder = _folders.folder_of(Path(path))
        if folder is None:
            return None
        cfg = _folders.read_config(folder)
        tensors = fla_to_official(_folders.load_meta(folder), cfg, str(folder))
        return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, self._meta(cfg)
