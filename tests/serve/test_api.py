"""The OpenAI-compatible server through the real ``openai`` client: concurrent requests equal offline
``generate`` token for token (greedy, seeded sampling with n > 1, chat, stop strings, chunked long
prompts), streaming equals non-streaming, a client that goes away frees its rows at once and leaves
the others exact, a full queue answers 503 with Retry-After, and every bad request gets its status."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from _deps import require

from rwkv_zoo.generation import generate
from rwkv_zoo.serve import render_chat

API_KEY = "test-key-3f9a"  # the key tests/serve/conftest.py's server accepts (test_api_key_matches checks)


FINISH = {"length": "length", "stop_token": "stop", "stop_string": "stop"}
TIMEOUT = 30


def offline(model, tok, ids, *, seed=0, max_tokens=16, stop=(), **kw):
    res = generate(model, ids, tokenizer=tok, max_new_tokens=max_tokens, seed=seed, stop=list(stop) or None, **kw)
    return res.tokens, res.text, FINISH[res.finish_reason]


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def wait_for(cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def post(url: str, body, *, key: str | None = API_KEY, raw: bytes | None = None):
    """(status, JSON body, headers) of a POST with the given body (``raw``: bytes sent as they are)."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.status, r.read().decode()


# ---------------------------------------------------------------------------------------------------


def test_concurrent_requests_equal_offline_generation(server, client, model, tok):
    engine, _ = server
    m, tok = model, tok
    long_prompt = [(i * 7919) % 251 + 1 for i in range(300)]  # 5 prefill chunks of 64 at this server
    sampling = dict(temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3)
    system, user = "You are a terse assistant.", "Name three colours.\n\n\nThen stop."
    chat_ids, _ = render_chat([("system", system), ("user", user)], tok)
    free = offline(m, tok, tok.encode("Once upon a time"), seed=5, max_tokens=20)[1]
    stop = free[6:9] if free[6:9].strip() else free[4:9]
    # Offline first: the model is shared with the engine's thread, which is idle now.
    want = {
        "greedy": [offline(m, tok, tok.encode("The quick brown fox"), temperature=0, max_tokens=20)],
        "seeded": [offline(m, tok, long_prompt, seed=7 + k, max_tokens=16, top_k=40, min_p=0.01, **sampling)
                   for k in range(2)],
        "chat": [offline(m, tok, chat_ids, seed=11, max_tokens=24, temperature=0.8, stop=["\n\n"])],
        "stop": [offline(m, tok, tok.encode("Once upon a time"), seed=5, max_tokens=20, stop=[stop])],
        "stream": [offline(m, tok, chat_ids, seed=3, max_tokens=20, temperature=1.0, stop=["\n\n"])],
    }
    assert want["stop"][0][2] == "stop" and want["stop"][0][1] == free[: free.find(stop)]
    extra = {"extra_body": {"return_token_ids": True}}
    peak_before = engine.metrics.peak_batch_rows
    cancelled_before = engine.metrics.cancelled

    def greedy():
        r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=20, temperature=0,
                                      **extra)
        return [(ids_of(c), c.text, c.finish_reason) for c in r.choices]

    def seeded():
        r = client.completions.create(model="tiny", prompt=long_prompt, max_tokens=16, n=2, seed=7, **sampling,
                                      extra_body={"return_token_ids": True, "top_k": 40, "min_p": 0.01})
        assert r.usage.prompt_tokens == 300 and r.usage.completion_tokens == sum(len(ids_of(c)) for c in r.choices)
        return [(ids_of(c), c.text, c.finish_reason) for c in r.choices]

    def chat():
        r = client.chat.completions.create(model="tiny", max_tokens=24, temperature=0.8, seed=11, **extra,
                                           messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": user}])
        return [(ids_of(c), c.message.content, c.finish_reason) for c in r.choices]

    def stop_string():
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, seed=5, stop=[stop],
                                      **extra)
        return [(ids_of(c), c.text, c.finish_reason) for c in r.choices]

    def stream():
        toks, text, finish = [], "", None
        for chunk in client.chat.completions.create(
                model="tiny", max_tokens=20, seed=3, stream=True, stream_options={"include_usage": True}, **extra,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}]):
            if not chunk.choices:
                assert chunk.usage.completion_tokens == len(toks)
                continue
            c = chunk.choices[0]
            toks += c.model_extra["token_ids"]
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        return [(toks, text, finish)]

    def abandoned():  # a long stream the client leaves after a few tokens, while the others run
        s = client.completions.create(model="tiny", prompt="Tell me everything.", max_tokens=4000, seed=1,
                                      stream=True, **extra)
        for i, _ in enumerate(s):
            if i == 3:
                break
        s.close()
        return None

    jobs = {"greedy": greedy, "seeded": seeded, "chat": chat, "stop": stop_string, "stream": stream,
            "abandoned": abandoned}
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        got = {name: f.result(timeout=60) for name, f in futures.items()}
    for name, expected in want.items():
        assert got[name] == [tuple(e) for e in expected], name
    assert engine.metrics.peak_batch_rows >= 2 or peak_before >= 2  # the requests did share decode steps
    wait_for(lambda: engine.metrics.cancelled > cancelled_before, "the abandoned stream to be cancelled")
    wait_for(lambda: engine.running_rows == 0, "every row to leave")


def test_streaming_equals_non_streaming(client):
    kw = dict(prompt="In the beginning", max_tokens=24, temperature=1.2, top_p=0.95, seed=42, n=2,
              extra_body={"return_token_ids": True})
    whole = client.completions.create(model="tiny", **kw)
    texts, toks, finish = ["", ""], [[], []], [None, None]
    for chunk in client.completions.create(model="tiny", stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            toks[c.index] += c.model_extra["token_ids"]
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in whole.choices]
    assert toks == [ids_of(c) for c in whole.choices] and all(len(t) == 24 for t in toks)
    assert finish == [c.finish_reason for c in whole.choices] == ["length", "length"]
    assert toks[0] != toks[1]  # choice k samples with seed + k


def test_shared_system_prompt_comes_from_the_cache(server, client, model, tok):
    engine, _ = server
    system = "You answer in French. " * 8
    msgs = [[("system", system), ("user", q)] for q in ("Hello?", "How are you?")]
    want = []
    for m in msgs:
        ids, system_len = render_chat(m, tok)
        want.append(offline(model, tok, ids, seed=9, max_tokens=10, stop=["\n\n"]))
    hits = engine.cache.hits
    got = []
    for m in msgs:
        r = client.chat.completions.create(model="tiny", messages=[{"role": a, "content": b} for a, b in m],
                                           max_tokens=10, seed=9, extra_body={"return_token_ids": True})
        c = r.choices[0]
        got.append(((ids_of(c), c.message.content, c.finish_reason), r.usage.prompt_tokens_details.cached_tokens))
    assert [g[0] for g in got] == [tuple(w) for w in want]
    assert got[0][1] == 0 and got[1][1] == system_len  # the second request started from the system prompt's state
    assert engine.cache.hits > hits


def test_full_queue_is_503_with_retry_after_and_a_closed_stream_frees_its_rows(server, client, model, tok):
    openai = require("openai")
    engine, _ = server
    want = offline(model, tok, tok.encode("Queued"), temperature=0, max_tokens=4)
    # Every row (8) taken by one streaming request ...
    hog = client.completions.create(model="tiny", prompt="Hog every row", n=8, max_tokens=4000, stream=True,
                                    extra_body={"return_token_ids": True})
    next(iter(hog))
    wait_for(lambda: engine.running_rows == 8, "the streaming request to take every row")
    # ... then the queue (2) filled ...
    results = []

    def queued():
        r = client.completions.create(model="tiny", prompt="Queued", max_tokens=4, temperature=0,
                                      extra_body={"return_token_ids": True})
        results.append([(ids_of(c), c.text, c.finish_reason) for c in r.choices])

    waiting = [threading.Thread(target=queued) for _ in range(2)]
    for t in waiting:
        t.start()
    wait_for(lambda: engine.queue_length == 2, "two queued requests")
    # ... so the next one is refused, with a time to come back.
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="tiny", prompt="One too many", max_tokens=4)
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body["code"] == "queue_full" and "retry" in err.value.body["message"]
    # The client that goes away frees its rows at once: the queued requests run, exactly.
    hog.close()
    for t in waiting:
        t.join(TIMEOUT)
    assert results == [[tuple(want)]] * 2
    wait_for(lambda: engine.running_rows == 0, "every row to leave")


BAD = [
    ("malformed JSON", None, b'{"prompt": "x", ', 400, "malformed JSON"),
    ("not an object", None, b'["x"]', 400, "object"),
    ("unknown field", {"prompt": "x", "frobnicate": 1}, None, 400, "unknown field 'frobnicate'"),
    ("missing prompt", {"max_tokens": 3}, None, 400, "missing field 'prompt'"),
    ("temperature", {"prompt": "x", "temperature": 5}, None, 400, "temperature"),
    ("top_p", {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ("negative max_tokens", {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("max_tokens over the limit", {"prompt": "x", "max_tokens": 5000}, None, 400, "at most 4096"),
    ("n over the rows", {"prompt": "x", "n": 9}, None, 400, "at most 8"),
    ("prompt too long", {"prompt": list(range(1, 1002))}, None, 400, "at most 1000"),
    ("token out of range", {"prompt": [5, 70000]}, None, 400, "out of range"),
    ("empty prompt", {"prompt": ""}, None, 400, "empty"),
    ("other model", {"prompt": "x", "model": "gpt-4"}, None, 404, "does not exist"),
]


@pytest.mark.parametrize(("what", "body", "raw", "status", "says"), BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests(server, what, body, raw, status, says):
    code, answer, _ = post(server[1] + "/v1/completions", body, raw=raw)
    assert code == status, answer
    err = answer["error"]
    assert says in err["message"] and err["type"] == "invalid_request_error"


def test_bad_chat_requests_and_api_keys(server, client):
    openai = require("openai")
    url = server[1] + "/v1/chat/completions"
    for body, says in (({"messages": []}, "messages"),
                       ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
                       ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
                       ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}, "unknown field")):
        code, answer, _ = post(url, body)
        assert code == 400 and says in answer["error"]["message"], answer
    for key in (None, "wrong-key", API_KEY + "x"):
        code, answer, _ = post(url, {"messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    other = openai.OpenAI(base_url=server[1] + "/v1", api_key="nope", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.models.list()


def test_models_health_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    code, text = get(server[1] + "/health")
    assert code == 200 and json.loads(text)["status"] == "ok"
    code, text = get(server[1] + "/metrics")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    p = "rwkv_zoo_serve_"
    for name in ("queue_length", "batch_size", "tokens_per_second", "prefix_cache_hits_total"):
        assert p + name in samples and f"# TYPE {p}{name} " in text
    assert samples[p + "generation_tokens_total"] > 0
    assert samples[p + "time_to_first_token_seconds_count"] > 0
    assert samples[p + 'time_to_first_token_seconds_bucket{le="+Inf"}'] == samples[
        p + "time_to_first_token_seconds_count"]
    assert samples[p + 'http_requests_total{endpoint="/v1/completions",status="400"}'] >= 1


def test_api_key_matches(server_api_key):
    assert server_api_key == API_KEY
