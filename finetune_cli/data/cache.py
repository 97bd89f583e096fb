"""Tokenized-data cache: a second `train`/`eval` on the same data skips tokenization.

The key hashes everything tokenization depends on: the records (so the data files, format, columns,
system prompt, weights and split), the tokenizer (vocabulary, merges, special tokens), the chat
template, max_length, train_on and ftune's version. Entries are Arrow files (`examples.save`: no pickle),
written atomically under $FTUNE_HOME/tokenized and memory-mapped when read; the newest KEEP entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune_cli import __version__
from finetune_cli.data import examples
from finetune_cli.data.examples import Examples
from finetune_cli.data.masking import tokenize_all

KEEP = 32


def directory() -> Path:
    from finetune_cli.models import ftune_home

    return ftune_home() / "tokenized"


def key(tokenizer, records: list[dict], max_length: int, train_on: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([__version__, max_length, train_on, tokenizer_fingerprint(tokenizer)]).encode())
    for r in records:
        h.update(json.dumps(r.get("messages", r.get("text")), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer)
    parts = [backend, tokenizer.chat_template or "", str(tokenizer.all_special_tokens), str(tokenizer.bos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def tokenize(tokenizer, records: list[dict], max_length: int, train_on: str, enabled: bool = True):
    """`masking.tokenize_all` through the cache: (examples, stats), stats["cache"] is "hit", "miss" or "off"."""
    if not enabled or not records:
        tokenized, stats = tokenize_all(tokenizer, records, max_length, train_on)
        return tokenized, {**stats, "cache": "off"}
    path = directory() / f"{key(tokenizer, records, max_length, train_on)}.arrow"
    loaded = _load(path)
    if loaded is not None:
        return loaded[0], {**loaded[1], "cache": "hit"}
    tokenized, stats = tokenize_all(tokenizer, records, max_length, train_on)
    try:
        _save(path, tokenized, stats)
    except OSError:  # a read-only or full cache folder only costs speed
        pass
    return tokenized, {**stats, "cache": "miss"}


def _load(path: Path):
    if not path.is_file():
        return None
    try:
        loaded = examples.load(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable entry: tokenize again and overwrite it
    os.utime(path)
    return loaded


def _save(path: Path, tokenized: Examples, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        examples.save(tmp, tokenized, stats)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for old in path.parent.glob("*.npz"):  # the format before Arrow files
        old.unlink(missing_ok=True)
    entries = sorted(path.parent.glob("*.arrow"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)
