"""The OpenAI-compatible HTTP API (FastAPI) in front of an ``Engine``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as
server-sent events, or one JSON body), ``GET /health``, ``GET /metrics`` (Prometheus text). Request
bodies are checked by pydantic models that forbid unknown fields; every refusal is an OpenAI-style
error body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (malformed JSON,
an unknown field, a value out of range, a prompt over the limit), 401 for a missing or wrong API key,
404 for another model's name, 503 with ``Retry-After`` when the queue is full or the server stops.

Extensions beyond OpenAI's fields (as vLLM names them): ``top_k``, ``min_p``, ``penalty_decay``
(BlinkDL's ``alpha_decay``), ``stop_token_ids``, and ``return_token_ids`` (each choice, or each
streamed chunk, carries the ``token_ids`` it generated).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rwkv_zoo.generation import SamplingParams
from rwkv_zoo.serve.chat import STOP, render_chat
from rwkv_zoo.serve.engine import Engine, EngineStopped, Handle, QueueFull
from rwkv_zoo.serve.engine import Request as EngineRequest
from rwkv_zoo.serve.metrics import CONTENT_TYPE

__all__ = ["APIError", "create_app"]

FINISH = {"length": "length", "stop_token": "stop", "stop_string": "stop"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    penalty_decay: Annotated[float, Field(ge=0, le=1)] = 0.996
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=64)] | None = None
    seed: int | None = None
    user: str | None = None
    return_token_ids: bool = False


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this server does not take it", param
    if kind == "missing":
        return f"missing field {param!r}", param
    if param is None:
        return f"the body must be a JSON object: {err.get('msg')}", None
    return f"{param}: {err.get('msg')} (got {err.get('input')!r})"[:500], param


# ---------------------------------------------------------------------------------------------------
# The app


def create_app(engine: Engine, *, model_name: str, tokenizer, api_keys: Sequence[str] = (),
               max_prompt_tokens: int = 16384, max_tokens_limit: int = 4096, default_max_tokens: int = 256,
               retry_after: int = 1, stop_engine: bool = True) -> FastAPI:
    """The FastAPI app. The engine is started by the app's lifespan and stopped with it (unless
    ``stop_engine`` is false); ``api_keys`` (any of them) are required as ``Authorization: Bearer``."""
    V = engine.model.config.vocab_size
    keys = [k.encode() for k in api_keys]
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            if stop_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="rwkv-zoo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = engine.metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.observe_request(request.url.path, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        metrics.observe_request(request.url.path, 400)
        return APIError(400, message, param=param).response()

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare with every key, always: the time taken says nothing about which key came close.
        ok = False
        for k in keys:
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           type_="invalid_request_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_length": engine.queue_length,
                "running_rows": engine.running_rows, "batching": engine.describe()}

    @app.get("/metrics")
    async def metrics_route():
        stats = engine.cache.stats() if engine.cache is not None else None
        return PlainTextResponse(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        metrics.observe_request("/v1/models", 200)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "rwkv-zoo"}]}

    def sampling(body: _Sampling, stops: list[str]) -> SamplingParams:
        if body.temperature == 0:  # OpenAI clients send top_p with greedy decoding; greedy ignores it
            top_p, top_k, min_p = 1.0, 0, 0.0
        else:
            top_p, top_k, min_p = body.top_p, body.top_k, body.min_p
        p = SamplingParams(body.temperature, top_p, top_k, min_p, body.presence_penalty, body.frequency_penalty,
                           body.penalty_decay, (), tuple(body.stop_token_ids or ()), tuple(stops))
        if tokenizer.vocab_size < V:
            p.vocab_limit = tokenizer.vocab_size
        try:
            p.validate(V)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        return p

    def max_tokens(value: int | None, default: int) -> int:
        n = default if value is None else value
        if n > max_tokens_limit:
            raise APIError(400, f"max_tokens is {n} but this server allows at most {max_tokens_limit} (--max-tokens)",
                           param="max_tokens")
        return n

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens but this server allows at most "
                                f"{max_prompt_tokens} (--max-prompt-tokens)", param="prompt",
                           code="context_length_exceeded")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is out of range for the model's vocabulary of {V}",
                           param="prompt")

    def submit(req: EngineRequest, loop, queue: asyncio.Queue) -> Handle:
        def sink(event):
            loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            return engine.submit(req, sink)
        except QueueFull as exc:
            raise APIError(503, f"the server is busy ({exc}): retry after {retry_after} s", type_="server_error",
                           code="queue_full", headers={"Retry-After": str(retry_after)}) from exc
        except EngineStopped as exc:
            raise APIError(503, str(exc), type_="server_error", code="shutting_down",
                           headers={"Retry-After": str(retry_after)}) from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="n") from exc

    async def run(request: Request, body: _Sampling, prompts: list[list[int]], stops: list[str], max_new: int,
                  cache_prefixes: tuple[int, ...], chat: bool):
        params = sampling(body, stops)
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**62)
        req = EngineRequest(prompts, params, max_new, seed, body.n, cache_prefixes)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handle = submit(req, loop, queue)
        endpoint = request.url.path
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        n_prompt = sum(len(p) for p in prompts)

        def usage(completion: int) -> dict:
            return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": handle.cached_tokens}}

        if body.stream:
            metrics.observe_request(endpoint, 200)
            return StreamingResponse(_stream(handle, queue, rid, kind, now, chat, body, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [""] * req.rows
        tokens: list[list[int]] = [[] for _ in range(req.rows)]
        finish: list[str | None] = [None] * req.rows
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(handle)
                        metrics.observe_request(endpoint, 499)
                        return PlainTextResponse("", status_code=499)
                    continue
                what, k, a, b = ev
                if what == "token":
                    if a is not None:
                        tokens[k].append(a)
                    if b is not None:
                        texts[k] += b
                elif what == "done":
                    finish[k] = FINISH[a]
                elif what == "end":
                    break
                else:
                    raise APIError(500, a, type_="server_error")
        except BaseException:
            engine.cancel(handle)
            raise
        choices = []
        for k in range(req.rows):
            c: dict[str, Any] = {"index": k, "finish_reason": finish[k], "logprobs": None}
            if chat:
                c["message"] = {"role": "assistant", "content": texts[k]}
            else:
                c["text"] = texts[k]
            if body.return_token_ids:
                c["token_ids"] = tokens[k]
            choices.append(c)
        metrics.observe_request(endpoint, 200)
        return {"id": rid, "object": kind, "created": now, "model": model_name, "choices": choices,
                "usage": usage(sum(len(t) for t in tokens))}

    async def _stream(handle: Handle, queue: asyncio.Queue, rid: str, kind: str, now: int, chat: bool,
                      body: _Sampling, usage):
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        rows = handle.request.rows

        def chunk(choices: list[dict], **extra) -> str:
            data = {"id": rid, "object": chunk_kind, "created": now, "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(k: int, piece: str | None, token: int | None, finish: str | None) -> dict:
            c: dict[str, Any] = {"index": k, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = {"content": piece} if piece is not None else {}
            else:
                c["text"] = piece or ""
            if body.return_token_ids:
                c["token_ids"] = [token] if token is not None else []
            return c

        completion = 0
        finished = False
        try:
            if chat:
                first = [{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for k in range(rows)]
                if body.return_token_ids:
                    for c in first:
                        c["token_ids"] = []
                yield chunk(first)
            while True:
                what, k, a, b = await queue.get()
                if what == "token":
                    if a is not None:
                        completion += 1
                    if b is not None or (body.return_token_ids and a is not None):
                        yield chunk([choice(k, b, a, None)])
                elif what == "done":
                    yield chunk([choice(k, None, None, FINISH[a])])
                elif what == "end":
                    finished = True
                    break
                else:
                    finished = True
                    err = {"message": a, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk([], usage=usage(completion))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server stops): free the rows now
                engine.cancel(handle)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        authorize(request)
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p:
            prompts = [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]
        else:
            raise APIError(400, "the prompt is empty", param="prompt")
        for ids in prompts:
            check_prompt(ids)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return await run(request, body, prompts, stops, max_tokens(body.max_tokens, 16), (), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        authorize(request)
        check_model(body.model)
        messages = [(m.role, m.content if isinstance(m.content, str) else "".join(x.text for x in m.content))
                    for m in body.messages]
        ids, system_len = render_chat(messages, tokenizer)
        check_prompt(ids)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run(request, body, [ids], [*stops, STOP], max_tokens(limit, default_max_tokens),
                         (system_len,) if system_len else (), chat=True)

    return app
