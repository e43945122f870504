"""Every version and size: official layout, parameter counts, forward/backward, state equivalences."""

from __future__ import annotations

import re

import pytest
import torch
from _deps import block_versions
from official_layout import official_param_count, official_shapes

import rwkv_zoo
from rwkv_zoo.registry import get_version

VERSIONS = block_versions()  # every registered version, v7a and v8 included
RELEASED = rwkv_zoo.list_models(released_only=True)


def _lora(model) -> dict:
    cfg = model.config.to_dict()
    return {k: v for k, v in cfg.items() if k.startswith("dim_") and k != "dim_ffn"}


def _published(label: str) -> float:
    m = re.fullmatch(r"([\d.]+)([MB])", label)
    assert m, label
    return float(m.group(1)) * (1e6 if m.group(2) == "M" else 1e9)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", RELEASED)
def test_released_sizes_have_the_official_parameter_count(name):
    model = rwkv_zoo.build(name, device="meta")
    c = model.config
    expected = official_param_count(model.version, c.n_layer, c.n_embd, c.vocab_size, _lora(model))
    assert model.num_parameters() == expected
    preset = get_version(model.version).preset(name.split("-", 1)[1])
    if preset.params:  # the release's own label, e.g. "1.600B"
        assert abs(expected - _published(preset.params)) / _published(preset.params) < 0.005, preset.params


def test_every_released_size_is_registered():
    # SPEC.md §3.8, §4.8, §5.7, §6.7: (version, L, C, V) of every official release.
    releases = {
        ("v4", 12, 768, 50277), ("v4", 24, 1024, 50277), ("v4", 24, 2048, 50277), ("v4", 32, 2560, 50277),
        ("v4", 32, 4096, 50277), ("v4", 40, 5120, 50277), ("v4", 12, 768, 65536), ("v4", 24, 1024, 65536),
        ("v4", 24, 2048, 65536), ("v4", 32, 2560, 65536), ("v4", 32, 4096, 65536),
        ("v5", 24, 1024, 65536), ("v5", 24, 2048, 65536), ("v5", 32, 2560, 65536), ("v5", 32, 4096, 65536),
        ("v6", 24, 2048, 65536), ("v6", 32, 2560, 65536), ("v6", 32, 4096, 65536), ("v6", 61, 4096, 65536),
        ("v7", 12, 768, 50304), ("v7", 24, 1024, 50304), ("v7", 24, 2048, 50304),
        ("v7", 12, 768, 65536), ("v7", 24, 1024, 65536), ("v7", 24, 2048, 65536), ("v7", 32, 2560, 65536),
        ("v7", 32, 4096, 65536), ("v7", 61, 4096, 65536),
    }
    have = set()
    for v in VERSIONS:
        for p in get_version(v).sizes:
            if p.released:
                have.add((v, p.n_layer, p.n_embd, p.vocab_size))
    assert releases <= have, releases - have


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("size", ["tiny", "largest"])
def test_state_dict_is_the_official_layout(version, size):
    if size == "largest":  # the largest preset of the version (released dims and LoRA ranks)
        size = max(get_version(version).sizes, key=lambda p: (p.n_layer * p.n_embd, p.name)).name
    model = rwkv_zoo.build(version, size=size, device="meta")
    c = model.config
    N = c.head_size if version != "v4" else 64
    expected = official_shapes(version, c.n_layer, c.n_embd, c.vocab_size, c.dim_ffn, N, _lora(model))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), (set(got) ^ set(expected))
    assert got == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_official_state_dict_loads_strictly(version):
    src = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=3)
    official = {k: v.clone() for k, v in src.state_dict().items()}  # what torch.save would write
    dst = rwkv_zoo.build(version, size="tiny")
    dst.load_state_dict(official, strict=True)
    toks = torch.randint(0, 256, (1, 7))
    torch.testing.assert_close(dst(toks)[0], src(toks)[0], rtol=0, atol=0)


def test_ffn_widths_and_lora_dims_follow_the_releases():
    assert rwkv_zoo.build("v4-0.1B", device="meta").config.dim_ffn == 3072
    assert rwkv_zoo.build("v5-1.5B", device="meta").config.dim_ffn == 7168
    assert rwkv_zoo.build("v6-3B", device="meta").config.dim_ffn == 8960
    assert rwkv_zoo.build("v7-0.4B", device="meta").config.dim_ffn == 4096
    v6 = rwkv_zoo.build("v6-7B", device="meta").config
    assert (v6.dim_mix_lora, v6.dim_decay_lora) == (64, 128)
    v6 = rwkv_zoo.build("v6-1.5B", device="meta").config
    assert (v6.dim_mix_lora, v6.dim_decay_lora) == (32, 64)
    v7 = rwkv_zoo.build("v7", n_layer=2, n_embd=768, device="meta").config  # formula of SPEC §6.6
    assert (v7.dim_w_lora, v7.dim_a_lora, v7.dim_v_lora, v7.dim_g_lora) == (64, 64, 32, 128)


@pytest.mark.parametrize("version", VERSIONS)
def test_forward_backward_reaches_every_parameter(version):
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=0)
    toks = torch.randint(0, 256, (2, 33))  # > 16: the chunked path
    logits, _ = model(toks)
    assert logits.shape == (2, 33, 256)
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks.roll(-1, 1).flatten())
    loss.backward()
    unused = set(model.unused_parameters())
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None or p.grad.abs().sum() == 0, name
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("version", VERSIONS)
def test_official_init_runs_and_is_finite(version):
    model = rwkv_zoo.build(version, size="tiny")
    toks = torch.randint(0, 256, (1, 20))
    logits, _ = model(toks)
    assert torch.isfinite(logits).all()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_official_init_values():
    m4 = rwkv_zoo.build("v4", n_layer=4, n_embd=64, vocab_size=100)
    att = m4.blocks[0].att
    # time_decay = -5 + 8 (c/(C-1))^(0.7 + 1.3 r01); layer 0: r01 = 0
    assert att.time_decay[0].item() == pytest.approx(-5.0)
    assert att.time_decay[-1].item() == pytest.approx(3.0)
    assert att.time_first[0].item() == pytest.approx(torch.log(torch.tensor(0.3)).item())
    assert att.key.weight.abs().sum() == 0 and att.output.weight.abs().sum() == 0
    m7 = rwkv_zoo.build("v7", n_layer=2, n_embd=128, vocab_size=100, head_size=64)
    a7 = m7.blocks[1].att
    assert torch.all(a7.k_a == 1.02) and torch.all(a7.r_k == -0.04)
    assert a7.w1.abs().sum() == 0 and a7.w2.abs().sum() > 0
    assert m7.blocks[0].ffn.value.weight.abs().sum() == 0
    m6 = rwkv_zoo.build("v6", n_layer=2, n_embd=128, vocab_size=100, head_size=64)
    a6 = m6.blocks[1].att
    assert a6.time_maa_w1.abs().sum() == 0 and a6.time_maa_w2.abs().max() <= 0.01
    assert a6.ln_x.weight[0].item() == pytest.approx(1.0)  # ((1+l)/L)^0.7 at the last layer


@pytest.mark.parametrize("version", VERSIONS)
def test_param_groups_follow_the_official_trainer(version):
    model = rwkv_zoo.build(version, size="tiny", device="meta")
    groups = rwkv_zoo.param_groups(model, weight_decay=0.1)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["weight_decay"] == 0.1
    assert by_name["blocks.0.ln1.weight"]["weight_decay"] == 0.0
    if not get_version(version).lr_scales:  # no multipliers (the attention baseline): one base rate for all
        assert {g["lr_scale"] for g in groups} == {1.0}
    else:
        decay_key = {"v4": "time_decay", "v5": "time_decay", "v6": "time_decay"}.get(version, "w0")  # x070, later
        assert by_name[f"blocks.1.att.{decay_key}"]["lr_scale"] == 2.0
        assert by_name[f"blocks.1.att.{decay_key}"]["weight_decay"] == 0.0
    if version == "v4":
        assert by_name["blocks.1.att.time_first"]["lr_scale"] == 3.0
    if version == "v6":
        assert by_name["blocks.1.att.time_decay_w1"]["lr_scale"] == 1.0
        assert by_name["blocks.1.att.time_maa_w1"]["weight_decay"] == 0.0  # LoRA: no ".weight"
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1e-3)
    assert len(opt.param_groups) == len(groups)


# --- parallel == recurrent == split with the state carried ------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_parallel_equals_recurrent_equals_split(version):
    torch.manual_seed(0)
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=5).eval()
    T = 70
    toks = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        full, full_state = model(toks)
        # token by token (recurrent kernels)
        state, steps = None, []
        for t in range(T):
            out, state = model(toks[:, t : t + 1], state)
            steps.append(out)
        stepwise = torch.cat(steps, 1)
        # split at random points, state carried (a mix of chunk and recurrent calls)
        cuts = sorted(torch.randperm(T - 1)[:3].add(1).tolist())
        state, parts, prev = None, [], 0
        for cut in [*cuts, T]:
            out, state = model(toks[:, prev:cut], state)
            parts.append(out)
            prev = cut
        split = torch.cat(parts, 1)
    assert rel(stepwise, full) <= 1e-5
    assert rel(split, full) <= 1e-5
    for a, b in zip(full_state.layers, state.layers, strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            if x.abs().max() > 1e20:  # v4's p starts at -1e30 for channels never updated
                continue
            assert rel(y, x) <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_gradients_flow_through_the_carried_state(version):
    """Embedding rows of tokens seen only in the first half get a gradient from the second half's loss
    only through the carried state: with the state carried they do, with it detached they do not."""
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=1)
    toks = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(7))
    second = set(toks[0, 12:].tolist())
    only_first = [t for t in toks[0, :12].unique().tolist() if t not in second]
    assert only_first  # the seed gives some: without them the asserts below would say nothing

    def first_half_rows(detach: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        _, state = model(toks[:, :12])
        logits, _ = model(toks[:, 12:], state.detach() if detach else state)
        logits.square().mean().backward()
        return model.emb.weight.grad[only_first].abs().sum(-1)  # [len(only_first)]

    assert (first_half_rows(detach=False) > 0).all()
    assert (first_half_rows(detach=True) == 0).all()


def test_bf16_model_runs_with_fp32_state():
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v6", size="tiny"), seed=0).to(torch.bfloat16)
    toks = torch.randint(0, 256, (1, 40))
    logits, state = model(toks)
    assert logits.dtype == torch.bfloat16
    assert state.layers[0].wkv.dtype == torch.float32
    assert state.layers[0].att_shift.dtype == torch.bfloat16
    ref = rwkv_zoo.randomize_(rwkv_zoo.build("v6", size="tiny"), seed=0)
    ref_logits, _ = ref(toks)
    assert rel(logits.float(), ref_logits) < 0.05


# --- input errors ------------------------------------------------------------------------------


def test_bad_tokens_raise_clear_errors():
    model = rwkv_zoo.build("v5", size="tiny")
    with pytest.raises(ValueError, match="token id 256 is out of range"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"tokens\[None\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))


def test_meta_device_builds_the_largest_models_instantly():
    for name in ("v4-pile-14B", "v6-14B", "v7-14B"):
        model = rwkv_zoo.build(name, device="meta")
        assert model.num_parameters() > 13e9
        assert model.device.type == "meta"
