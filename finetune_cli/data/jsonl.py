"""Reading data in any supported format from any source (`sources`: JSONL, JSON, Parquet, CSV, folders, Hub
datasets) into records; mixing weighted sources; held-out splits. (Named for the first source it read.)"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import numpy as np

from finetune_cli.data import sources
from finetune_cli.data.formats import LineError, convert, detect, json_text, rename
from finetune_cli.data.store import Errors, Records, Store, as_records
from finetune_cli.errors import FtuneError

NO_FORMAT = (
    'fits no data format: expected "messages" (OpenAI chat), "conversations" (ShareGPT), '
    '"instruction"+"output" (alpaca), "prompt"+"completion", or "text"; map other field names with data.columns'
)

SURROGATE = 'an escape between "\\ud800" and "\\udfff" without its pair is half a character; fix or remove it'


def parse(
    path, fmt: str = "auto", columns: dict | None = None, system_prompt: str | None = None
) -> tuple[Records, Errors, str | None]:
    """Every example of a source: (records, errors, format); a record is `{"source", "format", "messages"|"text"}`.
    The records are written to disk as they are read (`store.Records`); errors keep the first of each kind and
    count all (`store.Errors`).

    `path` is a file, a folder, `hf:ORG/NAME`, or a recipe's data spec (path with split, subset, revision): see
    `sources`. With `fmt="auto"` the format is the one of the first row that fits a format, and a later row in
    another format is an error; in a folder, each file's format is detected on its own. `system_prompt` is added to
    conversations that have no system message. The format returned lists each one detected, in order."""
    records, errors, found = Store(), Errors(), {}
    for item in rows(sources.open_source(path), fmt, columns, system_prompt, found):
        (errors if isinstance(item, LineError) else records).append(item)
    return Records((records.done(),)), errors, (", ".join(found) or None) if fmt == "auto" else fmt


def rows(source, fmt: str, columns: dict | None, system_prompt: str | None, found: dict | None = None) -> Iterator:
    """An opened source's records, one at a time, each a record or the LineError of its row (`parse` collects
    them; a streamed source is tokenized from them as it is read). `found` gathers each format detected."""
    columns, found = columns or {}, {} if found is None else found
    auto, file, detected_at = fmt == "auto", None, None
    for where, at, raw, escapes, part in source.rows:
        if auto and part != file:  # the next file of a folder: detect its format afresh
            fmt, file, detected_at = "auto", part, None
        if isinstance(raw, LineError):
            yield raw
            continue
        if source.tabular:
            try:
                raw, decoded = json_text(raw, columns, where)
            except LineError as exc:
                yield exc
                continue
            escapes = escapes or decoded
        raw = rename(raw, columns)
        if fmt == "auto" and detect(raw):
            fmt, detected_at = detect(raw), at
            found[fmt] = None
        elif fmt == "auto":
            yield LineError("missing field", where, NO_FORMAT)
            continue
        try:
            record = convert(raw, "messages" if fmt == "auto" else fmt, where)
        except LineError as exc:
            if exc.kind == "other format" and detected_at:
                exc = LineError(exc.kind, where, f"{exc.detail} (detected from {detected_at})")
            yield exc
            continue
        if escapes and not _encodable(record):  # json reads a lone "\ud800" escape; tokenizers refuse it
            yield LineError("not UTF-8", where, SURROGATE)
            continue
        if isinstance(record.get("image"), str):
            try:
                record["image"] = image_path(record["image"], part or source.name, where)
            except LineError as exc:
                yield exc
                continue
        if system_prompt and "messages" in record and record["messages"][0]["role"] != "system":
            record["messages"].insert(0, {"role": "system", "content": system_prompt})
        yield {"source": where, "format": fmt, **record}


def image_path(value: str, data_file: str, where: str) -> str:
    """An image row's path, relative to its data file's folder unless absolute; it must exist."""
    from pathlib import Path

    path = Path(value).expanduser()
    if not path.is_absolute() and not data_file.startswith(sources.HUB_PREFIX):
        path = Path(data_file).parent / path
    if not path.is_file():
        raise LineError("missing image", where, f"image {value} not found (looked for {path})")
    return str(path.resolve())


def _encodable(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read(path, fmt: str = "auto", columns: dict | None = None, system_prompt: str | None = None) -> Records:
    """The records of one source; the first bad row raises FtuneError naming file and line (or row)."""
    records, errors, _ = parse(path, fmt, columns, system_prompt)
    if errors:
        raise errors[0]
    if not records:
        raise FtuneError(f"{getattr(path, 'path', path)}: no examples (the file is empty)")
    return records


def load(data, seed: int, reader=read) -> tuple[Records, Records, list[dict]]:
    """The recipe's data: (train records after weighting, eval records, per-file info).

    Each training file is read in its own format; `eval_split` holds out that fraction of every file
    (chosen by `seed`) before weights apply, so no repeated example leaks into evaluation. A weight
    scales how many of a file's examples one epoch sees: 2 repeats each twice, 0.5 keeps a seeded half.
    Splits and weights pick rows by index (`Records.take`): no record is decoded here but each file's first."""
    rng = random.Random(seed)
    train, held, info = [], [], []
    for spec in data.files():
        records = as_records(reader(spec, spec.format, spec.columns, data.system_prompt))
        if data.eval_split:
            records, out = split(records, data.eval_split, seed)
            held.append(out)
        extra = round(len(records) * (spec.weight - int(spec.weight)))
        # the same random calls as rng.sample(records, extra) on a list: sample reads only its length
        weighted = records.repeat(int(spec.weight)) + records.take(rng.sample(range(len(records)), extra))
        if records and not weighted:
            raise FtuneError(f"{spec.path}: weight {spec.weight} leaves no example of this file")
        info.append(
            {
                "path": spec.path,
                "format": records[0]["format"] if records else None,
                "detected": spec.format == "auto",
                "weight": spec.weight,
                "examples": len(records),
                "used": len(weighted),
            }
        )
        train.append(weighted)
    train, held = Records.concat(train), Records.concat(held)
    source = data.eval_source()
    evals = as_records(reader(source, source.format, source.columns, data.system_prompt)) if source else held
    if data.eval_split and not held and train:
        raise FtuneError(f"data.eval_split {data.eval_split} holds out no example of so little data; raise it")
    return train, evals, info


def split(convs, fraction: float, seed: int):
    """Hold out `fraction` of the examples (rounded), chosen by `seed`: (train, eval), each in the original order.
    Records give Records (index views), a list gives lists."""
    from array import array

    order = array("q", range(len(convs)))  # shuffled as the list of positions it was: the same held-out rows
    random.Random(seed).shuffle(order)
    held = np.zeros(len(convs), dtype=bool)
    held[np.frombuffer(order, dtype=np.int64)[: round(len(convs) * fraction)]] = True
    keep, out = np.flatnonzero(~held), np.flatnonzero(held)
    if isinstance(convs, Records):
        return convs.take(keep), convs.take(out)
    return [convs[i] for i in keep.tolist()], [convs[i] for i in out.tolist()]
