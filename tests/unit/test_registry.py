"""build(), names, sizes and aliases, and the errors that tell users what exists."""

from __future__ import annotations

import pytest
import torch

import rwkv_zoo


def test_name_and_size_forms_are_equivalent():
    a = rwkv_zoo.build("v6-1.5B", device="meta")
    b = rwkv_zoo.build("v6", size="1.5B", device="meta")
    c = rwkv_zoo.build("v6", size="1B6", device="meta")
    assert a.config == b.config == c.config
    assert a.size_name == "1.5B"


@pytest.mark.parametrize(
    ("name", "L", "C", "V"),
    [
        ("v4-169M", 12, 768, 50277),
        ("v4-1B5", 24, 2048, 50277),
        ("v4-0.1B", 12, 768, 65536),
        ("v5-1b5", 24, 2048, 65536),
        ("v6-1.6B", 24, 2048, 65536),
        ("v7-0.1B", 12, 768, 65536),
        ("v7-168M", 12, 768, 50304),
        ("v7-3B", 32, 2560, 65536),
    ],
)
def test_release_labels_are_aliases(name, L, C, V):
    cfg = rwkv_zoo.build(name, device="meta").config
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (L, C, V)


def test_shared_size_labels_mean_the_same_shape_in_every_version():
    for size in ("0.1B", "0.4B", "1.5B", "3B", "7B", "14B"):
        shapes = set()
        for v in ("v4", "v5", "v6", "v7"):
            if f"{v}-{size}" in rwkv_zoo.list_models():
                m = rwkv_zoo.build(v, size=size, device="meta")
                shapes.add((m.config.n_layer, m.config.n_embd))
        assert len(shapes) == 1, (size, shapes)
    assert rwkv_zoo.list_models("v?-1.5B") == ["v4-1.5B", "v5-1.5B", "v6-1.5B", "v7-1.5B"]
    assert rwkv_zoo.build("v7-2.9B", device="meta").size_name == "3B"


def test_size_and_dimensions_are_exclusive():
    with pytest.raises(ValueError, match="exclusive.*n_layer=4"):
        rwkv_zoo.build("v6", size="1.5B", n_layer=4, device="meta")
    with pytest.raises(ValueError, match="already names a size"):
        rwkv_zoo.build("v6-1.6B", size="3B", device="meta")


def test_explicit_dimensions():
    m = rwkv_zoo.build("v7", n_layer=3, n_embd=256, vocab_size=1000, head_size=64, dim_w_lora=32,
                       device="meta")
    assert (m.config.n_layer, m.config.n_head, m.config.dim_w_lora, m.config.dim_ffn) == (3, 4, 32, 1024)
    assert rwkv_zoo.build("v5", n_layer=1, n_embd=128, device="meta").config.vocab_size == 65536
    with pytest.raises(ValueError, match="size= .*or at least n_layer= and n_embd="):
        rwkv_zoo.build("v5", n_layer=2)
    with pytest.raises(ValueError, match="not a multiple of head_size"):
        rwkv_zoo.build("v5", n_layer=1, n_embd=100, device="meta")


def test_unknown_names_list_what_exists():
    with pytest.raises(ValueError, match="unknown version 'v9'; versions: attn, hybrid, v4, v5, v6, v7"):
        rwkv_zoo.build("v9")
    with pytest.raises(ValueError, match=r"unknown size '2B' for v6; sizes: 0.1B, 0.4B, 1.5B"):
        rwkv_zoo.build("v6", size="2B")
    with pytest.raises(ValueError, match=r"unknown option\(s\) dim_mix_lora for v7; its options are: dim_w_lora"):
        rwkv_zoo.build("v7-tiny", dim_mix_lora=3)


def test_list_models_and_versions():
    names = rwkv_zoo.list_models()
    assert "v6-1.5B" in names and "v7-tiny" in names and "v4-pile-169M" in names
    assert rwkv_zoo.list_models("v7-pile*") == ["v7-pile-168M", "v7-pile-421M", "v7-pile-1.47B"]
    assert "v5-tiny" not in rwkv_zoo.list_models(released_only=True)
    # attn: plugins/attention.py; hybrid: plugins/hybrids.py
    assert rwkv_zoo.list_versions() == ["attn", "hybrid", "v4", "v5", "v6", "v7", "v7a", "v8"]


def test_dtype_device_and_backend_arguments():
    m = rwkv_zoo.build("v7-tiny", dtype=torch.bfloat16, backend="reference")
    assert m.dtype == torch.bfloat16 and m.backend == "reference"
    logits, state = m(torch.tensor([[1, 2, 3]]))
    assert logits.dtype == torch.bfloat16 and state.layers[0].wkv.dtype == torch.float32
    assert "reference" in rwkv_zoo.explain(m, (1, 3)).backends


def test_every_release_names_where_its_shape_comes_from():
    """A released preset's dimensions come from an independent source (a model card, the official demo, a
    conversion script), or it is marked unverified, which `rwkv-zoo models` shows."""
    from rwkv_zoo.registry import get_version

    unverified = []
    for v in rwkv_zoo.list_versions():
        for p in get_version(v).sizes:
            if p.released and not p.verified:
                assert "[unverified]" in p.note, (v, p.name)
                unverified.append(f"{v}-{p.name}")
    assert unverified == ["v7-pile-1.47B", "v8-pile-0.1B"]
