"""The API's request bodies (fields of OpenAI's API that ftune does not use are accepted and
ignored) and turning one into a job: its prompt tokens, sampling, limits and stops; a bad one is a 400.
"""

from __future__ import annotations

import threading
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune_cli.data.masking import render
from finetune_cli.inference import batching
from finetune_cli.inference.batching import Sequence
from finetune_cli.inference.generate import MIN_TEMPERATURE, SEEDS
from finetune_cli.serving.engine import ApiError, Text
from finetune_cli.serving.served import Served

CHAT_MAX_TOKENS = 256  # `ftune generate --max-new-tokens`'s default


COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


_TOKENIZER = threading.Lock()  # HTTP threads encode one at a time (the worker decodes with its own copy)


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


def messages(body: ChatRequest) -> list[dict]:
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


def stops(body: _Request) -> list[str]:
    texts = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(texts) > 4 or any(not s for s in texts):
        raise ApiError(400, "stop: up to 4 non-empty texts", param="stop")
    return texts


def prepare(served: Served, body: _Request, chat: bool) -> tuple[Sequence, Text]:
    """The Sequence to decode for a request (its settings checked) and the Text that follows its reply."""
    if body.n not in (None, 1):
        raise ApiError(400, f"n: {body.n}; only n=1 is supported (send the request again for more answers)", "n")
    stop_texts = stops(body)
    tokenizer = served.tokenizer
    if chat:
        chat_messages = messages(body)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions", "messages")
        try:
            with _TOKENIZER:
                prompt = render(tokenizer, chat_messages, add_generation_prompt=True)
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
    return seq, Text(served.decoder, stop_texts, strip=chat)


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
