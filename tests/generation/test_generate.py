"""generate(): greedy, seeded sampling, official penalty semantics, mixed-length batches, streaming,
state carried between calls, the prefix cache, and clear errors for bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from _deps import require

import rwkv_zoo
from rwkv_zoo.generation import PrefixCache, generate
from rwkv_zoo.state import StateMismatchError

# ---------------------------------------------------------------------------------------------------
# greedy and sampling


@torch.no_grad()
def _manual_greedy(model, prompt: list[int], n: int) -> list[int]:
    logits, state = model(torch.tensor([prompt]))
    out = []
    for _ in range(n):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits, state = model(torch.tensor([[tok]]), state)
    return out


def test_greedy_is_argmax_and_deterministic(tiny):
    prompt = [5, 17, 200, 3]
    res = generate(tiny, prompt, max_new_tokens=8, temperature=0)
    assert res.tokens == _manual_greedy(tiny, prompt, 8)
    assert res.finish_reason == "length" and res.text is None and res.prompt_tokens == prompt
    assert generate(tiny, prompt, max_new_tokens=8, temperature=0).tokens == res.tokens


def test_sampling_is_reproducible_with_a_seed(tiny):
    kw = dict(max_new_tokens=12, temperature=1.3, top_p=0.95, top_k=50, min_p=0.01)
    a = generate(tiny, [1, 2, 3], seed=7, **kw).tokens
    assert generate(tiny, [1, 2, 3], seed=7, **kw).tokens == a
    assert generate(tiny, [1, 2, 3], seed=8, **kw).tokens != a


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    greedy = generate(tiny, [9, 8], max_new_tokens=6, temperature=0).tokens
    assert generate(tiny, [9, 8], max_new_tokens=6, top_k=1, seed=0).tokens == greedy
    assert generate(tiny, [9, 8], max_new_tokens=6, top_p=1e-6, seed=0).tokens == greedy


def test_ban_and_stop_tokens(tiny):
    greedy = generate(tiny, [4, 4], max_new_tokens=6, temperature=0).tokens
    banned = generate(tiny, [4, 4], max_new_tokens=6, temperature=0, ban=[greedy[0]])
    assert greedy[0] not in banned.tokens
    stopped = generate(tiny, [4, 4], max_new_tokens=6, temperature=0, stop=greedy[3])
    assert stopped.tokens == greedy[:3] and stopped.finish_reason == "stop_token"


def test_penalties_follow_the_official_pipeline(tiny, byte_tok):
    """Greedy with presence/frequency penalties, decay and bans: same tokens as rwkv.utils.PIPELINE."""
    utils = require("rwkv.utils")

    fed: list[list[int]] = []

    class Adapter:  # PIPELINE calls model.forward(list_of_ids, state) -> (logits [V], state)
        def forward(self, ids, state):
            fed.append(list(ids))
            with torch.no_grad():
                out, state = tiny(torch.tensor([ids]), state)
            return out[0, -1].float(), state

    class Codec:  # PIPELINE treats anything whose type name contains "Tokenizer" as an HF tokenizer
        encode, decode = staticmethod(byte_tok.encode), staticmethod(byte_tok.decode)

    pipe = utils.PIPELINE.__new__(utils.PIPELINE)
    pipe.model, pipe.tokenizer = Adapter(), Codec()
    text = "ab 12 cd"
    args = utils.PIPELINE_ARGS(temperature=0, top_p=0, alpha_presence=0.4, alpha_frequency=0.3, alpha_decay=0.9,
                               token_ban=[32], token_stop=[], chunk_len=3)
    pipe.generate(text, token_count=21, args=args, callback=None, state=None)
    sampled = [ids[0] for ids in fed[3:]]  # the prompt went in 3 chunks; then one sampled token per call
    assert len(sampled) == 20
    ours = generate(tiny, text, tokenizer=byte_tok, max_new_tokens=20, temperature=0, presence_penalty=0.4,
                    frequency_penalty=0.3, penalty_decay=0.9, ban=[32], chunk_len=3)
    assert ours.tokens == sampled
    plain = generate(tiny, text, tokenizer=byte_tok, max_new_tokens=20, temperature=0, ban=[32])
    assert plain.tokens != ours.tokens  # the penalties did something


# ---------------------------------------------------------------------------------------------------
# batches


def test_mixed_length_batch_equals_solo_runs(tiny):
    # two prompts of length 3 are prefilled together as one batch; the others alone
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100, 50], [42] * 6, [9, 8, 7]]
    batched = generate(tiny, prompts, max_new_tokens=7, temperature=0, chunk_len=4)
    for i, p in enumerate(prompts):
        solo = generate(tiny, p, max_new_tokens=7, temperature=0, chunk_len=4)
        assert batched.tokens[i] == solo.tokens
        torch.testing.assert_close(batched.logits[i], solo.logits, rtol=1e-5, atol=1e-5)
        for a, b in zip(batched.state.select(i).layers, solo.state.layers, strict=True):
            torch.testing.assert_close(a.wkv, b.wkv, rtol=1e-5, atol=1e-5)


def test_batch_sequences_finish_independently_and_sample_like_solo(tiny):
    prompts = [[3, 3], [9, 1, 4]]
    solo0 = generate(tiny, prompts[0], max_new_tokens=6, temperature=0).tokens
    res = generate(tiny, prompts, max_new_tokens=6, temperature=0, stop=solo0[1])
    assert res.tokens[0] == solo0[:1] and res.finish_reason[0] == "stop_token"
    assert res.state.batch_size == 2
    # seeded sampling: sequence i of a batch draws what a solo run with seed + i draws
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    batch = generate(tiny, prompts, seed=11, **kw).tokens
    assert batch[1] == generate(tiny, prompts[1], seed=12, **kw).tokens


def test_tensor_prompts(tiny):
    a = generate(tiny, torch.tensor([5, 6, 7]), max_new_tokens=3, temperature=0).tokens
    b = generate(tiny, torch.tensor([[5, 6, 7], [1, 1, 1]]), max_new_tokens=3, temperature=0).tokens
    assert b[0] == a


# ---------------------------------------------------------------------------------------------------
# state carried, streaming, stop strings


def test_returned_state_continues_the_conversation(tiny):
    first = generate(tiny, [10, 20, 30], max_new_tokens=5, temperature=0)
    second = generate(tiny, [40, 50], max_new_tokens=5, temperature=0, state=first.state)
    whole = [10, 20, 30, *first.tokens, 40, 50]
    assert second.tokens == _manual_greedy(tiny, whole, 5)
    with torch.no_grad():
        logits, _ = tiny(torch.tensor([[*whole, *second.tokens]]))
    torch.testing.assert_close(second.logits, logits[0, -1], rtol=1e-4, atol=1e-4)


class Scripted:
    """The tiny model with its logits replaced: after byte x it always predicts NEXT[x]."""

    def __init__(self, model, chain: bytes):
        self.model, self.config, self.identity, self.device = model, model.config, model.identity, model.device
        self.next = {a: b for a, b in itertools.pairwise(chain)}

    def __call__(self, tokens, state=None):
        logits, state = self.model(tokens, state)
        last = tokens[:, -1].tolist()
        forced = torch.full_like(logits[:, -1:], -30.0)
        for r, t in enumerate(last):
            forced[r, 0, self.next.get(t, 0)] = 30.0
        return forced.expand_as(logits).contiguous(), state


def test_stream_yields_only_whole_characters(tiny, byte_tok):
    chain = "aé€😀b".encode()  # every byte differs, so the script is a chain
    model = Scripted(tiny, chain)
    stream = generate(model, "a", tokenizer=byte_tok, max_new_tokens=len(chain) - 1, temperature=0, stream=True)
    pieces = list(stream)
    assert pieces == ["é", "€", "😀", "b"]
    assert stream.result.text == "é€😀b" and stream.result.tokens == list(chain[1:])
    # a stop string spanning several tokens: nothing of it is shown, and the text ends before it
    stream = generate(model, "a", tokenizer=byte_tok, max_new_tokens=20, temperature=0, stop="€😀", stream=True)
    assert "".join(stream) == "é" and stream.result.text == "é"
    assert stream.result.finish_reason == "stop_string"
    # cut mid-character by max_new_tokens: the flush shows U+FFFD, never raw bytes
    res = generate(model, "a", tokenizer=byte_tok, max_new_tokens=3, temperature=0)
    assert res.text == "é\ufffd"
    # a batch streams (index, piece) pairs
    pairs = list(generate(model, ["a", "a"], tokenizer=byte_tok, max_new_tokens=2, temperature=0, stream=True))
    assert sorted(pairs) == [(0, "é"), (1, "é")]


def test_stream_without_tokenizer_yields_ids(tiny):
    stream = generate(tiny, [1, 2], max_new_tokens=4, temperature=0, stream=True)
    assert list(stream) == stream.result.tokens


# ---------------------------------------------------------------------------------------------------
# prefix cache


def test_prefix_cache_reuses_states_and_is_exact(tiny):
    cache = PrefixCache(max_bytes=1 << 20)
    system = list(range(30, 60))
    cache.add(tiny, system)
    assert cache.stats()["entries"] == 1 and cache.misses == 1
    for tail in ([1, 2], [3], [4, 5, 6]):
        with_cache = generate(tiny, system + tail, max_new_tokens=4, temperature=0, cache=cache, chunk_len=8)
        without = generate(tiny, system + tail, max_new_tokens=4, temperature=0, chunk_len=8)
        assert with_cache.tokens == without.tokens
        torch.testing.assert_close(with_cache.logits, without.logits, rtol=1e-5, atol=1e-5)
    assert cache.hits == 3
    # the whole prompt was stored too: asking again is a full hit (logits come from the cache)
    again = generate(tiny, [*system, 1, 2], max_new_tokens=4, temperature=0, cache=cache)
    assert cache.hits == 4 and again.tokens == generate(tiny, [*system, 1, 2], max_new_tokens=4, temperature=0).tokens
    assert "hits=4" in repr(cache)
    # a prompt continuing a given state neither reads nor fills the cache
    before = cache.stats()
    generate(tiny, [*system, 1, 2], max_new_tokens=1, temperature=0, cache=cache, state=again.state)
    assert cache.stats() == before


def test_prefix_cache_forgets_freed_models():
    model = rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), 3)
    cache = PrefixCache()
    cache.add(model, [1, 2, 3])
    assert len(cache) == 1
    del model
    import gc

    gc.collect()
    assert len(cache) == 0 and cache.bytes == 0


def test_one_state_continues_every_prompt_of_a_batch(tiny):
    start = generate(tiny, [9, 9, 9], max_new_tokens=2, temperature=0)
    batch = generate(tiny, [[1], [2, 3]], max_new_tokens=3, temperature=0, state=start.state)
    assert batch.tokens[1] == generate(tiny, [2, 3], max_new_tokens=3, temperature=0, state=start.state).tokens


def test_prefix_cache_is_bounded_lru(tiny):
    probe = PrefixCache()
    probe.add(tiny, [1, 2, 3])
    one = probe.bytes
    cache = PrefixCache(max_bytes=2 * one + 10)
    cache.add(tiny, [1, 2, 3])
    cache.add(tiny, [4, 5, 6])
    assert cache.lookup(tiny, [1, 2, 3, 9])[0] == 3  # touch: [1, 2, 3] is now the most recent
    cache.add(tiny, [7, 8, 9])  # evicts [4, 5, 6], the least recently used
    assert cache.evictions == 1 and len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert cache.lookup(tiny, [4, 5, 6])[0] == 0
    assert cache.lookup(tiny, [7, 8, 9, 1])[0] == 3
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(0)


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an int > 0"),
        ({"temperature": -0.5}, "temperature must be"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be"),
        ({"min_p": 1.0}, "min_p must be"),
        ({"penalty_decay": 1.5}, "penalty_decay"),
        ({"temperature": 0, "top_p": 0.5}, "greedy"),
        ({"ban": [256]}, "ban token id 256 is out of range"),
        ({"stop": [999]}, "stop token id 999 is out of range"),
        ({"stop": "\n"}, "stop strings need a tokenizer"),
        ({"chunk_len": 0}, "chunk_len"),
    ],
)
def test_bad_sampling_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny, [1, 2], **{"max_new_tokens": 2, **kwargs})


def test_bad_prompts_states_and_tokenizers(tiny, other_tiny, world):
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny, [1, 256], max_new_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny, [[1], [-1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(tiny, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(tiny, [[1], []], max_new_tokens=2)
    narrow = rwkv_zoo.build("v7", n_layer=1, n_embd=32, head_size=16, vocab_size=200)
    with pytest.raises(ValueError, match="no default tokenizer fits a vocabulary of 200: pass token ids"):
        generate(narrow, "hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="65536 ids but the model's vocabulary has only 256"):
        generate(tiny, "hello", tokenizer=world, max_new_tokens=2)
    other_state = generate(other_tiny, [1], max_new_tokens=1).state
    with pytest.raises(StateMismatchError, match="another model"):
        generate(tiny, [1], max_new_tokens=1, state=other_state)
    two = generate(tiny, [[1], [2]], max_new_tokens=1).state
    with pytest.raises(StateMismatchError, match="batch size 2"):
        generate(tiny, [[1], [2], [3]], max_new_tokens=1, state=two)
    with pytest.raises(TypeError, match="prompt must be"):
        generate(tiny, 3.5, max_new_tokens=1)


def test_world_model_uses_the_world_tokenizer_by_default():
    model = rwkv_zoo.build("v7", n_layer=1, n_embd=32, head_size=16, vocab_size=65536)
    rwkv_zoo.randomize_(model, 0)
    res = generate(model, "Hello world", max_new_tokens=2, temperature=0)
    assert res.prompt_tokens == [33155, 40213] and isinstance(res.text, str)


def test_sampler_filters_like_the_package(monkeypatch):
    """The distribution each sampler draws from, for the same logits and settings: ours (what goes into
    torch.multinomial) against rwkv.utils.PIPELINE.sample_logits (what goes into np.random.choice on the
    CPU). The package draws from numpy's global RNG, so the draws themselves cannot be compared."""
    from rwkv_zoo.generation import SamplingParams, _sample

    utils = require("rwkv.utils")
    seen: dict[str, torch.Tensor] = {}

    def package_choice(a, p):
        seen["package"] = torch.as_tensor(p, dtype=torch.float64)
        return 0

    def our_multinomial(probs, num_samples, generator=None):
        seen["ours"] = probs.double() / probs.double().sum()
        return torch.zeros(num_samples, dtype=torch.long)

    monkeypatch.setattr(utils.np.random, "choice", package_choice)
    monkeypatch.setattr(torch, "multinomial", our_multinomial)
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 2  # distinct probabilities
    # top_p < 1: at exactly 1 the package keeps only the top token when the float cumsum stays below 1.
    settings = [(t, p, k) for t in (0.5, 1.0, 1.7) for p in (0.3, 0.8, 0.99) for k in (0, 1, 5)]
    for temperature, top_p, top_k in settings:
        utils.PIPELINE.sample_logits(None, logits.clone(), temperature=temperature, top_p=top_p, top_k=top_k)
        _sample(logits.clone(), SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k), None)
        assert (seen["ours"] > 0).sum() == (seen["package"] > 0).sum(), (temperature, top_p, top_k)
        torch.testing.assert_close(seen["ours"], seen["package"], rtol=1e-5, atol=1e-7)


def test_sampler_draw_frequencies_follow_the_filters():
    """Hand-computed expectations (min-p is ours; the package has none): top-p on untempered
    probabilities (ties kept), then top-k, min-p, and p ** (1 / temperature), seen in 600 draws."""
    from rwkv_zoo.generation import SamplingParams, _sample

    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)

    def draws(**kw):
        p = SamplingParams(**kw)
        return torch.bincount(torch.tensor([_sample(logits, p, gen) for _ in range(600)]), minlength=8) / 600

    freq = draws(top_p=0.8, temperature=0.5)  # cumsum reaches 0.8 at p=0.1: keep {0..3}, then square
    want = torch.zeros(8)
    want[:4] = probs[:4] ** 2 / (probs[:4] ** 2).sum()
    assert (freq[4:] == 0).all() and torch.allclose(freq, want, atol=0.06)
    assert (draws(top_k=3)[3:] == 0).all()
    assert (draws(min_p=0.3)[4:] == 0).all() and (draws(min_p=0.3)[:4] > 0).all()
    assert (draws(top_p=1.0) > 0).sum() >= 7
