"""The HTTP app (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, whole or streamed
replies, the API key and request-size gate, and one log line per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
import traceback
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finetune_cli.serving.engine import ApiError, Engine, Job
from finetune_cli.serving.schema import ChatRequest, CompletionRequest, _Request, prepare
from finetune_cli.serving.served import Served

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # `--max-request-bytes`' default: a larger body is refused (413) unread


def create_app(engine: Engine, api_key: str | None, log=None, max_request_bytes: int = MAX_REQUEST_BYTES):
    log = log or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.join()

    app = FastAPI(title="ftune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(ApiError(400, "the request body is not valid JSON"))
        if tuple(first.get("loc", ())) == ("body",):
            return error(ApiError(400, "the request body must be a JSON object (Content-Type: application/json)"))
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.get("loc", ())[1:]).lstrip(".")
        param = param or None
        return error(ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return error(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # logged by _Gate (Starlette re-raises it to there)
        return error(ApiError(500, "internal error; the server log has the details", code="internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(engine.served), **engine.load()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_card(s) for s in engine.served.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return _card(_find(engine, name))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await _answer(engine, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(engine, body, request, chat=False)

    return _Gate(app, api_key, log, engine.debug, max_request_bytes)


def _card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "ftune"}


def _find(engine: Engine, name: str) -> Served:
    served = engine.served.get(name)
    if served is None:
        raise ApiError(
            404, f"model {name!r} is not served here; served: {', '.join(engine.served)}", "model", "model_not_found"
        )
    return served


async def _answer(engine: Engine, body: _Request, request: Request, chat: bool):
    info = request.state.ftune
    info["model"] = body.model
    served = _find(engine, body.model)
    seq, text = await run_in_threadpool(prepare, served, body, chat)  # tokenizing a long prompt takes seconds
    info["seq"] = seq
    loop = asyncio.get_running_loop()
    job = Job(served, seq, text, loop, asyncio.Queue())
    info["job"] = job
    engine.submit(job)
    reply = _Reply(served.name, chat, body.stream_options.include_usage if body.stream_options else False)
    if body.stream:
        return StreamingResponse(
            _stream(job, reply, info), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts = []
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise value
            elif value == "cancelled":
                info["finish"] = value
                return JSONResponse({}, status_code=499)  # nginx's "client closed request": nobody reads it
            else:
                info["finish"] = value
                return reply.whole("".join(parts), value, len(seq.prompt), len(seq.tokens))
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """A client that goes away before its (non-streamed) answer cancels the generation."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class _Reply:
    """OpenAI's response objects: chat.completion(.chunk) and text_completion."""

    def __init__(self, model: str, chat: bool, include_usage: bool):
        self.model, self.chat, self.include_usage = model, chat, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    @staticmethod
    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self, text: str, finish: str, prompt: int, completion: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{**choice, "finish_reason": finish}],
            "usage": self.usage(prompt, completion),
        }

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            body["usage"] = None
        return _event(body)

    def usage_chunk(self, prompt: int, completion: int) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(prompt, completion),
        }
        return _event(body)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(job: Job, reply: _Reply, info: dict):
    """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, then `data: [DONE]`. A client
    that goes away cancels the generation (Starlette cancels this generator; `finally` frees the slot)."""
    seq = job.seq
    try:
        if reply.chat:
            yield reply.chunk(None, role=True)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield reply.chunk(value)
            elif kind == "error":
                info["status"] = value.status
                yield _event(value.body())
                return
            else:
                info["finish"] = value
                yield reply.chunk(None, finish=value)
                if reply.include_usage:
                    yield reply.usage_chunk(len(seq.prompt), len(seq.tokens))
                yield "data: [DONE]\n\n"
                return
    finally:
        if seq.finish_reason is None:
            job.cancel()
            info["finish"] = "cancelled"


class _Gate:
    """The outermost ASGI layer: the API key (compared in constant time, never logged), the request size limit (413,
    by Content-Length before reading, or as the body comes), one log line per request, and a JSON error, never a
    traceback, for anything that escapes a handler."""

    def __init__(self, app, api_key: str | None, log, debug: bool, max_bytes: int = MAX_REQUEST_BYTES):
        self.app, self.key, self.log, self.debug, self.max_bytes = app, api_key, log, debug, max_bytes
        self.too_large = f"the request body is larger than {max_bytes} bytes (the server's --max-request-bytes)"

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        expected = self.key.encode()
        return hmac.compare_digest(given.strip() if scheme.lower() == b"bearer" else b"", expected)

    def _declared_too_large(self, scope) -> bool:
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        return length.isdigit() and int(length) > self.max_bytes

    def _limited(self, receive):
        """`receive`, refusing a body (also a chunked one) once it passes the limit; the handler turns the
        HTTPException into the 413."""
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self.too_large)
            return message

        return limited

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        info = {}
        scope.setdefault("state", {})["ftune"] = info
        started = {}

        async def tracked(message):
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
            await send(message)

        try:
            if self.key and scope["path"].startswith("/v1/") and not self._authorized(scope):
                error = ApiError(
                    401, "missing or wrong API key: send the header Authorization: Bearer KEY", code="invalid_api_key"
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, tracked)
            elif self._declared_too_large(scope):
                await JSONResponse(ApiError(413, self.too_large).body(), status_code=413)(scope, receive, tracked)
            else:
                await self.app(scope, self._limited(receive), tracked)
        except Exception as exc:  # noqa: BLE001 - the client gets a JSON error; the server log gets one line
            info["error"] = f"{type(exc).__name__}: {exc}"
            if self.debug:
                traceback.print_exc()
            if "status" not in started:
                error = ApiError(500, "internal error; the server log has the details", code="internal_error")
                await JSONResponse(error.body(), status_code=500)(scope, receive, tracked)
        finally:
            self.log(_log_line(scope, info, started.get("status"), start))


def _log_line(scope, info: dict, status: int | None, start: float) -> str:
    status = info.get("status", status)
    parts = [scope.get("method", "-"), scope.get("path", "-"), str(status or "-")]
    if "model" in info:
        parts.append(f"model={info['model']}")
    seq = info.get("seq")
    if seq is not None:
        parts.append(f"prompt_tokens={len(seq.prompt)} completion_tokens={len(seq.tokens)}")
    if "finish" in info:
        parts.append(f"finish={info['finish']}")
    job = info.get("job")
    if job is not None and job.batch:
        parts.append(f"batch={job.batch}")
    if "error" in info:
        parts.append(f"error={info['error']!r}")
    parts.append(f"ms={(time.perf_counter() - start) * 1000:.0f}")
    return " ".join(parts)
