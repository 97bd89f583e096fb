"""The HTTP app (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, whole or streamed replies,
/v1/feedback, the chat page at / (its files in page/), /metrics, the API key, origin and request-size gate, and one
log line per request.
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
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finetune_cli.serving import requestlog
from finetune_cli.serving.engine import ApiError, Engine, Job
from finetune_cli.serving.metrics import CONTENT_TYPE, Metrics
from finetune_cli.serving.requestlog import Feedback, RequestLog
from finetune_cli.serving.schema import ChatRequest, CompletionRequest, _Request, messages, prepare, stops
from finetune_cli.serving.served import Served

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # `--max-request-bytes`' default: a larger body is refused (413) unread
PAGE = Path(__file__).parent / "page"  # the chat page: plain HTML, CSS and JS, no build step
PAGE_HEADERS = {  # the page runs only its own script and talks only to this server
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(
    engine: Engine,
    api_key: str | None,
    log=None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    log_dir: Path | None = None,
    cors_origins: list[str] | tuple = (),
):
    """The ASGI app. `log_dir`: --log-requests (checked and opened here; `server.run` holds its lock)."""
    log = log or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
    requests = None
    if log_dir is not None:
        requestlog.check_folder(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        requests = RequestLog(log_dir, warn=lambda msg: log(f"serve: warning: {msg}"))
    metrics = Metrics(engine)

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
        state = {"api_key": bool(api_key), "feedback": requests is not None}
        return {"status": "ok", "models": list(engine.served), **engine.load(), **state}

    @app.get("/")
    async def page():
        return FileResponse(PAGE / "index.html", headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def page_file(name: str):
        if name not in {p.name for p in PAGE.iterdir() if p.is_file()}:  # only the page's own files
            raise ApiError(404, f"no page file {name!r}")
        return FileResponse(PAGE / name, headers=PAGE_HEADERS)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

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

    @app.post("/v1/feedback")
    async def feedback(body: Feedback):
        if requests is None:
            raise ApiError(
                404, "this server keeps no feedback: start `ftune serve` with --log-requests DIR", code="no_feedback"
            )
        return await run_in_threadpool(requests.feedback, body)

    app.state.requests = requests
    gate = _Gate(app, api_key, log, engine.debug, max_request_bytes, metrics, tuple(cors_origins))
    if not cors_origins:
        return gate
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(
        gate,
        allow_origins=list(cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["authorization", "content-type"],
        max_age=600,
    )


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
    info["id"] = reply.id
    logged = _Logged(request.app.state.requests, reply, job, body, info)
    if body.stream:
        return StreamingResponse(
            _stream(job, reply, info, logged), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts = []
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                info.setdefault("first", time.perf_counter())
                parts.append(value)
            elif kind == "error":
                raise value
            elif value == "cancelled":
                info["finish"] = value
                return JSONResponse({}, status_code=499)  # nginx's "client closed request": nobody reads it
            else:
                info["finish"] = value
                await logged.write()
                return reply.whole("".join(parts), value, len(seq.prompt), len(seq.tokens))
    finally:
        watcher.cancel()


class _Logged:
    """A finished request's line in --log-requests' requests.jsonl (written off the event loop, before the reply's
    last chunk leaves, so feedback on it can never arrive first)."""

    def __init__(self, requests: RequestLog | None, reply: _Reply, job: Job, body: _Request, info: dict):
        self.requests, self.reply, self.job, self.body, self.info = requests, reply, job, body, info

    async def write(self) -> None:
        if self.requests is None:
            return
        body, seq, info = self.body, self.job.seq, self.info
        asked = {"messages": messages(body)} if self.reply.chat else {"prompt": _prompt(body)}
        first = info.get("first")
        record = {
            "id": self.reply.id,
            "time": info["time"],
            "model": self.reply.model,
            "endpoint": "chat" if self.reply.chat else "completions",
            **asked,
            "reply": self.job.text.final(),
            "finish_reason": seq.finish_reason,
            "prompt_tokens": len(seq.prompt),
            "completion_tokens": len(seq.tokens),
            "latency_s": round(time.perf_counter() - info["start"], 4),
            "time_to_first_token_s": None if first is None else round(first - info["start"], 4),
            "settings": {
                "temperature": body.temperature,
                "top_p": body.top_p,
                "max_tokens": getattr(body, "max_completion_tokens", None) or body.max_tokens,
                "seed": body.seed,
                "stop": stops(body),
            },
        }
        await run_in_threadpool(self.requests.add, record)


def _prompt(body: CompletionRequest) -> str:
    return body.prompt[0] if isinstance(body.prompt, list) else body.prompt


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


async def _stream(job: Job, reply: _Reply, info: dict, logged: _Logged):
    """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, then `data: [DONE]`. A client
    that goes away cancels the generation (Starlette cancels this generator; `finally` frees the slot)."""
    seq = job.seq
    try:
        if reply.chat:
            yield reply.chunk(None, role=True)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                info.setdefault("first", time.perf_counter())
                yield reply.chunk(value)
            elif kind == "error":
                info["status"] = value.status
                yield _event(value.body())
                return
            else:
                info["finish"] = value
                if value != "cancelled":
                    await logged.write()
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
    """The outermost ASGI layer: the API key on /v1/ and /metrics (compared in constant time, never logged), a
    browser's cross-origin POST refused (403) unless --cors-origin allows its origin, the request size limit (413,
    by Content-Length before reading, or as the body comes; feedback bodies have a small limit of their own), one
    log line and the metrics per request, and a JSON error, never a traceback, for anything that escapes a handler."""

    def __init__(
        self,
        app,
        api_key: str | None,
        log,
        debug: bool,
        max_bytes: int = MAX_REQUEST_BYTES,
        metrics: Metrics | None = None,
        origins: tuple = (),
    ):
        self.app, self.key, self.log, self.debug, self.max_bytes = app, api_key, log, debug, max_bytes
        self.metrics, self.origins = metrics, origins

    def _limit(self, scope) -> int:
        return min(self.max_bytes, requestlog.FEEDBACK_BYTES) if scope["path"] == "/v1/feedback" else self.max_bytes

    def _too_large(self, limit: int) -> str:
        flag = " (the server's --max-request-bytes)" if limit == self.max_bytes else ""
        return f"the request body is larger than {limit} bytes{flag}"

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        expected = self.key.encode()
        return hmac.compare_digest(given.strip() if scheme.lower() == b"bearer" else b"", expected)

    def _foreign_origin(self, scope) -> str | None:
        """The Origin of a browser's POST from another site (which could otherwise send feedback or spend the
        server's time in a visitor's name), unless --cors-origin allows it; programs send no Origin."""
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if not origin or scope.get("method") in ("GET", "HEAD", "OPTIONS") or origin in self.origins:
            return None
        return None if urlsplit(origin).netloc == headers.get(b"host", b"").decode("latin-1") else origin

    def _declared_too_large(self, scope, limit: int) -> bool:
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        return length.isdigit() and int(length) > limit

    def _limited(self, receive, limit: int):
        """`receive`, refusing a body (also a chunked one) once it passes the limit; the handler turns the
        HTTPException into the 413."""
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, self._too_large(limit))
            return message

        return limited

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        info = {"start": start, "time": requestlog.now()}
        scope.setdefault("state", {})["ftune"] = info
        started = {}

        async def tracked(message):
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
            await send(message)

        async def refuse(error: ApiError):
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, tracked)

        path, limit, origin = scope["path"], self._limit(scope), self._foreign_origin(scope)
        try:
            if self.key and (path.startswith("/v1/") or path == "/metrics") and not self._authorized(scope):
                await refuse(
                    ApiError(
                        401,
                        "missing or wrong API key: send the header Authorization: Bearer KEY",
                        code="invalid_api_key",
                    )
                )
            elif origin:
                message = f"a page from {origin} may not call this server; start it with --cors-origin {origin}"
                await refuse(ApiError(403, message, code="origin_not_allowed"))
            elif self._declared_too_large(scope, limit):
                await refuse(ApiError(413, self._too_large(limit)))
            else:
                await self.app(scope, self._limited(receive, limit), tracked)
        except Exception as exc:  # noqa: BLE001 - the client gets a JSON error; the server log gets one line
            info["error"] = f"{type(exc).__name__}: {exc}"
            if self.debug:
                traceback.print_exc()
            if "status" not in started:
                await refuse(ApiError(500, "internal error; the server log has the details", code="internal_error"))
        finally:
            status = info.get("status", started.get("status"))
            if self.metrics is not None:
                self.metrics.observe(path, status, time.perf_counter() - start, info)
            self.log(_log_line(scope, info, status, start))


def _log_line(scope, info: dict, status: int | None, start: float) -> str:
    status = info.get("status", status)
    parts = [scope.get("method", "-"), scope.get("path", "-"), str(status or "-")]
    if "model" in info:
        parts.append(f"model={info['model']}")
    if "id" in info:
        parts.append(f"id={info['id']}")
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
