"""Infrastructure shared by every version: config base, the generic model, the block, small helpers.

The maths of each version lives in its own file under ``rwkv_zoo/versions/``; what is here is the
skeleton that SPEC.md §1 says all versions share: embedding, blocks 0..L-1 (block 0 first applies
``ln0``), pre-LN residual time-mix and channel-mix, ``ln_out`` and a separate ``head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo import fused
from rwkv_zoo.protocols import ChannelMix, Context, TimeMix
from rwkv_zoo.state import LayerState, ModelIdentity, RWKVState, Wkv

GROUPNORM_EPS = 64e-5  # SPEC §9.1: GN(y/8, 1e-5) of training == GN(y, 64e-5) on the raw WKV output
LAYERNORM_EPS = 1e-5


@dataclass
class RWKVConfig:
    """Dimensions common to every version; versions subclass it and add their own options."""

    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    dim_ffn: int | None = None

    version: ClassVar[str] = ""
    has_heads: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_embd", "vocab_size", "head_size"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.version} config: {f} must be a positive int, got {value!r}")
        if self.has_heads and self.n_embd % self.head_size:
            raise ValueError(
                f"{self.version} config: n_embd={self.n_embd} is not a multiple of head_size={self.head_size}"
            )
        if self.dim_ffn is None:
            self.dim_ffn = self.default_dim_ffn()

    def default_dim_ffn(self) -> int:
        return 4 * self.n_embd

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size if self.has_heads else 1

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def ffn_3p5x(n_embd: int) -> int:
    """v5.2/v6 channel-mix width: 3.5 C rounded down to a multiple of 32 (SPEC §4.1)."""
    return int(n_embd * 3.5) // 32 * 32


# ---------------------------------------------------------------------------------------------------
# Helpers used by the version files


def token_shift(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Previous token's input for every position: ``x'`` [B, T, C], and the new shift state [B, C]."""
    prev = torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
    return prev, x[:, -1]


def head_group_norm(y: Tensor, ln_x: nn.GroupNorm) -> Tensor:
    """GroupNorm over each head of ``y`` [B, T, H, N] in fp32; returns [B, T, H*N] in fp32."""
    B, T, H, N = y.shape
    out = F.group_norm(y.float().reshape(B * T, H * N), H, ln_x.weight.float(), ln_x.bias.float(), ln_x.eps)
    return out.view(B, T, H * N)


def layer_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(ratio_0_to_1, ratio_1_to_almost0) of the official initialisation (SPEC §3.7)."""
    r01 = layer_id / max(n_layer - 1, 1)
    r1 = 1.0 - layer_id / n_layer
    return r01, r1


def channel_ramp(C: int, device=None) -> Tensor:
    """delta_i = i / C, the ramp the official token-shift initialisation raises to powers."""
    return torch.arange(C, dtype=torch.float32, device=device) / C


@torch.no_grad()
def orthogonal_(w: Tensor, gain: float) -> None:
    if gain == 0:
        w.zero_()
        return
    tmp = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    nn.init.orthogonal_(tmp, gain=gain)
    w.copy_(tmp)


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------------------------------------
# Block and model


class Block(nn.Module):
    """Pre-LN residual block: ``x += att(ln1(x)); x += ffn(ln2(x))``; block 0 applies ``ln0`` first.

    Version files subclass it and set ``time_mix_cls`` / ``channel_mix_cls``. Registration order
    (ln1, ln2, ln0, att, ffn) is the official module order, so ``state_dict()`` keys come out in the
    order of official checkpoints.
    """

    time_mix_cls: ClassVar[type[TimeMix]]
    channel_mix_cls: ClassVar[type[ChannelMix]]

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = config.n_embd
        self.ln1 = nn.LayerNorm(C, eps=LAYERNORM_EPS)
        self.ln2 = nn.LayerNorm(C, eps=LAYERNORM_EPS)
        self.ln0 = nn.LayerNorm(C, eps=LAYERNORM_EPS) if layer_id == 0 else None
        self.att = self.time_mix_cls(config, layer_id)
        self.ffn = self.channel_mix_cls(config, layer_id)

    def forward(self, x: Tensor, state: LayerState, ctx: Context) -> tuple[Tensor, LayerState]:
        if self.ln0 is not None:
            x = self.ln0(x)
            ctx.x0 = x  # the normed embedding, for blocks that read it (v7a's DeepEmbed channel-mix)
        out, att_shift, wkv = self.att(self.ln1(x), state.att_shift, state.wkv, ctx)
        x = x + out
        out, ffn_shift = self.ffn(self.ln2(x), state.ffn_shift, ctx)
        return x + out, LayerState(att_shift, ffn_shift, wkv)

    @torch.no_grad()
    def init_weights(self) -> None:
        for ln in (self.ln0, self.ln1, self.ln2):
            if ln is not None:
                ln.weight.fill_(1.0)
                ln.bias.zero_()
        self.att.init_weights()
        self.ffn.init_weights()


class RWKV(nn.Module):
    """An RWKV language model: ``model(tokens [B, T], state=None) -> (logits [B, T, V], state)``.

    The same call trains (T long, gradients through everything, the state included), prefills and
    decodes (T = 1). ``state=None`` starts from the zero state. The returned state continues the
    sequence: a sequence split anywhere and carried through the state gives the same logits.
    Kernels are chosen per call by ``rwkv_zoo.dispatch`` (``self.backend`` forces one).
    """

    def __init__(self, config: RWKVConfig, block_cls: type[Block], version: str | None = None):
        super().__init__()
        self.config = config
        self.version = version or config.version
        C, V = config.n_embd, config.vocab_size
        # _weight skips torch's default normal_ init: init_weights() sets it, and on the meta device normal_
        # goes through torch._refs, which imports torch._dynamo (seconds) on first use.
        self.emb = nn.Embedding(V, C, _weight=torch.empty(V, C))
        self.blocks = nn.ModuleList(block_cls(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(C, eps=LAYERNORM_EPS)
        self.head = nn.Linear(C, V, bias=False)
        self.backend: str | None = None
        self.mode: str | None = None
        # A tuned initial state (e.g. official time_state keys); used when forward gets state=None.
        self.initial_state: RWKVState | None = None
        # fp16 inference transform (SPEC §8): see set_rescale(). 0 = off.
        self.rescale_every: int = 0
        # Without gradients a backend's fused whole-model step may run the body (rwkv_zoo.fused): the
        # default, same maths; False always runs the modules. What a step built from the weights is
        # cached per weight version; moving or replacing tensors drops it.
        self.fused_step: bool = True
        self.register_load_state_dict_post_hook(fused.invalidate)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() / .cuda() move or convert every tensor: a built fused step points at the old ones.
        fused.invalidate(self)
        return super()._apply(fn, *args, **kwargs)

    # -- identity and state ------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        c = self.config
        N = c.head_size if c.has_heads else c.n_embd
        return ModelIdentity(self.version, c.n_layer, c.n_embd, c.n_head, N)

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype

    def zero_state(self, batch_size: int = 1, *, device=None, dtype=None, wkv: bool = True) -> RWKVState:
        """The state a sequence starts from. ``wkv=False`` leaves the WKV states as None: the model
        does that for ``state=None`` so kernels see a fresh sequence (``has_state=False``)."""
        device = device or self.device
        dtype = dtype or self.dtype
        C = self.config.n_embd
        layers = []
        for block in self.blocks:
            shift = torch.zeros(batch_size, C, device=device, dtype=dtype)
            wkv_state: Wkv | None = block.att.zero_wkv(batch_size, device) if wkv else None
            layers.append(LayerState(shift, shift.clone(), wkv_state))
        return RWKVState(layers, self.identity)

    # -- forward ------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a LongTensor [B, T], got {type(tokens).__name__}")
        if tokens.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor [B, T], got dtype {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            hint = " (use tokens[None] for a single sequence)" if tokens.dim() == 1 else ""
            raise ValueError(f"tokens must have shape [B, T] with T >= 1, got {list(tokens.shape)}{hint}")
        # The range check reads values (a sync, and a graph break under torch.compile): eager only.
        if tokens.device.type != "meta" and tokens.numel() and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is out of range for this model's vocabulary of {V} (ids 0..{V - 1})")

    def forward(self, tokens: Tensor, state: RWKVState | None = None, *,
                logits_to_keep: int = 0) -> tuple[Tensor, RWKVState]:
        """``logits_to_keep = n > 0`` computes the head for the last ``n`` positions only (prefill needs
        one: at T = 512 the head over every position would cost as much as the model body)."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        self._check_tokens(tokens)
        B = tokens.shape[0]
        if state is None and self.initial_state is not None:
            state = self.initial_state.select([0] * B) if self.initial_state.batch_size != B else self.initial_state
        if state is None:
            state = self.zero_state(B, device=tokens.device, wkv=False)
        else:
            if not isinstance(state, RWKVState):
                raise TypeError(f"state must be an RWKVState (or None), got {type(state).__name__}")
            state.check(self, B)
        tokens = tokens.to(self.device).long()
        x = self.emb(tokens)
        if fused.applies(self):
            sel = fused.select(self, fused.StepCall(x.device.type, self.dtype, B, tokens.shape[1]))
            if sel.backend is not None:
                run = fused.runner(self, sel)
                logits, layers = run(x, state, state.layers[0].wkv is None, logits_to_keep or tokens.shape[1])
                return logits, RWKVState(layers, state.identity)
        ctx = Context(tokens, self.backend, self.mode)
        new_layers = []
        every = self.rescale_every
        for i, (block, layer_state) in enumerate(zip(self.blocks, state.layers, strict=True)):
            x, ls = block(x, layer_state, ctx)
            new_layers.append(ls)
            if every and (i + 1) % every == 0:
                x = x / 2  # keeps fp16 activations in range; matches the weights set_rescale() divided
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.head(self.ln_out(x))
        return logits, RWKVState(new_layers, state.identity)

    # -- kernels the model will call (for explain) -------------------------------------------------
    def kernel_calls(self, batch_size: int, T: int, *, requires_grad: bool = False, has_state: bool = False,
                     device: str | None = None, dtype: torch.dtype | None = None):
        """The ``KernelCall`` each layer makes for input [batch_size, T] (mode left to dispatch). A layer
        whose time-mix has no ``wkv_op`` (it calls no dispatched kernel) makes none: see ``no_kernel``."""
        from rwkv_zoo.dispatch import KernelCall, auto_mode

        device = device or self.device.type
        dtype = dtype or self.dtype
        mode = self.mode or auto_mode(T)[0]
        out = []
        for i, block in enumerate(self.blocks):
            att = block.att
            if not getattr(att, "wkv_op", ""):
                continue
            out.append((i, KernelCall(att.wkv_op, mode, device, dtype, batch_size, T, att.kernel_heads,
                                      att.kernel_head_size, requires_grad, has_state)))
        return out

    def no_kernel(self) -> list[tuple[int, str]]:
        """``(layer, what runs it)`` for every layer whose time-mix calls no dispatched kernel (its
        ``wkv_op`` is empty; its ``runs_with`` says what runs it instead, e.g. torch's SDPA)."""
        out = []
        for i, block in enumerate(self.blocks):
            att = block.att
            if not getattr(att, "wkv_op", ""):
                what = getattr(att, "runs_with", "") or "its own PyTorch code"
                out.append((i, f"{type(att).__qualname__} calls no WKV kernel; it runs {what}"))
        return out

    # -- initialisation and optimisation ------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation of this version (SPEC.md §x.7/§x.6). No-op on the meta device."""
        if _is_meta(self):
            return
        C, V = self.config.n_embd, self.config.vocab_size
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        orthogonal_(self.head.weight, 0.5 * math.sqrt(V / C) if V > C else 0.5)
        self.ln_out.weight.fill_(1.0)
        self.ln_out.bias.zero_()
        for block in self.blocks:
            block.init_weights()

    @torch.no_grad()
    def set_rescale(self, every: int) -> RWKV:
        """fp16 inference transform of SPEC §8, explicit and reversible.

        With ``every = k``: layer l's ``att.output`` and ``ffn.value`` weights are divided by
        ``2 ** (l // k)`` and the residual is halved after every k-th block, so fp16 activations
        stay in range (LayerNorm makes it exact up to its eps). ``set_rescale(0)`` undoes it. The
        setting is recorded in ``model.rescale_every``; ``rwkv_zoo.save`` writes un-rescaled weights.
        """
        if every < 0:
            raise ValueError(f"rescale every must be >= 0, got {every}")
        old = self.rescale_every
        for i, block in enumerate(self.blocks):
            factor = (2 ** (i // old) if old else 1) / (2 ** (i // every) if every else 1)
            if factor != 1:
                for lin in (block.att.output, block.ffn.value):
                    lin.weight.mul_(factor)
        self.rescale_every = every
        return self

    def unused_parameters(self) -> list[str]:
        """Official keys that this version keeps for checkpoint compatibility but never uses.

        A time-mix class lists in ``first_layer_unused`` the parameters that the first layer using it
        never reads (v7: layer 0's ``v0``/``v1``/``v2``, since that layer *makes* ``v_first``)."""
        for i, block in enumerate(self.blocks):
            names = getattr(block.att, "first_layer_unused", ())
            if names:
                return [f"blocks.{i}.att.{n}" for n in names]
        return []

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return f"version={self.version}, n_layer={c.n_layer}, n_embd={c.n_embd}, vocab_size={c.vocab_size}"


def official_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    lr_scales: dict[str, float] | None = None,
    *,
    decay_rule: Callable[[str, Tensor], bool] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups as the official trainers build them.

    ``lr_scales`` maps a parameter-name fragment (``"time_decay"``) to a learning-rate multiplier;
    weight decay goes to parameters that ``decay_rule`` accepts (default: >= 2-D after squeeze and
    named ``*.weight``, as in RWKV-LM). Each group has ``params``, ``names``, ``weight_decay`` and
    ``lr_scale``; multiply your base learning rate by ``lr_scale`` (the official ``my_lr_scale``).
    """
    lr_scales = lr_scales or {}

    def default_rule(name: str, p: Tensor) -> bool:
        return p.squeeze().dim() >= 2 and ".weight" in f".{name}" and weight_decay > 0

    rule = decay_rule or default_rule
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        for fragment, s in lr_scales.items():
            if fragment in name:
                scale = s
                break
        wd = weight_decay if rule(name, p) else 0.0
        g = groups.setdefault((scale, wd), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["weight_decay"] > 0, g["lr_scale"]))


# ---------------------------------------------------------------------------------------------------
# Random weights (tests, demos): plausible values everywhere, so every parameter matters


def _mix_like(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last.startswith(("time_mix_", "x_")) or (last.startswith("time_maa_") and last[-2:] not in ("w1", "w2"))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Fill every parameter with seeded random values of a sensible scale (unlike the official init,
    which zeroes whole projections so that many gradients vanish at step 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        shape, last = p.shape, name.rsplit(".", 1)[-1]
        if _mix_like(name):
            val = torch.rand(shape, generator=g)
        elif ".ln" in f".{name}" and last == "weight":
            val = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif last == "bias":
            val = 0.1 * torch.randn(shape, generator=g)
        elif name.startswith("emb."):
            val = torch.randn(shape, generator=g)
        elif p.dim() == 2 and last == "weight":
            val = torch.randn(shape, generator=g) * scale / math.sqrt(shape[1])
        elif p.squeeze().dim() >= 2:  # LoRA factors stored (in, out): x @ W
            val = 0.3 * torch.randn(shape, generator=g) / math.sqrt(shape[-2])
        else:
            val = 0.5 * torch.randn(shape, generator=g)
        p.copy_(val.to(p.dtype))
    return model


def count(params: Iterable[Tensor]) -> int:
    return sum(p.numel() for p in params)
