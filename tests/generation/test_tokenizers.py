"""World tokenizer: the fast package equals the reference greedy longest match; byte and HF tokenizers."""

from __future__ import annotations

import os
import random
import sys

import pytest
from _deps import CORE, missing, require

from rwkv_zoo.tokenizers import (
    WORLD_VOCAB_FILE,
    ByteTokenizer,
    TokenizerError,
    WorldTokenizer,
    get_tokenizer,
    read_world_vocab,
)


def _random_texts(tokens: list[bytes], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # runs of vocabulary entries: long matches that overlap
            b = b"".join(rng.choice(tokens) for _ in range(rng.randint(1, 20)))
            out.append(b.decode("utf-8", errors="replace"))
        elif kind == 1:
            pools = [(32, 126), (0, 0x2FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
            out.append("".join(chr(rng.randint(*rng.choice(pools))) for _ in range(rng.randint(0, 80))))
        elif kind == 2:
            out.append(" " * rng.randint(1, 200) + "\n" * rng.randint(0, 4) + "\t" * rng.randint(0, 2) + "x")
        else:
            out.append("".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(0, 40))))
    return out


def test_world_examples_from_the_spec(world):
    assert world.vocab_size == 65536
    assert world.encode("Hello world") == [33155, 40213]
    assert world.encode("\n\n") == [261]
    assert world.encode_bytes(b"\x00\xff") == [1, 256]  # byte b is id b + 1
    assert world.decode([33155, 40213]) == "Hello world"
    assert world.encode("") == []


def test_world_vocab_ships_with_an_installed_package(world):
    assert world.vocab_file.name == WORLD_VOCAB_FILE
    assert len(world.idx2token) == 65529
    assert world.idx2token[65529] == b" " * 128


def test_fast_encoder_equals_reference_on_random_strings(world):
    if world._fast is None:
        missing("pyrwkv-tokenizer is not installed: the reference encoder is the only one", CORE)
    tokens = list(world.token2idx)
    for text in _random_texts(tokens, 600):
        assert world.encode(text) == world.encode_bytes(text.encode("utf-8")), repr(text[:50])


def test_reference_equals_the_official_trie_on_invalid_utf8_runs(world):
    rwkv = require("rwkv")
    sys.path.insert(0, os.path.dirname(rwkv.__file__))
    try:
        from rwkv_tokenizer import TRIE_TOKENIZER
    finally:
        sys.path.pop(0)
    trie = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), WORLD_VOCAB_FILE))
    rng = random.Random(1)
    tokens = list(world.token2idx)
    for i in range(400):
        if i % 2:
            data = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 60)))
        else:  # valid tokens glued to stray continuation / lead bytes
            data = b"".join(rng.choice(tokens) + bytes([rng.randint(0x80, 0xFF)]) for _ in range(rng.randint(1, 8)))
        ids = world.encode_bytes(data)
        assert ids == trie.encodeBytes(data)
        assert world.decode_bytes(ids) == data


def test_decode_of_invalid_utf8_gives_replacement_and_eos_is_empty(world):
    assert world.decode(world.encode_bytes(b"ab\xff")) == "ab\ufffd"
    assert world.decode([0]) == ""
    with pytest.raises(TokenizerError, match="not in the World vocabulary"):
        world.decode([65535])


def test_vocab_file_errors(tmp_path):
    bad = tmp_path / "v.txt"
    bad.write_text("1 'ab' 3\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="2 bytes, the line says 3"):
        read_world_vocab(bad)
    bad.write_text("1 ab(\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not '<id> <literal> <length>'"):
        read_world_vocab(bad)
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("gpt2")


def test_custom_vocab_file_uses_the_reference_encoder(tmp_path):
    path = tmp_path / "v.txt"
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)] + ["257 'ab' 2", "258 'abc' 3", "259 b'\\xc3' 1"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = WorldTokenizer(path)
    assert tok._fast is None
    assert tok.encode("abcab a") == [258, 257, 33, 98]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode("héllo €")) == "héllo €"
    assert get_tokenizer("bytes").vocab_size == 256


def test_hf_tokenizer_json(tmp_path):
    tokenizers = require("tokenizers")
    from tokenizers import models, pre_tokenizers

    from rwkv_zoo.tokenizers import HFTokenizer

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello world", "héllo wörld €"] * 20, trainer)
    path = tmp_path / "tok.json"
    bpe.save(str(path))
    tok = get_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == bpe.get_vocab_size()
    ids = tok.encode("héllo wörld €")
    assert tok.decode_bytes(ids) == "héllo wörld €".encode()
    assert tok.decode(ids) == "héllo wörld €"
    with pytest.raises(TokenizerError, match="not found"):
        HFTokenizer(tmp_path / "missing.json")
