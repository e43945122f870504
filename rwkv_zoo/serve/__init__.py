"""An OpenAI-compatible server with exact continuous batching (``rwkv-zoo serve``; docs/serving.md).

``Engine`` (``rwkv_zoo.serve.engine``) runs the requests of one model together, each row sampling
what ``rwkv_zoo.generate`` samples for it alone; ``create_app`` (``rwkv_zoo.serve.app``, needs the
``serve`` extra: FastAPI and uvicorn) puts the OpenAI HTTP API in front of it.
"""

from __future__ import annotations

from typing import Any

from rwkv_zoo.serve.chat import render_chat
from rwkv_zoo.serve.engine import Engine, EngineStopped, QueueFull, Request, probe
from rwkv_zoo.serve.metrics import Metrics

__all__ = ["Engine", "EngineStopped", "Metrics", "QueueFull", "Request", "create_app", "probe", "render_chat"]


def __getattr__(name: str) -> Any:
    # FastAPI is an optional dependency: the engine works without it.
    if name == "create_app":
        from rwkv_zoo.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
