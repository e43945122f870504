"""Hybrids: build spellings, components, identity, state interface, training and save/load."""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo
from rwkv_zoo.train import TrainConfig, Trainer
from rwkv_zoo.versions import v4, v5, v6, v7


def test_time_mix_and_channel_mix_of_other_versions():
    m = rwkv_zoo.build("v6", size="tiny", time_mix="v5", channel_mix="v4")
    assert m.version == "hybrid" and m.size_name == "tiny"
    assert (m.config.n_layer, m.config.n_embd, m.config.head_size) == (2, 64, 16)  # v6's tiny preset
    for block in m.blocks:
        assert type(block.att) is v5.V5TimeMix and type(block.ffn) is v4.V4ChannelMix
    assert m.config.dim_ffn == 256  # the v4 channel-mix's own width (4 C)
    assert m.identity.version == "hybrid[v5/v4,v5/v4]"
    assert m.identity != rwkv_zoo.build("v6-tiny").identity
    # the same model spelled directly
    same = rwkv_zoo.build("hybrid", base="v6", n_layer=2, n_embd=64, head_size=16, vocab_size=256,
                          time_mix="v5", channel_mix="v4", dim_mix_lora=8, dim_decay_lora=16)
    assert same.identity == m.identity and same.num_parameters() == m.num_parameters()
    # parameter count = the sum of the components (official keys, official shapes)
    plain_v5 = rwkv_zoo.build("v5", size="tiny")
    assert m.state_dict()["blocks.1.att.time_faaaa"].shape == plain_v5.state_dict()["blocks.1.att.time_faaaa"].shape
    # 2 layers x (key + value) x C x (256 - 224): the v5 FFN is 3.5 C = 224 wide
    assert m.num_parameters() == plain_v5.num_parameters() + 2 * 2 * 64 * (256 - 224)


def test_per_layer_pattern_and_its_state():
    m = rwkv_zoo.build("v7", n_layer=4, n_embd=64, head_size=16, vocab_size=256, layers="v7,v7,v6,v4/v5")
    kinds = [(type(b.att), type(b.ffn)) for b in m.blocks]
    assert kinds == [(v7.V7TimeMix, v7.V7ChannelMix), (v7.V7TimeMix, v7.V7ChannelMix),
                     (v6.V6TimeMix, v6.V6ChannelMix), (v4.V4TimeMix, v5.V5ChannelMix)]
    assert m.unused_parameters() == ["blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"]
    state = m.zero_state(2)
    assert isinstance(state.layers[3].wkv, tuple) and state.layers[2].wkv.shape == (2, 4, 16, 16)
    rwkv_zoo.randomize_(m, 0)
    x = torch.randint(0, 256, (2, 29))
    with torch.no_grad():
        whole, _ = m(x)
        first, st = m(x[:, :11])
        rest, _ = m(x[:, 11:], st)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(rwkv_zoo.StateMismatchError, match=r"hybrid\[v7,v7,v6,v4/v5\]"):
        rwkv_zoo.build("v7", n_layer=4, n_embd=64, head_size=16, vocab_size=256)(x, st)


def test_param_groups_are_the_union_of_the_official_ones():
    m = rwkv_zoo.build("v7", n_layer=2, n_embd=64, head_size=16, vocab_size=256, layers="v7,v6")
    scale = {n: g["lr_scale"] for g in rwkv_zoo.param_groups(m) for n in g["names"]}
    assert scale["blocks.0.att.w0"] == 2.0 and scale["blocks.1.att.time_decay"] == 2.0
    assert scale["blocks.1.att.time_decay_w1"] == 1.0 and scale["blocks.1.att.time_faaaa"] == 1.0


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"time_mix": "hybrid"}, "time_mix 'hybrid' is not a version with blocks"),  # v8 has blocks now
        ({"layers": "v7,v7,v6"}, "layers names 3 layers .* n_layer=2"),
        ({"layers": "v7,v6", "time_mix": "v5"}, "either layers= or time_mix="),
        ({"channel_mix": "v6", "dim_w_lora": 8, "bogus": 1}, r"unknown option\(s\) bogus for hybrid"),
    ],
)
def test_hybrid_errors_say_what_to_do(opts, match):
    with pytest.raises(ValueError, match=match):
        rwkv_zoo.build("v7", size="tiny", **opts)


def test_a_hybrid_trains_saves_and_loads(tmp_path):
    config = TrainConfig(model="v6", size="tiny", model_options={"time_mix": "v7", "channel_mix": "v4"},
                         data={"task": "copying", "length": 5}, steps=3, batch_size=4, progress=False,
                         eval_batches=1, out_dir=str(tmp_path))
    trainer = Trainer(config)
    result = trainer.fit()
    assert result.identity == "hybrid[v7/v4,v7/v4]" and result.params == trainer.module.num_parameters()
    assert result.model == "hybrid-tiny[v7/v4,v7/v4]"
    resumed = Trainer(TrainConfig(**{**config.__dict__, "resume": True}))
    assert resumed.step == 3
    for name, value in trainer.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name
    # the state file of a hybrid round-trips and keeps its identity
    _, state = trainer.module(torch.randint(0, 18, (1, 7)))
    state.save(tmp_path / "state.safetensors")
    back = rwkv_zoo.RWKVState.load(tmp_path / "state.safetensors", trainer.module)
    assert back.identity == state.identity
    assert torch.equal(back.layers[1].wkv, state.layers[1].wkv)


def test_hybrid_presets_are_listed_with_shared_shapes():
    assert "hybrid-tiny" in rwkv_zoo.list_models() and "hybrid-1.5B" in rwkv_zoo.list_models()
    assert rwkv_zoo.build("hybrid", size="1.5B", base="v5", device="meta").config.n_embd == 2048
    assert "hybrid-tiny" not in rwkv_zoo.list_models(released_only=True)
