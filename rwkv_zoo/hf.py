"""rwkv_zoo models inside Hugging Face transformers: ``import rwkv_zoo.hf`` registers them.

    import rwkv_zoo, rwkv_zoo.hf
    from transformers import AutoModelForCausalLM
    hf = rwkv_zoo.hf.RWKVZooForCausalLM.from_rwkv(rwkv_zoo.load("model.pth"))  # shares the weights
    hf.save_pretrained("folder")                                 # config.json + model.safetensors
    hf = AutoModelForCausalLM.from_pretrained("folder")          # any registered version
    out = hf.generate(input_ids, max_new_tokens=20, do_sample=False)

Every registered version (plugins' too) runs under **one** ``model_type``, ``rwkv_zoo``: the config
holds the version id and the version's own options (``rwkv_version``, ``rwkv_options``), and the model
is ``rwkv_zoo.build(...)`` of them. One model type per version would need a config class per version,
made when a plugin registers one, and those classes would have to exist before ``from_pretrained``
reads a folder; with one type a folder names its version in ``config.json`` and nothing is generated.

The cache is the RWKV state (``RWKVZooCache``: the ``RWKVState`` and the number of tokens it has
read), returned as ``cache`` like transformers 5's recurrent models (Mamba) do. A state is fixed-size,
so nothing grows with the sequence, and nothing can be cropped: the model declares that it supplies
its own cache (``_supports_default_dynamic_cache`` is False), so ``generate()`` passes the state from
step to step and feeds only the new token. ``attention_mask`` may mark right padding (training batches:
later positions never change earlier ones); left padding would push padding through the state and is
refused. Weights keep the official names under ``model.`` (``model.blocks.0.att.key.weight``), so peft
targets are the official ones (``att.key``) here too. Needs ``transformers>=5``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from rwkv_zoo.model import RWKV
from rwkv_zoo.state import RWKVState

MODEL_TYPE = "rwkv_zoo"


@strict
class RWKVZooConfig(PreTrainedConfig):
    """An rwkv_zoo model for transformers: the version id and its config's fields.

    ``vocab_size``, ``hidden_size`` (``n_embd``) and ``num_hidden_layers`` (``n_layer``) are the names
    transformers' tools read; ``rwkv_options`` holds every other field of the version's config
    (``head_size``, ``dim_ffn``, the LoRA widths ...)."""

    model_type = MODEL_TYPE

    rwkv_version: str = "v7"
    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    rwkv_options: dict | None = None
    use_cache: bool = True

    @classmethod
    def from_rwkv(cls, model: RWKV, **kwargs: Any) -> RWKVZooConfig:
        d = dict(model.config.to_dict())
        n_layer, n_embd, vocab = d.pop("n_layer"), d.pop("n_embd"), d.pop("vocab_size")
        return cls(rwkv_version=model.version, vocab_size=vocab, hidden_size=n_embd, num_hidden_layers=n_layer,
                   rwkv_options=d, **kwargs)

    def build_kwargs(self) -> dict[str, Any]:
        """Arguments of ``rwkv_zoo.build`` for this config."""
        return {"n_layer": self.num_hidden_layers, "n_embd": self.hidden_size, "vocab_size": self.vocab_size,
                **{k: v for k, v in (self.rwkv_options or {}).items() if v is not None}}


class RWKVZooCache:
    """The RWKV state as generate()'s cache: fixed size, replaced (never mutated) at every step."""

    is_compileable = False
    is_croppable = False

    def __init__(self, state: RWKVState, seen_tokens: int):
        self.state = state
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the rows of ``beam_idx`` ([B])."""
        self.state = self.state.select(beam_idx.tolist())

    def __repr__(self) -> str:
        return f"RWKVZooCache({self.state.identity.version}, batch {self.state.batch_size}, {self.seen_tokens} tokens)"


@dataclass
class RWKVZooCausalLMOutput(ModelOutput):
    """``loss`` (with ``labels``), ``logits`` [B, T, V], and ``cache`` (the state after the input)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: RWKVZooCache | None = None


class RWKVZooPreTrainedModel(PreTrainedModel):
    config_class = RWKVZooConfig
    config: RWKVZooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def _init_weights(self, module) -> None:
        # The weights get the version's official initialisation when the model is built (below), and
        # from_pretrained overwrites them; transformers' generic init must not touch them.
        pass


def _check_mask(attention_mask: Tensor | None) -> None:
    if attention_mask is None or bool(attention_mask.all()):
        return
    m = attention_mask.bool()
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("RWKV reads the sequence left to right into its state: left padding (a 0 before a 1 in "
                         "attention_mask) would enter the state; pad on the right (tokenizer.padding_side = "
                         "'right') or generate each prompt alone")


class RWKVZooForCausalLM(RWKVZooPreTrainedModel, GenerationMixin):
    """An rwkv_zoo ``RWKV`` (``self.model``) as a transformers causal LM."""

    def __init__(self, config: RWKVZooConfig, model: RWKV | None = None):
        super().__init__(config)
        if model is None:
            import rwkv_zoo

            # from_pretrained builds under a meta-device context and then loads the weights: no init there.
            meta = torch.get_default_device().type == "meta"
            model = rwkv_zoo.build(config.rwkv_version, device="meta" if meta else None, init=not meta,
                                   **config.build_kwargs())
        self.model = model
        self.post_init()

    @classmethod
    def from_rwkv(cls, model: RWKV, **config_kwargs: Any) -> RWKVZooForCausalLM:
        """Wrap an existing model; the weights are shared, not copied."""
        return cls(RWKVZooConfig.from_rwkv(model, **config_kwargs), model)

    def to_rwkv(self) -> RWKV:
        """The rwkv_zoo model inside (shared weights): ``rwkv_zoo.save``, ``rwkv_zoo.generate`` ..."""
        return self.model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is the cache, made by forward (see the module docstring)

    def get_input_embeddings(self):
        return self.model.emb

    def set_input_embeddings(self, value) -> None:
        self.model.emb = value

    def get_output_embeddings(self):
        return self.model.head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: RWKVZooCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> RWKVZooCausalLMOutput | tuple:
        """``input_ids`` [B, T] -> ``logits`` [B, T, V] (the last ``logits_to_keep`` positions if > 0),
        ``cache`` (the state after the input, when ``use_cache``), ``loss`` (with ``labels``, shifted
        inside as transformers' causal LMs do; -100 is ignored)."""
        if inputs_embeds is not None:
            raise ValueError("rwkv_zoo models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        _check_mask(attention_mask)
        if cache is not None and not isinstance(cache, RWKVZooCache):
            raise TypeError(f"cache must be the RWKVZooCache this model returned, got {type(cache).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        keep = int(logits_to_keep) if isinstance(logits_to_keep, int) else 0
        if labels is not None:
            keep = 0  # the loss needs every position
        logits, state = self.model(input_ids, cache.state if cache is not None else None, logits_to_keep=keep)
        loss = None
        if labels is not None:
            kw = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kw)
        new_cache = None
        if use_cache:
            seen = cache.seen_tokens if cache is not None else 0
            new_cache = RWKVZooCache(state, seen + input_ids.shape[1])
        if not return_dict:
            out = (logits, new_cache) if new_cache is not None else (logits,)
            return (loss, *out) if loss is not None else out
        return RWKVZooCausalLMOutput(loss=loss, logits=logits, cache=new_cache)


def register() -> None:
    """Register the config and model with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent; done at
    import)."""
    with contextlib.suppress(ValueError):  # already registered (a reload)
        AutoConfig.register(MODEL_TYPE, RWKVZooConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(RWKVZooConfig, RWKVZooForCausalLM)


register()

__all__ = ["RWKVZooCache", "RWKVZooCausalLMOutput", "RWKVZooConfig", "RWKVZooForCausalLM", "register"]
