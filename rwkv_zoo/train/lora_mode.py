"""The ``lora`` tuning mode: ``rwkv-zoo train --init-from FILE --tune lora [--lora-r 8 ...]``.

LoRA adapters through peft (``rwkv_zoo.lora``) on the official projections; the base weights stay
frozen. Each checkpoint folder holds

- ``model.safetensors``: the **merged** model under official keys, so ``rwkv_zoo.load(RUN_DIR)``,
  ``rwkv-zoo generate RUN_DIR`` and ``rwkv-zoo export`` give the tuned model like any other run;
- ``adapter/``: the adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``,
  and ``rwkv_zoo_params.safetensors`` with ``--lora-mixes``), which ``--resume`` reads back and
  ``rwkv-zoo merge BASE ADAPTER OUT`` folds into the base; the end of the run copies it to
  ``OUT_DIR/adapter``.

Options (``TrainConfig``): ``lora_r`` (8), ``lora_alpha`` (None: 2 r), ``lora_dropout`` (0),
``lora_targets`` (comma-separated official names; None: every projection), ``lora_norms`` and
``lora_mixes`` (also train the norms / the token-shift mix vectors, as RWKV-PEFT can). The adapter's
matrices get ``weight_decay``; norms and mixes none. FSDP is refused (peft layers are not sharded here);
DDP works.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from rwkv_zoo import lora
from rwkv_zoo.train.tuning import TuningMode, register_mode

if TYPE_CHECKING:
    from rwkv_zoo.model import RWKV

ADAPTER_DIR = "adapter"


def _targets(config: Any) -> list[str] | None:
    text = getattr(config, "lora_targets", None)
    if text is None:
        return None
    if isinstance(text, str):
        return [t.strip() for t in text.split(",") if t.strip()]
    return list(text)


def _options(config: Any) -> dict[str, Any]:
    return {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": _targets(config), "train_norms": bool(config.lora_norms)}


class LoraTuning(TuningMode):
    name = "lora"
    description = ("LoRA adapters (HF peft) on the projections (--lora-r, --lora-targets ...); the base weights "
                   "stay frozen; checkpoints hold the merged model and the adapter in peft's format")

    def check(self, model: RWKV, config: Any) -> None:
        if model.initial_state is not None:
            raise ValueError("the model to start from carries a tuned initial state (time_state keys); LoRA "
                             "would not keep it: use --tune state, or start from a file without time_state")
        if config.distributed == "fsdp":
            raise ValueError("--tune lora runs without FSDP (peft's layers are not sharded here): use "
                             "--distributed ddp or none")
        lora.config(model, **_options(config))  # refuses a bad rank, dropout or target, naming it

    def prepare(self, model: RWKV, config: Any) -> nn.Module:
        return lora.apply(model, **_options(config), train_mixes=bool(config.lora_mixes))

    def param_groups(self, model: RWKV, prepared: nn.Module, config: Any) -> list[dict[str, Any]]:
        named = [(n, p) for n, p in prepared.named_parameters() if p.requires_grad]
        adapter = [(n, p) for n, p in named if ".lora_A." in n or ".lora_B." in n]
        rest = [(n, p) for n, p in named if not (".lora_A." in n or ".lora_B." in n)]
        groups = [{"names": [n for n, _ in adapter], "params": [p for _, p in adapter],
                   "weight_decay": config.weight_decay}]
        if rest:
            groups.append({"names": [n for n, _ in rest], "params": [p for _, p in rest], "weight_decay": 0.0})
        return groups

    def checkpoint_tensors(self, model: RWKV, prepared: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in lora.merged_tensors(prepared).items()}

    def resume_tensors(self, model: RWKV, prepared: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        # The merged weights cannot be split back into base and adapter; the base is the --init-from
        # file again and the adapter comes from the checkpoint's adapter/ folder (resume_files).
        return prepared.state_dict()

    def resume_files(self, model: RWKV, prepared: nn.Module, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = folder / ADAPTER_DIR
        if not (adapter / "adapter_model.safetensors").is_file():
            raise ValueError(f"{folder} has no {ADAPTER_DIR}/adapter_model.safetensors to resume the LoRA run from")
        result = set_peft_model_state_dict(prepared, load_file(str(adapter / "adapter_model.safetensors")))
        missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k or "modules_to_save" in k]
        if missing:
            raise ValueError(f"{adapter} does not fit this run's adapter (missing {missing[0]} ...)")
        if (adapter / lora.PARAMS_FILE).is_file():
            lora._load_params(lora.base_model(prepared), adapter / lora.PARAMS_FILE)

    def save_checkpoint_files(self, model: RWKV, prepared: nn.Module, folder: Path) -> None:
        lora.save_adapter(prepared, folder / ADAPTER_DIR)

    def finish(self, model: RWKV, prepared: nn.Module, out_dir: Path) -> list[Path]:
        target = out_dir / ADAPTER_DIR
        lora.save_adapter(prepared, target)
        return [target]

    def plain_model(self, model: RWKV, prepared: nn.Module) -> RWKV:
        """A new plain model with the merged weights (copies: the run's model keeps its adapter)."""
        from rwkv_zoo.registry import build

        kwargs = {k: v for k, v in model.config.to_dict().items() if v is not None}
        plain = build(model.version, device="meta", init=False, backend=model.backend, **kwargs)
        plain.load_state_dict({k: v.clone() for k, v in lora.merged_tensors(prepared).items()},
                              strict=True, assign=True)
        return plain.eval()


register_mode(LoraTuning())
