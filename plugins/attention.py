"""A causal softmax-attention baseline (sliding window, RoPE), registered as the version ``attn``.

Ablations ask "and against attention?": this is a Transformer of the same width and depth as the RWKV
versions, built from the same scaffolding (embedding, ``ln0``, pre-LN blocks ``x += att(ln1(x));
x += ffn(ln2(x))``, ``ln_out``, a separate head) so that only the time-mix and channel-mix differ.

Time-mix: multi-head causal softmax attention with rotary position embeddings (RoPE, rotate-half form)
over a sliding window of ``W = window`` keys (the query's own position and the ``W - 1`` before it):
    q, k, v = W_q x, W_k x, W_v x           per head [B, H, T, N]; q, k rotated by their absolute position
    y_t     = sum_{t-W < s <= t} softmax_s(q_t . k_s / sqrt(N)) v_s
    out     = W_o y
The window keeps the recurrent state fixed-size, as an RNN's is: per layer the last W rotated keys and
values, ``[B, H, W, N]`` each (fp32, like every WKV state), plus the number of tokens seen ``[B]``
(int64). The "WKV" slot of ``LayerState`` holds the triple ``(keys, values, position)``; the buffer
keeps the keys in time order (the oldest first), so appending is one concatenation and the valid
entries of a sequence that has seen ``p < W`` tokens are the last ``p`` slots. Keys are stored already
rotated, so a cached key never needs its position again. A layer's window is W tokens; the model's
receptive field is ``n_layer * (W - 1) + 1`` tokens, since each layer looks W - 1 tokens further back.

``token_shift = True`` (off by default; the ablation suites turn it on) feeds q, k and v a per-channel
lerp of this token and the previous one, ``x + (x_prev - x) * mu_{q,k,v}`` (RWKV's token shift, a
kernel-2 causal convolution; ``att.x_q``, ``att.x_k``, ``att.x_v`` [1, 1, C], initialised like RWKV-7's
``x_k``), read from the shift state that every layer carries anyway. Zoology's MQAR models put a short
convolution before every sequence mixer for the same reason: a key can then carry the token before it,
so one attention layer recalls "the value after key k" without first learning a previous-token head.
Every RWKV version has this shift built in; without it the baseline measures how fast attention learns a
previous-token head, not how well it recalls (MQAR, 2 x 64, T = 32, 400 steps: 0.12 accuracy without,
1.00 with; docs/ablations.md).

Paths: a fresh sequence (``wkv is None``) runs ``torch.nn.functional.scaled_dot_product_attention``
over the input with a causal mask (``is_causal`` when T <= W, a banded mask beyond); a carried state
runs the same call over ``[buffer, new keys]`` with a mask that admits exactly the same keys, so a
sequence decoded token by token, split anywhere, or run in one pass gives the same logits (to fp32
rounding), across the window boundary included. Both paths are differentiable, the buffer included,
so chunked training with the state carried (``rwkv_zoo.train.infctx``) gets exact gradients. No WKV op
runs: ``wkv_op`` is empty and ``explain`` says that torch's SDPA runs the layer (PyTorch chooses its own
SDPA kernel: flash, memory-efficient or math).

Channel-mix: ``W_v relu(W_k x)^2`` at width 4 C, no token shift. ReLU² (Primer, So et al. 2021) is the
activation RWKV's own channel-mix uses, with the same two matrices and the same width as the v4/v7
channel-mix, so parameter counts match an RWKV layer's channel-mix exactly and the comparison isolates
the time-mix; SwiGLU would need a third matrix and a 8/3 C width to match. The shift states are kept as
the contract says (the last token's normed input); only ``token_shift`` reads the time-mix's.

Initialisation: fan-in scaled normals (every projection N(0, 1/sqrt(fan_in)), the two projections into
the residual that divided by sqrt(2 L), as GPT-2 does); embedding, norms and head as every RWKV version
(the shared scaffolding). GPT-2's constant 0.02 equals 1/sqrt(fan_in) only near width 2500: at the
ablation widths it is 3-6x smaller, so q.k stays ~0.1 and attention stays uniform for hundreds of steps.

Checkpoints: no release exists, so this file's key layout is the official one (``att.query``,
``att.key``, ``att.value``, ``att.output``, ``ffn.key``, ``ffn.value``; ``detect`` claims files with
``att.query``). Keys alone do not show the head size, window or RoPE base: rwkv_zoo safetensors keep
them in their metadata; a ``.pth`` loads with the head size of the shared preset of its width
(``min(64, C/4)``, a divisor of C), ``token_shift`` when it has ``att.x_k``, and the default window and
base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_zoo.hookspecs import hookimpl
from rwkv_zoo.model import Block, RWKVConfig, channel_ramp, layer_ratios, token_shift
from rwkv_zoo.protocols import Context
from rwkv_zoo.registry import SizePreset, VersionSpec

NAME = "attn"
WORLD_VOCAB = 65536


def fan_in_std(fan_in: int) -> float:
    """1/sqrt(fan_in): unit-variance outputs from unit-variance (LayerNorm'd) inputs. GPT-2's fixed 0.02
    is this scale at width ~2500; at the ablation widths (32-128) it is 3-6x smaller, which leaves q.k at
    ~0.1 and attention uniform for hundreds of steps (MQAR, 2 x 64: 0.14 accuracy after 400 steps)."""
    return 1.0 / math.sqrt(fan_in)


@dataclass
class AttnConfig(RWKVConfig):
    window: int = 256  # keys each query attends to (itself included): the state holds this many per layer
    rope_theta: float = 10000.0  # RoPE base
    # q, k and v read a per-channel lerp of this token and the previous one (RWKV's token shift, a
    # kernel-2 causal convolution), as Zoology puts a short convolution in front of every MQAR mixer
    token_shift: bool = False

    version: ClassVar[str] = NAME

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"{NAME} config: window must be a positive int, got {self.window!r}")
        if self.head_size % 2:
            raise ValueError(f"{NAME} config: RoPE rotates pairs of channels, so head_size must be even, "
                             f"got {self.head_size}")
        if not isinstance(self.token_shift, bool):
            raise ValueError(f"{NAME} config: token_shift must be true or false, got {self.token_shift!r}")
        if not isinstance(self.rope_theta, int | float) or self.rope_theta <= 1:
            raise ValueError(f"{NAME} config: rope_theta must be a number > 1, got {self.rope_theta!r}")


def rope_tables(pos: Tensor, N: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, T, N/2] (fp32) for absolute positions ``pos`` [B, T]."""
    inv_freq = theta ** (-torch.arange(0, N, 2, device=pos.device, dtype=torch.float32) / N)  # [N/2]
    angles = pos.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, N/2]
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the channel pairs (i, i + N/2) of ``x`` [B, H, T, N] (the GPT-NeoX / Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def band_mask(T: int, W: int, device) -> Tensor:
    """[T, T] bool, True where query i may see key j: ``i - W < j <= i``."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(T, device=device).unsqueeze(0)
    return (j <= i) & (j > i - W)


def carried_mask(start: Tensor, T: int, W: int) -> Tensor:
    """[B, 1, T, W + T] bool for keys ``[buffer (W), new (T)]``, a sequence having seen ``start`` [B] tokens.

    Key slot j holds absolute position ``start - W + j`` and query i is at ``start + i``: the query sees
    the key when ``0 <= i + W - j < W`` (inside the window, not in the future) and the slot is filled
    (``j >= W - start``: a sequence that has seen p < W tokens has only its last p buffer slots set).
    Every query sees at least itself, so no row is empty.
    """
    i = torch.arange(T, device=start.device).view(1, T, 1)
    j = torch.arange(W + T, device=start.device).view(1, 1, W + T)
    ok = (j > i) & (j <= i + W) & (j >= (W - start).view(-1, 1, 1))
    return ok.unsqueeze(1)


class AttnTimeMix(nn.Module):
    """Sliding-window causal softmax attention with RoPE (see the module docstring)."""

    wkv_op = ""  # no dispatched kernel: torch's SDPA runs the layer (``runs_with`` says so in explain)

    def __init__(self, config: AttnConfig, layer_id: int):
        super().__init__()
        self.layer_id, self.n_layer = layer_id, config.n_layer
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.kernel_heads, self.kernel_head_size = H, N
        self.window, self.rope_theta = config.window, float(config.rope_theta)
        self.runs_with = (f"torch.nn.functional.scaled_dot_product_attention over a window of {config.window} "
                          "keys (PyTorch picks its SDPA kernel)")
        self.query = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.shifted = config.token_shift
        if self.shifted:
            self.x_q, self.x_k, self.x_v = (nn.Parameter(torch.empty(1, 1, C)) for _ in range(3))

    def zero_wkv(self, batch_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(keys [B, H, W, N] fp32, values [B, H, W, N] fp32, tokens seen [B] int64), all zero."""
        H, N, W = self.kernel_heads, self.kernel_head_size, self.window
        buf = torch.zeros(batch_size, H, W, N, device=device, dtype=torch.float32)
        return buf, buf.clone(), torch.zeros(batch_size, device=device, dtype=torch.long)

    def forward(self, x: Tensor, shift: Tensor, wkv, ctx: Context):
        B, T, C = x.shape
        H, N, W = self.kernel_heads, self.kernel_head_size, self.window

        def heads(t: Tensor) -> Tensor:  # [B, T, C] -> [B, H, T, N]
            return t.view(B, T, H, N).transpose(1, 2)

        if self.shifted:
            xx, new_shift = token_shift(x, shift)
            dx = xx - x
            xq, xk, xv = x + dx * self.x_q, x + dx * self.x_k, x + dx * self.x_v
        else:
            xq = xk = xv = x
            new_shift = x[:, -1]
        q, k, v = heads(self.query(xq)), heads(self.key(xk)), heads(self.value(xv))
        if wkv is None:
            start = torch.zeros(B, device=x.device, dtype=torch.long)
        else:
            k_buf, v_buf, start = wkv
            start = start.to(x.device)
        pos = start.unsqueeze(1) + torch.arange(T, device=x.device)  # [B, T] absolute positions
        cos, sin = rope_tables(pos, N, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if wkv is None:
            if T <= W:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, W, x.device))
            k_all, v_all = k, v
        else:
            k_all = torch.cat([k_buf.to(k.dtype), k], dim=2)  # [B, H, W + T, N]
            v_all = torch.cat([v_buf.to(v.dtype), v], dim=2)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=carried_mask(start, T, W))
        out = self.output(y.transpose(1, 2).reshape(B, T, C))
        new = (_last(k_all, W), _last(v_all, W), start + T)
        return out, new_shift, new

    @torch.no_grad()
    def init_weights(self) -> None:
        C = self.query.weight.shape[1]
        for lin in (self.query, self.key, self.value):
            nn.init.normal_(lin.weight, 0.0, fan_in_std(C))
        nn.init.normal_(self.output.weight, 0.0, fan_in_std(C) / math.sqrt(2 * self.n_layer))
        if self.shifted:
            # RWKV-7's key mix: from all previous token (channel 0) to almost none (the last channel), so
            # every head starts with both tokens at hand
            _, r1 = layer_ratios(self.layer_id, self.n_layer)
            mix = 1 - channel_ramp(C).view(1, 1, C) ** (0.7 * r1)
            for p in (self.x_q, self.x_k, self.x_v):
                p.copy_(mix)


def _last(t: Tensor, W: int) -> Tensor:
    """The last W entries of ``t`` [B, H, S, N] along S, zero-padded at the front when S < W; fp32 (or
    fp64 in an fp64 model), as every WKV state."""
    S = t.shape[2]
    if S < W:
        t = F.pad(t, (0, 0, W - S, 0))
    t = t[:, :, -W:]
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class AttnMLP(nn.Module):
    """``W_v relu(W_k x)^2`` (no token shift): the feed-forward half of the attention block."""

    def __init__(self, config: RWKVConfig, layer_id: int):
        super().__init__()
        self.n_layer = config.n_layer
        C, F_ = config.n_embd, config.dim_ffn
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x: Tensor, shift: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        return self.value(torch.relu(self.key(x)).square()), x[:, -1]

    @torch.no_grad()
    def init_weights(self) -> None:
        F_, C = self.key.weight.shape
        nn.init.normal_(self.key.weight, 0.0, fan_in_std(C))
        nn.init.normal_(self.value.weight, 0.0, fan_in_std(F_) / math.sqrt(2 * self.n_layer))


class AttnBlock(Block):
    time_mix_cls = AttnTimeMix
    channel_mix_cls = AttnMLP


def _preset(name: str, L: int, C: int, V: int = WORLD_VOCAB, head_size: int | None = None) -> SizePreset:
    opts = (("head_size", head_size),) if head_size is not None else ()
    return SizePreset(name, L, C, V, options=opts, released=False, note="shape shared with the RWKV versions")


# The shapes every RWKV version shares (rwkv_zoo.registry's docstring), so an ablation compares like with
# like; no attention model was released under these names.
SIZES = (
    _preset("0.1B", 12, 768),
    _preset("0.4B", 24, 1024),
    _preset("1.5B", 24, 2048),
    _preset("3B", 32, 2560),
    _preset("7B", 32, 4096),
    _preset("14B", 61, 4096),
    _preset("tiny", 2, 64, 256, head_size=16),
    _preset("small", 4, 128, 1024, head_size=32),
)


def preset_head_size(C: int) -> int:
    """The head size the shared presets use at width C (16 at 64, 32 at 128, 64 from 256): the largest
    even divisor of C that is at most min(64, C / 4), or C itself for a narrow odd width."""
    for n in range(min(64, max(C // 4, 2)), 1, -1):
        if C % n == 0 and n % 2 == 0:
            return n
    return C


def detect(shapes) -> dict | None:
    """Files with ``blocks.0.att.query.weight`` (no RWKV version has a query projection)."""
    if "blocks.0.att.query.weight" not in shapes or "emb.weight" not in shapes:
        return None
    return {"head_size": preset_head_size(shapes["emb.weight"][1]), "token_shift": "blocks.0.att.x_k" in shapes}


SPEC = VersionSpec(
    name=NAME,
    title="Causal softmax attention (sliding window, RoPE)",
    config_cls=AttnConfig,
    block_cls=AttnBlock,
    sizes=SIZES,
    default_vocab=WORLD_VOCAB,
    wkv_op="",
    detect=detect,
    relative_cost=2.0,
    description="Transformer baseline for ablations: RoPE softmax attention over a window of W keys "
                "(a fixed-size state of W keys and values per layer), ReLU² MLP",
)


@hookimpl
def rwkv_zoo_register_versions(register):
    register(SPEC)
