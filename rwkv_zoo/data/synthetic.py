"""Synthetic tasks generated in code: multi-query associative recall, copying, selective copying.

Every task is a frozen dataclass with ``seq_len`` (the model's T), ``vocab_size`` (the smallest model
vocabulary that holds its tokens) and ``sample(n, generator) -> (inputs [n, T], targets [n, T])``:
``targets[b, t]`` is the token the model must predict after reading ``inputs[b, : t + 1]``, or
``IGNORE`` (-100, what ``cross_entropy`` skips) where nothing is asked. Samples are a pure function of
the generator, so ``task.batch(seed, step, n)`` is deterministic and needs no saved data position.

Token layout (small ids so a tiny model's vocabulary holds every task): 0 is filler/noise, 1 a
separator; keys, values and symbols follow. Tasks:

- ``MQAR`` (multi-query associative recall, as in the Zoology study, arXiv:2312.04927): ``P`` key-value
  pairs, then every key queried once, in random order, at random places in the rest of the sequence
  (filler between queries); each query key is followed by its value, which is the target.
  Difficulty grows with the number of pairs and the distance between a pair and its query.
- ``Copying``: ``L`` random symbols, a separator, then the same symbols again (targets: the copy).
- ``SelectiveCopying`` (arXiv:2312.00752): ``L`` symbols scattered in order among filler in a region
  of ``region`` tokens, a separator, then the symbols in order with the filler dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

IGNORE = -100  # the ignore_index of torch.nn.functional.cross_entropy
FILLER = 0
SEP = 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator for one batch: a pure function of (seed, step, stream), so any batch can be
    regenerated without replaying the ones before it (resume, sharding by rank)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def _random_subsets(n: int, population: int, k: int, g: torch.Generator) -> Tensor:
    """``n`` random k-subsets of ``range(population)``, each in random order: [n, k]."""
    return torch.argsort(torch.rand(n, population, generator=g), dim=1)[:, :k]


@dataclass(frozen=True)
class Task:
    """Base of the synthetic tasks (see the module docstring for the contract)."""

    name: ClassVar[str] = ""

    # Every task has ``seq_len`` and ``vocab_size`` (a field or a property).
    seq_len: ClassVar[int]
    vocab_size: ClassVar[int]

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def batch(self, seed: int, step: int, n: int, split: str = "train") -> tuple[Tensor, Tensor]:
        """Batch ``step`` of ``n`` sequences; ``split="eval"`` draws from a separate stream."""
        return self.sample(n, step_generator(seed, step, 0 if split == "train" else 1))

    def eval_variants(self) -> dict[str, Task]:
        """Tasks evaluated besides this one (e.g. MQAR at each number of pairs): label -> task."""
        return {}

    def describe(self) -> str:
        fields_ = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "task")
        return f"{self.name}({fields_})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"task": self.name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}}


@dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall.

    ``num_pairs``: key-value pairs per sequence; a tuple trains on a mixture (each sequence draws one
    count), and evaluation then reports accuracy at every count. ``seq_len``: the model's T (default
    ``4 * max(num_pairs)``: queries back to back, no filler). Keys are distinct within a sequence and
    drawn from ``num_keys`` ids; values from ``num_values`` ids (repeats allowed).
    """

    num_pairs: int | tuple[int, ...] = 8
    seq_len: int | None = None  # type: ignore[misc]  (resolved to an int in __post_init__)
    num_keys: int = 32
    num_values: int = 32

    name: ClassVar[str] = "mqar"

    def __post_init__(self) -> None:
        if isinstance(self.num_pairs, list):
            object.__setattr__(self, "num_pairs", tuple(self.num_pairs))
        pairs = self.pairs
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", 4 * max(pairs))
        if min(pairs) < 1:
            raise ValueError(f"mqar: num_pairs must be >= 1, got {self.num_pairs}")
        if max(pairs) > self.num_keys:
            raise ValueError(f"mqar: {max(pairs)} pairs need distinct keys, but num_keys={self.num_keys}")
        if self.seq_len < 4 * max(pairs):
            raise ValueError(f"mqar: seq_len={self.seq_len} is too short for {max(pairs)} pairs and their "
                             f"queries (needs >= {4 * max(pairs)})")

    @property
    def pairs(self) -> tuple[int, ...]:
        return tuple(self.num_pairs) if isinstance(self.num_pairs, (tuple, list)) else (int(self.num_pairs),)

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return 2 + self.num_keys + self.num_values

    def key_ids(self) -> range:
        return range(2, 2 + self.num_keys)

    def value_ids(self) -> range:
        return range(2 + self.num_keys, 2 + self.num_keys + self.num_values)

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        T = self.seq_len
        seq = torch.full((n, T + 1), FILLER, dtype=torch.long)
        supervised = torch.zeros(n, T + 1, dtype=torch.bool)  # positions of query values in seq
        pairs = self.pairs
        which = torch.randint(0, len(pairs), (n,), generator=g) if len(pairs) > 1 else torch.zeros(n, dtype=torch.long)
        for i, P in enumerate(pairs):
            # One count (the common case): every row, written in place rather than gathered and put back.
            rows = slice(None) if len(pairs) == 1 else (which == i).nonzero().squeeze(1)
            m = n if len(pairs) == 1 else len(rows)
            if m == 0:
                continue
            keys = _random_subsets(m, self.num_keys, P, g) + 2
            values = torch.randint(0, self.num_values, (m, P), generator=g) + 2 + self.num_keys
            ctx = torch.stack([keys, values], 2).reshape(m, 2 * P)
            # Queries: every key once, in random order, each at one of the two-token slots after the
            # context (T + 1 - 2P positions hold (T + 1 - 2P) // 2 slots), in increasing position.
            order = _random_subsets(m, P, P, g)
            slots = (T + 1 - 2 * P) // 2
            where = torch.sort(_random_subsets(m, slots, P, g), dim=1).values * 2 + 2 * P  # [m, P]
            block = seq[rows]
            block[:, : 2 * P] = ctx
            block.scatter_(1, where, keys.gather(1, order))
            block.scatter_(1, where + 1, values.gather(1, order))
            sup = supervised[rows]
            sup.scatter_(1, where + 1, True)
            if len(pairs) > 1:  # advanced indexing gave copies
                seq[rows] = block
                supervised[rows] = sup
        inputs = seq[:, :-1]
        targets = torch.where(supervised[:, 1:], seq[:, 1:], IGNORE)
        return inputs, targets

    def eval_variants(self) -> dict[str, Task]:
        if len(self.pairs) == 1:
            return {}
        return {f"pairs={p}": replace(self, num_pairs=p) for p in self.pairs}


@dataclass(frozen=True)
class Copying(Task):
    """Copy ``length`` random symbols (from ``num_symbols``) after a separator."""

    length: int = 16
    num_symbols: int = 16

    name: ClassVar[str] = "copying"

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return 2 * self.length

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return 2 + self.num_symbols

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        L = self.length
        data = torch.randint(0, self.num_symbols, (n, L), generator=g) + 2
        seq = torch.cat([data, torch.full((n, 1), SEP), data], 1)  # [n, 2L + 1]
        inputs, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, : L] = IGNORE  # before the separator nothing can be known
        return inputs, targets


@dataclass(frozen=True)
class SelectiveCopying(Task):
    """``length`` symbols scattered (in order) among filler in ``region`` tokens; after the separator,
    the symbols in order."""

    length: int = 8
    region: int = 32
    num_symbols: int = 16

    name: ClassVar[str] = "selective_copying"

    def __post_init__(self) -> None:
        if self.region < self.length:
            raise ValueError(f"selective_copying: region={self.region} cannot hold length={self.length} symbols")

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return self.region + self.length

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return 2 + self.num_symbols

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        L, R = self.length, self.region
        data = torch.randint(0, self.num_symbols, (n, L), generator=g) + 2
        where = torch.sort(_random_subsets(n, R, L, g), dim=1).values
        region = torch.full((n, R), FILLER, dtype=torch.long).scatter_(1, where, data)
        seq = torch.cat([region, torch.full((n, 1), SEP), data], 1)  # [n, R + 1 + L]
        inputs, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, : R] = IGNORE
        return inputs, targets


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, Copying, SelectiveCopying)}


def make_task(spec: dict[str, Any]) -> Task:
    """A task from a dict such as ``{"task": "mqar", "num_pairs": [4, 8], "seq_len": 64}``."""
    spec = dict(spec)
    name = spec.pop("task", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for task {name}; its options: {', '.join(valid)}")
    return cls(**spec)
