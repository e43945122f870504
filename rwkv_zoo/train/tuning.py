"""Tuning modes: what a training run trains, and what it writes. ``TrainConfig.tune`` names one.

Built in: ``full`` (every weight trains; what ``rwkv-zoo train`` always did) and ``state`` (state tuning:
only the initial WKV state of every layer trains, the weights stay bit-identical; RWKV-LM/RWKV-PEFT's
"state tuning"). Another mode (LoRA, say) is added without touching the trainer::

    from rwkv_zoo.train.tuning import TuningMode, register_mode

    class MyMode(TuningMode):
        name = "mine"
        description = "one sentence for --help"
        def prepare(self, model, config): ...

    register_mode(MyMode())

``--tune`` offers every registered mode (``mode_names()``); register before the parser is built (at
import of the module that defines the mode; the CLI imports ``rwkv_zoo.train.tuning`` and whatever
``TUNING_MODULES`` lists).

The protocol: the trainer builds (or ``init_from`` loads) the plain ``RWKV`` model, then calls, in order

1. ``check(model, config)``: refuse what the mode cannot do (a ``ValueError`` naming the problem; state
   tuning refuses a version without matrix states).
2. ``prepare(model, config) -> nn.Module``: the module the trainer trains and calls as
   ``prepared(tokens, state) -> (logits, state)``. It may be ``model`` itself (full, state) or wrap it
   (a peft model). It sets ``requires_grad`` on what trains and freezes the rest. The trainer then
   wraps ``prepared`` for DDP/FSDP when distributed.
3. ``param_groups(model, prepared, config) -> list[dict]``: the optimizer groups; each has ``names``
   (parameter names in ``prepared``, which the trainer maps to the parameters after wrapping) and may
   set ``weight_decay`` and ``lr_scale`` (the rate is ``lr * lr_scale``).
4. ``initial_state(model, prepared, batch_size) -> RWKVState | None``: the state every training and
   evaluation sequence starts from (None: the model's own start, zeros or ``model.initial_state``). It
   is built on each call, so its gradient reaches the parameters it is made of.

At each checkpoint the trainer writes ``checkpoints/step-N/model.safetensors`` from the state dict of
the (wrapped) prepared module, passed through ``checkpoint_tensors(model, prepared, state_dict)``:
return tensors under the **official key names** (``rwkv_zoo.load`` reads the folder as a model), which
``resume_tensors(model, prepared, tensors)`` maps back to ``prepared``'s state dict on ``--resume``.
``save_checkpoint_files(model, prepared, folder)`` may add files to the checkpoint folder (an adapter),
which ``resume_files(model, prepared, folder)`` reads back on ``--resume``,
and ``finish(model, prepared, out_dir) -> list[Path]`` writes the run's products at the end (state
tuning: ``time_state.pth`` and ``state.safetensors``). ``plain_model(model, prepared)`` gives back an
``RWKV`` for evaluation and generation (merged adapter, tuned state as ``initial_state``).

``checkpoint_tensors`` runs on every rank (after the full state dict was gathered);
``save_checkpoint_files`` and ``finish`` run on rank 0 only. ``TrainConfig.tune`` is a resume field: a run
is resumed with the mode it was started with.

Modes are stateless singletons: everything a run needs lives on the model or the prepared module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rwkv_zoo.state import RWKVState

if TYPE_CHECKING:
    from rwkv_zoo.model import RWKV

# Modules imported before --tune's choices are listed, so that the modes they register are offered.
TUNING_MODULES: list[str] = ["rwkv_zoo.train.lora_mode"]


class TuningMode:
    """Base class: every hook's default is full fine-tuning's behaviour (see the module docstring)."""

    name: str = ""
    description: str = ""

    def check(self, model: RWKV, config: Any) -> None:
        """Raise ``ValueError`` naming the problem if this mode cannot tune ``model``."""

    def prepare(self, model: RWKV, config: Any) -> nn.Module:
        return model

    def param_groups(self, model: RWKV, prepared: nn.Module, config: Any) -> list[dict[str, Any]]:
        import rwkv_zoo

        return rwkv_zoo.param_groups(model, config.weight_decay)

    def initial_state(self, model: RWKV, prepared: nn.Module, batch_size: int) -> RWKVState | None:
        return None

    def checkpoint_tensors(self, model: RWKV, prepared: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        return state_dict

    def resume_tensors(self, model: RWKV, prepared: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return tensors

    def save_checkpoint_files(self, model: RWKV, prepared: nn.Module, folder: Path) -> None:
        """Extra files in a checkpoint folder (written into the temporary folder before its rename)."""

    def resume_files(self, model: RWKV, prepared: nn.Module, folder: Path) -> None:
        """Read back what ``save_checkpoint_files`` wrote, after the tensors were loaded on ``--resume``."""

    def finish(self, model: RWKV, prepared: nn.Module, out_dir: Path) -> list[Path]:
        """Files the run leaves in ``out_dir`` at the end (besides the checkpoints); returns their paths."""
        return []

    def plain_model(self, model: RWKV, prepared: nn.Module) -> RWKV:
        return model


_MODES: dict[str, TuningMode] = {}


def register_mode(mode: TuningMode, *, replace: bool = False) -> TuningMode:
    """Add a mode under ``mode.name``; a second one of the same name is refused unless ``replace``."""
    if not isinstance(mode, TuningMode) or not mode.name:
        raise TypeError(f"register_mode takes a TuningMode instance with a name, got {mode!r}")
    if mode.name in _MODES and not replace:
        raise ValueError(f"tuning mode {mode.name!r} is already registered")
    _MODES[mode.name] = mode
    return mode


def _import_plugins() -> None:
    import importlib

    for module in TUNING_MODULES:
        importlib.import_module(module)


def mode_names() -> list[str]:
    _import_plugins()
    return list(_MODES)


def get_mode(name: str) -> TuningMode:
    _import_plugins()
    if name not in _MODES:
        raise ValueError(f"unknown tuning mode {name!r}; modes: {', '.join(_MODES)}")
    return _MODES[name]


# ---------------------------------------------------------------------------------------------------
# full


class FullTuning(TuningMode):
    name = "full"
    description = "every weight trains (the version's official optimizer groups)"

    def check(self, model: RWKV, config: Any) -> None:
        if model.initial_state is not None:
            # A tuned start state is not a weight: full tuning would train against it, then save a model
            # without it. Refused rather than silently dropped.
            raise ValueError("the model to start from carries a tuned initial state (time_state keys); full "
                             "tuning would not keep it: use --tune state, or start from a file without "
                             "time_state")


# ---------------------------------------------------------------------------------------------------
# state


TIME_STATE = "time_state"


def has_matrix_state(model: RWKV) -> bool:
    """Whether every layer's WKV state is one ``[B, H, K, V]`` matrix (v5 and later), which is what the
    official ``time_state`` keys hold; RWKV-4's is a (num, den, max) triple."""
    state = model.zero_state(1, device="meta")
    return all(isinstance(ls.wkv, Tensor) and ls.wkv.dim() == 4 for ls in state.layers)


class StateTuning(TuningMode):
    """Only the initial WKV state trains. Each layer's ``att`` gets a parameter ``time_state`` in the
    official layout ``[H, V, K]`` (value index first, fp32), so the model's state dict has exactly the
    official ``blocks.N.att.time_state`` keys next to the untouched weights."""

    name = "state"
    description = ("only the initial state trains (official blocks.N.att.time_state, v5 and later); the "
                   "weights stay as they are")

    def check(self, model: RWKV, config: Any) -> None:
        if not has_matrix_state(model):
            raise ValueError(f"state tuning needs a matrix state (v5 and later); this {model.version} model's "
                             f"state is not one (RWKV-4 keeps a num/den/max triple): use --tune full")

    def prepare(self, model: RWKV, config: Any) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        start = model.initial_state  # loaded from time_state keys: tuning goes on from there
        zero = model.zero_state(1)
        for i, block in enumerate(model.blocks):
            wkv = (start.layers[i].wkv if start is not None else zero.layers[i].wkv)[0]  # [H, K, V]
            param = nn.Parameter(wkv.detach().transpose(-1, -2).contiguous().float().clone())  # [H, V, K]
            block.att.register_parameter(TIME_STATE, param)
        model.initial_state = None  # the parameters are the start now
        return model

    def param_groups(self, model: RWKV, prepared: nn.Module, config: Any) -> list[dict[str, Any]]:
        names = [n for n, p in prepared.named_parameters() if n.endswith(f".att.{TIME_STATE}")]
        return [{"names": names, "params": [dict(prepared.named_parameters())[n] for n in names],
                 "weight_decay": 0.0}]

    def initial_state(self, model: RWKV, prepared: nn.Module, batch_size: int) -> RWKVState:
        state = model.zero_state(batch_size)
        for ls, block in zip(state.layers, model.blocks, strict=True):
            ts = getattr(block.att, TIME_STATE)  # [H, V, K]
            ls.wkv = ts.transpose(-1, -2).unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()
        return state

    def time_state(self, model: RWKV) -> dict[str, Tensor]:
        """The official ``blocks.N.att.time_state`` tensors ([H, V, K] fp32, CPU)."""
        return {f"blocks.{i}.att.{TIME_STATE}": getattr(b.att, TIME_STATE).detach().float().cpu().contiguous()
                for i, b in enumerate(model.blocks)}

    def finish(self, model: RWKV, prepared: nn.Module, out_dir: Path) -> list[Path]:
        from rwkv_zoo.fileio import atomic_path

        ts = self.time_state(model)
        pth = out_dir / "time_state.pth"
        with atomic_path(pth, ".pth") as tmp:
            torch.save(ts, tmp)
        st = out_dir / "state.safetensors"
        RWKVState.from_time_state(model, ts).save(st)
        return [pth, st]

    def plain_model(self, model: RWKV, prepared: nn.Module) -> RWKV:
        """A new model with the same (shared, not copied) weights, the tuned state as ``initial_state``."""
        from rwkv_zoo.registry import build

        ts = self.time_state(model)
        kwargs = {k: v for k, v in model.config.to_dict().items() if v is not None}
        plain = build(model.version, device="meta", init=False, backend=model.backend, **kwargs)
        weights = {k: v for k, v in model.state_dict().items() if not k.endswith(f".att.{TIME_STATE}")}
        plain.load_state_dict(weights, strict=True, assign=True)
        plain.initial_state = RWKVState.from_time_state(plain, ts)
        return plain.eval()


register_mode(FullTuning())
register_mode(StateTuning())
