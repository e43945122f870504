"""Fixtures for the server tests: a tiny random v7 (256 ids) with the byte tokenizer, and one server
per module, started in-process on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch
from _deps import require

import rwkv_zoo

API_KEY = "test-key-3f9a"


@pytest.fixture(scope="package")
def model():
    return rwkv_zoo.randomize_(rwkv_zoo.build("v7", size="tiny"), 0).eval()  # 2 layers x 64, 256 ids


@pytest.fixture(scope="package")
def tok():
    from rwkv_zoo.tokenizers import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """A tiny model: a second OpenMP thread only adds waiting on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def running(app, timeout: float = 30.0):
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    uvicorn = require("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive(), "the server thread died while starting"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "the server did not shut down in time"
        sock.close()


@pytest.fixture(scope="module")
def server(model, tok):
    """The shared server: max 8 rows, 2 waiting requests, 64-token prefill chunks, an API key."""
    require("fastapi")
    from rwkv_zoo.serve import Engine, create_app

    engine = Engine(model, tok, max_batch=8, max_queue=2, chunk_len=64, cache_bytes=64 << 20)
    app = create_app(engine, model_name="tiny", tokenizer=tok, api_keys=[API_KEY], max_prompt_tokens=1000,
                     max_tokens_limit=4096)
    with running(app) as url:
        yield engine, url


@pytest.fixture(scope="module")
def client(server):
    openai = require("openai")
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=API_KEY, timeout=30, max_retries=0)


@pytest.fixture
def server_api_key() -> str:
    return API_KEY
