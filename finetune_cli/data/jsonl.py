"""Reading JSONL data files in any supported format; mixing weighted files; held-out splits."""

from __future__ import annotations

import codecs
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from finetune_cli.data.formats import LineError, convert, detect, rename
from finetune_cli.errors import FtuneError

NO_FORMAT = (
    'fits no data format: expected "messages" (OpenAI chat), "conversations" (ShareGPT), '
    '"instruction"+"output" (alpaca), "prompt"+"completion", or "text"; map other field names with data.columns'
)

SURROGATE = 'an escape between "\\ud800" and "\\udfff" without its pair is half a character; fix or remove it'


def parse(
    path: str | Path, fmt: str = "auto", columns: dict | None = None, system_prompt: str | None = None
) -> tuple[list[dict], list[LineError], str | None]:
    """Every line of a file: (records, errors, format). Records are `{"source": "file:line", "messages"|"text"}`.

    With `fmt="auto"` the format is the one of the first line that fits a format, and a later line in
    another format is an error. `system_prompt` is added to conversations that have no system message."""
    path = Path(path)
    if not path.is_file():
        raise FtuneError(f"{path}: data file not found")
    records, errors, detected_at = [], [], None
    for lineno, where, line in _lines(path, errors):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(LineError("not JSON", where, f"not valid JSON ({exc.msg}, column {exc.colno})"))
            continue
        except RecursionError:
            errors.append(LineError("not JSON", where, "arrays or objects nested too deeply to read"))
            continue
        except ValueError:  # an integer of more digits than Python's int() reads
            limit = sys.get_int_max_str_digits()
            errors.append(LineError("not JSON", where, f"a number of more than {limit} digits, too long to read"))
            continue
        raw = rename(raw, columns or {})
        if fmt == "auto" and detect(raw):
            fmt, detected_at = detect(raw), lineno
        elif fmt == "auto":
            errors.append(LineError("missing field", where, NO_FORMAT))
            continue
        try:
            record = convert(raw, "messages" if fmt == "auto" else fmt, where)
        except LineError as exc:
            if exc.kind == "other format" and detected_at:
                exc = LineError(exc.kind, where, f"{exc.detail} (detected from line {detected_at})")
            errors.append(exc)
            continue
        if "\\u" in line and not _encodable(record):  # json reads a lone "\ud800" escape; tokenizers refuse it
            errors.append(LineError("not UTF-8", where, SURROGATE))
            continue
        if system_prompt and "messages" in record and record["messages"][0]["role"] != "system":
            record["messages"].insert(0, {"role": "system", "content": system_prompt})
        records.append({"source": where, "format": fmt, **record})
    return records, errors, None if fmt == "auto" else fmt


def _lines(path: Path, errors: list[LineError]) -> Iterator[tuple[int, str, str]]:
    """(number, "file:line", text) of each non-blank line. Text is UTF-8, a byte order mark at the start skipped
    (spreadsheet exports write one); an undecodable line goes to `errors`, never trained on as U+FFFD."""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise FtuneError(f"{path}: cannot read the data file: {exc.strerror}") from None
    lineno = 0
    with f:
        for chunk in f:
            for data in chunk.splitlines():  # \n, \r\n and \r: the lines that text mode numbered
                lineno += 1
                if lineno == 1:
                    data = data.removeprefix(codecs.BOM_UTF8)
                where = f"{path}:{lineno}"
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    byte = f"byte 0x{data[exc.start]:02x} at column {exc.start + 1}"
                    errors.append(LineError("not UTF-8", where, f"not UTF-8 text ({byte}); save the file as UTF-8"))
                    continue
                if line.strip():
                    yield lineno, where, line


def _encodable(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read(
    path: str | Path, fmt: str = "auto", columns: dict | None = None, system_prompt: str | None = None
) -> list[dict]:
    """The records of one file; the first bad line raises FtuneError naming file and line."""
    records, errors, _ = parse(path, fmt, columns, system_prompt)
    if errors:
        raise errors[0]
    if not records:
        raise FtuneError(f"{path}: no examples (the file is empty)")
    return records


def load(data, seed: int, reader=read) -> tuple[list[dict], list[dict], list[dict]]:
    """The recipe's data: (train records after weighting, eval records, per-file info).

    Each training file is read in its own format; `eval_split` holds out that fraction of every file
    (chosen by `seed`) before weights apply, so no repeated example leaks into evaluation. A weight
    scales how many of a file's examples one epoch sees: 2 repeats each twice, 0.5 keeps a seeded half."""
    rng = random.Random(seed)
    train, held, info = [], [], []
    for spec in data.files():
        records = reader(spec.path, spec.format, spec.columns, data.system_prompt)
        if data.eval_split:
            records, out = split(records, data.eval_split, seed)
            held += out
        weighted = records * int(spec.weight)
        extra = round(len(records) * (spec.weight - int(spec.weight)))
        weighted += rng.sample(records, extra)
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
        train += weighted
    evals = reader(data.eval, data.format, data.columns, data.system_prompt) if data.eval else held
    if data.eval_split and not held and train:
        raise FtuneError(f"data.eval_split {data.eval_split} holds out no example of so little data; raise it")
    return train, evals, info


def split(convs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the examples (rounded), chosen by `seed`: (train, eval)."""
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(len(convs) * fraction)])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]
