"""Chat template rendering and loss masks found by rendering, so they hold for any Jinja template.

For each learned assistant turn we render the conversation up to that turn (with the generation
prompt) and up to and including it; the difference is what the model must produce: the reply and
the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...). Tokens of the full
rendering whose characters fall in those spans are learned. Nothing depends on `{% generation %}`
markers, and the end-of-turn token is learned even when it is also the pad token.
"""

from __future__ import annotations

from finetune_cli.errors import FtuneError

IGNORE = -100
# Closing texts looked for after a reply when a template renders history differently from a prefix.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    messages = _fold_system(tokenizer, messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_ACCEPTS_SYSTEM: dict[str, bool] = {}


def _fold_system(tokenizer, messages: list[dict]) -> list[dict]:
    """Templates with no system role (Gemma) raise on one: fold it into the first user turn, as their authors advise."""
    if not messages or messages[0]["role"] != "system":
        return messages
    template = tokenizer.chat_template or ""
    if template not in _ACCEPTS_SYSTEM:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False)
            _ACCEPTS_SYSTEM[template] = True
        except Exception:  # noqa: BLE001 - any template error means: no system role
            _ACCEPTS_SYSTEM[template] = False
    if _ACCEPTS_SYSTEM[template]:
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def end_of_turn_ids(tokenizer) -> list[int]:
    """The EOS id and each end-of-turn token the chat template writes, so generation stops after a reply."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = tokenizer.chat_template or ""
    for token in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(token) if token in template else None
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def learned_spans(tokenizer, messages: list[dict], train_on: str = "assistant") -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans the model learns."""
    full = render(tokenizer, messages)
    if train_on == "all":
        return full, [(0, len(full))]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans, cursor = [], 0
    for i in turns:
        span = _turn_by_prefix(tokenizer, messages, i, full, cursor) or _turn_by_search(
            tokenizer, messages[i], full, cursor
        )
        if span is None:
            raise ValueError(f"cannot find assistant message {i} in the rendered chat template")
        spans.append(span)
        cursor = span[1]
    return full, spans


def _turn_by_prefix(tokenizer, messages, i, full, cursor):
    before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
    through = render(tokenizer, messages[: i + 1]).rstrip()
    if not (full.startswith(before) and full.startswith(through) and cursor <= len(before) < len(through)):
        return None
    if messages[i]["content"].strip() not in full[len(before) : len(through)]:
        return None
    return len(before), len(through)


def _turn_by_search(tokenizer, message, full, cursor):
    content = message["content"].strip()
    start = full.find(content, cursor)
    if start < 0 or not content:
        return None
    end = start + len(content)
    rest = full[end:]
    stripped = rest.lstrip(" ")
    for token in (tokenizer.eos_token, *END_OF_TURN):
        if token and stripped.startswith(token):
            end += len(rest) - len(stripped) + len(token)
            break
    return start, end


def tokenize(tokenizer, messages: list[dict], max_length: int, train_on: str = "assistant") -> dict:
    """Token ids and labels (-100 where not learned), truncated to `max_length`."""
    text, spans = learned_spans(tokenizer, messages, train_on)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tok if _inside(s, e, spans) else IGNORE for tok, (s, e) in zip(ids, offsets)]
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def _inside(start: int, end: int, spans) -> bool:
    if end == start:
        return any(a <= start < b for a, b in spans)
    return any(start < b and end > a for a, b in spans)


def tokenize_text(tokenizer, text: str, max_length: int) -> list[dict]:
    """Plain text for continued pre-training: the tokenizer's own special tokens (BOS) plus EOS at the end, so
    the model learns where a document ends; every token is learned; longer texts become consecutive chunks."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [{"input_ids": c, "labels": [IGNORE, *c[1:]]} for c in chunks if len(c) > 1]


def tokenize_all(tokenizer, records: list[dict], max_length: int, train_on: str) -> tuple[list[dict], dict]:
    """Tokenize conversations (and plain texts); drop those left with nothing to learn; return examples and counts."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("this tokenizer has no fast (Rust) version; ftune needs character offsets to mask the loss")
    examples, truncated, dropped = [], 0, 0
    for record in records:
        if "text" in record:
            examples += tokenize_text(tokenizer, record["text"], max_length)
            continue
        try:
            ex = tokenize(tokenizer, record["messages"], max_length, train_on)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or our span search
            raise FtuneError(f"{record['source']}: chat template cannot render this conversation: {exc}") from None
        truncated += ex.pop("truncated")
        if all(label == IGNORE for label in ex["labels"]):
            dropped += 1
            continue
        examples.append(ex)
    stats = {
        "examples": len(examples),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "learned_tokens": sum(sum(label != IGNORE for label in e["labels"]) for e in examples),
    }
    return examples, stats
