"""The recurrent state shared by every version: one ``LayerState`` per layer plus the model's identity.

``LayerState(att_shift [B, C], ffn_shift [B, C], wkv)``: the shifts hold the previous token's
LayerNorm outputs (ln1 for time-mix, ln2 for channel-mix) in the activation dtype; ``wkv`` is
``[B, H, K, V]`` fp32 for v5-v7 (key index first) and the ``(a, b, p)`` triple of ``[B, C]`` fp32
tensors for v4. Blocks return new states; they never mutate the caller's.

``RWKVState`` carries the identity of the model that made it (version and dimensions), so a state
from another model is rejected with an error that names the difference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rwkv_zoo.errors import RWKVZooError, StateMismatchError

if TYPE_CHECKING:
    from rwkv_zoo.model import RWKV

Wkv = Tensor | tuple[Tensor, ...]


def _map_wkv(wkv: Wkv, fn: Callable[[Tensor], Tensor]) -> Wkv:
    return tuple(fn(t) for t in wkv) if isinstance(wkv, tuple) else fn(wkv)


@dataclass
class LayerState:
    att_shift: Tensor  # [B, C]
    ffn_shift: Tensor  # [B, C]
    wkv: Wkv  # [B, H, K, V] fp32, or (a, b, p) each [B, C] fp32 for v4

    def map(self, fn: Callable[[Tensor], Tensor], wkv_fn: Callable[[Tensor], Tensor] | None = None) -> LayerState:
        return LayerState(fn(self.att_shift), fn(self.ffn_shift), _map_wkv(self.wkv, wkv_fn or fn))

    def tensors(self) -> list[Tensor]:
        wkv = list(self.wkv) if isinstance(self.wkv, tuple) else [self.wkv]
        return [self.att_shift, self.ffn_shift, *wkv]


@dataclass(frozen=True)
class ModelIdentity:
    """What a state must agree with to be used by a model."""

    version: str
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int

    def describe(self) -> str:
        dims = f"n_layer={self.n_layer}, n_embd={self.n_embd}, n_head={self.n_head}, head_size={self.head_size}"
        return f"{self.version} ({dims})"


class StateFileError(RWKVZooError, ValueError):
    """A path given to ``RWKVState.save``/``load`` cannot be written, or does not hold a saved state."""


_WRITTEN_BY = "a state file is written by RWKVState.save, `generate --save-state` or chat's /save-state"


def _not_a_state(path: str, what: str) -> StateFileError:
    return StateFileError(f"{path} is not an rwkv_zoo state file but {what}; {_WRITTEN_BY}")


def _describe_unreadable(path: str) -> str:
    """What a file that safetensors cannot open most likely is, for the error message."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        return "a PyTorch zip file (a .pth model checkpoint?)"
    if head[:1] == b"\x80":
        return "a pickle file (an old .pth model checkpoint?)"
    if len(head) == 8 and int.from_bytes(head, "little") < os.path.getsize(path):
        return "a truncated or damaged safetensors file"
    return "not a safetensors file"


class RWKVState:
    """Per-layer recurrent state of a model. Immutable by convention: methods return new states."""

    def __init__(self, layers: Sequence[LayerState], identity: ModelIdentity):
        self.layers = list(layers)
        self.identity = identity

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def zeros(cls, model: RWKV, batch_size: int = 1, *, device=None, dtype=None) -> RWKVState:
        """The empty state (what a model starts from) for ``batch_size`` sequences."""
        return model.zero_state(batch_size, device=device, dtype=dtype)

    # -- shape and identity -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.layers[0].att_shift.shape[0]

    @property
    def device(self) -> torch.device:
        return self.layers[0].att_shift.device

    def check(self, model: RWKV, batch_size: int | None = None) -> None:
        """Raise ``StateMismatchError`` naming the difference if this state is not ``model``'s."""
        mine, theirs = self.identity, model.identity
        if mine != theirs:
            diffs = [
                f"{f.name} {getattr(mine, f.name)!r} != {getattr(theirs, f.name)!r}"
                for f in fields(ModelIdentity)
                if getattr(mine, f.name) != getattr(theirs, f.name)
            ]
            raise StateMismatchError(
                f"this state belongs to another model: it was made by {mine.describe()}, "
                f"but the model is {theirs.describe()} ({'; '.join(diffs)})"
            )
        if len(self.layers) != mine.n_layer:
            raise StateMismatchError(f"state has {len(self.layers)} layers, the model has {mine.n_layer}")
        if batch_size is not None and batch_size != self.batch_size:
            raise StateMismatchError(
                f"state is for batch size {self.batch_size} but the tokens have batch size {batch_size}; "
                f"use state.select(...) or RWKVState.concat(...) to match"
            )

    # -- transforms ---------------------------------------------------------------------------------
    def _map(self, fn, wkv_fn=None) -> RWKVState:
        return RWKVState([ls.map(fn, wkv_fn) for ls in self.layers], self.identity)

    def to(self, device=None, dtype: torch.dtype | None = None) -> RWKVState:
        """Move to ``device``; ``dtype`` applies to the shift states only (the WKV state stays fp32/fp64)."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda t: t.to(device=device))

    def detach(self) -> RWKVState:
        """Cut the gradient history (truncated backpropagation through time)."""
        return self._map(lambda t: t.detach())

    def clone(self) -> RWKVState:
        return self._map(lambda t: t.clone())

    def select(self, index: int | slice | Sequence[int] | Tensor) -> RWKVState:
        """Keep some sequences of the batch (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        if isinstance(index, Sequence):
            index = torch.as_tensor(list(index), dtype=torch.long)
        if isinstance(index, Tensor):
            index = index.to(self.device)
        return self._map(lambda t: t[index])

    @classmethod
    def concat(cls, states: Sequence[RWKVState]) -> RWKVState:
        """Stack the batches of several states of the same model."""
        if not states:
            raise ValueError("concat needs at least one state")
        ident = states[0].identity
        for s in states[1:]:
            if s.identity != ident:
                raise StateMismatchError(f"cannot concat states of {ident.describe()} and {s.identity.describe()}")
        layers = []
        for per_layer in zip(*(s.layers for s in states), strict=True):
            wkv0 = per_layer[0].wkv
            if isinstance(wkv0, tuple):
                wkv = tuple(torch.cat([ls.wkv[i] for ls in per_layer]) for i in range(len(wkv0)))
            else:
                wkv = torch.cat([ls.wkv for ls in per_layer])
            layers.append(
                LayerState(
                    torch.cat([ls.att_shift for ls in per_layer]),
                    torch.cat([ls.ffn_shift for ls in per_layer]),
                    wkv,
                )
            )
        return cls(layers, ident)

    # -- official state-tuning keys -----------------------------------------------------------------
    @classmethod
    def from_time_state(cls, model: RWKV, tensors: dict[str, Tensor]) -> RWKVState:
        """A batch-1 state from official ``blocks.N.att.time_state`` tensors ([H, V, K], SPEC §4.1/§6.5).

        State tuning trains only the initial WKV state; shifts start at zero. The official layout is
        value-first for v5, v6 and v7 alike, so it is transposed into our key-first ``[B, H, K, V]``.
        """
        state = model.zero_state(1)
        for i, ls in enumerate(state.layers):
            if not isinstance(ls.wkv, Tensor) or ls.wkv.dim() != 4:
                raise ValueError(f"layer {i} of this {model.version} model has no matrix state (its time-mix keeps "
                                 "a tuple of tensors, like RWKV-4's (num, den, max) triple): official time_state "
                                 "keys exist only for matrix states")
            key = f"blocks.{i}.att.time_state"
            if key not in tensors:
                raise ValueError(f"time_state is missing {key}")
            t = tensors[key]
            H, N = ls.wkv.shape[1], ls.wkv.shape[2]
            if tuple(t.shape) != (H, N, N):
                raise ValueError(f"{key}: expected shape [{H}, {N}, {N}], found {list(t.shape)}")
            ls.wkv = t.detach().to(device=ls.wkv.device, dtype=torch.float32).transpose(-1, -2).unsqueeze(0).clone()
        extra = set(tensors) - {f"blocks.{i}.att.time_state" for i in range(len(state.layers))}
        if extra:
            raise ValueError(f"unexpected time_state keys: {sorted(extra)}")
        return state

    def to_time_state(self, index: int = 0) -> dict[str, Tensor]:
        """Official ``blocks.N.att.time_state`` tensors ([H, V, K] fp32) of sequence ``index``."""
        if any(isinstance(ls.wkv, tuple) for ls in self.layers):
            raise ValueError(f"{self.identity.version} has a layer without a matrix state (a tuple, like RWKV-4's "
                             "triple): only matrix states export as time_state")
        return {
            f"blocks.{i}.att.time_state": ls.wkv[index].transpose(-1, -2).contiguous().float()
            for i, ls in enumerate(self.layers)
        }

    # -- files --------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, ls in enumerate(self.layers):
            out[f"blocks.{i}.att_shift"] = ls.att_shift
            out[f"blocks.{i}.ffn_shift"] = ls.ffn_shift
            if isinstance(ls.wkv, tuple):
                for name, t in zip(("a", "b", "p"), ls.wkv, strict=True):
                    out[f"blocks.{i}.wkv.{name}"] = t
            else:
                out[f"blocks.{i}.wkv"] = ls.wkv
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors with the model identity in the metadata (atomically).

        Raises ``StateFileError`` naming ``path`` (never the temporary file) when it cannot be written.
        """
        from safetensors.torch import save_file

        from rwkv_zoo.fileio import atomic_path

        path = os.fspath(path)
        if os.path.isdir(path):
            raise StateFileError(f"cannot save the state to {path}: it is a directory; "
                                 f"give a file name such as {os.path.join(path, 'state.safetensors')}")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StateFileError(f"cannot save the state to {path}: the directory {os.path.dirname(path) or parent} "
                                 "does not exist; create it first or choose another path")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta = {"format": "rwkv_zoo.state", "identity": json.dumps(asdict(self.identity))}
        try:
            with atomic_path(path, ".safetensors") as tmp:
                save_file(tensors, tmp, metadata=meta)
        except OSError as exc:  # permissions, a full disk: the message of the temp file would confuse
            raise StateFileError(f"cannot save the state to {path}: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike, model: RWKV, *, device=None, batch_size: int | None = None) -> RWKVState:
        """Read a state written by ``save`` and check that it belongs to ``model``.

        ``batch_size``: also require that many sequences (``StateMismatchError`` otherwise). A path that
        is missing, a directory, or a file that is not a saved state raises ``StateFileError``.
        """
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise StateFileError(f"{path} does not exist: give the path of a saved state ({_WRITTEN_BY})")
        if os.path.isdir(path):
            raise _not_a_state(path, "a directory")
        if not os.path.isfile(path):
            raise _not_a_state(path, "a device or other special file")
        if os.path.getsize(path) == 0:
            raise _not_a_state(path, "empty")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                if meta.get("format") != "rwkv_zoo.state":
                    if meta.get("format") == "rwkv_zoo" or "emb.weight" in keys or "head.weight" in keys:
                        raise _not_a_state(path, "a model checkpoint (give it as the MODEL instead)")
                    raise _not_a_state(path, "a safetensors file without rwkv_zoo state metadata")
                tensors = {k: f.get_tensor(k) for k in keys}
        except SafetensorError as exc:
            raise _not_a_state(path, _describe_unreadable(path)) from exc
        try:
            ident = ModelIdentity(**json.loads(meta["identity"]))
            layers = []
            for i in range(ident.n_layer):
                if f"blocks.{i}.wkv" in tensors:
                    wkv: Any = tensors[f"blocks.{i}.wkv"]
                else:
                    wkv = tuple(tensors[f"blocks.{i}.wkv.{n}"] for n in ("a", "b", "p"))
                layers.append(LayerState(tensors[f"blocks.{i}.att_shift"], tensors[f"blocks.{i}.ffn_shift"], wkv))
        except (KeyError, TypeError, ValueError) as exc:
            raise _not_a_state(path, f"a damaged state file ({exc!r} is missing or wrong)") from exc
        state = cls(layers, ident)
        try:
            state.check(model)
        except StateMismatchError as exc:
            raise StateMismatchError(f"{path}: {exc}; load it with that model, or save a state of this one") from None
        if batch_size is not None and state.batch_size != batch_size:
            raise StateMismatchError(
                f"{path} holds {state.batch_size} sequences (batch size {state.batch_size}) but {batch_size} is "
                f"needed here: save a single one with state.select(i).save(PATH)"
            )
        return state.to(device or model.device)

    def __repr__(self) -> str:
        return f"RWKVState({self.identity.describe()}, batch_size={self.batch_size}, device={self.device})"
