"""`ftune eval` of a classifier (accuracy, macro F1, per-class precision/recall/F1, the confusion matrix) and
`ftune classify` (each row's class and probabilities), batched; figures from classification.metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

from finetune_cli import files, rundir
from finetune_cli.classification import inputs, predict
from finetune_cli.classification import model as classifier
from finetune_cli.data import formats, sources
from finetune_cli.errors import FtuneError
from finetune_cli.results import EvalResult


def evaluate(found, target: str, names: list[str], records: list[dict], batch_size: int, predictions, progress):
    """Score the classifier on labelled `records`; write each row's prediction to `predictions` (a path, or None
    for none)."""
    unlabelled = next((r for r in records if "label" not in r), None)
    if unlabelled is not None:
        raise FtuneError(
            f'{unlabelled["source"]}: no label to score against; rows need {{"text", "label"}} (ftune classify '
            "predicts rows without labels)"
        )
    known = set(found.labels)
    for r in records:
        if r["label"] not in known:
            raise FtuneError(
                f"{r['source']}: label {r['label']!r} is not one of the classifier's classes "
                f"({', '.join(found.labels)}); fix the row or score other data"
            )
    kind = "image" if found.task == "image" else "text"
    if inputs.modality(records) != kind:
        raise FtuneError(f"{', '.join(names)}: a {kind} classifier, but the rows hold {inputs.modality(records)}s")
    model, processor = classifier.load_target(found)
    context = None
    if kind == "image":
        examples = inputs.image_examples(records, found.labels)[0]
    else:
        context = _context(found, processor)
        examples = inputs.tokenize(processor, records, found.labels, context)[0]
    collate = inputs.Collator(processor, kind == "image")
    result, probs = predict.score(model, examples, found.labels, collate, batch_size, progress(len(examples)))
    name = "tuned" if found.run_dir is not None or found.adapter is not None else "model"
    out = EvalResult(
        kind="classification",
        target=str(target),
        base=found.base or str(target),
        data=names,
        context=context,
        stride=None,
        results={name: result},
    )
    if predictions is not None:
        rows = (_row(i, r, p, found.labels) | {"label": r["label"]} for i, (r, p) in enumerate(zip(records, probs)))
        files.write_text(predictions, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        out.predictions = str(predictions)
    return out


def _row(index: int, record: dict, probs: list[float], names: list[str]) -> dict:
    best = predict.argmax(probs)
    row = {"index": index}
    if "text" in record:
        row["text"] = record["text"]
    else:
        row["image"] = record["image"] if isinstance(record["image"], str) else f"<{len(record['image'])} bytes>"
    return row | {
        "prediction": names[best],
        "probability": round(probs[best], 6),
        "probabilities": {n: round(p, 6) for n, p in zip(names, probs)},
    }


def open_classifier(target: str):
    found = rundir.open_target(target)
    if not found.task:
        raise FtuneError(
            f"{target} is a language model, not a classifier: train one with training.objective: classification "
            "(ftune generate answers with text)"
        )
    return found


def classify_texts(target: str, texts: list[str], images: list[str], batch_size: int = 8) -> list[dict]:
    """Each given text (or image file) with its predicted class and probabilities."""
    found = open_classifier(target)
    records = [{"text": t} for t in texts]
    for image in images:
        if not Path(image).is_file():
            raise FtuneError(f"--image: {image} not found")
        records.append({"image": str(Path(image).resolve())})
    _check_kind(found, records, "--text" if texts else "--image")
    model, processor = classifier.load_target(found)
    collate = inputs.Collator(processor, found.task == "image")
    rows = []
    for i, (record, probs) in enumerate(
        zip(records, _probabilities(found, model, processor, records, collate, batch_size))
    ):
        rows.append(_row(i, record, probs, found.labels))
    return rows


def classify_file(
    target: str, data: str, out, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
) -> dict:
    """Classify every row of `data` (text or image rows, labels optional), writing one JSON line per row to `out` (a
    text stream) as it goes: memory stays at one chunk of rows. Returns counts and speed."""
    found = open_classifier(target)
    model, processor = classifier.load_target(found)
    collate = inputs.Collator(processor, found.task == "image")
    d = found.recipe.data if found.recipe else None
    started, count = time.perf_counter(), 0
    for chunk in _chunks(_unlabelled_rows(data, d.columns if d else {}), batch_size * 16):
        _check_kind(found, chunk, data)
        probs = _probabilities(found, model, processor, chunk, collate, batch_size, on_batch)
        for record, p in zip(chunk, probs):
            row = _row(count, record, p, found.labels)
            if "label" in record:
                row["label"] = record["label"]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        out.flush()
    if not count:
        raise FtuneError(f"{data}: no rows to classify (the file is empty)")
    seconds = time.perf_counter() - started
    return {"rows": count, "seconds": round(seconds, 2), "rows_per_second": round(count / max(seconds, 1e-9), 1)}


def _check_kind(found, records: list[dict], where: str) -> None:
    kind = "image" if found.task == "image" else "text"
    if records and inputs.modality(records) != kind:
        raise FtuneError(f"{where}: {found.name} is a {kind} classifier; give it {kind}s")


def _probabilities(found, model, processor, records, collate, batch_size, on_batch=None) -> list[list[float]]:
    if found.task == "image":
        examples = inputs.image_examples(records, found.labels)[0]
    else:
        examples = inputs.tokenize(processor, records, found.labels, _context(found, processor))[0]
    return predict.probabilities(model, examples, collate, batch_size, on_batch)[0]


def _context(found, processor) -> int:
    """Tokens read per text: the run's data.max_length, else the tokenizer's own limit (texts are truncated)."""
    if found.recipe is not None:
        return found.recipe.data.max_length
    return min(getattr(processor, "model_max_length", 2048) or 2048, 1 << 20)


def _chunks(rows: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unlabelled_rows(path: str, columns: dict) -> Iterator[dict]:
    """Rows to classify: a "text" (or "image") field, other names mapped by the run's data.columns; a label, when a
    row has one, is kept in the output for comparison."""
    from finetune_cli.data.jsonl import image_path

    source = sources.open_source(path)
    for where, _at, raw, _escapes, part in source.rows:
        if isinstance(raw, formats.LineError):
            raise raw
        raw = formats.rename(raw, columns)
        if not isinstance(raw, dict) or not ("text" in raw or "image" in raw):
            raise FtuneError(f'{where}: expected an object with "text" (or "image") to classify')
        record = {"source": where}
        if "label" in raw:
            record["label"] = formats.label_name(raw["label"], where)
        if "image" in raw:
            image = formats.convert_labelled({"image": raw["image"], "label": "x"}, where)["image"]
            record["image"] = image_path(image, part or source.name, where) if isinstance(image, str) else image
        else:
            text = raw["text"]
            if not isinstance(text, str) or not text.strip():
                raise FtuneError(f'{where}: "text" must be a non-empty string')
            record["text"] = text
        yield record
