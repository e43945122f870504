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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second OpenMP thread only adds waiting on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
