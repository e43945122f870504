"""Generation, scoring and a prefix-state cache on top of ``model(tokens, state) -> (logits, state)``.

``generate(model, prompt, ...)`` prefills each prompt on its own (in chunks of ``chunk_len`` tokens, so
a long prompt needs bounded memory), stacks the prompt states with ``RWKVState.concat`` and decodes all
sequences together, one token per step. No sequence ever sees padding: a batch of prompts of mixed
lengths gives each sequence the logits of its solo run, and sequences finish independently (finished
ones leave the batch). The returned state has consumed exactly ``prompt + tokens`` of each sequence, so
``generate(model, more, state=result.state)`` continues the conversation.

Sampling follows BlinkDL's ``rwkv.utils.PIPELINE`` (re-implemented here, per step and per sequence):

1. ``ban`` ids get logit ``-inf``.
2. Penalties: every token ``t`` generated so far has an occurrence weight ``occ[t]``;
   ``logit[t] -= presence_penalty + occ[t] * frequency_penalty`` (the package's ``alpha_presence`` and
   ``alpha_frequency``). After each sampled token, every weight is multiplied by ``penalty_decay``
   (``alpha_decay``, package default 0.996) and then the new token's weight grows by 1 — or by 0 when a
   tokenizer decodes it to text found in ``" \\t0123456789"`` (spaces, tabs and digits are not
   penalised by frequency; presence still applies). Prompt tokens are not counted.
3. ``probs = softmax(logits)`` in fp32. ``temperature == 0`` is greedy (argmax). Otherwise, on these
   untempered probabilities: top-p keeps tokens with a probability >= the one at which the descending
   cumulative sum first reaches ``top_p`` (ties kept); top-k keeps the ``top_k`` most probable (0 = off);
   min-p (not in the package) keeps tokens with ``p >= min_p * max(p)``. Then ``probs ** (1 /
   temperature)``, renormalised, and one draw from the sequence's own ``torch.Generator`` (seeded
   ``seed + i`` for sequence ``i``, so a batched run samples what the solo runs sample).
4. A sampled id in ``stop`` ends that sequence and is not emitted (nor fed to the state). A stop
   string ends it once the decoded text contains it: the text is cut before it; the tokens that made
   it are kept in ``tokens`` and in the state.
"""

from __future__ import annotations

import codecs
import math
import random
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_zoo.model import RWKV
from rwkv_zoo.state import RWKVState, StateMismatchError

__all__ = [
    "GenerationResult",
    "GenerationStream",
    "PrefixCache",
    "SamplingParams",
    "ScoreResult",
    "generate",
    "sample_step",
    "score",
]

NO_PENALTY_TEXT = " \t0123456789"  # PIPELINE: a token whose text is in here adds 0 to its weight


# ---------------------------------------------------------------------------------------------------
# Parameters and results


@dataclass
class SamplingParams:
    """Sampling settings; ``validate()`` raises ``ValueError`` for impossible or contradictory values."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996
    ban: tuple[int, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    # Ids from here on are never sampled: the tokenizer could not decode them (a byte tokenizer on a
    # 1024-row test model, or the padding rows of a Pile model's head). None: every id may be sampled.
    vocab_limit: int | None = None

    def validate(self, vocab_size: int) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        if not 0 <= self.penalty_decay <= 1:
            raise ValueError(f"penalty_decay must be in [0, 1], got {self.penalty_decay!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        for name, ids in (("ban", self.ban), ("stop", self.stop_tokens)):
            for i in ids:
                if not 0 <= i < vocab_size:
                    raise ValueError(f"{name} token id {i} is out of range for the model's vocabulary of {vocab_size}")
        if len(set(self.ban)) >= vocab_size:
            raise ValueError("ban covers the whole vocabulary: nothing could be sampled")
        if self.temperature == 0 and (self.top_p < 1 or self.top_k or self.min_p):
            raise ValueError("temperature=0 is greedy decoding: top_p, top_k and min_p would be ignored; drop them")
        if any(not s for s in self.stop_strings):
            raise ValueError("an empty stop string would stop at once")


@dataclass
class GenerationResult:
    """What ``generate`` returns. For a batch, ``tokens``/``text``/``finish_reason`` are lists."""

    tokens: Any  # list[int] (one prompt) or list[list[int]] (a batch)
    text: Any  # str | None, or a list of them
    state: RWKVState  # consumed prompt + tokens, batch in prompt order
    finish_reason: Any  # "length" | "stop_token" | "stop_string", or a list
    prompt_tokens: Any = None
    logits: Tensor | None = None  # [V] or [B, V] fp32: the next-token logits after `state`


class GenerationStream:
    """Iterate for text pieces (with a tokenizer) or token ids (without); then read ``.result``."""

    def __init__(self, gen: Iterator):
        self._gen = gen
        self.result: GenerationResult | None = None

    def __iter__(self):
        result = yield from self._gen
        if result is not None:  # a second iteration finds the generator spent: keep the result
            self.result = result
        return self.result


@dataclass
class ScoreResult:
    """Per-sequence scores: ``logprobs`` [n] of every scored token, and their sums."""

    logprobs: Tensor
    tokens: list[int]
    nll: float  # -sum(logprobs), nats
    n_tokens: int
    n_bytes: int | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.n_bytes if self.n_bytes else None


# ---------------------------------------------------------------------------------------------------
# Prefix cache


def _state_bytes(state: RWKVState) -> int:
    return sum(t.numel() * t.element_size() for ls in state.layers for t in ls.tensors())


class PrefixCache:
    """Reuse the state of a prompt prefix (a system prompt, a few-shot block) instead of recomputing it.

    Keys are ``(model, token prefix)``; values the batch-1 state after the prefix and the logits of its
    last token. A lookup returns the longest cached prefix of a prompt. Entries are evicted least
    recently used first so that the stored tensors never exceed ``max_bytes``; ``hits``, ``misses``,
    ``evictions`` and ``bytes`` say how it goes. Entries belong to the model object (dropped when it is
    freed): call ``clear()`` after changing its weights or its ``initial_state``.
    ``generate(..., cache=cache)`` looks prompts up and stores each prompt's state;
    ``cache.add(model, tokens)`` stores a prefix ahead of time.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[RWKVState, Tensor, int]] = OrderedDict()
        self._lengths: dict[int, dict[int, int]] = {}  # model key -> {prefix length: count}
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def _model_key(model) -> int:
        return id(model)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.bytes = 0

    def lookup(self, model, tokens: Sequence[int]) -> tuple[int, RWKVState | None, Tensor | None]:
        """``(n, state, logits)`` for the longest cached prefix ``tokens[:n]`` (``(0, None, None)`` if none)."""
        mk = self._model_key(model)
        for n in sorted(self._lengths.get(mk, {}), reverse=True):
            if n > len(tokens):
                continue
            key = (mk, tuple(tokens[:n]))
            if key in self._entries:
                self._entries.move_to_end(key)
                state, logits, _ = self._entries[key]
                self.hits += 1
                return n, state, logits
        self.misses += 1
        return 0, None, None

    def put(self, model, tokens: Sequence[int], state: RWKVState, logits: Tensor) -> None:
        """Store the batch-1 ``state`` after ``tokens`` and the logits [V] of the last token."""
        if state.batch_size != 1:
            raise ValueError("PrefixCache stores batch-1 states")
        mk = self._model_key(model)
        key = (mk, tuple(int(t) for t in tokens))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        state = state.detach().clone()
        logits = logits.detach().float().reshape(-1).clone()
        size = _state_bytes(state) + logits.numel() * 4 + 8 * len(tokens)
        if size > self.max_bytes:
            return  # larger than the whole cache: not stored
        while self.bytes + size > self.max_bytes:
            self._evict()
        self._entries[key] = (state, logits, size)
        if mk not in self._lengths:  # forget a model's entries when it is freed (its id may be reused)
            weakref.finalize(model, self._drop_model, mk)
        lengths = self._lengths.setdefault(mk, {})
        lengths[len(key[1])] = lengths.get(len(key[1]), 0) + 1
        self.bytes += size

    def _drop_model(self, mk: int) -> None:
        for key in [k for k in self._entries if k[0] == mk]:
            self.bytes -= self._entries.pop(key)[2]
        self._lengths.pop(mk, None)

    def _evict(self) -> None:
        (mk, toks), (_, _, size) = self._entries.popitem(last=False)
        lengths = self._lengths[mk]
        lengths[len(toks)] -= 1
        if not lengths[len(toks)]:
            del lengths[len(toks)]
        self.bytes -= size
        self.evictions += 1

    def add(self, model, tokens: Sequence[int], *, chunk_len: int = 256) -> RWKVState:
        """Prefill ``tokens`` (from the longest cached prefix) and store the result; returns the state."""
        return _prefill(model, list(tokens), None, chunk_len, self)[0]

    def __repr__(self) -> str:
        s = self.stats()
        return (f"PrefixCache({s['entries']} entries, {s['bytes']:,}/{s['max_bytes']:,} bytes, "
                f"hits={s['hits']}, misses={s['misses']})")


# ---------------------------------------------------------------------------------------------------
# Helpers


def _vocab_size(model) -> int:
    return model.config.vocab_size


def _check_tokenizer(model, tokenizer) -> None:
    if tokenizer is not None and tokenizer.vocab_size > _vocab_size(model):
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has only "
            f"{_vocab_size(model)}: they do not belong together"
        )


def _default_tokenizer(model):
    from rwkv_zoo.tokenizers import default_tokenizer

    return default_tokenizer(_vocab_size(model))


def _to_token_lists(model, prompt, tokenizer) -> tuple[list[list[int]], bool, Any]:
    """Normalise a prompt (str, ids, a [T]/[B, T] tensor, or a list of those) to lists; batched?;
    the tokenizer (the default one if text needed it)."""
    if isinstance(prompt, Tensor):
        if prompt.dim() == 1:
            return [prompt.tolist()], False, tokenizer
        if prompt.dim() == 2:
            return prompt.tolist(), True, tokenizer
        raise ValueError(f"a tensor prompt must be [T] or [B, T], got shape {list(prompt.shape)}")
    if isinstance(prompt, (str, bytes)):
        prompts, batched = [prompt], False
    elif isinstance(prompt, Sequence) and len(prompt) and all(isinstance(t, int) for t in prompt):
        return [list(prompt)], False, tokenizer
    elif isinstance(prompt, Sequence):
        prompts, batched = list(prompt), True
        if not prompts:
            raise ValueError("the prompt is empty: give at least one token or a non-empty text")
    else:
        raise TypeError(f"prompt must be text, token ids or a list of them, got {type(prompt).__name__}")
    out = []
    for p in prompts:
        if isinstance(p, (str, bytes)):
            if tokenizer is None:
                tokenizer = _default_tokenizer(model)
            ids = tokenizer.encode(p) if isinstance(p, str) else tokenizer.encode_bytes(p)
        elif isinstance(p, Tensor):
            ids = p.reshape(-1).tolist()
        elif isinstance(p, Sequence) and all(isinstance(t, int) for t in p):
            ids = list(p)
        else:
            raise TypeError(f"each prompt must be text or a list of token ids, got {type(p).__name__}")
        out.append(ids)
    return out, batched, tokenizer


def _check_ids(ids: list[int], V: int, what: str = "prompt") -> None:
    if not ids:
        raise ValueError(f"the {what} is empty: give at least one token or a non-empty text")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= V:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} token id {bad} is out of range for the model's vocabulary of {V} (ids 0..{V - 1})")


@torch.no_grad()
def _prefill(model, ids: list[int], state: RWKVState | None, chunk_len: int,
             cache: PrefixCache | None) -> tuple[RWKVState, Tensor]:
    """Run one prompt (batch 1) in chunks; returns (state, last logits [V] fp32)."""
    start, logits = 0, None
    if state is not None:
        cache = None  # keys are token prefixes from the model's own start: another start must not be stored
    if cache is not None:
        n, cached_state, cached_logits = cache.lookup(model, ids)
        if n:
            start, state, logits = n, cached_state, cached_logits
    device = model.device
    # Only the last position's logits are used: an RWKV skips the head everywhere else. Any other
    # callable with the model's signature (a wrapper) is called plainly.
    keep = {"logits_to_keep": 1} if isinstance(model, RWKV) else {}
    for i in range(start, len(ids), chunk_len):
        chunk = torch.tensor([ids[i : i + chunk_len]], dtype=torch.long, device=device)
        out, state = model(chunk, state, **keep)
        logits = out[0, -1].float()
    if cache is not None and start < len(ids):
        cache.put(model, ids, state, logits)
    return state, logits


@torch.no_grad()
def _prefill_rows(model, prompts: list[list[int]], state: RWKVState | None, chunk_len: int,
                  cache: PrefixCache | None) -> tuple[RWKVState, Tensor]:
    """Prompts of one length as a batch; returns (state, last logits [G, V] fp32)."""
    if len(prompts) == 1:
        st, lg = _prefill(model, prompts[0], state, chunk_len, cache)
        return st, lg[None]
    keep = {"logits_to_keep": 1} if isinstance(model, RWKV) else {}
    ids = torch.tensor(prompts, dtype=torch.long, device=model.device)
    for i in range(0, ids.shape[1], chunk_len):
        out, state = model(ids[:, i : i + chunk_len], state, **keep)
    return state, out[:, -1].float()


def _sample(logits: Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from logits [V] (penalties and bans already applied)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs = F.softmax(logits.float(), dim=-1)
    if p.top_p < 1:
        sorted_probs, _ = torch.sort(probs, descending=True)
        reached = torch.cumsum(sorted_probs, 0) >= p.top_p
        idx = int(torch.argmax(reached.int())) if bool(reached.any()) else probs.numel() - 1
        probs = torch.where(probs < sorted_probs[idx], torch.zeros_like(probs), probs)
    if 0 < p.top_k < probs.numel():
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if p.min_p > 0:
        probs = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs)
    if p.temperature != 1:
        probs = probs ** (1.0 / p.temperature)
    if not bool(probs.sum() > 0):  # every survivor underflowed: fall back to the most probable
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


class _Seq:
    """Book-keeping of one sequence while decoding."""

    def __init__(self, prompt: list[int], tokenizer, seed: int, device):
        self.prompt = prompt
        self.tokens: list[int] = []
        self.occurrence: dict[int, float] = {}
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.done: str | None = None
        self.tokenizer = tokenizer
        self.text = "" if tokenizer is not None else None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer is not None else None
        self.state: RWKVState | None = None
        self.logits: Tensor | None = None
        self._emitted = 0

    def push_text(self, token: int, stop_strings: tuple[str, ...]) -> str:
        """Append the token's text; return what may be shown now: complete characters only, never a
        stop string, and not a tail that could still become one. Sets ``done`` on a stop string."""
        self.text += self._decoder.decode(self.tokenizer.decode_bytes([token]))
        for x in stop_strings:
            cut = self.text.find(x)
            if cut >= 0:
                self.text = self.text[:cut]
                self.done = "stop_string"
        end = len(self.text)
        if self.done is None:
            for x in stop_strings:  # hold back a tail that is the start of a stop string
                for k in range(min(len(x) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(x[:k]):
                        end = min(end, len(self.text) - k)
                        break
        return self._emit(end)

    def flush(self) -> str:
        """At the end: the held-back tail and any incomplete bytes (as U+FFFD)."""
        if self.done != "stop_string":
            self.text += self._decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece


def _penalised(logits: Tensor, seq: _Seq, p: SamplingParams) -> Tensor:
    limit = p.vocab_limit is not None and p.vocab_limit < logits.numel()
    if not (p.ban or seq.occurrence or limit):
        return logits
    logits = logits.clone()
    if limit:
        logits[p.vocab_limit :] = -math.inf
    if p.ban:
        logits[list(p.ban)] = -math.inf
    if seq.occurrence and (p.presence_penalty or p.frequency_penalty):
        ids = torch.tensor(list(seq.occurrence), dtype=torch.long, device=logits.device)
        occ = torch.tensor(list(seq.occurrence.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= p.presence_penalty + occ * p.frequency_penalty
    return logits


def _update_occurrence(seq: _Seq, token: int, p: SamplingParams) -> None:
    if p.penalty_decay != 1:
        for t in seq.occurrence:
            seq.occurrence[t] *= p.penalty_decay
    weight = 1.0
    if seq.tokenizer is not None:
        text = seq.tokenizer.decode([token])
        if text and text in NO_PENALTY_TEXT:
            weight = 0.0
    seq.occurrence[token] = seq.occurrence.get(token, 0.0) + weight


def sample_step(seq: _Seq, logits: Tensor, p: SamplingParams, max_new: int) -> tuple[int | None, str | int | None]:
    """One decoding step of one sequence, as ``generate`` takes it: sample from ``logits`` [V] (the
    next-token logits after ``seq``'s state) with its penalties and its own generator, and book the token.

    Returns ``(token, piece)``. ``token`` is the id to feed to the model next, or None when a stop token
    ended the sequence (it is neither kept nor fed). ``piece`` is what to show now (text with a
    tokenizer, the id without one), or None. ``seq.done`` is set when the sequence has ended
    (``stop_token``, ``stop_string``, ``length``); a sequence ended by a string or by its length still
    returns its last token, which ``generate`` feeds so that the state has consumed every kept token.
    A server calls this for each of its rows, which is why a row samples what a solo ``generate`` samples.
    """
    tok = _sample(_penalised(logits, seq, p), p, seq.gen)
    if tok in p.stop_tokens:
        seq.done = "stop_token"
        piece = seq.flush() if seq.text is not None else ""
        return None, piece or None
    seq.tokens.append(tok)
    _update_occurrence(seq, tok, p)
    if seq.text is not None:
        piece = seq.push_text(tok, p.stop_strings) or None
    else:
        piece = tok
    if seq.done is None and len(seq.tokens) >= max_new:
        seq.done = "length"
    return tok, piece


# ---------------------------------------------------------------------------------------------------
# generate


def generate(
    model,
    prompt,
    *,
    tokenizer=None,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    penalty_decay: float = 0.996,
    stop: int | str | Sequence[int | str] | None = None,
    ban: Sequence[int] | None = None,
    seed: int | None = None,
    state: RWKVState | None = None,
    stream: bool = False,
    chunk_len: int = 256,
    cache: PrefixCache | None = None,
) -> GenerationResult | GenerationStream:
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens per sequence (see the module docstring).

    ``prompt``: text, a list of token ids, a [T] tensor, or a list of texts / id lists (a batch, any
    mix of lengths; a [B, T] tensor is a batch too). Text without ``tokenizer`` uses
    ``rwkv_zoo.tokenizers.default_tokenizer`` (World, Pile where shipped, bytes for test models); with
    a tokenizer, only ids it can decode are sampled. ``state``: continue from it (batch 1, broadcast to
    every prompt, or one row per prompt); the prefix ``cache`` is used only when ``state`` is None.
    ``stream=True`` returns a ``GenerationStream`` yielding text pieces at character boundaries (token
    ids without a tokenizer; ``(index, piece)`` pairs for a batch); its ``.result`` is set when it ends.
    """
    V = _vocab_size(model)
    _check_tokenizer(model, tokenizer)
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    if not isinstance(chunk_len, int) or chunk_len <= 0:
        raise ValueError(f"chunk_len must be an int > 0, got {chunk_len!r}")
    if isinstance(stop, (int, str)):
        stop = [stop]
    stop = list(stop or [])
    stop_strings = tuple(s for s in stop if isinstance(s, str))
    stop_tokens = tuple(int(s) for s in stop if not isinstance(s, str))
    params = SamplingParams(temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, penalty_decay,
                            tuple(int(b) for b in (ban or ())), stop_tokens, stop_strings)
    params.validate(V)
    prompts, batched, tokenizer = _to_token_lists(model, prompt, tokenizer)
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (or give stop token ids)")
    if tokenizer is not None and tokenizer.vocab_size < V:
        params.vocab_limit = tokenizer.vocab_size
    for ids in prompts:
        _check_ids(ids, V)
    B = len(prompts)
    if state is not None:
        if not isinstance(state, RWKVState):
            raise TypeError(f"state must be an RWKVState, got {type(state).__name__}")
        state.check(model)
        if state.batch_size not in (1, B):
            raise StateMismatchError(f"the state has batch size {state.batch_size}; the prompts need 1 or {B}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**62)
    seqs = [_Seq(ids, tokenizer, seed + i, model.device) for i, ids in enumerate(prompts)]
    gen = _generate(model, seqs, params, max_new_tokens, state, chunk_len, cache, batched)
    if stream:
        return GenerationStream(gen)
    for _ in gen:
        pass
    return _result(seqs, batched)


def _result(seqs: list[_Seq], batched: bool) -> GenerationResult:
    state = RWKVState.concat([s.state for s in seqs])
    logits = torch.stack([s.logits for s in seqs]) if batched else seqs[0].logits
    one = (lambda xs: xs) if batched else (lambda xs: xs[0])
    return GenerationResult(one([s.tokens for s in seqs]), one([s.text for s in seqs]), state,
                            one([s.done for s in seqs]), one([s.prompt for s in seqs]), logits)


@torch.no_grad()
def _generate(model, seqs: list[_Seq], p: SamplingParams, max_new: int, state: RWKVState | None,
              chunk_len: int, cache: PrefixCache | None, batched: bool):
    # Prefill without padding, so no sequence's state ever sees another's: prompts of equal length run
    # together as one batch (the prefix cache works per prompt, so with a cache each runs alone).
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s.prompt) if cache is None else -1 - i, []).append(i)
    states: list[RWKVState | None] = [None] * len(seqs)
    logits: list[Tensor | None] = [None] * len(seqs)
    for rows in groups.values():
        init = None if state is None else state.select([0] * len(rows) if state.batch_size == 1 else rows)
        st, lg = _prefill_rows(model, [seqs[i].prompt for i in rows], init, chunk_len, cache)
        for j, i in enumerate(rows):
            states[i] = st if len(rows) == 1 else st.select(j)
            logits[i] = lg[j]
    active = list(range(len(seqs)))
    cur_state = RWKVState.concat(states)
    cur_logits = torch.stack(logits)  # [B_active, V]
    while active:
        feed, keep_rows = [], []
        for row, i in enumerate(active):
            s = seqs[i]
            tok, piece = sample_step(s, cur_logits[row], p, max_new)
            if tok is None:
                s.state, s.logits = cur_state.select(row), cur_logits[row]
            if piece is not None:
                yield (i, piece) if batched else piece
            if tok is None:
                continue
            feed.append(tok)
            keep_rows.append(row)
        if not feed:
            break
        # Feed the sampled tokens so that every state has consumed prompt + tokens.
        sub = cur_state if len(keep_rows) == len(active) else cur_state.select(keep_rows)
        out, sub = model(torch.tensor(feed, dtype=torch.long, device=model.device)[:, None], sub)
        out = out[:, -1].float()
        still, still_rows = [], []
        for j, row in enumerate(keep_rows):
            s = seqs[active[row]]
            if s.done is not None:
                s.state, s.logits = sub.select(j), out[j]
                if s.text is not None and (piece := s.flush()):
                    yield (active[row], piece) if batched else piece
            else:
                still.append(active[row])
                still_rows.append(j)
        active = still
        if active:
            cur_state = sub if len(still_rows) == len(keep_rows) else sub.select(still_rows)
            cur_logits = out if len(still_rows) == len(keep_rows) else out[still_rows]
    return _result(seqs, batched)


# ---------------------------------------------------------------------------------------------------
# score


@torch.no_grad()
def score(model, texts_or_tokens, *, tokenizer=None, bos: int | None = None, chunk_len: int = 1024,
          batch_size: int = 8) -> ScoreResult | list[ScoreResult]:
    """Log-likelihood of each token given the ones before it.

    Input: a text, a list of ids, or a list of those (a batch; returns a list). ``bos``: an id put
    before each sequence so that its first token is scored too (World models: 0, the end-of-document
    token); without it the first token is context only. Sequences are run ``batch_size`` at a time,
    padded at the end (padding comes after every scored position, so it changes nothing), in chunks of
    ``chunk_len`` tokens with the state carried, so long texts need bounded memory. Bits per byte is
    ``nll / ln 2 / bytes`` over the UTF-8 bytes of the scored tokens (needs a tokenizer or text input).
    """
    V = _vocab_size(model)
    _check_tokenizer(model, tokenizer)
    if chunk_len <= 0 or batch_size <= 0:
        raise ValueError("chunk_len and batch_size must be > 0")
    x = texts_or_tokens
    single = isinstance(x, (str, Tensor)) or (isinstance(x, Sequence) and len(x) and all(isinstance(t, int) for t in x))
    items = [texts_or_tokens] if single else list(texts_or_tokens)
    if not items:
        raise ValueError("nothing to score")
    if tokenizer is None and any(isinstance(x, str) for x in items):
        tokenizer = _default_tokenizer(model)
    seqs: list[list[int]] = []
    for x in items:
        if isinstance(x, str):
            ids = tokenizer.encode(x)
        else:
            ids = x.reshape(-1).tolist() if isinstance(x, Tensor) else list(x)
        if bos is not None:
            ids = [bos, *ids]
        _check_ids(ids, V, "text")
        if len(ids) < 2:
            raise ValueError("a sequence needs at least 2 tokens to score (or pass bos=...)")
        seqs.append(ids)
    results: list[ScoreResult] = []
    device = model.device
    for b0 in range(0, len(seqs), batch_size):
        group = seqs[b0 : b0 + batch_size]
        T = max(len(s) for s in group)
        tokens = torch.zeros(len(group), T, dtype=torch.long)
        for r, s in enumerate(group):
            tokens[r, : len(s)] = torch.tensor(s)
        tokens = tokens.to(device)
        lp = torch.empty(len(group), T - 1)
        state = None
        for t0 in range(0, T - 1, chunk_len):
            chunk = tokens[:, t0 : min(t0 + chunk_len, T - 1)]
            out, state = model(chunk, state)
            logp = F.log_softmax(out.float(), dim=-1)
            target = tokens[:, t0 + 1 : t0 + 1 + chunk.shape[1]]
            lp[:, t0 : t0 + chunk.shape[1]] = logp.gather(-1, target[..., None])[..., 0].cpu()
        for r, s in enumerate(group):
            row = lp[r, : len(s) - 1].clone()
            n_bytes = len(tokenizer.decode_bytes(s[1:])) if tokenizer is not None else None
            results.append(ScoreResult(row, s, float(-row.double().sum()), len(s) - 1, n_bytes))
    return results[0] if single else results
