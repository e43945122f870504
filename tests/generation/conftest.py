"""Fixtures for the generation tests: one random tiny v7 model and the byte tokenizer."""

from __future__ import annotations

import pytest

import rwkv_zoo
from rwkv_zoo.tokenizers import ByteTokenizer


@pytest.fixture(scope="session")
def tiny():
    return rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), 0).eval()


@pytest.fixture(scope="session")
def other_tiny():
    return rwkv_zoo.randomize_(rwkv_zoo.build("v6", size="tiny"), 1).eval()


@pytest.fixture(scope="session")
def byte_tok():
    return ByteTokenizer()


@pytest.fixture(scope="session")
def world():
    from rwkv_zoo.tokenizers import WorldTokenizer

    return WorldTokenizer()
