"""LoRA through peft (rwkv_zoo.lora, rwkv-zoo merge): targets by official names, adapters in peft's format,
merged = unmerged logits, the fused CPU step never reading a wrapped projection as a plain one, bf16."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import rwkv_zoo
from tests._deps import require

peft = require("peft")
from rwkv_zoo import lora  # noqa: E402  (after the dependency check)

V = 256


def tiny(version: str, seed: int = 0, dtype=torch.float32):
    model = rwkv_zoo.build(f"{version}-tiny", init=False)  # randomize_ sets every parameter
    return rwkv_zoo.randomize_(model, seed).to(dtype)


def tokens(seed: int = 1, B: int = 2, T: int = 12):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(wrapped, x, steps: int = 3, lr: float = 3e-2) -> list[float]:
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits, _ = wrapped(x)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("version", "expected"), [
    ("v4", ["att.receptance", "att.key", "att.value", "att.output", "ffn.receptance", "ffn.key", "ffn.value"]),
    ("v6", ["att.receptance", "att.key", "att.value", "att.output", "att.gate",
            "ffn.receptance", "ffn.key", "ffn.value"]),
    ("v7", ["att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"]),
])
def test_targets_are_the_official_projections_and_the_wrapped_model_starts_equal(version, expected):
    model = tiny(version)
    assert lora.available_targets(model) == expected
    x = tokens()
    with torch.no_grad():
        before, _ = model(x)
    wrapped = lora.apply(model, r=4)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped_names = {n.split(".base_model.model.", 1)[-1].rsplit(".lora_", 1)[0] for n in trainable}
    assert {n.split("blocks.", 1)[1].split(".", 1)[1] for n in wrapped_names} == set(expected)
    with torch.no_grad():
        after, _ = wrapped(x)
    # B starts at zero (before ran the fused CPU step, after the modules: equal to rounding)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_unknown_target_is_named():
    with pytest.raises(rwkv_zoo.RWKVZooError, match=r"att\.gate .*it has att\.receptance"):
        lora.apply(tiny("v7"), targets=["att.key", "att.gate"])


@pytest.mark.parametrize("version", ["v6", "v7"])
def test_train_save_load_merge(tmp_path, version):
    x = tokens()
    wrapped = lora.apply(tiny(version), r=4, train_norms=True, train_mixes=True)
    losses = train_steps(wrapped, x)
    assert losses[-1] < losses[0]
    base_keys = set(tiny(version).state_dict())
    B = [p for n, p in wrapped.named_parameters() if ".lora_B." in n]
    assert all(b.abs().max() > 0 for b in B)  # the adapter is not the zero adapter any more

    # The unmerged model without gradients (where the fused CPU step would run on a plain model) must
    # compute what it computes with them: the fused step never reads a wrapped projection as plain.
    with torch.no_grad():
        unmerged, _ = wrapped(x)
    with torch.enable_grad():
        with_grad, _ = wrapped(x)
    torch.testing.assert_close(unmerged, with_grad.detach(), rtol=0, atol=1e-5)

    lora.save_adapter(wrapped, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", lora.PARAMS_FILE} <= files
    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in (tmp_path / "adapter").iterdir())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert set(cfg["target_modules"]) == set(lora.available_targets(tiny(version)))

    # Back onto a fresh copy of the base model: the same logits.
    loaded = lora.load_adapter(tiny(version), tmp_path / "adapter")
    with torch.no_grad():
        again, _ = loaded(x)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=0)

    merged = lora.merge(loaded)
    assert type(merged) is rwkv_zoo.RWKV and set(merged.state_dict()) == base_keys  # official keys again
    with torch.no_grad():
        out, _ = merged(x)
    assert (out - unmerged).abs().max().item() <= 1e-5
    assert (out - tiny(version)(x)[0]).abs().max().item() > 1e-2  # the merge changed the model


def test_peft_alone_restores_adapter_and_norms(tmp_path):
    """Without rwkv_zoo.lora, peft's own loader gets the adapter and the norms (not the mix vectors)."""
    x = tokens()
    wrapped = lora.apply(tiny("v6"), r=4, train_norms=True)
    train_steps(wrapped, x, steps=2)
    lora.save_adapter(wrapped, tmp_path / "a")
    assert not (tmp_path / "a" / lora.PARAMS_FILE).exists()
    plain = peft.PeftModel.from_pretrained(tiny("v6"), str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], wrapped(x)[0], rtol=0, atol=0)


def test_unmerged_generates_like_merged():
    x = tokens(T=8)
    wrapped = lora.apply(tiny("v6"), r=4)
    train_steps(wrapped, x, steps=2)
    prompt = x[0, :5].tolist()
    unmerged = rwkv_zoo.generate(wrapped, prompt, max_new_tokens=8, temperature=0)
    merged = rwkv_zoo.generate(lora.merge(wrapped), prompt, max_new_tokens=8, temperature=0)
    assert unmerged.tokens == merged.tokens


def test_bf16_training_changes_the_adapter_and_stays_finite():
    x = tokens()
    wrapped = lora.apply(tiny("v7", dtype=torch.bfloat16), r=4)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    losses = train_steps(wrapped, x, steps=4, lr=3e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    changed = [n for n, p in wrapped.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    logits, _ = lora.merge(wrapped)(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_cli_merge_writes_an_official_checkpoint(tmp_path, capsys):
    from rwkv_zoo.cli import main

    base = tmp_path / "base.pth"
    rwkv_zoo.save(tiny("v6"), base)
    x = tokens()
    wrapped = lora.apply(rwkv_zoo.load(base), r=4, train_mixes=True)
    train_steps(wrapped, x, steps=2)
    lora.save_adapter(wrapped, tmp_path / "adapter")
    with torch.no_grad():
        expected, _ = wrapped(x)

    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "out.pth")]) == 0
    sd = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(sd) == set(tiny("v6").state_dict())
    merged = rwkv_zoo.load(tmp_path / "out.pth")
    with torch.no_grad():
        got, _ = merged(x)
    assert (got - expected).abs().max().item() <= 1e-5

    assert main(["merge", str(base), str(tmp_path), str(tmp_path / "o.pth")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "o.bin")]) == 2
    assert "must end in .pth" in capsys.readouterr().err


def test_peft_used_directly_after_the_fused_step_ran():
    """peft swaps a model's layers in place; a fused step chosen or built before must not be reused."""
    model = tiny("v6").eval()
    x = tokens(B=1, T=6)
    with torch.no_grad():
        before, _ = model(x)  # may choose and build the cpu backend's fused step
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["att.key"], init_lora_weights=False))
    with torch.no_grad():
        no_grad, _ = wrapped(x)
    with torch.enable_grad():
        with_grad, _ = wrapped(x)
    assert (no_grad - before).abs().max().item() > 1e-2  # the (random) adapter counts
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=0, atol=1e-5)
