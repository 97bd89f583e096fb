"""The worker: one thread owns the models and decodes the queued requests of one model together
(`inference.batching.Batch`); jobs, their events, incremental text with stop strings, and the API
error a failed generation ends its request with.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass

from finetune_cli.inference.batching import Batch, Sequence
from finetune_cli.serving.served import Served


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
    """The queue and the worker thread. At most `max_batch` requests decode at once (in one batch per model; the
    models take turns, a step each) and `max_queue` more wait; beyond that a request is refused (503) rather than
    queued without bound."""

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
        """Decode step by step. Each model (a base and each adapter on it count as models) has its own batch; the
        models with requests take turns, one step each, so a request for one never waits for another's batch to
        end (side by side on the chat page: the base and the adapter answer together)."""
        batches: dict[str, Batch] = {}
        last = None
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.closing):
                    self.cond.wait(0.25)
                if self.closing:
                    self._end_all(ApiError(503, "the server is shutting down", code="shutting_down"))
                    return
                served = self._next(last)
                batch = batches.get(served.name) or Batch(served.model, _pad_id(served.tokenizer))
                batches[served.name] = batch
                new = self._take(served, batch)
                self.running += new
            last = served.name
            mine = [j for j in self.running if j.served is served]
            try:
                with _use(served):
                    if new:
                        batch.add([j.seq for j in new])
                    elif len(batch):
                        batch.step()
                self._deliver(mine)
            except Exception as exc:  # noqa: BLE001 - a failed batch step ends its requests, not the server
                error = self._failure(exc)
                with self.cond:
                    self._end_running(error, mine)
                batch = batches[served.name] = Batch(served.model, _pad_id(served.tokenizer))
            if not len(batch):
                batches.pop(served.name, None)

    def _next(self, last: str | None) -> Served:
        """The model whose turn it is: the first after `last` (in the order served) with running or waiting
        requests."""
        busy = {j.served.name for j in self.running} | {j.served.name for j in self.waiting if not j.seq.cancelled}
        names = list(self.served)
        start = names.index(last) + 1 if last in names else 0
        order = names[start:] + names[:start]
        name = next((n for n in order if n in busy), None)
        return self.served[name] if name else (self.waiting[0].served if self.waiting else self.running[0].served)

    def _take(self, served: Served, batch: Batch) -> list[Job]:
        """The waiting requests for `served` that start now, oldest first, while there is room (`--max-batch`
        counts the requests decoding for every model); they join `served`'s running batch where its cache allows."""
        room = self.max_batch - len(self.running)
        if len(batch) and not batch.can_join():
            room = 0
        new = [j for j in self.waiting if j.served is served and not j.seq.cancelled][: max(room, 0)]
        self.waiting = deque(j for j in self.waiting if j not in new and not j.seq.cancelled)
        return new

    def _deliver(self, jobs: list[Job]) -> None:
        """Send each of `jobs` (one model's running requests) its new text; finish the ones that ended (one that
        failed ends alone)."""
        done = []
        size = len(jobs)
        for job in jobs:
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

    def _end_running(self, error: ApiError, jobs: list[Job] | None = None) -> None:
        """End `jobs` (default: every running request) with `error`."""
        jobs = list(self.running if jobs is None else jobs)
        for job in jobs:
            job.seq.cancelled = True
            job.post(("error", error))
        self.running = [j for j in self.running if j not in jobs]

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
