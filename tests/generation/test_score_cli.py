"""score() (log-likelihoods, perplexity, bits per byte; batched and chunked) and the generate / chat /
eval subcommands, chat driven through stdin in-process."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_zoo import cli
from rwkv_zoo.generation import generate, score
from rwkv_zoo.state import RWKVState


@torch.no_grad()
def _manual_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits, _ = model(torch.tensor([ids]))
    return F.log_softmax(logits[0, :-1].float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_score_matches_a_full_forward_chunked_and_batched(tiny, byte_tok):
    seqs = [list(range(10, 47)), [5, 6], [200, 1, 2, 3, 4, 5, 6, 7, 8]]
    batched = score(tiny, seqs, chunk_len=5, batch_size=2)
    for ids, res in zip(seqs, batched, strict=True):
        want = _manual_logprobs(tiny, ids)
        torch.testing.assert_close(res.logprobs, want, rtol=1e-4, atol=1e-4)
        assert res.n_tokens == len(ids) - 1 and res.bits_per_byte is None
        assert math.isclose(res.perplexity, math.exp(-want.double().mean().item()), rel_tol=1e-4)
    text = score(tiny, "héllo wörld", tokenizer=byte_tok, bos=10)
    assert text.n_tokens == len("héllo wörld".encode()) and text.n_bytes == text.n_tokens
    assert math.isclose(text.bits_per_byte, text.nll / math.log(2) / text.n_bytes)


def test_score_bad_input(tiny, world):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score(tiny, [5])
    with pytest.raises(ValueError, match="out of range"):
        score(tiny, [5, 300])
    with pytest.raises(ValueError, match="vocabulary has only 256"):
        score(tiny, "hi", tokenizer=world)
    with pytest.raises(ValueError, match="nothing to score"):
        score(tiny, [])


def _run(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_command(monkeypatch, capsys, tiny, byte_tok, tmp_path):
    rc, out, err = _run(monkeypatch, capsys, ["generate", "v7-tiny", "--prompt", "hi", "--max-new-tokens", "6",
                                              "--temperature", "0", "--stream", "-v",
                                              "--save-state", str(tmp_path / "s.safetensors")])
    assert rc == 0 and "random weights" in err and "2 prompt + 6 new tokens" in err
    want = generate(tiny, "hi", tokenizer=byte_tok, max_new_tokens=6, temperature=0)  # v7-tiny, seed 0 = `tiny`
    assert out == want.text + "\n"
    assert (tmp_path / "s.safetensors").exists()
    rc, _, err = _run(monkeypatch, capsys, ["generate", "v7-tiny", "--prompt", "hi", "--top-p", "2"])
    assert rc == 2 and "top_p must be in (0, 1]" in err
    rc, _, err = _run(monkeypatch, capsys, ["generate", "no-such-model", "--prompt", "hi"])
    assert rc == 2 and "neither a checkpoint file nor a model name" in err
    rc, _, err = _run(monkeypatch, capsys, ["generate", "v7-tiny", "--prompt", "hi", "--tokenizer", "world"])
    assert rc == 2 and "65536 ids" in err


def test_eval_command(monkeypatch, capsys, tiny, byte_tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world, hello rwkv", encoding="utf-8")
    rc, out, _ = _run(monkeypatch, capsys, ["eval", "v7-tiny", "--text", str(path), "--chunk-len", "7"])
    assert rc == 0
    want = score(tiny, "hello world, hello rwkv", tokenizer=byte_tok)
    lines = {line[:16].strip(): line[16:].strip() for line in out.splitlines()}
    assert math.isclose(float(lines["perplexity"]), want.perplexity, rel_tol=1e-4)
    assert math.isclose(float(lines["bits per byte"]), want.bits_per_byte, rel_tol=1e-4)


def test_chat_carries_state_between_turns(monkeypatch, capsys, tmp_path):
    saved = tmp_path / "turn1.safetensors"
    flags = ["chat", "v7-tiny", "--temperature", "0", "--max-new-tokens", "5"]
    script = f"hello\n/save-state {saved}\nagain\n/reset\nagain\n/load-state {saved}\nagain\n/bogus\n/quit\nignored\n"
    rc, out, _ = _run(monkeypatch, capsys, flags, script)
    assert rc == 0
    replies = [seg.split("\n[")[0] for seg in out.split("Assistant:")[1:]]  # a reply may hold a newline
    assert len(replies) == 4  # hello, again (after hello), again (fresh), again (after the loaded state)
    assert replies[1] == replies[3]  # /load-state brought back the state after turn 1
    assert "[conversation reset]" in out and "[unknown command /bogus" in out
    # a fresh conversation whose first line is "again" says what the reset one said
    rc, out2, _ = _run(monkeypatch, capsys, flags, "again\n")
    assert out2.split("Assistant:")[1].removesuffix("\n") == replies[2]
    state = RWKVState.load(saved, __import__("rwkv_zoo").build("v7", size="tiny"))
    assert any(float(ls.wkv.abs().sum()) > 0 for ls in state.layers)
