"""`ftune serve`: runs, adapters and models behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Each TARGET is opened as `ftune generate` opens it (`rundir.open_target`: same base, adapter, tokenizer with the
chat template training used, dtype, trust_remote_code). Adapters that share a base load it once, as PEFT named
adapters, and the base is served too with the adapters disabled. One worker thread owns the models and decodes the
queued requests of one model together (`batching.Batch`); the HTTP side only validates, tokenizes (in a thread, off
the event loop) and streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finetune_cli import batching
from finetune_cli.batching import Batch, Sequence
from finetune_cli.data.masking import end_of_turn_ids, render
from finetune_cli.errors import FtuneError
from finetune_cli.generate import MIN_TEMPERATURE, SEEDS

CHAT_MAX_TOKENS = 256  # `ftune generate --max-new-tokens`'s default
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # `--max-request-bytes`' default: a larger body is refused (413) unread
_TOKENIZER = threading.Lock()  # HTTP threads encode one at a time (the worker decodes with its own copy)


# --- what is served


@dataclass(eq=False)
class Served:
    """One model name of the API: a model (shared by a base and its adapters), the adapter to enable (None: none,
    with the adapters of a shared base disabled) and the tokenizer with its chat template (`decoder`: a copy of it
    for the worker thread, so decoding never waits for a long prompt's encoding)."""

    name: str
    model: object
    adapter: str | None
    tokenizer: object
    decoder: object
    stop_ids: frozenset[int]
    context: int
    created: int = field(default_factory=lambda: int(time.time()))


def parse_target(spec: str) -> tuple[str, str]:
    """`NAME=PATH_OR_NAME` or `PATH_OR_NAME`: (name, what to open). NAME defaults to the folder or model name."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        if not rest:
            raise FtuneError(f"TARGET {spec!r}: nothing after '='; give NAME=PATH_OR_NAME")
        return name, rest
    return default_name(spec), spec


def default_name(source: str) -> str:
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return path.resolve().name if path.exists() else path.name
    return source  # a builtin name or a hub id (org/model), as given


def open_targets(specs: list[str]) -> list[tuple[str, object]]:
    """(name, rundir.Target) for each TARGET, checked before any weights load."""
    from finetune_cli import rundir

    if not specs:
        raise FtuneError("give at least one TARGET: a run directory, adapter folder, model folder or model name")
    named, seen = [parse_target(spec) for spec in specs], {}
    for spec, (name, source) in zip(specs, named):
        if name in seen:
            raise FtuneError(f"two targets are named {name!r} ({seen[name]}, {spec}); name them: NAME={source}")
        seen[name] = spec
    opened = []
    for spec, (name, source) in zip(specs, named):
        target = rundir.open_target(source)
        if target.adapter is not None and _prompt_learning(target.adapter):
            raise FtuneError(
                f"{spec}: a {target.method.get('name', 'prompt tuning')} adapter cannot be served yet (only LoRA "
                f"adapters, full runs and model folders); use `ftune generate {source}`"
            )
        opened.append((name, target))
    return opened


def _prompt_learning(adapter: Path) -> bool:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("peft_type", "")).upper() in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def load(specs: list[str], log=lambda msg: None) -> dict[str, Served]:
    """Load every TARGET once: adapters of one base (same weights, dtype and trust_remote_code) share it."""
    from finetune_cli import models, rundir

    opened = open_targets(specs)
    groups: dict[tuple, list] = {}
    for name, target in opened:
        groups.setdefault((target.weights, target.dtype, target.trust_remote_code), []).append((name, target))
    served: dict[str, Served] = {}
    for (weights, dtype, trust), members in groups.items():
        adapters = [(n, t) for n, t in members if t.adapter is not None]
        plain = [(n, t) for n, t in members if t.adapter is None]
        log(f"loading {weights}" + (f" with adapters {', '.join(n for n, _ in adapters)}" if adapters else ""))
        model = models.load_model(weights, dtype, trust)
        if adapters:
            model = _with_adapters(model, adapters)
            if not plain:  # the base itself, under its own name, with the adapters disabled
                base = adapters[0][1].base or weights
                plain = [(default_name(base), rundir.Target(base, "model", weights, weights, trust_remote_code=trust))]
        model.eval()
        for name, target in adapters + plain:
            if name in served:
                raise FtuneError(
                    f"the base of {', '.join(n for n, _ in adapters)} would be served as {name!r}, which another "
                    f"TARGET is named; name that one differently (NAME=...)"
                )
            tokenizer = models.load_tokenizer(target.tokenizer, None, target.trust_remote_code, require_template=False)
            served[name] = Served(
                name=name,
                model=model,
                adapter=name if target.adapter is not None else None,
                tokenizer=tokenizer,
                decoder=copy.deepcopy(tokenizer),
                stop_ids=frozenset(end_of_turn_ids(tokenizer)),
                context=_context(model, tokenizer),
            )
        ignored = batching.unsupported(model)
        if ignored:
            log(f"warning: {weights}: the server does not apply generation_config's {', '.join(ignored)}")
    return served


def _with_adapters(model, adapters):
    from peft import PeftModel

    (first, target), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(model, str(target.adapter), adapter_name=first)
    for name, target in rest:
        model.load_adapter(str(target.adapter), adapter_name=name)
    return model


def _context(model, tokenizer) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not context:
        limit = getattr(tokenizer, "model_max_length", 0)
        context = limit if 0 < limit < 10**8 else 2048
    return int(context)


# --- the worker: one thread owns the models and decodes the queued requests of one model together


class ApiError(Exception):
    """An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_UNSETTLED = re.compile(r"[\s\ufffd]+$")  # trailing whitespace and halves of UTF-8 characters


class Text:
    """The reply's text as tokens come. Sent as it grows, except what a later token may still change or cut: trailing
    whitespace (tokenizers drop a space before punctuation; a chat reply is stripped as `generate.reply` strips
    it), a trailing half of a UTF-8 character (decoded as U+FFFD) and the start of a stop text."""

    def __init__(self, tokenizer, stops: list[str], strip: bool):
        self.tokenizer, self.stops, self.strip = tokenizer, stops, strip
        self.sent = 0
        self.text = ""

    def feed(self, tokens: list[int]) -> tuple[str, bool]:
        """The new text to send, and whether a stop text was reached."""
        full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.strip:
            full = full.lstrip()
        found = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text = full[: min(found)]
            return "", True
        self.text = full
        cut = len(full)
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:k]):
                    cut = min(cut, len(full) - k)
                    break
        safe = len(_UNSETTLED.sub("", full[:cut]))
        if safe <= self.sent:
            return "", False
        delta, self.sent = full[self.sent : safe], safe
        return delta, False

    def final(self) -> str:
        return self.text.rstrip() if self.strip else self.text

    def rest(self) -> str:
        return self.final()[self.sent :]


@dataclass(eq=False)
class Job:
    served: Served
    seq: Sequence
    text: Text
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    batch: int = 0  # the largest batch it decoded in (for the log)

    def post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        self.seq.cancelled = True


class Engine:
    """The queue and the worker thread. At most `max_batch` requests decode together (those of one model, in the
    order they came) and `max_queue` more wait; beyond that a request is refused (503) rather than queued without
    bound."""

    def __init__(self, served: dict[str, Served], max_batch: int, max_queue: int, debug: bool = False):
        self.served, self.max_batch, self.max_queue, self.debug = served, max_batch, max_queue, debug
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.closing = False  # set from a signal handler: no lock taken there
        self.thread = threading.Thread(target=self._work, name="ftune-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop: waiting requests are refused, running ones end with an error (the worker sees it within a step)."""
        self.closing = True

    def join(self, timeout: float = 5.0) -> None:
        self.closing = True
        with self.cond:
            self.cond.notify_all()
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self.waiting) + len(self.running) >= self.max_batch + self.max_queue:
                raise ApiError(
                    503,
                    f"the server is busy: {len(self.running)} requests are decoding and {len(self.waiting)} waiting "
                    f"(--max-batch {self.max_batch}, --max-queue {self.max_queue}); retry shortly",
                    code="queue_full",
                )
            self.waiting.append(job)
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting)}

    def _work(self) -> None:
        batch, served, scope = None, None, contextlib.ExitStack()
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.closing):
                    self.cond.wait(0.25)
                if self.closing:
                    self._end_all(ApiError(503, "the server is shutting down", code="shutting_down"))
                    scope.close()
                    return
                if not self.running:  # a new batch, for the model of the oldest waiting request
                    served = self.waiting[0].served
                    scope.close()
                    scope = _use(served)
                    batch = Batch(served.model, _pad_id(served.tokenizer))
                new = self._take(served, batch)
                self.running += new
            try:
                if new:
                    batch.add([j.seq for j in new])
                elif batch is not None and len(batch):
                    batch.step()
                self._deliver()
            except Exception as exc:  # noqa: BLE001 - a failed batch step ends its requests, not the server
                error = self._failure(exc)
                with self.cond:
                    self._end_running(error)
                batch = Batch(served.model, _pad_id(served.tokenizer))

    def _take(self, served: Served, batch: Batch) -> list[Job]:
        """The waiting requests for `served` that start now, oldest first: all that fit when a batch starts; later
        ones join the running batch while no other model's request waits (that one goes next, when it drains)."""
        room = self.max_batch - len(self.running)
        if self.running and (not batch.can_join() or any(j.served is not served for j in self.waiting)):
            return []
        new = [j for j in self.waiting if j.served is served and not j.seq.cancelled][:room]
        self.waiting = deque(j for j in self.waiting if j not in new and not j.seq.cancelled)
        return new

    def _deliver(self) -> None:
        """Send each running request its new text; finish the ones that ended (one that failed ends alone)."""
        done = []
        size = len(self.running)
        for job in self.running:
            job.batch = max(job.batch, size)
            seq = job.seq
            if seq.finish_reason in (None, "stop", "length") and not seq.cancelled:
                try:
                    delta, stopped = job.text.feed(seq.tokens)
                except Exception as exc:  # noqa: BLE001 - this request's text: it fails, the others go on
                    seq.fail(exc)
                    delta, stopped = "", False
                if stopped:
                    seq.finish_reason = "stop"  # a stop text, also where the last token reached the length
                if delta:
                    job.post(("text", delta))
            if seq.finish_reason is not None or seq.cancelled:
                done.append(job)
        for job in done:
            seq = job.seq
            if seq.finish_reason in ("stop", "length"):
                rest = job.text.rest()
                if rest:
                    job.post(("text", rest))
                job.post(("end", seq.finish_reason))
            elif seq.finish_reason == "error":
                job.post(("error", self._failure(seq.error)))
            else:
                seq.finish("cancelled")
                job.post(("end", "cancelled"))
        if done:
            with self.cond:
                self.running = [j for j in self.running if j not in done]

    def _failure(self, exc: Exception) -> ApiError:
        """The error for the requests `exc` ended; the server log gets one line (and the traceback with --debug)."""
        detail = f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"error: decoding failed ({detail})\n")
        if self.debug:
            traceback.print_exception(exc)
        return ApiError(500, f"generation failed: {detail}", code="generation_failed")

    def _end_running(self, error: ApiError) -> None:
        for job in self.running:
            job.seq.cancelled = True
            job.post(("error", error))
        self.running = []

    def _end_all(self, error: ApiError) -> None:
        self._end_running(error)
        while self.waiting:
            self.waiting.popleft().post(("error", error))


def _use(served: Served) -> contextlib.ExitStack:
    """Enable `served`'s adapter on its shared model (or disable the adapters, for the base) until closed."""
    scope = contextlib.ExitStack()
    model = served.model
    if hasattr(model, "peft_config"):
        if served.adapter is None:
            scope.enter_context(model.disable_adapter())
        else:
            model.set_adapter(served.adapter)
    return scope


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# --- the API's request bodies (fields of OpenAI's API that ftune does not use are accepted and ignored)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class _Request(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


# --- turning a request into a job


def _messages(body: ChatRequest) -> list[dict]:
    if not body.messages:
        raise ApiError(400, "messages: at least one message is needed", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p.text for p in content)
        if content is None:
            raise ApiError(400, f"messages[{i}].content: a {m.role} message needs content", f"messages[{i}].content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _stops(body: _Request) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop: up to 4 non-empty texts", param="stop")
    return stops


def prepare(served: Served, body: _Request, chat: bool) -> tuple[Sequence, Text]:
    """The Sequence to decode for a request (its settings checked) and the Text that follows its reply."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n: {body.n}; only n=1 is supported (send the request again for more answers)", "n")
    stops = _stops(body)
    tokenizer = served.tokenizer
    if chat:
        messages = _messages(body)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions", "messages")
        try:
            with _TOKENIZER:
                prompt = render(tokenizer, messages, add_generation_prompt=True)
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception (e.g. roles out of order)
            raise ApiError(400, f"messages: the chat template cannot render them: {exc}", "messages") from None
        requested = body.max_completion_tokens or body.max_tokens
        default = CHAT_MAX_TOKENS
    else:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", param="prompt")
            prompt = prompt[0]
        with _TOKENIZER:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise ApiError(400, "prompt: empty", param="prompt")
        requested, default = body.max_tokens, COMPLETION_MAX_TOKENS
    room = served.context - len(ids)
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; {served.name!r} has a context of {served.context} tokens",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        raise ApiError(
            400,
            f"max_tokens: {requested}, but the prompt has {len(ids)} tokens and the context is {served.context}: "
            f"at most {room}",
            param="max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens",
            code="context_length_exceeded",
        )
    temperature, top_p = _sampling(served, body)
    seq = Sequence(
        prompt=ids,
        max_new_tokens=requested or min(default, room),
        stop_ids=served.stop_ids,
        temperature=temperature,
        top_p=top_p,
        seed=body.seed,
        repetition_penalty=batching.repetition_penalty(served.model),
    )
    return seq, Text(served.decoder, stops, strip=chat)


def _sampling(served: Served, body: _Request) -> tuple[float, float]:
    """(temperature, top_p): 0 is greedy, and so is a temperature below MIN_TEMPERATURE (sampling's limit as the
    temperature goes to 0). Without a temperature the model's generation config decides, as for `ftune generate`
    (greedy unless it says do_sample)."""
    temperature, top_p = body.temperature, body.top_p
    if temperature is None:
        config = getattr(served.model, "generation_config", None)
        if config is None or not getattr(config, "do_sample", False):
            return 0.0, 1.0
        temperature = config.temperature or 1.0
        top_p = top_p or config.top_p
    return (float(temperature) if temperature >= MIN_TEMPERATURE else 0.0), float(top_p or 1.0)


# --- the HTTP app


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


# --- running it


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before models load (a port in use is an error at once) and listened on after."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise FtuneError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def run(
    specs: list[str],
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    max_queue: int,
    debug: bool = False,
    log=None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> int:
    """Serve until SIGTERM (exit 0) or Ctrl-C (130)."""
    import uvicorn

    log = log or (lambda line: (sys.stderr.write(line + "\n"), sys.stderr.flush()))
    open_targets(specs)  # a bad TARGET fails before the port is opened
    sock = bind(host, port)
    try:
        served = load(specs, log=lambda msg: log(f"serve: {msg}"))
        engine = Engine(served, max_batch, max_queue, debug)
        app = create_app(engine, api_key, log, max_request_bytes)
        sock.listen(2048)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        keyed = "API key required" if api_key else "no API key"
        log(f"serve: ready at http://{shown}:{bound_port}/v1 ({keyed}): {', '.join(served)}; Ctrl-C stops")
        if not api_key and bound_host not in ("127.0.0.1", "::1", "localhost"):
            log(f"serve: warning: anyone who can reach {shown}:{bound_port} can use these models (no --api-key)")
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="on"
        )
        server = _server(config, engine)
        server.run(sockets=[sock])
    finally:
        sock.close()
    log("serve: stopped")
    return 130 if server.stopped_by == signal.SIGINT else 0


def _server(config, engine: Engine):
    """uvicorn's Server, with SIGTERM/SIGINT also ending the running generations at once (so in-flight requests end
    within a step), and without re-raising the signal afterwards (the command exits 0 or 130 by itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by = None

        def handle_exit(self, sig, frame):
            self.stopped_by = self.stopped_by or sig
            engine.close()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
