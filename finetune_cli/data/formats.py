"""Dataset formats: each JSONL record becomes OpenAI-style `messages` (or plain `text`).

| format              | a line looks like                                                             |
|---------------------|-------------------------------------------------------------------------------|
| `messages`          | {"messages": [{"role": "user", "content": "..."}, ...]} (OpenAI chat format)  |
| `sharegpt`          | {"conversations": [{"from": "human", "value": "..."}, ...], "system": "..."}  |
| `prompt_completion` | {"prompt": "...", "completion": "..."} (strings or message lists, as in TRL)  |
| `alpaca`            | {"instruction": "...", "input": "...", "output": "...", "system": "..."}      |
| `text`              | {"text": "..."} (continued pre-training: every token is learned)              |
| `preference`        | {"prompt": "...", "chosen": "...", "rejected": "..."} (DPO; see preference.py) |
| `unpaired_preference` | {"prompt": "...", "completion": "...", "label": true} (KTO)                 |
| `classification`    | {"text": "...", "label": "spam"} or {"image": "cat1.png", "label": "cat"}     |

A message may say `"train": false` (or OpenAI's `"weight": 0`) to keep that assistant turn out of the loss.
"""

from __future__ import annotations

import json

from finetune_cli.errors import FtuneError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
# Fields a `columns` mapping may rename: ftune's name -> the name in the user's files.
FIELDS = (
    "messages",
    "conversations",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "text",
    "system",
    "chosen",
    "rejected",
    "label",
    "image",
)
MESSAGE_FIELDS = ("role", "content", "from", "value")


class LineError(FtuneError):
    """A bad data line: `kind` groups it in `ftune validate`; str() is `file:line: message`."""

    def __init__(self, kind: str, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.kind, self.where, self.detail = kind, where, message


def json_text(record, columns: dict[str, str], where: str) -> tuple[object, bool]:
    """A table's cells that hold a list as JSON text (CSV has no lists; many Parquet exports store them so),
    decoded: `messages` and `conversations` always, `prompt` and `completion` when the text is a JSON list of
    messages (else it is the prompt itself). Returns (record, whether any text was decoded)."""
    if not isinstance(record, dict):
        return record, False
    decoded = False
    for name in ("messages", "conversations", "prompt", "completion"):
        key = columns.get(name, name)
        value = record.get(key)
        if not isinstance(value, str):
            continue
        chat = name in ("messages", "conversations")
        if not chat and not value.lstrip().startswith("["):
            continue
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as exc:
            if not chat:
                continue
            detail = f"{exc.msg}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "too deep or long"
            raise LineError("not JSON", where, f'"{key}" holds text that is not a JSON list ({detail})') from None
        if not chat and not (isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed)):
            continue
        record = {**record, key: parsed}
        decoded = True
    return record, decoded


def detect(record) -> str | None:
    """The format a record is in, from its keys; None when it fits none."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "completion" in record and isinstance(record.get("label"), bool):
        return "unpaired_preference"
    if "label" in record and ("text" in record or "image" in record) and "completion" not in record:
        return "classification"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def rename(record, columns: dict[str, str]):
    """Apply a `columns` mapping ({ftune_field: your_field}) to a record and to its messages."""
    if not columns or not isinstance(record, dict):
        return record
    record = {next((k for k, v in columns.items() if v == key and k in FIELDS), key): v for key, v in record.items()}
    inner = {v: k for k, v in columns.items() if k in MESSAGE_FIELDS}
    for key in ("messages", "conversations", "prompt", "completion", "chosen", "rejected"):
        if inner and isinstance(record.get(key), list):
            record[key] = [
                {inner.get(f, f): x for f, x in m.items()} if isinstance(m, dict) else m for m in record[key]
            ]
    return record


def convert(record, fmt: str, where: str) -> dict:
    """One record in `fmt` as {"messages": [...]} or {"text": ...}; raise LineError naming what is wrong."""
    if not isinstance(record, dict):
        raise LineError("missing field", where, f"expected a JSON object ({fmt} format), got {type(record).__name__}")
    found = detect(record)
    kto = fmt == "unpaired_preference" and found == "prompt_completion"  # a label that is not true/false: say so
    if found is not None and found != fmt and not kto:
        raise LineError("other format", where, f"this line is in {found} format but the file is {fmt}")
    if fmt in ("preference", "unpaired_preference"):
        return (convert_pair if fmt == "preference" else convert_unpaired)(record, where)
    if fmt == "classification":
        return convert_labelled(record, where)
    if fmt == "text":
        text = _field(record, "text", where)
        if not text.strip():
            raise LineError("empty content", where, '"text" is empty')
        return {"text": text}
    if fmt == "messages":
        messages = _messages(record, "messages", where)
    elif fmt == "sharegpt":
        messages = _sharegpt(record, where)
    elif fmt == "alpaca":
        instruction, extra = _field(record, "instruction", where), record.get("input") or ""
        if not isinstance(extra, str):
            raise LineError("wrong type", where, '"input" must be a string')
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _field(record, "output", where)},
        ]
    else:
        messages = _part(record, "prompt", "user", where) + _part(record, "completion", "assistant", where)
    system = record.get("system")
    if system is not None and fmt != "messages":
        if not isinstance(system, str):
            raise LineError("wrong type", where, '"system" must be a string')
        if system.strip() and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
    check(messages, where)
    return {"messages": messages}


def check(messages: list[dict], where: str) -> None:
    """Empty content, message order and a learnable assistant turn."""
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise LineError("empty content", where, f"message {i} ({m['role']}) has empty content")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i:
            raise LineError("wrong message order", where, f"message {i} is a system message; only the first may be")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    for i, role in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise LineError(
                "wrong message order",
                where,
                f"turns must alternate user, assistant, user, ... (turn {i + 1} is {role})",
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise LineError("no assistant turn", where, "conversation has no assistant turn, so there is nothing to learn")
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        raise LineError("no assistant turn", where, 'every assistant turn has "train": false; nothing to learn')


def _field(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise LineError("missing field", where, f'missing field "{key}"')
    if not isinstance(record[key], str):
        raise LineError("wrong type", where, f'"{key}" must be a string')
    return record[key]


def _messages(record: dict, key: str, where: str) -> list[dict]:
    value = record.get(key)
    if not isinstance(value, list):
        raise LineError(
            "missing field",
            where,
            f'expected an object with a "{key}" list' + (" (OpenAI chat format)" * (key == "messages")),
        )
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise LineError("missing field", where, f"message {i} is not an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise LineError(
                "unknown role", where, f"message {i} has unknown role {_short(role)}; use one of {', '.join(ROLES)}"
            )
        role = ROLES[ROLES.index(role)]  # one string object for every message's role, not one each: big sets
        messages.append(_message(role, msg.get("content"), msg, i, where))
    return messages


def _message(role: str, content, msg: dict, i: int, where: str) -> dict:
    if isinstance(content, list):  # OpenAI content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise LineError("wrong type", where, f"message {i} ({role}) has content parts that are not text")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise LineError("missing field", where, f"message {i} ({role}) needs a string 'content'")
    out = {"role": role, "content": content}
    train = msg.get("train", msg.get("weight", True))
    if train not in (True, False, 0, 1):
        raise LineError("wrong type", where, f'message {i}: "train" must be true or false (or "weight" 0 or 1)')
    if not train:
        if role != "assistant":
            raise LineError("wrong type", where, f'message {i}: "train": false only applies to assistant messages')
        out["train"] = False
    return out


def _sharegpt(record: dict, where: str) -> list[dict]:
    value = record.get("conversations")
    if not isinstance(value, list):
        raise LineError("missing field", where, 'expected a "conversations" list (ShareGPT format)')
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise LineError("missing field", where, f"turn {i} is not an object with from and value")
        sender = msg.get("from")
        role = SHAREGPT_ROLES.get(sender) if isinstance(sender, str) else None  # a list or object is no dict key
        if role is None:
            names = ", ".join(SHAREGPT_ROLES)
            raise LineError("unknown role", where, f"turn {i} is from {_short(sender)}; use one of {names}")
        messages.append(_message(role, msg.get("value"), msg, i, where))
    return messages


def _part(record: dict, key: str, role: str, where: str) -> list[dict]:
    if key not in record:
        raise LineError("missing field", where, f'missing field "{key}"')
    value = record[key]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(record, key, where)
    raise LineError("wrong type", where, f'"{key}" must be a string or a list of messages')


def _short(value) -> str:
    """A value from the data as an error shows it, cut so that one bad line stays one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


PAIR_FIELDS = ("chosen", "rejected")


def convert_pair(record: dict, where: str) -> dict:
    """One preference line as {"prompt": [...], "chosen": [assistant], "rejected": [assistant]}; raise LineError.

    Explicit prompt: {"prompt", "chosen", "rejected"} as strings (a user turn, assistant replies) or message lists.
    Implicit prompt: "chosen" and "rejected" are two whole conversations; their shared first messages are the
    prompt. Other fields are ignored."""
    for key in PAIR_FIELDS:
        if key not in record:
            raise LineError(f"missing {key}", where, f'missing field "{key}": a preference pair needs both replies')
    if "prompt" in record:
        prompt = _turns(record, "prompt", "user", where)
        chosen, rejected = _turns(record, "chosen", "assistant", where), _turns(record, "rejected", "assistant", where)
    else:
        whole = [_turns(record, key, "assistant", where) for key in PAIR_FIELDS]
        shared = 0
        while shared < min(map(len, whole)) - 1 and whole[0][shared] == whole[1][shared]:
            shared += 1
        prompt, chosen, rejected = whole[0][:shared], whole[0][shared:], whole[1][shared:]
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise LineError(
            "no prompt",
            where,
            'no prompt: give a "prompt" field, or chosen and rejected conversations that start with the same messages',
        )
    for key, reply in zip(PAIR_FIELDS, (chosen, rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise LineError("wrong message order", where, f'"{key}" must be one assistant reply to the prompt')
        reply[0].pop("train", None)
    check(prompt + chosen, where)
    check(prompt + rejected, where)
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise LineError("chosen equals rejected", where, "chosen and rejected are the same reply; a pair must differ")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _turns(record: dict, key: str, role: str, where: str) -> list[dict]:
    value = record[key]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):  # a single message object
        return _messages({key: [value]}, key, where)
    if isinstance(value, list):
        return _messages(record, key, where)
    raise LineError("wrong type", where, f'"{key}" must be a string or a list of messages')


def convert_unpaired(record: dict, where: str) -> dict:
    """One KTO line {"prompt", "completion", "label": true|false} as {"prompt": [...], "completion": [assistant],
    "label": bool}; raise LineError. Other fields are ignored."""
    for key in ("prompt", "completion"):
        if key not in record:
            raise LineError(
                f"missing {key}", where, f'missing field "{key}": a KTO line needs prompt, completion, label'
            )
    if not isinstance(record.get("label"), bool):
        raise LineError("wrong type", where, '"label" must be true (a desirable reply) or false (an undesirable one)')
    prompt, completion = _turns(record, "prompt", "user", where), _turns(record, "completion", "assistant", where)
    if not any(m["content"].strip() for m in prompt):
        raise LineError("no prompt", where, 'no prompt: "prompt" is empty')
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise LineError("wrong message order", where, '"completion" must be one assistant reply to the prompt')
    completion[0].pop("train", None)
    check(prompt + completion, where)
    return {"prompt": prompt, "completion": completion, "label": record["label"]}


def convert_labelled(record: dict, where: str) -> dict:
    """One classification row as {"text": ..., "label": name} or {"image": path or bytes, "label": name}; raise
    LineError. An image is a path (relative ones are resolved against the data file's folder by the reader) or a
    table's image cell ({"bytes": ..., "path": ...}, as datasets and Parquet store images)."""
    if "label" not in record:
        raise LineError("missing field", where, 'missing field "label": a classification row needs its class')
    label = label_name(record["label"], where)
    if "image" in record:
        image = record["image"]
        if isinstance(image, dict) and isinstance(image.get("bytes"), (bytes, bytearray)) and image["bytes"]:
            return {"image": bytes(image["bytes"]), "label": label}
        if isinstance(image, dict) and isinstance(image.get("path"), str):
            image = image["path"]
        if not isinstance(image, str) or not image.strip():
            raise LineError("wrong type", where, '"image" must be the path of an image file')
        return {"image": image, "label": label}
    text = _field(record, "text", where)
    if not text.strip():
        raise LineError("empty content", where, '"text" is empty; a classification row needs text to classify')
    return {"text": text, "label": label}


def label_name(value, where: str) -> str:
    """A row's label as its class name; raise LineError for what cannot be one."""
    if isinstance(value, float) and value.is_integer():  # Parquet and pandas store integer columns with nulls so
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = "true/false" if isinstance(value, bool) else type(value).__name__
        raise LineError("wrong type", where, f'"label" is {kind}; a class label is a string or an integer')
    text = str(value).strip()
    if not text:
        raise LineError("empty content", where, '"label" is empty; give each row its class')
    if "\n" in text:
        raise LineError("wrong type", where, '"label" spans lines; a class label is one line')
    return text
