"""The lm-evaluation-harness adapter (rwkv_zoo.harness), driven through lm_eval's own API: Instances built
here, lm_eval's model registry and ``simple_evaluate`` on a task read from a local jsonl file."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from _deps import require

require("lm_eval")  # in the test extra; before the imports below, which need it

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from rwkv_zoo import cli  # noqa: E402
from rwkv_zoo.generation import generate, score  # noqa: E402
from rwkv_zoo.harness import EOD, RWKVZooLM  # noqa: E402


def _ll(*pairs) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def _expected(model, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probs from one whole-sequence score(), and argmax of one forward."""
    res = score(model, ctx_ids + cont_ids, chunk_len=7)
    ll = float(res.logprobs[len(ctx_ids) - 1 :].double().sum())
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx_ids + cont_ids]))
    pred = logits[0, len(ctx_ids) - 1 : -1].argmax(-1).tolist()
    return ll, pred == cont_ids


PAIRS = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the", " sofa, twice"),  # same context: one prefill, another row of the batch
    ("Hello ", "world"),  # trailing space moves into the continuation
    ("", "abc"),  # empty context: predicted from the prefix token alone
    ("x", "y"),
    ("A longer context that spans several prefill chunks of four tokens", " and a long continuation too"),
]


def test_registered_under_rwkv_zoo():
    assert get_model("rwkv_zoo") is RWKVZooLM


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_equals_score_sums_and_argmax(tiny, byte_tok, batch_size):
    lm = RWKVZooLM(tiny, tokenizer="bytes", batch_size=batch_size, chunk_len=4)
    got = lm.loglikelihood(_ll(*PAIRS), disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got, strict=True):
        n = len(ctx) - len(ctx.rstrip())
        ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
        want_ll, want_greedy = _expected(tiny, [EOD, *byte_tok.encode(ctx)], byte_tok.encode(cont))
        assert math.isclose(ll, want_ll, rel_tol=0, abs_tol=1e-5), (ctx, cont, ll, want_ll)
        assert greedy is want_greedy


def test_is_greedy_true_exactly_for_the_argmax_continuation(tiny):
    lm = RWKVZooLM(tiny, tokenizer="bytes", batch_size=2, chunk_len=3)
    ctx = [EOD, *b"Once upon a time"]
    greedy = generate(tiny, ctx, temperature=0, max_new_tokens=4).tokens
    wrong = [*greedy[:-1], (greedy[-1] + 1) % tiny.config.vocab_size]
    (ll_g, is_g), (ll_w, is_w), (_, is_1) = lm.loglikelihood_tokens([(ctx, greedy), (ctx, wrong), (ctx, greedy[:1])])
    assert is_g and not is_w and is_1
    assert ll_g > ll_w  # the argmax token is the most probable one at the changed position


def test_prefix_choices(tiny, byte_tok):
    args = ("The cat sat on the", " mat")
    cont = byte_tok.encode(" mat")
    for prefix, ctx in (("eod", [EOD]), ("newline", [10]), ("none", [])):
        lm = RWKVZooLM(tiny, tokenizer="bytes", prefix=prefix)
        (ll, _), = lm.loglikelihood(_ll(args), disable_tqdm=True)
        assert math.isclose(ll, _expected(tiny, ctx + byte_tok.encode(args[0]), cont)[0], abs_tol=1e-5)
    # with nothing before it, an empty context still needs one token to predict from: token 0
    (ll, _), = RWKVZooLM(tiny, tokenizer="bytes", prefix="none").loglikelihood(_ll(("", "ab")), disable_tqdm=True)
    assert math.isclose(ll, _expected(tiny, [EOD], byte_tok.encode("ab"))[0], abs_tol=1e-5)


@torch.no_grad()
def _log_prob(model, ids: list[int]) -> float:
    """log p(ids[1:] | ids[0]) from one whole-sequence forward (the adapter uses score(), chunked)."""
    logits, _ = model(torch.tensor([ids]))
    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    return float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())


def test_loglikelihood_rolling_is_the_whole_text_log_probability(tiny, byte_tok):
    texts = ["a short one", "", "x" * 3, "a longer text, scored in chunks of five tokens with the state carried " * 3]
    lm = RWKVZooLM(tiny, tokenizer="bytes", batch_size=2, chunk_len=5)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                   disable_tqdm=True)
    for text, ll in zip(texts, got, strict=True):
        want = _log_prob(tiny, [EOD, *byte_tok.encode(text)]) if text else 0.0
        assert math.isclose(ll, want, rel_tol=1e-5, abs_tol=1e-4), (text, ll, want)
    # the newline prefix is context only: the text's tokens are scored after it
    nl = RWKVZooLM(tiny, tokenizer="bytes", prefix="newline")
    (ll,) = nl.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("a short one",), 0)], disable_tqdm=True)
    want = _log_prob(tiny, [10, *byte_tok.encode("a short one")])
    assert math.isclose(ll, want, rel_tol=1e-5, abs_tol=1e-4)


def test_generate_until_respects_until_and_max_gen_toks(tiny, byte_tok):
    lm = RWKVZooLM(tiny, tokenizer="bytes", batch_size=2)
    prompt = "Once upon a time"
    ids = [EOD, *byte_tok.encode(prompt)]
    free = generate(tiny, ids, tokenizer=byte_tok, temperature=0, max_new_tokens=24, stop=[EOD])
    assert len(free.text) >= 6, free.text  # long enough to cut inside
    until = free.text[3:5]
    reqs = [
        Instance("generate_until", {}, (prompt, {"until": [until], "max_gen_toks": 24}), 0),
        Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": 24, "do_sample": False}), 1),
        Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 5}), 2),
        Instance("generate_until", {}, ("Another prompt", {"until": ["\n\n"], "max_gen_toks": 3}), 3),
    ]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert out[0] == out[1] == free.text[: free.text.find(until)] and until not in out[0]
    short = generate(tiny, ids, tokenizer=byte_tok, temperature=0, max_new_tokens=5, stop=[EOD])
    assert out[2] == short.text and len(short.tokens) <= 5
    other = generate(tiny, [EOD, *byte_tok.encode("Another prompt")], tokenizer=byte_tok, temperature=0,
                     max_new_tokens=3, stop=["\n\n", EOD])
    assert out[3] == other.text and len(other.tokens) <= 3


def test_model_args_from_an_lm_eval_arg_string():
    with pytest.warns(UserWarning, match="random weights"):
        lm = get_model("rwkv_zoo").create_from_arg_string(
            "pretrained=v7-tiny,dtype=fp32,chunk_len=16,prefix=none,tokenizer=bytes",
            {"batch_size": 3, "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size == 3 and lm.chunk_len == 16 and lm.prefix == [] and lm.model.config.vocab_size == 256
    with pytest.raises(ValueError, match="prefix"):
        RWKVZooLM("v7-tiny", prefix="bos")
    with pytest.raises(TypeError, match="unknown model args"):
        RWKVZooLM("v7-tiny", nonsense=1)
    with pytest.raises(ValueError, match="neither a checkpoint file nor a model name"):
        RWKVZooLM("no-such-model")


TASK = {
    "output_type": "loglikelihood",
    "test_split": "test",
    "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",  # lambada_openai's split: the last word is scored
    "doc_to_target": "{{' '+text.split(' ')[-1]}}",
    "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
DOCS = ["the cat sat on the mat", "a dog ran in the park", "she said hello to him"]


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    """A LAMBADA-shaped task over a local jsonl (datasets' json loader: no network)."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # simple_evaluate records the environment by running `pip list` in a subprocess: seconds, for nothing here
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
    return {"task": "rwkv_zoo_tiny_lambada", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf")}, **TASK}


def test_simple_evaluate_through_the_registry(local_task, byte_tok):
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model="rwkv_zoo", model_args="pretrained=v7-tiny,tokenizer=bytes,batch_size=2",
                                  tasks=[local_task], task_manager=TaskManager(include_defaults=False),
                                  bootstrap_iters=0, log_samples=True)
    metrics = res["results"]["rwkv_zoo_tiny_lambada"]
    samples = res["samples"]["rwkv_zoo_tiny_lambada"]
    assert len(samples) == len(DOCS)
    # the same numbers as the adapter gives for the task's own (context, continuation) pairs
    lm = RWKVZooLM("v7-tiny", tokenizer="bytes")
    lls = lm.loglikelihood(_ll(*[tuple(s["arguments"][0]) for s in samples]), disable_tqdm=True)
    for s, (ll, greedy) in zip(samples, lls, strict=True):
        assert s["arguments"][0][1] == " " + s["doc"]["text"].split(" ")[-1]
        assert math.isclose(s["resps"][0][0][0], ll, abs_tol=1e-5) and s["resps"][0][0][1] == greedy
    assert metrics["acc,none"] == sum(g for _, g in lls) / len(DOCS)
    assert math.isclose(metrics["perplexity,none"], math.exp(-sum(ll for ll, _ in lls) / len(DOCS)), rel_tol=1e-6)


def test_cli_lm_eval_with_a_task_yaml(local_task, tmp_path, monkeypatch, capsys):
    import functools

    import lm_eval.tasks
    import yaml

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(yaml.safe_dump(local_task))
    # only the task folder given: indexing lm_eval's thousands of built-in task files takes many seconds
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    out_json = tmp_path / "results.json"
    rc = cli.main(["lm-eval", "v7-tiny", "--tasks", "rwkv_zoo_tiny_lambada", "--include-path", str(tmp_path / "tasks"),
                   "--limit", "2", "--batch-size", "2", "--output", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rwkv_zoo_tiny_lambada" in out and "acc" in out
    assert json.loads(out_json.read_text())["results"]["rwkv_zoo_tiny_lambada"]["sample_len"] == 2


def test_cli_lm_eval_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert cli.main(["lm-eval", "v7-tiny", "--tasks", "lambada_openai"]) == 2
    assert "pip install lm_eval" in capsys.readouterr().err


def test_import_rwkv_zoo_does_not_import_lm_eval():
    code = "import sys, rwkv_zoo, rwkv_zoo.cli; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.integration
def test_the_harness_own_command_line_runs_a_local_task(local_task, tmp_path):
    """lm_eval's CLI through ``python -m rwkv_zoo.harness`` (the model registered), with lm_eval's own
    flags and its default device (CUDA, which this machine lacks: the adapter falls back to the CPU)."""
    import os

    import yaml

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(yaml.safe_dump(local_task))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rwkv_zoo.harness", "run", "--model", "rwkv_zoo",
           "--model_args", "pretrained=v7-tiny,tokenizer=bytes", "--tasks", "rwkv_zoo_tiny_lambada",
           "--include_path", str(tmp_path / "tasks"), "--batch_size", "2", "--device", "cuda:0",
           "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rwkv_zoo_tiny_lambada" in proc.stdout and "acc" in proc.stdout, proc.stdout[-2000:]
    assert "CUDA is not available here; running on the CPU" in proc.stderr
    results = [json.loads(p.read_text()) for p in out.rglob("results*.json")]
    assert results and results[0]["results"]["rwkv_zoo_tiny_lambada"]["sample_len"] == len(DOCS)
    # the numbers equal the adapter's in-process ones (the same model, seed and tokenizer)
    with pytest.warns(UserWarning):
        lm = RWKVZooLM("v7-tiny", tokenizer="bytes")
    pairs = [(" ".join(d.split(" ")[:-1]), " " + d.split(" ")[-1]) for d in DOCS]
    acc = sum(g for _, g in lm.loglikelihood(_ll(*pairs), disable_tqdm=True)) / len(DOCS)
    assert results[0]["results"]["rwkv_zoo_tiny_lambada"]["acc,none"] == pytest.approx(acc)


def test_loglikelihoods_do_not_depend_on_the_batch_size():
    """Continuations of many lengths (1 to 25 tokens, so both kernel modes and padding) scored at batch
    sizes 1, 3, 4 and 16 give identical log-likelihoods on the CPU (the fused step computes each row on
    its own)."""
    import random

    rng = random.Random(0)
    pairs = [([rng.randrange(256) for _ in range(rng.randint(1, 30))],
              [rng.randrange(256) for _ in range(rng.randint(1, 25))]) for _ in range(40)]
    results = {}
    for bs in (1, 3, 4, 16):
        with pytest.warns(UserWarning):
            lm = RWKVZooLM("v7-small", tokenizer="bytes", batch_size=bs)
        results[bs] = lm.loglikelihood_tokens(pairs, disable_tqdm=True)
    assert all(results[bs] == results[1] for bs in (3, 4, 16))
