"""An EleutherAI lm-evaluation-harness model adapter: ``python -m rwkv_zoo.harness --model rwkv_zoo``.

Importing this module imports ``lm_eval`` and registers :class:`RWKVZooLM` under the name
``"rwkv_zoo"`` (``import rwkv_zoo`` never imports it, so the package stays light). lm_eval finds
models only in its own registry (no plugin entry points), so its command line is run through this
module: ``python -m rwkv_zoo.harness run --model rwkv_zoo --model_args pretrained=FILE --tasks ...``
takes every ``lm_eval`` flag. In Python::

    import rwkv_zoo.harness
    lm_eval.simple_evaluate(model="rwkv_zoo", model_args="pretrained=RWKV-x070-World-1.5B.pth",
                            tasks=["lambada_openai"])

or ``rwkv_zoo.harness.evaluate(path_or_model, ["lambada_openai"])``, or ``rwkv-zoo lm-eval MODEL
--tasks lambada_openai`` on the command line.

Model args (``key=value,...`` or a dict): ``pretrained`` (a checkpoint file for ``rwkv_zoo.load``, a
model name such as ``v7-tiny``, built with random weights, or an ``RWKV`` object), ``tokenizer``
(``world``, ``bytes``, a tokenizer ``.json`` such as Pile's ``20B_tokenizer.json``, a World vocab
``.txt``; default: by vocabulary size), ``batch_size``, ``device``, ``dtype`` (fp32, bf16, fp16),
``backend`` (a WKV kernel backend), ``chunk_len`` (prefill chunk, tokens) and ``prefix`` (below).

How a request becomes tokens (the choice that makes published RWKV numbers reproducible):

* Context and continuation are tokenized **separately**: ``prefix + encode(context)`` is the context
  and ``encode(continuation)`` the scored part, after moving the context's trailing whitespace to the
  front of the continuation (lm_eval's convention). That is what BlinkDL's own LAMBADA check does
  (RWKV-LM ``RWKV-v7/rwkv_v7_demo.py``: ``src = [0] + encode(text.rsplit(' ', 1)[0])``,
  ``dst = encode(' ' + last word)``), and lm_eval's ``lambada_openai`` builds the same pair
  (context = every word but the last, continuation = ``' ' + last word``). Encoding
  ``context + continuation`` as one string and splitting, as HF models do in lm_eval, can merge
  tokens across the boundary with the World tokenizer's greedy longest match, which would score
  different tokens from the official numbers.
* ``prefix``: what goes before every context. ``eod`` (default) is token 0, the end-of-document
  token that separates documents in RWKV training data, so the model starts as at a document start;
  BlinkDL's LAMBADA check prepends it. ``newline`` is ``encode("\\n")``, the pad of BlinkDL's
  lm_eval scripts (ChatRWKV/RWKV-LM ``run_lm_eval.py``, ``RWKV_PAD``), for their tables; ``none``
  prepends nothing (an empty context then falls back to token 0, as lm_eval does with EOT).
* ``loglikelihood``: the sum of ``log p(continuation token | everything before)``; ``is_greedy`` is
  true when every continuation token is the argmax. Exact: RWKV has no context window, so nothing
  is truncated. Requests sharing a context prefill it once (and a :class:`PrefixCache` keeps recent
  context states), then their continuations run as one padded batch from the context states.
* ``loglikelihood_rolling`` (perplexity tasks): ``rwkv_zoo.score`` over ``prefix + encode(text)``,
  whole text, in chunks of ``chunk_len`` with the state carried; the prefix itself is not scored.
* ``generate_until``: greedy ``rwkv_zoo.generate`` from ``prefix + encode(context)`` with the
  request's ``until`` strings and token 0 as stops, at most ``max_gen_toks`` tokens (default 256);
  ``do_sample=True`` with a temperature samples instead (``seed`` model arg).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from rwkv_zoo.generation import PrefixCache, _prefill, generate, score
from rwkv_zoo.state import RWKVState

__all__ = ["RWKVZooLM", "evaluate", "main"]

EOD = 0  # the end-of-document token of World and Pile vocabularies (and NUL for the byte tokenizer)
PREFIXES = ("eod", "newline", "none")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
DEFAULT_MAX_GEN_TOKS = 256


def _usable_device(device):
    """``device``, or the CPU with a one-line warning where it asks for CUDA that this torch cannot use
    (lm_eval's own command line passes ``cuda`` when no ``--device`` is given; its HF model falls back
    the same way)."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"rwkv_zoo: device={device} but CUDA is not available here; running on the CPU",
                      stacklevel=3)
        return "cpu"
    return device


def _load(pretrained, *, device, dtype, backend, seed: int):
    """A model from a checkpoint path, a model name (random weights, with a warning) or an RWKV object."""
    import rwkv_zoo

    device = _usable_device(device)
    if isinstance(pretrained, torch.nn.Module):
        if device is not None or dtype is not None:
            pretrained = pretrained.to(device=device, dtype=dtype)
        return pretrained.eval()
    spec = str(pretrained)
    if os.path.exists(spec):
        return rwkv_zoo.load(spec, device=device, dtype=dtype, backend=backend)
    try:
        model = rwkv_zoo.build(spec, device=device, dtype=dtype, backend=backend)
    except ValueError as exc:
        raise ValueError(f"pretrained={spec!r} is neither a checkpoint file nor a model name: {exc}") from exc
    warnings.warn(f"{spec} is a model name: random weights (seed {seed}); give a checkpoint file for real scores",
                  stacklevel=3)
    return rwkv_zoo.randomize_(model, seed).eval()


def _tokenizer(model, name):
    """The tokenizer named, or the one the vocabulary implies (World for 65,536 ids, bytes for test models)."""
    from rwkv_zoo.tokenizers import PILE_VOCAB_SIZE, WORLD_VOCAB_SIZE, get_tokenizer

    V = model.config.vocab_size
    if name in (None, "", "auto"):
        if V == WORLD_VOCAB_SIZE:
            name = "world"
        elif V >= PILE_VOCAB_SIZE:
            raise ValueError(f"the model's vocabulary is {V} (a Pile model?): pass tokenizer=PATH/20B_tokenizer.json")
        elif V >= 256:
            name = "bytes"
        else:
            raise ValueError(f"no tokenizer fits a vocabulary of {V}: pass tokenizer=...")
    tok = get_tokenizer(name) if isinstance(name, (str, os.PathLike)) else name
    if tok.vocab_size > V:
        raise ValueError(f"tokenizer {tok!r} has {tok.vocab_size} ids but the model's vocabulary is {V}")
    return tok


def _batch_size(value) -> int:
    # lm_eval passes "auto" / "auto:N" from its CLI; RWKV's memory does not grow with the context, so a
    # fixed size is as good a guess as a probe would be.
    if isinstance(value, str) and value.startswith("auto"):
        return 16
    n = int(value)
    if n < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return n


def _progress(total: int, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=disable or total == 0)


@register_model("rwkv_zoo", "rwkv-zoo")
class RWKVZooLM(LM):
    """Every rwkv_zoo model (v4-v7) as an lm_eval ``LM``; see the module docstring for the semantics."""

    def __init__(
        self,
        pretrained: Any = "v7-tiny",
        tokenizer: Any = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str | None = None,
        chunk_len: int = 1024,
        prefix: str = "eod",
        seed: int = 0,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        cache_bytes: int = 256 << 20,
        **kwargs,
    ):
        super().__init__()
        # simple_evaluate adds max_batch_size (and CLI users pass trust_remote_code etc.): nothing to do here.
        unknown = set(kwargs) - {"max_batch_size", "trust_remote_code", "parallelize"}
        if unknown:
            raise TypeError(f"rwkv_zoo: unknown model args {sorted(unknown)}")
        if isinstance(dtype, str):
            if dtype.lower() in ("", "auto", "none"):
                dtype = None
            elif dtype.lower() in _DTYPES:
                dtype = _DTYPES[dtype.lower()]
            else:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or auto, got {dtype!r}")
        if prefix is None:  # lm_eval's arg-string parser turns "prefix=none" into None
            prefix = "none"
        if prefix not in PREFIXES:
            raise ValueError(f"prefix must be one of {PREFIXES}, got {prefix!r}")
        self.chunk_len = int(chunk_len)
        if self.chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len!r}")
        self.model = _load(pretrained, device=device, dtype=dtype, backend=backend, seed=int(seed))
        self.tokenizer = _tokenizer(self.model, tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.prefix_name = prefix
        self.prefix: list[int] = {"eod": [EOD], "newline": self.tokenizer.encode("\n"), "none": []}[prefix]
        self.seed = int(seed)
        self.max_gen_toks = int(max_gen_toks)
        self.cache = PrefixCache(int(cache_bytes))
        self._device = self.model.device

    @property
    def tokenizer_name(self) -> str:
        # fingerprints lm_eval's request cache: the same texts tokenize differently with another vocab
        return repr(self.tokenizer).replace("/", "__")

    # -- tokens -----------------------------------------------------------------------------------

    def _context(self, text: str) -> list[int]:
        ids = self.prefix + self.tokenizer.encode(text)
        return ids or [EOD]  # an empty context still needs a token to predict from

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing whitespace belongs to the next word: " word" is one token, "word" after " " is not.
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return self._context(context), self.tokenizer.encode(continuation)

    # -- lm_eval API ------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self.loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]],
                             disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), every token greedy?)`` for token-id pairs."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        # Sorting the contexts puts requests with the same context side by side (one prefill for all
        # the choices of a multiple-choice question) and a context right after its own prefixes, where
        # the prefix cache finds them.
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
        bar = _progress(len(pairs), "rwkv_zoo loglikelihood", disable_tqdm)
        for b0 in range(0, len(order), self.batch_size):
            batch = order[b0 : b0 + self.batch_size]
            for i, res in zip(batch, self._score_batch([pairs[i] for i in batch]), strict=True):
                results[i] = res
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        model, V = self.model, self.model.config.vocab_size
        ctx_runs: dict[tuple[int, ...], tuple[RWKVState, torch.Tensor]] = {}
        for ctx, cont in pairs:
            for t in (*ctx, *cont):
                if not 0 <= t < V:
                    raise ValueError(f"token id {t} is out of range for the model's vocabulary of {V}")
            if tuple(ctx) not in ctx_runs:
                ctx_runs[tuple(ctx)] = _prefill(model, list(ctx), None, self.chunk_len, self.cache)
        # Scored position 0 of each continuation is predicted by its context's last logits; the rest
        # by running cont[:-1] from the context state. Rows are padded at the end, after every scored
        # position, so padding never reaches a score.
        first = torch.stack([ctx_runs[tuple(ctx)][1] for ctx, _ in pairs])  # [B, V] fp32
        lps = [[] for _ in pairs]
        greedy = [[] for _ in pairs]
        first_lp = F.log_softmax(first, dim=-1)
        first_arg = first.argmax(-1)
        for r, (_, cont) in enumerate(pairs):
            if cont:
                lps[r].append(float(first_lp[r, cont[0]]))
                greedy[r].append(int(first_arg[r]) == cont[0])
        T = max(len(cont) for _, cont in pairs) - 1
        if T > 0:
            feed = torch.zeros(len(pairs), T, dtype=torch.long)
            target = torch.zeros(len(pairs), T, dtype=torch.long)
            for r, (_, cont) in enumerate(pairs):
                if len(cont) > 1:
                    feed[r, : len(cont) - 1] = torch.tensor(cont[:-1])
                    target[r, : len(cont) - 1] = torch.tensor(cont[1:])
            feed, target = feed.to(model.device), target.to(model.device)
            state = RWKVState.concat([ctx_runs[tuple(ctx)][0] for ctx, _ in pairs])
            lp_all, hit_all = [], []
            for t0 in range(0, T, self.chunk_len):
                out, state = model(feed[:, t0 : t0 + self.chunk_len], state)
                out = out.float()
                tgt = target[:, t0 : t0 + self.chunk_len]
                lp_all.append(F.log_softmax(out, dim=-1).gather(-1, tgt[..., None])[..., 0].cpu())
                hit_all.append((out.argmax(-1) == tgt).cpu())
            lp_t, hit_t = torch.cat(lp_all, 1), torch.cat(hit_all, 1)
            for r, (_, cont) in enumerate(pairs):
                n = len(cont) - 1
                if n > 0:
                    lps[r].extend(lp_t[r, :n].tolist())
                    greedy[r].extend(hit_t[r, :n].tolist())
        # Summed in Python floats (doubles): a long continuation loses nothing to fp32 accumulation.
        return [(float(sum(lp)), bool(all(g))) for lp, g in zip(lps, greedy, strict=True)]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pre = self.prefix or [EOD]  # the first text token needs something to be predicted from
        seqs = [pre + self.tokenizer.encode(req.args[0]) for req in requests]
        results: list[float] = [0.0] * len(seqs)  # an empty text has log-likelihood 0
        # Similar lengths together: score() pads each batch to its longest sequence.
        order = sorted((i for i, s in enumerate(seqs) if len(s) > len(pre)), key=lambda i: len(seqs[i]))
        n_skip = len(pre) - 1  # score() predicts every token after the first: skip the prefix's own
        bar = _progress(len(order), "rwkv_zoo loglikelihood_rolling", disable_tqdm)
        for b0 in range(0, len(order), self.batch_size):
            batch = order[b0 : b0 + self.batch_size]
            for i, res in zip(batch, score(self.model, [seqs[i] for i in batch], chunk_len=self.chunk_len,
                                           batch_size=self.batch_size), strict=True):
                results[i] = float(res.logprobs[n_skip:].double().sum())
            bar.update(len(batch))
        bar.close()
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        # One generate() call per batch of requests with the same settings (stops, length, sampling).
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self._gen_settings(req.args[1]), []).append(i)
        bar = _progress(len(requests), "rwkv_zoo generate_until", disable_tqdm)
        for (until, max_new, temperature, top_p, top_k), idx in groups.items():
            idx.sort(key=lambda i: len(requests[i].args[0]))
            for b0 in range(0, len(idx), self.batch_size):
                batch = idx[b0 : b0 + self.batch_size]
                prompts = [self._context(requests[i].args[0]) for i in batch]
                res = generate(self.model, prompts, tokenizer=self.tokenizer, max_new_tokens=max_new,
                               temperature=temperature, top_p=top_p, top_k=top_k, stop=[*until, EOD],
                               seed=self.seed, chunk_len=self.chunk_len, cache=self.cache)
                for i, text in zip(batch, res.text, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _gen_settings(self, gen_kwargs) -> tuple:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(u for u in until if u)
        max_new = int(kw.pop("max_gen_toks", None) or kw.pop("max_new_tokens", None) or self.max_gen_toks)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if not kw.pop("do_sample", False) or temperature == 0:
            return until, max_new, 0.0, 1.0, 0  # greedy: lm_eval's default for generation tasks
        return until, max_new, temperature, float(kw.pop("top_p", 1.0) or 1.0), int(kw.pop("top_k", 0) or 0)


def evaluate(model_or_path, tasks: str | Sequence, *, limit: int | float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, tokenizer=None, device: str | None = None,
             dtype: str | None = None, backend: str | None = None, chunk_len: int = 1024, prefix: str = "eod",
             **simple_evaluate_kwargs) -> dict:
    """Run lm_eval tasks on a model (an ``RWKV`` object, a checkpoint path or a model name); returns
    ``lm_eval.simple_evaluate``'s result dict (``result["results"][task]["acc,none"]``, ...)."""
    import lm_eval

    lm = RWKVZooLM(model_or_path, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype,
                   backend=backend, chunk_len=chunk_len, prefix=prefix)
    if isinstance(tasks, (str, dict)):
        tasks = [tasks]
    simple_evaluate_kwargs.setdefault("bootstrap_iters", 0)  # stderr by bootstrap is slow; opt in
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                   **simple_evaluate_kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's own command line with the ``rwkv_zoo`` model registered: ``python -m rwkv_zoo.harness
    run --model rwkv_zoo --model_args pretrained=FILE --tasks ...``, any lm_eval flag.

    The harness finds models only through its own registry, filled by imports (it has no plugin entry
    points for models), so a bare ``lm_eval --model rwkv_zoo`` cannot see this adapter; this module,
    having registered it on import, hands the arguments to lm_eval's ``cli_evaluate``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
