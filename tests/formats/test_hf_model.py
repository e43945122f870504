"""rwkv_zoo models inside transformers (rwkv_zoo.hf): generate() = rwkv_zoo.generate, save/load round trip
through AutoModelForCausalLM, a Trainer step, peft on the wrapper. (HF's own RWKV-4 format: test_hf_folders.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import rwkv_zoo
from tests._deps import require

transformers = require("transformers")
import rwkv_zoo.hf as rhf  # noqa: E402  (after the dependency check)

V = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: a second OpenMP thread (the fused CPU step, QR) only waits on a busy CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(version: str = "v6", seed: int = 0) -> rwkv_zoo.RWKV:
    # init=False: randomize_ sets every parameter anyway (the official init's QR costs more than the test)
    return rwkv_zoo.randomize_(rwkv_zoo.build(f"{version}-tiny", init=False), seed).eval()


def ids(B: int = 1, T: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", ["v6", "v7"])
def test_greedy_generate_equals_rwkv_zoo_generate(version):
    model = tiny(version)
    hf = rhf.RWKVZooForCausalLM.from_rwkv(model).eval()
    prompts = ids(B=2)
    out = hf.generate(prompts, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7 + 12)
    for row in range(2):
        ref = rwkv_zoo.generate(model, prompts[row].tolist(), max_new_tokens=12, temperature=0)
        assert out[row, 7:].tolist() == ref.tokens


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    from safetensors import safe_open

    hf = rhf.RWKVZooForCausalLM.from_rwkv(tiny("v7"))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "rwkv_zoo" and cfg["rwkv_version"] == "v7"
    assert cfg["rwkv_options"]["head_size"] == 16
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"model.{k}" for k in tiny("v7").state_dict()}  # official names under model.

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is rhf.RWKVZooForCausalLM and loaded.to_rwkv().version == "v7"
    x = ids(B=2, T=9)
    with torch.no_grad():
        a, b = hf(x).logits, loaded(x).logits
    assert torch.equal(a, b)
    # The cache continues the sequence: split-and-carry equals one pass.
    with torch.no_grad():
        first = loaded(x[:, :4], use_cache=True)
        rest = loaded(x[:, 4:], cache=first.cache, use_cache=True)
    assert rest.cache.get_seq_length() == 9
    torch.testing.assert_close(rest.logits, b[:, 4:], rtol=0, atol=1e-5)


def test_loss_matches_shifted_cross_entropy_and_left_padding_is_refused():
    hf = rhf.RWKVZooForCausalLM.from_rwkv(tiny("v6"))
    x = ids(B=2, T=8)
    labels = x.clone()
    labels[:, -2:] = -100
    out = hf(x, labels=labels, attention_mask=torch.tensor([[1] * 8, [1] * 6 + [0, 0]]))  # right padding: fine
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="left padding"):
        hf(x, attention_mask=torch.tensor([[0, 0] + [1] * 6, [1] * 8]))


def test_trainer_step_changes_weights(tmp_path):
    require("accelerate")
    torch.manual_seed(0)
    hf = rhf.RWKVZooForCausalLM.from_rwkv(tiny("v6"))
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    data = [{"input_ids": row, "labels": row} for row in ids(B=4, T=16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=hf, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in hf.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.blocks.0.att.key.weight" in changed and "model.head.weight" in changed


def test_peft_on_the_transformers_model():
    peft = require("peft")
    hf = rhf.RWKVZooForCausalLM.from_rwkv(tiny("v6"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["att.key", "att.value", "ffn.value"],
                          task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(hf, cfg)
    x = ids(B=2, T=10)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(2):
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert any(".att.key.lora_B" in n for n in trainable)
    wrapped.eval()
    prompt = x[:1, :5]
    unmerged = wrapped.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    merged_model = wrapped.merge_and_unload()
    merged = rwkv_zoo.generate(merged_model.to_rwkv(), prompt[0].tolist(), max_new_tokens=6, temperature=0)
    assert unmerged[0, 5:].tolist() == merged.tokens
