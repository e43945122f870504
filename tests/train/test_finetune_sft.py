"""Chat SFT data (``--sft``): the World chat format, loss on exactly the assistant positions, mixed-length
batches whose padding reaches no real token, long samples through the infctx chunks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import rwkv_zoo
from rwkv_zoo.cli import main as cli_main
from rwkv_zoo.data import IGNORE
from rwkv_zoo.data.sft import ChatData, chat_prompt, encode, sft_file
from rwkv_zoo.tokenizers import ByteTokenizer, get_tokenizer
from rwkv_zoo.train.infctx import chunked_backward
from rwkv_zoo.train.tuning import get_mode

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4\n\n\nDone."}]},
    {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]},
    {"text": "a plain text sample, every token trains"},
]
RENDERED = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+2?\n\nAssistant: 4\nDone.\n\n"
REPLIES = [" Hello!\n\n", " 4\nDone.\n\n"]


def _write(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_world_chat_format_and_reply_mask():
    world = get_tokenizer("world")
    ids, mask = encode(CONVERSATIONS[0], world)
    assert world.decode(ids) == RENDERED
    assert world.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "".join(REPLIES)
    assert sum(mask) == sum(len(world.encode(r)) for r in REPLIES)
    # rwkv-zoo chat renders a user turn with the same function
    assert RENDERED.endswith("User: 2+2?\n\n" + chat_prompt("2+2?")[len("User: 2+2?\n\n"):] + " 4\nDone.\n\n")
    assert chat_prompt("Hi") == "User: Hi\n\nAssistant:"


def _assistant_positions(text: str) -> set[int]:
    """Byte offsets of the reply characters, found in the rendered text (not from the mask)."""
    out, start = set(), 0
    for reply in REPLIES:
        at = text.index("Assistant:" + reply, start) + len("Assistant:")
        out |= set(range(at, at + len(reply)))
        start = at
    return out


def test_masked_loss_counts_exactly_the_assistant_positions():
    data = ChatData([encode(s, ByteTokenizer()) for s in CONVERSATIONS], 256, "t", eval_fraction=0.0)
    inputs, targets = data.rows(data.samples, 512)
    # target t predicts token t + 1: the targets that train are the reply bytes, each once
    want = {p - 1 for p in _assistant_positions(RENDERED)}
    got = set((targets[0] != IGNORE).nonzero().flatten().tolist())
    assert got == want
    assert int((targets[1] != IGNORE).sum()) == len(" Blue\n\n")
    assert int((targets[2] != IGNORE).sum()) == len(CONVERSATIONS[2]["text"]) - 1
    # the loss the trainer computes is the mean over those positions and no others
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7-tiny"), seed=0).eval()
    with torch.no_grad():
        logits, _ = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    logp = logits[0].log_softmax(-1)
    seq = list(RENDERED.encode())  # byte tokens: target t is byte t + 1 of the rendered text
    by_hand = -torch.stack([logp[t, seq[t + 1]] for t in sorted(want)])
    rows = [by_hand]
    for r in (1, 2):
        pos = (targets[r] != IGNORE).nonzero().flatten()
        rows.append(-logits[r].log_softmax(-1)[pos, targets[r, pos]])
    torch.testing.assert_close(loss, torch.cat(rows).mean())


def test_padding_never_reaches_a_real_token_and_chunks_give_the_same_loss():
    """Each sample's logits in a right-padded batch equal its logits alone, from a tuned (non-zero) start
    state; the infctx chunked loss equals the whole-sequence one."""
    data = ChatData([encode(s, ByteTokenizer()) for s in CONVERSATIONS], 256, "t", eval_fraction=0.0)
    inputs, targets = data.rows(data.samples, 512)
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7-tiny"), seed=0)
    mode = get_mode("state")
    mode.prepare(model, None)
    with torch.no_grad():
        for block in model.blocks:
            block.att.time_state.normal_(0, 0.5)
    start = mode.initial_state(model, model, 3)
    model.eval()
    with torch.no_grad():
        batch, _ = model(inputs, start)
        for r, (ids, _) in enumerate(data.samples):
            alone, _ = model(torch.tensor([ids[:-1]]), start.select(r))
            torch.testing.assert_close(batch[r, : len(ids) - 1], alone[0], rtol=1e-5, atol=1e-5)

    def loss_fn(logits, tgt):
        return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="sum")

    def fwd(x, state):
        return model(x, mode.initial_state(model, model, x.shape[0]) if state is None else state)

    whole, _ = chunked_backward(model, inputs, targets, None, loss_fn, forward=fwd)
    g_whole = [b.att.time_state.grad.clone() for b in model.blocks]
    model.zero_grad()
    chunked, _ = chunked_backward(model, inputs, targets, 7, loss_fn, forward=fwd)
    assert abs(whole - chunked) <= 1e-4 * abs(whole)
    for b, g in zip(model.blocks, g_whole, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(b.att.time_state.grad, g, rtol=1e-4, atol=1e-6)


def test_sft_state_tuning_from_the_command_line(tmp_path, capsys):
    """`rwkv-zoo train --init-from M --tune state --sft data.jsonl` with the World tokenizer."""
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7", n_layer=1, n_embd=16, head_size=16, vocab_size=65536), seed=0)
    rwkv_zoo.save(model, tmp_path / "base.pth")
    data = _write(tmp_path / "chat.jsonl", CONVERSATIONS)
    out = tmp_path / "run"
    assert cli_main(["train", "--init-from", str(tmp_path / "base.pth"), "--tune", "state", "--sft", str(data),
                     "--steps", "2", "--batch-size", "2", "--chunk-len", "16", "--out-dir", str(out), "--quiet",
                     "--threads", "1", "--set", "eval_batches=1"]) == 0
    assert "done:" in capsys.readouterr().out
    assert (out / "time_state.pth").is_file() and (out / "state.safetensors").is_file()
    tuned = rwkv_zoo.load(out)
    assert tuned.initial_state is not None
    assert json.loads((out / "result.json").read_text())["config"]["tune"] == "state"


def test_bad_sft_lines_name_the_line(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [CONVERSATIONS[1], {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the conversation has no assistant message"):
        sft_file(bad, "bytes")
    assert cli_main(["train", "--sft", str(bad), "--steps", "1"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
