"""The engine without HTTP: on the cpu backend's fused step rows are batched (the probe finds them
independent and splits invariant); on the module-by-module path the engine runs one row at a time and
is still exact, its prefix cache included."""

from __future__ import annotations

import queue

import pytest
import torch

import rwkv_zoo
from rwkv_zoo import fused
from rwkv_zoo.generation import SamplingParams, generate
from rwkv_zoo.serve import Engine, Request, probe

TIMEOUT = 30


def run(engine: Engine, requests: list[Request]) -> list[tuple[list[list[int]], int]]:
    """Submit every request at once; per request, each choice's tokens and the cached prompt tokens."""
    inbox: queue.Queue = queue.Queue()
    handles = [engine.submit(r, lambda ev, i=i: inbox.put((i, ev))) for i, r in enumerate(requests)]
    tokens = [[[] for _ in range(r.rows)] for r in requests]
    open_ = len(requests)
    while open_:
        i, (what, k, tok, _) = inbox.get(timeout=TIMEOUT)
        assert what != "error", tok
        if what == "token" and tok is not None:
            tokens[i][k].append(tok)
        open_ -= what == "end"
    return [(t, h.cached_tokens) for t, h in zip(tokens, handles, strict=True)]


def test_the_fused_cpu_step_batches_rows_exactly(model):
    sel = fused.select(model, fused.StepCall("cpu", torch.float32, 8, 1))
    assert sel.backend == "cpu", sel.describe()
    assert probe(model, max_batch=8, chunk_len=16) == (True, True)
    engine = Engine(model, max_batch=8, chunk_len=16)
    assert engine.batched and engine.exact


def test_one_row_at_a_time_is_exact_where_batching_is_not(model):
    plain = rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), 1).eval()
    plain.fused_step = False  # the modules layer by layer: BLAS rounding depends on the number of rows
    engine = Engine(plain, max_batch=6, chunk_len=16, batching="rows").start()
    try:
        assert not engine.batched and engine.exact
        p = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.4, frequency_penalty=0.2)
        prompts = [list(range(3, 43)), [7, 8, 9], [(i * 37) % 250 for i in range(70)]]
        reqs = [Request([prompts[0]], p, 12, seed=4, n=2, cache_prefixes=(33,)),
                Request([prompts[1]], SamplingParams(temperature=0), 9, seed=0),
                Request([prompts[2]], p, 15, seed=8)]
        got = run(engine, reqs)
        for req, (toks, _) in zip(reqs, got, strict=True):
            for k, t in enumerate(toks):
                q = req.params
                want = generate(plain, req.prompts[0], max_new_tokens=req.max_tokens, seed=req.seed + k,
                                temperature=q.temperature, top_p=q.top_p, presence_penalty=q.presence_penalty,
                                frequency_penalty=q.frequency_penalty)
                assert t == want.tokens
        # A prompt sharing the first 33 tokens starts from a cached state, cut where the uncached run cuts.
        again = Request([[*prompts[0][:33], 200, 201, 202]], SamplingParams(temperature=0), 10, seed=0)
        (toks, cached), = run(engine, [again])
        assert cached == (33 if engine.split_invariant else 32)
        assert toks[0] == generate(plain, again.prompts[0], max_new_tokens=10, temperature=0).tokens
    finally:
        engine.stop()


def test_engine_refuses_what_it_cannot_hold(model):
    engine = Engine(model, max_batch=2, max_queue=0, chunk_len=16)
    with pytest.raises(ValueError, match="at most 2"):
        engine.submit(Request([[1, 2]], SamplingParams(), 4, seed=0, n=3), print)
    engine.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(Request([[1, 2]], SamplingParams(), 4, seed=0), print)
