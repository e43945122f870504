"""Data: synthetic tasks are deterministic and their labels are right; binidx and text streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from binidx_writer import write_binidx

from rwkv_zoo.data import IGNORE, MQAR, Copying, SelectiveCopying, binidx, make_data, read_binidx_index, text_file
from rwkv_zoo.data.synthetic import FILLER, SEP

TASKS = [MQAR(num_pairs=6, seq_len=40), MQAR(num_pairs=(2, 5), num_keys=8, num_values=4), Copying(length=7),
         SelectiveCopying(length=5, region=20)]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.describe())
def test_tasks_are_deterministic_by_seed_and_step(task):
    a = task.batch(seed=3, step=11, n=16)
    b = task.batch(seed=3, step=11, n=16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], task.batch(seed=3, step=12, n=16)[0])
    assert not torch.equal(a[0], task.batch(seed=4, step=11, n=16)[0])
    assert not torch.equal(a[0], task.batch(seed=3, step=11, n=16, split="eval")[0])
    inputs, targets = a
    assert inputs.shape == targets.shape == (16, task.seq_len)
    assert inputs.dtype == targets.dtype == torch.long
    assert int(inputs.min()) >= 0 and int(inputs.max()) < task.vocab_size
    sup = targets != IGNORE
    assert sup.any() and int(targets[sup].max()) < task.vocab_size
    # targets are the next inputs wherever they are asked for
    assert torch.equal(targets[:, :-1][sup[:, :-1]], inputs[:, 1:][sup[:, :-1]])


def test_mqar_labels_are_the_values_of_the_queried_keys():
    task = MQAR(num_pairs=(3, 8), seq_len=48, num_keys=10, num_values=5)
    inputs, targets = task.batch(0, 0, 64)
    keys, values = set(task.key_ids()), set(task.value_ids())
    counts = set()
    for x, y in zip(inputs.tolist(), targets.tolist(), strict=True):
        pairs = {}
        t = 0
        while t + 1 < len(x) and x[t] in keys and x[t + 1] in values and x[t] not in pairs:
            pairs[x[t]] = x[t + 1]
            t += 2
        P = len(pairs)
        counts.add(P)
        asked = [(x[i], y[i]) for i in range(len(x)) if y[i] != IGNORE]
        assert sorted(k for k, _ in asked) == sorted(pairs), "every key is queried exactly once"
        assert all(v == pairs[k] for k, v in asked), "each answer is the value paired with the key"
        assert all(i >= 2 * P for i in range(len(x)) if y[i] != IGNORE), "queries come after the context"
        rest = [tok for tok in x[2 * P :] if tok != FILLER]
        assert len(rest) in (2 * P, 2 * P - 1)  # the last value may fall outside the inputs
    assert counts == {3, 8}
    assert set(task.eval_variants()) == {"pairs=3", "pairs=8"}


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError, match="distinct keys"):
        MQAR(num_pairs=9, num_keys=8)
    with pytest.raises(ValueError, match="too short"):
        MQAR(num_pairs=8, seq_len=20)
    with pytest.raises(ValueError, match="unknown option.*num_pair.*options"):
        make_data({"task": "mqar", "num_pair": 3})
    with pytest.raises(ValueError, match="unknown task 'mqr'"):
        make_data({"task": "mqr"})


def test_copying_and_selective_copying_labels():
    inputs, targets = Copying(length=6, num_symbols=5).batch(1, 2, 8)
    for x, y in zip(inputs, targets, strict=True):
        assert x[6] == SEP and (y[:6] == IGNORE).all()
        assert torch.equal(y[6:], x[:6])
    task = SelectiveCopying(length=4, region=12, num_symbols=5)
    inputs, targets = task.batch(1, 2, 8)
    for x, y in zip(inputs, targets, strict=True):
        data = x[:12][x[:12] != FILLER]
        assert len(data) == 4 and x[12] == SEP
        assert torch.equal(y[12:], data) and (y[:12] == IGNORE).all()


def test_binidx_reads_what_the_writer_wrote(tmp_path):
    docs = [[1, 2, 3], [400, 500], list(range(1000, 1200))]
    prefix = write_binidx(tmp_path / "corpus", docs)
    index = read_binidx_index(f"{prefix}.idx")
    assert index.dtype == "uint16" and index.sizes.tolist() == [3, 2, 200]
    assert index.pointers.tolist() == [0, 6, 10]
    stream = binidx(prefix)
    assert isinstance(stream.tokens, np.memmap)
    assert stream.tokens.tolist() == [t for d in docs for t in d]
    assert stream.vocab_size == 1200 and len(stream) == 205
    assert binidx(f"{prefix}.bin", vocab_size=65536).vocab_size == 65536
    x, y = stream.batch(seed=0, step=5, n=4, seq_len=16)
    x2, _ = stream.batch(seed=0, step=5, n=4, seq_len=16)
    assert torch.equal(x, x2) and torch.equal(x[:, 1:], y[:, :-1])
    # training windows never reach the held-out part
    split = stream.split_point(16)
    flat = stream.tokens.tolist()
    for step in range(20):
        for row in stream.batch(0, step, 4, 16)[0].tolist():
            start = next(i for i in range(len(flat)) if flat[i : i + 16] == row)
            assert start + 17 <= split
    ex, _ = stream.eval_batch(0, 2, 16)
    assert ex[0].tolist() == flat[split : split + 16]


def test_binidx_errors(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"NOTANIDX" + b"\0" * 40)
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a binidx index"):
        binidx(tmp_path / "bad")
    prefix = write_binidx(tmp_path / "short", [[1, 2, 3]])
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="holds 4 tokens but .* describes 3"):
        binidx(prefix)


def test_text_file_is_byte_level(tmp_path):
    path = tmp_path / "t.txt"
    text = "héllo wörld\n" * 50
    path.write_text(text, encoding="utf-8")
    stream = make_data({"text": str(path)})
    assert stream.vocab_size == 256 and stream.bytes_per_token == 1.0
    assert bytes(stream.tokens[:6].tolist()) == "héllo".encode()
    assert len(stream) == len(text.encode())

    class Words:
        vocab_size = 100

        def encode(self, s):
            return [len(w) for w in s.split()]

    world = make_data({"text": str(path), "tokenizer": "world"})
    assert world.vocab_size == 65536 and 1 < world.bytes_per_token < len(text.encode())
    assert make_data({"text": str(path), "tokenizer": "bytes"}).vocab_size == 256
    words = text_file(path, tokenizer=Words())
    assert words.vocab_size == 100 and words.tokens.tolist()[:2] == [5, 5]
    assert math.isclose(words.bytes_per_token, len(text.encode()) / 100)
