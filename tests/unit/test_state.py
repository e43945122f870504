"""RWKVState: identity checks, batch operations, files."""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import RWKVState, StateMismatchError


@pytest.fixture(scope="module")
def v6():
    return rwkv_zoo.randomize_(rwkv_zoo.build("v6", size="tiny"), seed=0).eval()


def test_zero_state_layout(v6):
    state = RWKVState.zeros(v6, 3)
    assert state.batch_size == 3 and len(state.layers) == 2
    ls = state.layers[0]
    assert ls.att_shift.shape == (3, 64) and ls.ffn_shift.shape == (3, 64)
    assert ls.wkv.shape == (3, 4, 16, 16) and ls.wkv.dtype == torch.float32
    v4 = rwkv_zoo.build("v4", size="tiny")
    a, b, p = RWKVState.zeros(v4, 2).layers[1].wkv
    assert a.shape == b.shape == p.shape == (2, 64)
    assert torch.all(p < -1e29)  # the "minus infinity" running maximum


def test_state_from_another_model_is_rejected(v6):
    other = rwkv_zoo.build("v5", size="tiny")
    _, state = other(torch.tensor([[1, 2, 3]]))
    with pytest.raises(StateMismatchError, match=r"made by v5.*model is v6.*version 'v5' != 'v6'"):
        v6(torch.tensor([[1]]), state)
    bigger = rwkv_zoo.build("v6", n_layer=3, n_embd=64, vocab_size=256, head_size=16,
                            dim_mix_lora=8, dim_decay_lora=16)
    with pytest.raises(StateMismatchError, match="n_layer 2 != 3"):
        bigger(torch.tensor([[1]]), RWKVState.zeros(v6, 1))
    with pytest.raises(TypeError, match="RWKVState"):
        v6(torch.tensor([[1]]), [torch.zeros(1)])


def test_batch_size_mismatch_says_how_to_fix(v6):
    with pytest.raises(StateMismatchError, match="batch size 2 but the tokens have batch size 1.*select"):
        v6(torch.tensor([[1]]), RWKVState.zeros(v6, 2))


def test_select_and_concat_keep_sequences_independent(v6):
    toks = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        _, state = v6(toks)
        nxt = torch.randint(0, 256, (3, 4))
        full, _ = v6(nxt, state)
        one, _ = v6(nxt[1:2], state.select(1))
        two, _ = v6(nxt[[0, 2]], state.select([0, 2]))
        joined = RWKVState.concat([state.select(0), state.select(slice(1, 3))])
        again, _ = v6(nxt, joined)
    torch.testing.assert_close(one, full[1:2])
    torch.testing.assert_close(two, full[[0, 2]])
    torch.testing.assert_close(again, full)
    with pytest.raises(StateMismatchError):
        RWKVState.concat([state, RWKVState.zeros(rwkv_zoo.build("v7", size="tiny"), 1)])


def test_blocks_never_mutate_the_callers_state(v6):
    toks = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        _, state = v6(toks)
        before = [t.clone() for ls in state.layers for t in ls.tensors()]
        v6(toks, state)
        v6(toks[:, :1], state)
    after = [t for ls in state.layers for t in ls.tensors()]
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x, y)


def test_clone_detach_to(v6):
    toks = torch.randint(0, 256, (1, 5))
    emb = v6.emb.weight
    _, state = v6(toks)
    assert state.layers[0].wkv.requires_grad
    d = state.detach()
    assert not d.layers[0].wkv.requires_grad
    c = state.clone()
    assert c.layers[1].att_shift is not state.layers[1].att_shift
    half = state.detach().to(dtype=torch.bfloat16)
    assert half.layers[0].att_shift.dtype == torch.bfloat16
    assert half.layers[0].wkv.dtype == torch.float32  # the WKV state stays fp32
    assert emb.grad is None


@pytest.mark.parametrize("version", ["v4", "v7"])
def test_save_and_load_round_trip(tmp_path, version):
    model = rwkv_zoo.randomize_(rwkv_zoo.build(version, size="tiny"), seed=2).eval()
    with torch.no_grad():
        _, state = model(torch.randint(0, 256, (2, 9)))
    path = tmp_path / "s.safetensors"
    state.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    loaded = RWKVState.load(path, model)
    for a, b in zip(state.layers, loaded.layers, strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            assert torch.equal(x, y)
    other = rwkv_zoo.build("v5", size="tiny")
    with pytest.raises(StateMismatchError):
        RWKVState.load(path, other)


def test_load_rejects_files_that_are_not_states(tmp_path, v6):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an rwkv_zoo state file"):
        RWKVState.load(path, v6)
