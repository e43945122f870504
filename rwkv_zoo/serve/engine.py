"""The serving engine: one thread that owns the model, a stacked ``RWKVState`` of every running row and
a queue of waiting requests, and advances them together (continuous batching).

A request is one or more prompts with ``n`` choices each; every choice is a row. Each loop iteration

1. drops the rows and prefills of cancelled requests, and admits waiting requests while rows are free
   (a request's rows are reserved when it is admitted, so a running request never waits for memory);
2. prefills: up to ``chunk_len`` prompt tokens in all, in chunks cut where ``generate`` cuts them
   (from the longest cached prefix, ``chunk_len`` tokens at a time), so a long prompt never stalls
   the decoding rows for more than one chunk;
3. decodes one token for every running row: ``rwkv_zoo.generation.sample_step`` on the row's own
   logits, with the row's own ``torch.Generator`` (seeded ``seed + k`` for choice ``k``), then one
   model call over the rows that go on. Finished and cancelled rows leave before that call.

**Exactness.** A choice's tokens equal ``generate(model, prompt, seed=seed + k, ...)`` run alone,
whatever else is running, when two facts about the model's forward path hold: a row of a batch gets
bit-for-bit the logits and state it gets alone (*rows independent*), and a prompt split anywhere and
carried through the state gives bit-for-bit the result of its usual chunks (*split invariant*). The
cpu backend's fused step has both (its matrix kernels compute each row on its own and its prefill is
a token-by-token recurrence); BLAS-based paths (the modules layer by layer, most GPU kernels) pick
their blocking by the number of rows and differ from a lone row in the last bits. ``probe`` measures
both facts on the model at start-up. Where rows are not independent the engine runs each row as its
own batch-1 call (``batching="rows"``: exact, slower); where splits are not invariant the prefix cache
keeps only prefixes that end on a chunk boundary, whose continuation is cut exactly as without it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rwkv_zoo.generation import PrefixCache, SamplingParams, _Seq, sample_step
from rwkv_zoo.model import RWKV
from rwkv_zoo.serve.metrics import Metrics
from rwkv_zoo.state import RWKVState

__all__ = ["Engine", "EngineStopped", "Handle", "QueueFull", "Request", "probe"]

log = logging.getLogger("rwkv_zoo.serve")


class QueueFull(RuntimeError):
    """Every row is taken and the waiting queue is full: try again later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


@dataclass
class Request:
    """What to generate: ``prompts`` (token ids, one list per prompt), ``n`` choices each.

    Choice ``k = prompt_index * n + j`` samples with a generator seeded ``seed + k``, so its tokens are
    those of ``generate(model, prompts, seed=seed)`` for the flattened list of prompts repeated ``n``
    times. ``cache_prefixes``: prompt lengths worth keeping in the prefix cache besides the whole prompt
    (a chat's system prompt).
    """

    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: int
    seed: int
    n: int = 1
    cache_prefixes: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        return self.n * len(self.prompts)


@dataclass
class Handle:
    """A submitted request. ``sink(event)`` is called from the engine's thread with, in order:
    ``("token", k, token_id_or_None, piece_or_None)`` per step of choice ``k`` (``piece`` is text to
    show; None when nothing is ready), ``("done", k, finish_reason, n_tokens)`` once per choice, then
    ``("end", None, None, None)``; or ``("error", None, message, None)`` if the engine failed."""

    request: Request
    sink: Callable[[tuple], Any]
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    remaining: int = 0
    cached_tokens: int = 0


def _emit(handle: Handle, event: tuple) -> None:
    # A sink that fails (its event loop already closed at shutdown) must not take the engine down.
    try:
        handle.sink(event)
    except Exception:
        handle.cancelled = True
        log.debug("a request's sink failed; the request is dropped", exc_info=True)


class _Row:
    __slots__ = ("handle", "k", "seq")

    def __init__(self, handle: Handle, k: int, seq: _Seq):
        self.handle, self.k, self.seq = handle, k, seq


class _Prefill:
    """One prompt being prefilled, chunk by chunk, for the choices ``ks`` of ``handle``."""

    __slots__ = ("boundaries", "handle", "ids", "ks", "logits", "pos", "state")

    def __init__(self, handle: Handle, ids: list[int], ks: list[int]):
        self.handle, self.ids, self.ks = handle, ids, ks
        self.pos = 0
        self.state: RWKVState | None = None
        self.logits: Tensor | None = None
        self.boundaries: list[int] = []


def _forward(model, ids: Sequence[int] | list[list[int]], state: RWKVState | None) -> tuple[Tensor, RWKVState]:
    """``model`` on [B, T] ids; last-position logits [B, V] fp32 (the head only where needed, as generate)."""
    keep = {"logits_to_keep": 1} if isinstance(model, RWKV) else {}
    x = torch.tensor(ids, dtype=torch.long, device=model.device)
    out, state = model(x, state, **keep)
    return out[:, -1].float(), state


def _same(a: tuple[Tensor, RWKVState], b: tuple[Tensor, RWKVState]) -> bool:
    if not torch.equal(a[0], b[0]):
        return False
    return all(torch.equal(x, y) for la, lb in zip(a[1].layers, b[1].layers, strict=True)
               for x, y in zip(la.tensors(), lb.tensors(), strict=True))


@torch.no_grad()
def probe(model, max_batch: int = 8, chunk_len: int = 256) -> tuple[bool, bool]:
    """``(rows_independent, split_invariant)`` measured on ``model``'s forward path (see the module
    docstring): a decode step of 2 and of ``max_batch`` rows against each row alone, and a prompt run
    whole against the same prompt split in two, compared bit for bit (logits and every state tensor)."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, V, (5 + i,), generator=g).tolist() for i in range(3)]
    solo_states = [_forward(model, [p], None)[1] for p in prompts]
    rows_ok = True
    for B in sorted({min(2, max_batch), max(1, max_batch)}):
        if B < 2:
            continue
        toks = torch.randint(0, V, (B,), generator=g).tolist()
        states = [solo_states[i % len(prompts)] for i in range(B)]
        lg, st = _forward(model, [[t] for t in toks], RWKVState.concat(states))
        for i in range(B):
            one = _forward(model, [[toks[i]]], states[i])
            if not _same((lg[i : i + 1], st.select([i])), one):
                rows_ok = False
    ids = torch.randint(0, V, (min(2 * chunk_len, 24),), generator=g).tolist()
    whole = _forward(model, [ids], None)
    cut = len(ids) // 3
    split = _forward(model, [ids[cut:]], _forward(model, [ids[:cut]], None)[1])
    return rows_ok, _same(whole, split)


class Engine:
    """Continuous batching over one model (see the module docstring). Thread-safe ``submit``/``cancel``.

    ``max_batch``: rows decoding or prefilling at once; ``max_queue``: requests waiting beyond those
    (``submit`` raises ``QueueFull`` past it). ``batching``: ``"auto"`` (probe the model: batched where
    rows are independent, else one row at a time), ``"batched"`` or ``"rows"``. ``cache_bytes``: the
    prefix-state cache's bound (0: no cache).
    """

    def __init__(self, model, tokenizer=None, *, max_batch: int = 32, max_queue: int = 64, chunk_len: int = 256,
                 cache_bytes: int = 256 << 20, batching: str = "auto", metrics=None):
        if max_batch < 1 or max_queue < 0 or chunk_len < 1:
            raise ValueError("max_batch and chunk_len must be >= 1 and max_queue >= 0")
        if batching not in ("auto", "batched", "rows"):
            raise ValueError(f"batching must be auto, batched or rows, got {batching!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.chunk_len = max_batch, max_queue, chunk_len
        self.cache = PrefixCache(cache_bytes) if cache_bytes > 0 else None
        rows_ok, split_ok = probe(model, max_batch, chunk_len)
        self.rows_independent, self.split_invariant = rows_ok, split_ok
        self.batched = batching == "batched" or (batching == "auto" and rows_ok)
        self.exact = rows_ok or not self.batched  # "batched" forced on a path where rows differ: not exact
        self.metrics = metrics if metrics is not None else Metrics()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._reserved = 0  # rows of admitted requests (prefilling or decoding)
        self._prefills: list[_Prefill] = []
        self._rows: list[_Row] = []
        self._state: RWKVState | None = None  # the running rows, stacked in self._rows' order
        self._logits: Tensor | None = None  # [len(rows), V] fp32: each row's next-token logits
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_id = 0

    # -- public, any thread ------------------------------------------------------------------------

    def describe(self) -> str:
        how = "rows batched" if self.batched else "one row at a time"
        yes = {True: "yes", False: "no"}
        return (f"{how}, max {self.max_batch} rows (rows independent: {yes[self.rows_independent]}, "
                f"split invariant: {yes[self.split_invariant]}, exact: {yes[self.exact]})")

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rwkv-zoo-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Refuse new requests, end the running ones with an error event, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    def submit(self, request: Request, sink: Callable[[tuple], Any]) -> Handle:
        if request.max_tokens < 1 or not request.prompts or not all(request.prompts):
            raise ValueError("a request needs max_tokens >= 1 and at least one non-empty prompt")
        if request.rows > self.max_batch:
            raise ValueError(f"the request needs {request.rows} rows (prompts x n) but the server runs at most "
                             f"{self.max_batch} (--max-batch)")
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            # Waiting requests that free rows will take at the next step are not queued in the sense of
            # --max-queue: only those beyond the free rows count against it.
            free, beyond = self.max_batch - self._reserved, 0
            for h in self._waiting:
                if beyond or h.request.rows > free:
                    beyond += 1
                else:
                    free -= h.request.rows
            if (beyond or request.rows > free) and beyond >= self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting and every row is busy")
            self._next_id += 1
            handle = Handle(request, sink, id=self._next_id, remaining=request.rows)
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Free the request's rows before the next step (a client that went away)."""
        with self._cond:
            if handle.remaining <= 0 or handle.cancelled:
                return
            handle.cancelled = True
            self.metrics.cancelled += 1
            if handle in self._waiting:
                self._waiting.remove(handle)
            self._cond.notify_all()

    # -- the loop, engine thread only ----------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._prefills or self._rows):
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._drop_cancelled()
                self._prefill_some()
                self._decode_step()
            except Exception as exc:  # a failed model call leaves no state to trust: fail what runs
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(exc).__name__}: {exc}")
            self.metrics.observe_engine(len(self._waiting), len(self._rows), len(self._prefills))
        self._fail_all("the server is shutting down", waiting=True)

    def _admit(self) -> None:
        while self._waiting and self._reserved + self._waiting[0].request.rows <= self.max_batch:
            h = self._waiting.popleft()
            self._reserved += h.request.rows
            n = h.request.n
            for j, ids in enumerate(h.request.prompts):
                job = _Prefill(h, ids, list(range(j * n, (j + 1) * n)))
                if self.cache is not None:
                    hit, st, lg = self.cache.lookup(self.model, ids)
                    if hit:
                        job.pos, job.state, job.logits = hit, st, lg
                        h.cached_tokens += hit
                cuts = set()
                for c in h.request.cache_prefixes:
                    c = c if self.split_invariant else c - c % self.chunk_len
                    if job.pos < c < len(ids):
                        cuts.add(c)
                job.boundaries = sorted(c for c in cuts if c > job.pos)
                self._prefills.append(job)
                self.metrics.prompt_tokens += len(ids)
                self.metrics.cached_prompt_tokens += job.pos

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._prefills if j.handle.cancelled]:
            self._prefills.remove(job)
            self._release_rows(len(job.ks))
        keep = [i for i, r in enumerate(self._rows) if not r.handle.cancelled]
        if len(keep) != len(self._rows):
            self._release_rows(len(self._rows) - len(keep))
            self._keep(keep)

    def _release_rows(self, count: int) -> None:
        with self._cond:
            self._reserved -= count

    def _keep(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._state = self._logits = None
        elif len(keep) != self._logits.shape[0]:
            self._state = self._state.select(keep)
            self._logits = self._logits[keep]

    def _prefill_some(self) -> None:
        """Up to ``chunk_len`` prompt tokens in all, oldest prompts first, each in generate's chunks."""
        budget = self.chunk_len
        while self._prefills and budget > 0:
            job = self._prefills[0]
            if job.pos < len(job.ids):
                # A chunk runs from job.pos for chunk_len tokens (generate's cut), ending early only at a
                # prefix worth caching, and only where splits are invariant (else boundaries are aligned).
                end = min(job.pos + self.chunk_len, len(job.ids))
                for b in job.boundaries:
                    if job.pos < b < end:
                        end = b
                        break
                job.logits, job.state = _forward(self.model, [job.ids[job.pos : end]], job.state)
                job.logits = job.logits[0]
                budget -= end - job.pos
                self.metrics.prefill_tokens += end - job.pos
                job.pos = end
                worth = end in job.boundaries or end == len(job.ids)
                if self.cache is not None and worth and (self.split_invariant or end % self.chunk_len == 0):
                    self.cache.put(self.model, job.ids[:end], job.state, job.logits)
            if job.pos >= len(job.ids):
                self._prefills.pop(0)
                self._join(job)

    def _join(self, job: _Prefill) -> None:
        req = job.handle.request
        n = len(job.ks)
        state = job.state.select([0] * n)  # a copy: a cached state is shared with later requests
        logits = job.logits.reshape(1, -1).expand(n, -1)
        for k in job.ks:
            seq = _Seq(job.ids, self.tokenizer, req.seed + k, self.model.device)
            self._rows.append(_Row(job.handle, k, seq))
        if self._state is None:
            self._state, self._logits = state, logits.clone()
        else:
            self._state = RWKVState.concat([self._state, state])
            self._logits = torch.cat([self._logits, logits])

    def _decode_step(self) -> None:
        if not self._rows:
            return
        now = time.perf_counter()
        feed, keep = [], []
        for i, row in enumerate(self._rows):
            h, seq, p = row.handle, row.seq, row.handle.request.params
            tok, piece = sample_step(seq, self._logits[i], p, h.request.max_tokens)
            if h.first_token is None:
                h.first_token = now
                self.metrics.observe_ttft(now - h.submitted)
            if seq.done is not None and seq.done != "stop_token" and seq.text is not None:
                tail = seq.flush()  # generate flushes after feeding the last token; nothing depends on it
                piece = (piece or "") + tail if tail or piece else None
            _emit(h, ("token", row.k, tok, piece))
            if tok is not None:
                self.metrics.generation_tokens += 1
            if seq.done is None:
                feed.append(tok)
                keep.append(i)
                continue
            _emit(h, ("done", row.k, seq.done, len(seq.tokens)))
            h.remaining -= 1
            self._release_rows(1)
            if h.remaining == 0:
                _emit(h, ("end", None, None, None))
                self.metrics.completed += 1
        self._keep(keep)
        if not feed:
            return
        if self.batched:
            self._logits, self._state = _forward(self.model, [[t] for t in feed], self._state)
        else:  # one batch-1 call per row: what generate computes for a lone prompt
            outs = [_forward(self.model, [[t]], self._state.select([i])) for i, t in enumerate(feed)]
            self._logits = torch.cat([o[0] for o in outs])
            self._state = RWKVState.concat([o[1] for o in outs])
        self.metrics.observe_step(time.perf_counter() - now, len(feed))

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        handles = {id(r.handle): r.handle for r in self._rows}
        handles.update({id(j.handle): j.handle for j in self._prefills})
        with self._cond:
            if waiting:
                handles.update({id(h): h for h in self._waiting})
                self._waiting.clear()
            self._reserved = 0
        self._rows, self._prefills = [], []
        self._state = self._logits = None
        for h in handles.values():
            h.remaining = 0
            _emit(h, ("error", None, message, None))
