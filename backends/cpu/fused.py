"""The cpu backend's fused step: the whole model body for inference in one C++ call.

The step covers the blocks of the built-in versions exactly as registered: the time-mix and
channel-mix classes of v4, v5, v6 and v7 (and any hybrid of them), in the generic pre-LN ``Block``
of the generic ``RWKV`` model. It looks the classes up by identity (``type(m) is cls``), so a subclass
that changes the maths, or a version with a new channel-mix (v7a, v8), runs its modules instead; the
reason is in ``rwkv_zoo.explain``.

The C++ side is the same maths as the version files, one token at a time per sequence, with the WKV
recurrence of ``csrc/cpu_wkv.cpp`` inline, fp32 activations and state, and matrix products through the
tile kernels of ``csrc/cpu_tiles.h`` (fp32 / bf16 / int8 / int4 weights, fp32 accumulation; the build
for the CPU's instruction set, ``kernels.select_isa``).
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor, nn

from rwkv_zoo.backends.cpu import kernels
from rwkv_zoo.fused import FusedStep, StepCall
from rwkv_zoo.inference import InferenceLinear
from rwkv_zoo.ops import V4_P_INIT
from rwkv_zoo.state import LayerState, RWKVState

PREFILL_CHUNK = 512  # tokens per C++ call: bounds its scratch (~60 MiB at C = 768) in long prefills
COVERED = ("v4", "v5", "v6", "v7")
_LORAS = ("time_maa_w1", "time_decay_w1", "w1", "a1", "v1", "g1")


def component_kinds() -> tuple[dict[type, str], dict[type, str]]:
    """``({time-mix class: kind}, {channel-mix class: kind})`` for the versions the C++ step implements.

    Kinds name the maths, not the version: v5's channel-mix is v4's maths (SPEC §3.5). Classes come
    from the registry, so this follows whatever is registered under these names."""
    from rwkv_zoo.registry import get_versions

    versions = get_versions()
    tms, cms = {}, {}
    for name in COVERED:
        spec = versions.get(name)
        if spec is None or spec.block_cls is None:
            continue
        tms[spec.block_cls.time_mix_cls] = name
        cms[spec.block_cls.channel_mix_cls] = {"v5": "v4"}.get(name, name)
    return tms, cms


def _component_classes() -> set[type]:
    tms, cms = component_kinds()
    return {*tms, *cms}


def _kinds(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    from rwkv_zoo.model import RWKV, Block

    why: list[str] = []
    if type(model).forward is not RWKV.forward:
        why.append(f"{type(model).__name__} overrides RWKV.forward")
    tms, cms = component_kinds()
    kinds = []
    for i, block in enumerate(model.blocks):
        if type(block).forward is not Block.forward:
            why.append(f"layer {i}: {type(block).__name__} overrides Block.forward")
            break
        tm, cm = tms.get(type(block.att)), cms.get(type(block.ffn))
        if tm is None:
            why.append(f"layer {i}: time-mix {type(block.att).__qualname__} is not one the C++ step implements "
                       f"({', '.join(c.__qualname__ for c in tms)})")
            break
        if cm is None:
            why.append(f"layer {i}: channel-mix {type(block.ffn).__qualname__} is not one the C++ step implements")
            break
        kinds.append((tm, cm))
    return kinds, why


def check(model: nn.Module, call: StepCall) -> list[str]:
    """Sentences for what keeps the fused step from running ``model`` for ``call`` (empty: it can)."""
    why: list[str] = []
    # Sharded (FSDP2 DTensor) or otherwise wrapped parameters cannot be read as one CPU buffer each.
    for n, p in model.named_parameters():
        if type(p.data) is not torch.Tensor or p.device.type != "cpu":
            return [f"{n} is not a plain CPU tensor ({type(p.data).__name__} on {p.device.type})"]
    if call.dtype != torch.float32:
        why.append(f"takes fp32 models, not {str(call.dtype).removeprefix('torch.')} (prepare_inference converts)")
    lib, reason = kernels.load_decode()
    if lib is None:
        return [*why, reason]
    kinds, problems = _kinds(model)
    why += problems
    if problems:
        return why
    C = model.config.n_embd
    if C % 8:
        why.append(f"the model width {C} is not a multiple of 8")
    for i, block in enumerate(model.blocks):
        att = block.att
        if any(getattr(att, n).shape[-1] % 8 for n in _LORAS if hasattr(att, n)):
            why.append(f"layer {i}: a LoRA width is not a multiple of 8")
            break
        if kinds[i][0] != "v4" and (att.kernel_head_size > 256 or att.kernel_heads * att.kernel_head_size != C):
            why.append(f"layer {i}: head size {att.kernel_head_size}: the step takes heads of up to 256 channels")
            break
    # The step reads weights from the modules it knows; a module wrapped or replaced by another library
    # (peft's LoRA layers keep the base weight as `.weight` but add to its output) would be read as if
    # plain, silently dropping what the wrapper adds: such a model runs its modules instead.
    known = {nn.ModuleList, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Embedding, InferenceLinear,
             *_component_classes()}
    blocks = {id(b) for b in model.blocks}
    for name, m in model.named_modules():
        if m is not model and id(m) not in blocks and type(m) not in known:
            why.append(f"{name}: a {type(m).__qualname__} module, not one the C++ step reads")
            break
    for name, m in model.named_modules():
        if isinstance(m, InferenceLinear) and not m.packed:
            why.append(f"{name}: a prepared projection that is not packed")
            break
        if isinstance(m, nn.Linear) and (m.bias is not None or m.weight.dtype != torch.float32
                                         or m.weight.device.type != "cpu"):
            why.append(f"{name}: takes fp32 CPU projections without bias")
            break
    return why


def build(model: nn.Module) -> FusedDecode:
    lib, reason = kernels.load_decode()
    if lib is None:
        raise RuntimeError(f"the cpu fused step cannot load: {reason}")
    kinds, problems = _kinds(model)
    if problems:
        raise RuntimeError("; ".join(problems))
    return FusedDecode(model, kinds, lib)


STEP = FusedStep(
    name="cpu-fused",
    check=check,
    build=build,
    devices=("cpu",),
    description="every layer, the final norm and the head of v4-v7 models (and hybrids) in one C++ call",
)


class FusedDecode:
    """The whole model body in one C++ call (``csrc/cpu_decode.cpp``): every layer, the final norm and
    the head, in one OpenMP parallel region, for B sequences of T tokens (decode: T = 1; prefill: whole
    prompts in chunks of ``PREFILL_CHUNK``). Projections are read in the tile layout of
    ``kernels.pack``: the packed buffers of a prepared model (``prepare_inference``: fp32, bf16,
    int8 or int4), or packed fp32 copies of a plain model's ``nn.Linear`` weights.
    """

    def __init__(self, model: nn.Module, kinds: list[tuple[str, str]], lib):
        self.lib = lib
        self.keep: list[Tensor] = []  # the tensors the structures point into
        self.C = model.config.n_embd
        self.L = len(kinds)
        self.params = (kernels.LayerP * self.L)()
        every = model.rescale_every
        for i, (block, (tm, cm)) in enumerate(zip(model.blocks, kinds, strict=True)):
            self._fill(self.params[i], block, tm, cm, bool(every and (i + 1) % every == 0))
        self.kinds = [tm for tm, _ in kinds]
        self.shapes = [(b.att.kernel_heads, b.att.kernel_head_size) for b in model.blocks]
        self.ln_out = (self._ptr(model.ln_out.weight), self._ptr(model.ln_out.bias), float(model.ln_out.eps))
        self.head = self._lin(model.head)
        self.vocab = model.head.out_features
        self.p_init = float(V4_P_INIT)

    # -- building the structures ------------------------------------------------------------------
    def _ptr(self, t: Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _rows(self, rows: list[Tensor]) -> int:
        return self._ptr(torch.stack([r.detach().reshape(-1).float() for r in rows]))

    def _lin(self, mod: nn.Module) -> kernels.Lin:
        if not isinstance(mod, InferenceLinear):
            # A plain fp32 nn.Linear: pack a copy in the tile layout (the model keeps its own weight, so
            # training, state_dict and save are untouched; the copy is rebuilt when the weight changes).
            mod = InferenceLinear(mod.weight, "fp32")
        self.keep.append(mod.qweight)
        kind = kernels.KINDS[mod.qweight.dtype]
        scale = None
        if mod.scale is not None:
            self.keep.append(mod.scale)
            scale = mod.scale.data_ptr()
        return kernels.Lin(mod.qweight.data_ptr(), scale, kind, mod.qweight.shape[0] * kernels.TILE_ROWS,
                               mod.in_features)

    def _lora(self, weight: Tensor) -> kernels.Lin:
        """A LoRA matrix used as ``x @ weight`` ([in, out]): packed fp32 as [out, in]."""
        packed = kernels.pack(weight.detach().float().t().contiguous())
        self.keep.append(packed)
        return kernels.Lin(packed.data_ptr(), None, 0, packed.shape[0] * kernels.TILE_ROWS, weight.shape[0])

    def _fill(self, P, block: nn.Module, tm: str, cm: str, halve: bool) -> None:
        att, ffn = block.att, block.ffn
        P.att_kind, P.ffn_kind = int(tm[1]), int(cm[1])
        P.H, P.N, P.halve = att.kernel_heads, att.kernel_head_size, int(halve)
        if block.ln0 is not None:
            P.ln0_w, P.ln0_b, P.ln0_eps = self._ptr(block.ln0.weight), self._ptr(block.ln0.bias), block.ln0.eps
        P.ln1_w, P.ln1_b, P.ln1_eps = self._ptr(block.ln1.weight), self._ptr(block.ln1.bias), block.ln1.eps
        P.ln2_w, P.ln2_b, P.ln2_eps = self._ptr(block.ln2.weight), self._ptr(block.ln2.bias), block.ln2.eps
        if tm != "v4":
            P.lnx_w, P.lnx_b, P.lnx_eps = self._ptr(att.ln_x.weight), self._ptr(att.ln_x.bias), att.ln_x.eps
        P.r, P.k, P.v, P.o = (self._lin(m) for m in (att.receptance, att.key, att.value, att.output))
        # The kernel takes the decay in the form each version's maths uses it (SPEC §3.4, §4.4, §5.4, §6.4).
        if tm == "v4":
            P.mix = self._rows([att.time_mix_k, att.time_mix_v, att.time_mix_r])
            P.w, P.u = self._ptr(-torch.exp(att.time_decay.detach().float())), self._ptr(att.time_first)
        elif tm == "v5":
            P.mix = self._rows([att.time_mix_k, att.time_mix_v, att.time_mix_r, att.time_mix_g])
            P.w = self._ptr(-torch.exp(att.time_decay.detach().float()))  # [H, N] log decay
            P.u, P.g = self._ptr(att.time_faaaa), self._lin(att.gate)
        elif tm == "v6":
            P.mix = self._rows([att.time_maa_x] + [getattr(att, f"time_maa_{c}") for c in "wkvrg"])
            P.w, P.u, P.g = self._ptr(att.time_decay), self._ptr(att.time_faaaa), self._lin(att.gate)
            P.l1[0], P.l1[1], P.l1[2] = (self._lora(m) for m in (att.time_maa_w1, att.time_decay_w1,
                                                                 att.time_decay_w2))
            for m in range(5):
                P.l2[m] = self._lora(att.time_maa_w2[m])
        else:
            P.mix = self._rows([getattr(att, f"x_{c}") for c in "rwkvag"])
            P.w, P.a0, P.v0 = self._ptr(att.w0), self._ptr(att.a0), self._ptr(att.v0)
            P.k_k, P.k_a, P.r_k = self._ptr(att.k_k), self._ptr(att.k_a), self._ptr(att.r_k)
            for j, c in enumerate("wavg"):
                P.l1[j], P.l2[j] = self._lora(getattr(att, f"{c}1")), self._lora(getattr(att, f"{c}2"))
        # Channel-mix lerp weights as the kernel's lerp(prev, x, m) wants them: v4 mixes toward x, v6/v7
        # toward the previous token (hence 1 - maa).
        if cm == "v4":
            P.f_mk, P.f_mr = self._ptr(ffn.time_mix_k), self._ptr(ffn.time_mix_r)
        elif cm == "v6":
            P.f_mk = self._ptr(1 - ffn.time_maa_k.detach().float())
            P.f_mr = self._ptr(1 - ffn.time_maa_r.detach().float())
        else:
            P.f_mk = self._ptr(1 - ffn.x_k.detach().float())
        P.fk, P.fv = self._lin(ffn.key), self._lin(ffn.value)
        if cm != "v7":
            P.fr = self._lin(ffn.receptance)

    # -- the step ---------------------------------------------------------------------------------
    def __call__(self, x: Tensor, state: RWKVState, fresh: bool, keep: int) -> tuple[Tensor, list[LayerState]]:
        """``x`` [B, T, C] embeddings -> (logits [B, keep, V] of the last ``keep`` tokens, new layer states).

        Long inputs run in chunks of ``PREFILL_CHUNK`` tokens (the state carried between them), which
        bounds the scratch memory; the results do not depend on the chunking."""
        T = x.shape[1]
        x = x.float()
        outs = []
        layers = state.layers
        for t0 in range(0, T, PREFILL_CHUNK):
            t1 = min(T, t0 + PREFILL_CHUNK)
            k = max(0, min(t1 - t0, keep - (T - t1)))  # positions of this chunk among the last `keep`
            logits, layers = self._run(x[:, t0:t1], layers, fresh and t0 == 0, k)
            if k:
                outs.append(logits)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), layers

    def _new_state(self, B: int):
        """Uninitialized tensors for the new state: the shifts, the v4 (a, b, p) and the matrix states,
        each group cut from one buffer with one call (per-piece views cost ~3 us each in Python). Matrix
        states above 8 MB in all get a buffer per layer: a v7-0.1B state at batch 16 is 38 MB, above
        glibc's largest mmap threshold, so one buffer would be mapped and zeroed afresh every step
        (measured: ~10 % of the step); per-layer buffers are reused from the heap."""
        C, L = self.C, self.L
        shifts = torch.empty(2 * L, B, C).unbind(0)
        n4 = self.kinds.count("v4")
        v4 = torch.empty(3 * n4, B, C).unbind(0) if n4 else ()
        mats = [(B, H, N, N) for kind, (H, N) in zip(self.kinds, self.shapes, strict=True) if kind != "v4"]
        if mats and len(set(mats)) == 1 and len(mats) * math.prod(mats[0]) * 4 <= 8 << 20:
            wkv = torch.empty(len(mats), *mats[0]).unbind(0)
        else:
            wkv = [torch.empty(shape) for shape in mats]
        return shifts, iter(v4), iter(wkv)

    def _run(self, x: Tensor, layers: list[LayerState], fresh: bool, keep: int):
        B, T, C = x.shape
        x = x.contiguous().clone()  # the kernel overwrites it
        shifts, v4, wkv = self._new_state(B)
        ins: list[Tensor | None] = []
        new_layers = []
        for i, (kind, ls) in enumerate(zip(self.kinds, layers, strict=True)):
            ins += (ls.att_shift, ls.ffn_shift)
            if kind == "v4":
                ins += (None, None, None) if fresh else ls.wkv
                new_layers.append(LayerState(shifts[2 * i], shifts[2 * i + 1], (next(v4), next(v4), next(v4))))
            else:
                ins += (None if fresh else ls.wkv, None, None)
                new_layers.append(LayerState(shifts[2 * i], shifts[2 * i + 1], next(wkv)))
        # States from another source (a bf16 model's shifts, a transposed view) are made fp32 contiguous;
        # ours already are. `keep_alive` holds the converted copies until the call returns.
        keep_alive = [t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()
                      for t in ins]
        out_ptrs = []
        for kind, ls in zip(self.kinds, new_layers, strict=True):
            out_ptrs += (ls.att_shift, ls.ffn_shift, *ls.wkv) if kind == "v4" else (ls.att_shift, ls.ffn_shift, ls.wkv,
                                                                                    None, None)
        P5 = ctypes.c_void_p * (5 * self.L)
        in_arr = P5(*[None if t is None else t.data_ptr() for t in keep_alive])
        out_arr = P5(*[None if t is None else t.data_ptr() for t in out_ptrs])
        logits = torch.empty(B, keep, self.head.N, dtype=torch.float32)
        self.lib.rz_decode(self.params, self.L, B, T, C, x.data_ptr(), in_arr, out_arr, *self.ln_out,
                           ctypes.byref(self.head), keep, logits.data_ptr(), self.p_init, torch.get_num_threads())
        return (logits if self.vocab == self.head.N else logits[..., : self.vocab]), new_layers


