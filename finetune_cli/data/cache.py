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

import numpy as np

from finetune_cli import __version__
from finetune_cli.data import examples, store
from finetune_cli.data.masking import tokenize_all
from finetune_cli.data.store import Records

KEEP = 32


def directory() -> Path:
    from finetune_cli.models import ftune_home

    return ftune_home() / "tokenized"


def key(tokenizer, records, max_length: int, train_on: str) -> str:
    """The digests of the records' contents in order (`store.digest`: Records computed them as they were read,
    so nothing is decoded here), with everything else tokenizing depends on."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, max_length, train_on, tokenizer_fingerprint(tokenizer)]).encode())
    if isinstance(records, Records):
        digests = records.digests()
        for start in range(0, len(digests), 1 << 16):
            h.update(np.ascontiguousarray(digests[start : start + (1 << 16)]).tobytes())
    else:
        for r in records:
            h.update(store.digest(r))
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer)
    parts = [backend, tokenizer.chat_template or "", str(tokenizer.all_special_tokens), str(tokenizer.bos_token_id)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def tokenize(tokenizer, records, max_length: int, train_on: str, enabled: bool = True):
    """`masking.tokenize_all` through the cache: (examples, stats), stats["cache"] is "hit", "miss" or "off".
    On a miss the examples are written straight into the new entry (renamed into place once whole)."""
    if not enabled or not records:
        tokenized, stats = tokenize_all(tokenizer, records, max_length, train_on)
        return tokenized, {**stats, "cache": "off"}
    path = directory() / f"{key(tokenizer, records, max_length, train_on)}.arrow"
    loaded = _load(path)
    if loaded is not None:
        return loaded[0], {**loaded[1], "cache": "hit"}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError:  # a read-only cache folder only costs speed
        tokenized, stats = tokenize_all(tokenizer, records, max_length, train_on)
        return tokenized, {**stats, "cache": "off"}
    try:
        tokenized, stats = tokenize_all(tokenizer, records, max_length, train_on, tmp)
        os.replace(tmp, path)  # the examples stay mapped from the file under its new name
    finally:
        tmp.unlink(missing_ok=True)
    _prune(path.parent)
    return tokenized, {**stats, "cache": "miss"}


def _load(path: Path):
    if not path.is_file():
        return None
    try:
        loaded = examples.load(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # unreadable entry: tokenize again and overwrite it
    os.utime(path)
    return loaded


def _prune(folder: Path) -> None:
    for old in folder.glob("*.npz"):  # the format before Arrow files
        old.unlink(missing_ok=True)
    entries = sorted(folder.glob("*.arrow"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)
