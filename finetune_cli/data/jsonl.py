"""Reading and validating JSONL chat data (OpenAI `messages` format)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_cli.errors import FtuneError

ROLES = ("system", "user", "assistant")


def read_conversations(path: str | Path, allow_text: bool = False) -> list[dict]:
    """Return `{"source": "file:line", "messages": [...]}` per non-blank line; raise FtuneError naming the line.

    With `allow_text`, a line may instead be `{"text": "..."}` (plain text, scored on every token)."""
    path = Path(path)
    if not path.is_file():
        raise FtuneError(f"{path}: data file not found")
    conversations = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FtuneError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            source = f"{path}:{lineno}"
            if allow_text and isinstance(record, dict) and "messages" not in record and "text" in record:
                if not isinstance(record["text"], str):
                    raise FtuneError(f'{source}: "text" must be a string')
                conversations.append({"source": source, "text": record["text"]})
            else:
                conversations.append({"source": source, "messages": _messages(record, source)})
    if not conversations:
        raise FtuneError(f"{path}: no examples (the file is empty)")
    return conversations


def split(convs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the examples (at least one), chosen by `seed`: (train, eval)."""
    import random

    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(convs) * fraction))])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def _messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise FtuneError(f'{where}: expected an object with a "messages" list (OpenAI chat format)')
    messages = []
    for i, msg in enumerate(record["messages"]):
        if not isinstance(msg, dict):
            raise FtuneError(f"{where}: message {i} is not an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise FtuneError(f"{where}: message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FtuneError(f"{where}: message {i} ({role}) needs a string 'content'")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise FtuneError(f"{where}: conversation has no assistant turn, so there is nothing to learn")
    return messages
