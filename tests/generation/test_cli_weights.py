"""``--weights fp32|bf16|int8`` of ``generate``, ``chat``, ``eval`` and its alias ``score``, end to end on a
random checkpoint written by the test and on a model name (random weights built, not loaded)."""

from __future__ import annotations

import io
import math

import pytest

import rwkv_zoo
from rwkv_zoo import cli, inference
from rwkv_zoo.generation import generate, score
from rwkv_zoo.inference import InferenceLinear

WEIGHTS = ("fp32", "bf16", "int8")
TEXT = "hello world, hello rwkv"
CHAT_PROMPT = "User: hello\n\nAssistant:"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "v7-tiny.safetensors"
    rwkv_zoo.save(rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), 3), path)
    return path


@pytest.fixture
def prepared(monkeypatch):
    """The weight formats prepare_inference was called with, and the models it returned."""
    calls: list[tuple[str, object]] = []
    original = inference.prepare_inference

    def spy(model, weights="fp32"):
        out = original(model, weights)
        calls.append((weights, out))
        return out

    monkeypatch.setattr(inference, "prepare_inference", spy)
    return calls


def _run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _check_prepared(calls, weights):
    assert [w for w, _ in calls] == [weights]
    model = calls[0][1]
    linears = [m for m in model.modules() if isinstance(m, InferenceLinear)]
    assert linears and all(m.kind == weights for m in linears)
    return model


def _reference(path, weights):
    return rwkv_zoo.load(path, weights=weights)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_generate_weights_on_a_checkpoint(monkeypatch, capsys, ckpt, prepared, byte_tok, weights):
    rc, out, err = _run(monkeypatch, capsys, ["generate", str(ckpt), "--prompt", "hi", "--temperature", "0",
                                              "--max-new-tokens", "6", "--weights", weights])
    assert rc == 0, err
    _check_prepared(prepared, weights)
    want = generate(_reference(ckpt, weights), "hi", tokenizer=byte_tok, max_new_tokens=6, temperature=0)
    assert out == want.text + "\n"


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("command", ["eval", "score"])
def test_eval_and_score_weights_on_a_checkpoint(monkeypatch, capsys, ckpt, prepared, byte_tok, tmp_path, command,
                                                weights):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc, out, err = _run(monkeypatch, capsys, [command, str(ckpt), "--text", str(text), "--weights", weights])
    assert rc == 0, err
    _check_prepared(prepared, weights)
    want = score(_reference(ckpt, weights), TEXT, tokenizer=byte_tok)
    lines = {line[:16].strip(): line[16:].strip() for line in out.splitlines()}
    assert math.isclose(float(lines["perplexity"]), want.perplexity, rel_tol=1e-4)
    assert math.isclose(float(lines["bits per byte"]), want.bits_per_byte, rel_tol=1e-4)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_chat_weights_on_a_checkpoint(monkeypatch, capsys, ckpt, prepared, byte_tok, weights):
    rc, out, err = _run(monkeypatch, capsys, ["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "5",
                                              "--weights", weights], "hello\n")
    assert rc == 0, err
    _check_prepared(prepared, weights)
    want = generate(_reference(ckpt, weights), CHAT_PROMPT, tokenizer=byte_tok, max_new_tokens=5, temperature=0,
                    stop=["\n\n"])
    assert out == "Assistant:" + want.text + "\n"


@pytest.mark.parametrize("weights", WEIGHTS)
def test_weights_on_a_model_name(monkeypatch, capsys, prepared, byte_tok, weights):
    rc, out, err = _run(monkeypatch, capsys, ["generate", "v7-tiny", "--prompt", "hi", "--temperature", "0",
                                              "--max-new-tokens", "6", "--weights", weights])
    assert rc == 0 and "random weights" in err
    _check_prepared(prepared, weights)
    model = inference.prepare_inference(rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), 0).eval(), weights)
    assert out == generate(model, "hi", tokenizer=byte_tok, max_new_tokens=6, temperature=0).text + "\n"


def test_no_weights_flag_keeps_the_loaded_weights(monkeypatch, capsys, ckpt, prepared, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    rc, _, err = _run(monkeypatch, capsys, ["score", str(ckpt), "--text", str(text)])
    assert rc == 0, err
    assert prepared == []


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "score"])
def test_bad_weights_is_an_argparse_error_naming_the_choices(capsys, ckpt, command):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, str(ckpt), "--weights", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--weights: invalid choice: 'fp16'" in err
    assert "fp32" in err and "bf16" in err and "int8" in err
