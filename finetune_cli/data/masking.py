"""Chat template rendering and loss masks found by rendering, so they hold for any Jinja template.

For each learned assistant turn we render the conversation up to that turn (with the generation
prompt) and up to and including it; the difference is what the model must produce: the reply and
the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...). Tokens of the full
rendering whose characters fall in those spans are learned. Nothing depends on `{% generation %}`
markers, and the end-of-turn token is learned even when it is also the pad token.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import sys
import tempfile
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from finetune_cli.data import examples as examples_file
from finetune_cli.data.examples import Examples
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
    return _truncate(enc["input_ids"], _labels(enc["input_ids"], enc["offset_mapping"], spans), max_length)


def _truncate(ids: list[int], labels: list[int], max_length: int) -> dict:
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def _labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters fall in a learned span (an empty token: where it sits), else IGNORE.
    One sweep: offsets and spans both run left to right."""
    labels, j, previous = [], 0, 0
    for tok, (start, end) in zip(ids, offsets):
        if start < previous:  # offsets that step back (never seen from a fast tokenizer): search from the start
            j = 0
        previous = start
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        learned = j < len(spans) and (spans[j][0] <= start if end == start else end > spans[j][0])
        labels.append(tok if learned else IGNORE)
    return labels


def tokenize_text(tokenizer, text: str, max_length: int) -> list[dict]:
    """Plain text for continued pre-training: the tokenizer's own special tokens (BOS) plus EOS at the end, so
    the model learns where a document ends; every token is learned; longer texts become consecutive chunks."""
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [{"input_ids": c, "labels": [IGNORE, *c[1:]]} for c in chunks if len(c) > 1]


def tokenize_all(tokenizer, records, max_length: int, train_on: str, path: Path | None = None) -> tuple[Examples, dict]:
    """Tokenize conversations (and plain texts), in forked processes for big sets; drop those left with nothing to
    learn; return the examples (flat, in record order) and counts.

    Each chunk's examples are written to an Arrow file as it comes (`path`: the tokenized cache's entry, being
    written; else a temporary file, deleted once mapped) and the whole is memory-mapped back from it: the
    examples of any number of records cost pages of the file, not memory."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("this tokenizer has no fast (Rust) version; ftune needs character offsets to mask the loss")
    own = path is None
    if own:
        handle, name = tempfile.mkstemp(prefix="ftune-examples-", suffix=".arrow")
        os.close(handle)
        path = Path(name)
    truncated = dropped = count = tokens = learned = 0
    stats = None
    try:
        writer = examples_file.Writer(path)
        try:
            for part, error in map_records(tokenizer, records, tokenize_chunk, max_length, train_on):
                if error:
                    raise FtuneError(error)
                examples, cut, empty = part
                writer.write(examples)
                truncated, dropped, count = truncated + cut, dropped + empty, count + len(examples)
                tokens, learned = tokens + examples.tokens(), learned + examples.learned(IGNORE)
            stats = {
                "examples": count,
                "truncated": truncated,
                "dropped": dropped,
                "tokens": tokens,
                "learned_tokens": learned,
            }
        finally:
            writer.close(stats)
        loaded = examples_file.load(path)[0]
    finally:
        if own:  # the memory map keeps its pages readable
            path.unlink(missing_ok=True)
    return loaded, stats


def tokenize_chunk(tokenizer, records: list[dict], max_length: int, train_on: str):
    """((examples, truncated, dropped), None) for some records, or (None, the first error naming its record)."""
    ids, labels, lengths, truncated, dropped = array("i"), array("i"), [], 0, 0
    for record in records:
        if "text" in record:
            chunks = tokenize_text(tokenizer, record["text"], max_length)
        else:
            try:
                ex = tokenize(tokenizer, record["messages"], max_length, train_on)
            except Exception as exc:  # noqa: BLE001 - a template's raise_exception or our span search
                return None, f"{record['source']}: chat template cannot render this conversation: {exc}"
            truncated += ex["truncated"]
            if all(label == IGNORE for label in ex["labels"]):
                dropped += 1
                continue
            chunks = [ex]
        for c in chunks:
            ids.extend(c["input_ids"])
            labels.extend(c["labels"])
            lengths.append(len(c["input_ids"]))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    examples = Examples(np.frombuffer(ids, np.int32), np.frombuffer(labels, np.int32), offsets)
    return (examples, truncated, dropped), None


# Tokenizing is pure Python around the tokenizer's Rust (the chat template renders each conversation 1 + 2 x turns
# times): processes, not threads, spread it over the cores.
CHUNK = 256
PARALLEL_FROM = 4096  # fewer records are done before a pool of processes has started
MAX_WORKERS = 16  # each holds a tokenizer and a Python: more rarely pays on one machine's memory
_JOB: tuple | None = None


def workers(count: int) -> int:
    """Processes to tokenize `count` records with: every available core up to MAX_WORKERS (FTUNE_TOKENIZE_WORKERS
    overrides), one for small sets, and one where processes cannot be forked."""
    if "fork" not in multiprocessing.get_all_start_methods() or sys.platform != "linux":
        return 1
    setting = os.environ.get("FTUNE_TOKENIZE_WORKERS", "").strip()
    if setting:
        if not setting.isdigit():
            raise FtuneError(f"FTUNE_TOKENIZE_WORKERS={setting}: expected a number of processes (1: none)")
        return max(1, int(setting))
    return 1 if count < PARALLEL_FROM else min(len(os.sched_getaffinity(0)), MAX_WORKERS)


def map_records(tokenizer, records, work, *args) -> Iterator:
    """`work(tokenizer, chunk, *args)` for consecutive chunks of records (a sequence: `store.Records` or a list),
    results in order. Big sets go to forked processes: they inherit the tokenizer and the records (a `Records`
    reads its rows from its file), and are sent only each chunk's (start, end); only results come back."""
    ranges = [(i, min(i + CHUNK, len(records))) for i in range(0, len(records), CHUNK)]
    n = min(workers(len(records)), len(ranges))
    if n <= 1:
        yield from (work(tokenizer, records[a:b], *args) for a, b in ranges)
        return
    global _JOB
    _JOB = (tokenizer, work, args, records)
    gc.freeze()  # the workers' garbage collector leaves the parent's objects alone: their pages stay shared
    try:
        with multiprocessing.get_context("fork").Pool(n, initializer=_ignore_sigint) as pool:
            yield from pool.imap(_run, ranges)
    finally:
        gc.unfreeze()
        _JOB = None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool


def _run(span: tuple[int, int]):
    tokenizer, work, args, records = _JOB
    return work(tokenizer, records[span[0] : span[1]], *args)
