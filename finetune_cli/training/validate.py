"""`ftune validate` and `ftune preview`: what the model will learn, before any weights are loaded.

validate reads every row of every data source (tokenizer only), groups bad rows by kind with file and line
or row (the first SHOWN of each kind, and how many), warns about missing system messages and duplicates, and
counts tokens and learned tokens per example before truncation, what truncation to max_length would lose, and
the steps an epoch takes. A classifier's rows (training.objective: classification) get training's label checks
as errors, and counts per class, the imbalance and tokens per text instead of learned tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from finetune_cli import models
from finetune_cli.classification import inputs, labels
from finetune_cli.data import jsonl, preference, sources
from finetune_cli.data.formats import PAIR_FIELDS, LineError
from finetune_cli.data.masking import IGNORE, map_records, tokenize, tokenize_text
from finetune_cli.data.store import Errors, Records
from finetune_cli.errors import FtuneError
from finetune_cli.results import ValidateReport
from finetune_cli.training import classifier, methods

PREFERENCE_KEYS = ("prompt", *PAIR_FIELDS, "completion", "label")

UNLIMITED = 1 << 40
SHOWN = 20  # bad rows listed per kind of error, and duplicates listed; the counts are of all of them
# validate's counts of each example, one row of int32 per distinct line (-1: the part is not in that example):
# arrays, not a dict per line, so a million lines cost 36 MB here
COUNTS = ("tokens", "learned", "lost", "over", "prompt", "chosen", "rejected", "completion", "chat")


def validate(recipe) -> ValidateReport:
    """The report: files (format, examples, errors), errors by kind, warnings, statistics; `ok` when no error."""
    d = recipe.data
    errors = Errors()  # the first of each kind and how many: validate lists SHOWN of each
    files: list[dict] = []

    def reader(spec, fmt, columns, system_prompt):
        path = spec.path
        try:
            records, bad, found = jsonl.parse(spec, fmt, columns, system_prompt)
        except FtuneError as exc:  # the source cannot be opened or read at all
            local = not str(path).startswith(sources.HUB_PREFIX)
            kind = "missing file" if local and not Path(path).exists() else "unreadable data"
            errors.append(LineError(kind, str(path), str(exc).removeprefix(f"{path}: ")))
            files.append({"path": str(path), "format": None, "examples": 0, "errors": 1})
            return []
        errors.extend(bad)
        if not records and not bad:
            errors.append(LineError("empty file", str(path), "no examples (the file is empty)"))
        files.append({"path": str(path), "format": found, "examples": len(records), "errors": bad.total})
        return records

    train, evals, _ = jsonl.load(d, recipe.training.seed, reader)
    lines = _unique(train + evals)  # every line read once: weights repeat lines, eval_split moves them
    source, weights = _sources(recipe)
    if recipe.training.objective == "classification":
        stats, warnings = _classification(recipe, train, evals, source, errors)
        return _report(recipe, files, errors, _warnings(lines) + warnings + _device_warnings(recipe), stats)
    try:
        classifier.check_data(recipe.training.objective, train, evals, d.files()[0].path)
    except FtuneError as exc:
        errors.append(_named("objective", exc, d.files()[0].path))
    train, evals = _keep(train, _not_row), _keep(evals, _not_row)
    lines = _keep(lines, _not_row)
    tokenizer = _tokenizer(recipe, lines, source)
    counts, ok = np.full((len(lines), len(COUNTS)), -1, np.int32), np.zeros(len(lines), bool)
    at = 0
    for chunk in map_records(tokenizer, lines, _count_chunk, d.max_length, d.train_on, d.system_prompt):
        rows, problems = chunk
        counts[at : at + len(rows)], ok[at : at + len(rows)] = rows, True
        for i, where, problem in problems:
            ok[at + i] = False
            errors.append(LineError("template", where, f"chat template cannot render this conversation: {problem}"))
        at += len(rows)
    find = _finder(lines)
    train_at = find(train)
    train = train.take(np.flatnonzero(ok[train_at])) if isinstance(train, Records) else _kept(train, ok[train_at])
    train_at = train_at[ok[train_at]]
    stats = _stats(counts[train_at], d.max_length)
    if len(train_at) and bool(np.any(counts[train_at, COUNTS.index("prompt")] >= 0)):  # preference rows
        stats["pairs"] = _part_stats(counts[train_at])
    try:
        preference.check_data(recipe.training.objective, train, evals, d.files()[0].path)
    except FtuneError as exc:
        errors.append(LineError("objective", d.files()[0].path, str(exc).split(": ", 1)[-1]))
    if len(train) and not stats["learned_tokens_per_epoch"]:  # what `ftune train` refuses, with the same words
        errors.append(
            LineError(
                "nothing to learn",
                d.files()[0].path,
                f"no example has a learned token left after truncation to {d.max_length}; raise data.max_length",
            )
        )
    t = recipe.training
    per_step = t.batch_size * t.gradient_accumulation * recipe.distributed.num_processes
    stats["steps_per_epoch"] = math.ceil(len(train) / per_step) if len(train) else 0
    if len(evals):
        at = find(_unique(evals))
        stats["eval"] = _stats(counts[at[ok[at]]], d.max_length)
    warnings = _warnings(lines) + _length_warnings(lines, counts, find(_unique(train)), d.max_length, weights)
    return _report(recipe, files, errors, _device_warnings(recipe) + warnings, stats)


def _report(recipe, files: list[dict], errors: list[LineError], warnings: list[str], stats: dict) -> ValidateReport:
    by_kind: dict[str, list[dict]] = {}
    counts = errors.counts if isinstance(errors, Errors) else Counter(e.kind for e in errors)
    for e in errors:
        shown = by_kind.setdefault(e.kind, [])
        if len(shown) < SHOWN:
            shown.append({"where": e.where, "message": e.detail})
    return ValidateReport(
        **{
            "recipe": recipe.output.dir,
            "model": recipe.model.base,
            "files": files,
            "errors": by_kind,
            "error_counts": dict(counts),
            "error_count": sum(counts.values()),
            "warnings": warnings,
            "stats": stats,
            "ok": not errors,
        }
    )


def _device_warnings(recipe) -> list[str]:
    t = recipe.training
    try:
        methods.check_device(recipe.method, t.precision, t.optimizer, t.liger)
    except FtuneError as exc:  # the recipe may be meant for another machine: say so, do not fail
        return [f"this machine cannot train this recipe as it is: {exc}"]
    return []


def _named(kind: str, exc: FtuneError, where: str) -> LineError:
    """A preflight FtuneError as a LineError at the file:line it names (else at `where`)."""
    text = str(exc)
    named, _, detail = text.partition(": ")
    return LineError(kind, named, detail) if detail else LineError(kind, where, text)


def _classification(recipe, train: list[dict], evals: list[dict], source: str, errors: list) -> tuple[dict, list]:
    """What `ftune train` checks in preflight for a classifier, every bad row an error rather than the first one;
    and per-class counts, imbalance, token counts per text (images: none) and steps per epoch."""
    d, t, first = recipe.data, recipe.training, recipe.data.files()[0].path
    try:
        classifier.check_data(t.objective, train, evals, first)
    except FtuneError as exc:
        errors.append(_named("objective", exc, first))
    train, evals = [r for r in train if classifier.is_row(r)], [r for r in evals if classifier.is_row(r)]
    _check_classes(recipe, train, evals, first, errors)
    names = list(d.labels) if d.labels is not None else labels.ordered(r["label"] for r in train)
    names += labels.ordered({r["label"] for r in train + evals} - set(names))  # shown too, as errors above
    count = labels.counts(train, names)
    per_step = t.batch_size * t.gradient_accumulation * recipe.distributed.num_processes
    images = inputs.modality(train + evals) == "image"
    stats = {
        "input": "image" if images else "text",
        "examples": len(train),
        "classes": names,
        "labels": count,
        "imbalance": labels.imbalance(count),
        "max_length": d.max_length,
        "steps_per_epoch": math.ceil(len(train) / per_step) if train else 0,
    }
    warnings = []
    if stats["imbalance"] and stats["imbalance"] > 3 and t.class_weights in (None, "none"):
        warnings.append(
            f"the classes are imbalanced (largest/smallest {stats['imbalance']}); "
            "training.class_weights: balanced weighs the rare ones up"
        )
    empty = [n for n in d.labels or [] if not count.get(n)]
    if empty:
        warnings.append(f"data.labels names {', '.join(empty)} with no training rows: the model cannot learn them")
    if not images and (train or evals):
        tokenizer = _tokenizer(recipe, [], source)
        rows = _unique(train + evals)
        ids = tokenizer([r["text"] for r in rows], truncation=False, add_special_tokens=True)["input_ids"]
        lengths = {r["source"]: len(i) for r, i in zip(rows, ids)}
        stats.update(_text_stats([lengths[r["source"]] for r in train], d.max_length))
        over = [r["source"] for r in _unique(train) if lengths[r["source"]] > d.max_length]
        if over:
            warnings.append(
                f"{len(over)} texts are longer than data.max_length {d.max_length} and are truncated to it "
                f"(first: {over[0]})"
            )
    if evals:
        stats["eval"] = {"examples": len(evals), "labels": labels.counts(evals, names)}
        if not images:
            stats["eval"].update(_text_stats([lengths[r["source"]] for r in evals], d.max_length))
    return stats, warnings


def _check_classes(recipe, train: list[dict], evals: list[dict], first: str, errors: list) -> None:
    """training.classifier.classes as errors: each unreadable image, each row whose label it refuses (the row it
    names is dropped and it runs again), then what is wrong with the data as a whole (one class)."""
    bad = set()
    for r in _unique(train + evals):  # each unreadable image, not only the first
        if isinstance(r.get("image"), (str, bytes)):
            try:
                classifier.check_images([r])
            except FtuneError as exc:
                error = _named("image", exc, r["source"])
                errors.append(error)
                bad.add(error.where)
    train, evals = [r for r in train if r["source"] not in bad], [r for r in evals if r["source"] not in bad]
    while True:  # a row the labels check names is dropped and the check runs again, to name every such row
        try:
            classifier.classes(recipe, train, evals, first)
            break
        except FtuneError as exc:
            error = _named("labels", exc, first)
            errors.append(error)
            if error.where not in {r["source"] for r in train + evals}:
                break
            train = [r for r in train if r["source"] != error.where]
            evals = [r for r in evals if r["source"] != error.where]


def _text_stats(lengths: list[int], max_length: int) -> dict:
    return {"tokens": _spread(lengths), "over_max_length": sum(n > max_length for n in lengths)}


def _unique(records):
    """Each line once, in order of first appearance (weights repeat lines, eval_split moves them)."""
    if isinstance(records, Records):
        return records.unique()
    return list({r["source"]: r for r in records}.values())


def _not_row(record: dict) -> bool:
    return not classifier.is_row(record)


def _keep(records, keep):
    """The records `keep` is true of: a view of Records (one pass, nothing kept in memory), else a list."""
    return records.where(keep) if isinstance(records, Records) else [r for r in records if keep(r)]


def _kept(records: list, mask: np.ndarray) -> list:
    return [r for r, k in zip(records, mask.tolist()) if k]


def _finder(lines):
    """position of each record in `lines` (distinct by source): by the sources' hashes for Records."""
    if isinstance(lines, Records):
        keys = lines.keys()
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]

        def find(records) -> np.ndarray:
            wanted = records.keys() if isinstance(records, Records) else Records.from_list(records).keys()
            return order[np.searchsorted(sorted_keys, wanted)]

        return find
    where = {r["source"]: i for i, r in enumerate(lines)}
    return lambda records: np.array([where[r["source"]] for r in records], dtype=np.int64)


def _sources(recipe) -> tuple[str, str]:
    """(tokenizer folder, weights folder or hub id) of model.base; a finished run named there is read as training
    reads it: its tokenizer (with the template it trained with) and the weights it starts from."""
    from finetune_cli import rundir

    start = rundir.start_point(recipe.model.base)
    if start is not None:
        return start.tokenizer, start.weights
    source = models.resolve(recipe.model.base)
    return source, source


def _tokenizer(recipe, records: list[dict], source: str | None = None):
    """The recipe's tokenizer and template, without weights; a template is needed only for chat data."""
    return models.load_tokenizer(
        source or _sources(recipe)[0],
        recipe.model.chat_template,
        recipe.model.trust_remote_code,
        require_template=any("messages" in r or "prompt" in r for r in records),
    )


def _count_chunk(tokenizer, records, max_length: int, train_on: str, system_prompt) -> tuple:
    """(an array of COUNTS, a row per record, -1 where a part is absent; [(i, where, why the template cannot
    render record i)])."""
    rows, problems = np.full((len(records), len(COUNTS)), -1, np.int32), []
    for i, r in enumerate(records):
        try:
            count = _count(tokenizer, r, max_length, train_on, system_prompt)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or the span search
            problems.append((i, r["source"], str(exc)))
            continue
        count = {**count, "chat": "messages" in r}
        rows[i] = [int(count.get(name, -1)) for name in COUNTS]
    return rows, problems


def _count(tokenizer, record: dict, max_length: int, train_on: str, system_prompt: str | None = None) -> dict:
    """Tokens and learned tokens of one example before truncation, and the learned tokens truncation loses."""
    if "chosen" in record or "label" in record:
        return preference.count(tokenizer, record, max_length, system_prompt)
    if "text" in record:
        chunks = tokenize_text(tokenizer, record["text"], max_length)
        tokens = sum(len(c["input_ids"]) for c in chunks)
        learned = sum(sum(x != IGNORE for x in c["labels"]) for c in chunks)
        return {"tokens": tokens, "learned": learned, "lost": 0, "over": False}  # long texts are chunked, not cut
    labels = tokenize(tokenizer, record["messages"], UNLIMITED, train_on)["labels"]
    learned = sum(x != IGNORE for x in labels)
    kept = sum(x != IGNORE for x in labels[:max_length])
    return {"tokens": len(labels), "learned": learned, "lost": learned - kept, "over": len(labels) > max_length}


def _spread(values) -> dict:
    """min, nearest-rank p50 and p95, and max: exact (one sort of the array of all values)."""
    values = np.sort(np.asarray(values, dtype=np.int64))
    if not len(values):
        return {"min": 0, "p50": 0, "p95": 0, "max": 0}
    rank = lambda q: int(values[max(0, math.ceil(q * len(values)) - 1)])  # noqa: E731 - nearest-rank percentile
    return {"min": int(values[0]), "p50": rank(0.5), "p95": rank(0.95), "max": int(values[-1])}


def _stats(counts: np.ndarray, max_length: int) -> dict:
    """The statistics of examples from their rows of COUNTS."""
    column = {name: counts[:, i].astype(np.int64) for i, name in enumerate(COUNTS)}
    return {
        "examples": len(counts),
        "tokens": _spread(column["tokens"]),
        "learned_tokens": _spread(column["learned"]),
        "over_max_length": int(column["over"].sum()),
        "learned_tokens_lost_to_truncation": int(column["lost"].sum()),
        "learned_tokens_per_epoch": int((column["learned"] - column["lost"]).sum()),
        "max_length": max_length,
    }


def _part_stats(counts: np.ndarray) -> dict:
    """preference.part_stats on rows of COUNTS: the spread of each part that some example has."""
    out = {}
    for part in ("prompt", *PAIR_FIELDS, "completion"):
        values = counts[:, COUNTS.index(part)]
        if np.any(values >= 0):
            out[f"{part}_tokens"] = _spread(values[values >= 0])
    return out


def _warnings(records) -> list[str]:
    """Missing system messages, duplicates (by a 128-bit digest of each line's content, kept in two arrays of
    int64: no dict of all lines), unanswered user turns. One pass over `records` (distinct lines)."""
    out = []
    chats = without = 0
    first_without = None
    ends: Counter = Counter()
    low, high = array("q"), array("q")
    for r in records:
        digest = hashlib.blake2b(_content(r), digest_size=16).digest()
        low.append(int.from_bytes(digest[:8], "little", signed=True))
        high.append(int.from_bytes(digest[8:], "little", signed=True))
        if "messages" in r:
            chats += 1
            ends[r["messages"][-1]["role"]] += 1
            if r["messages"][0]["role"] != "system":
                without += 1
                first_without = first_without or r["source"]
    if without and without < chats:
        out.append(f"{without} of {chats} conversations have no system message (first: {first_without})")
    elif without:
        out.append("no conversation has a system message; data.system_prompt can add one to each")
    low, high = np.frombuffer(low, np.int64), np.frombuffer(high, np.int64)
    lines, originals = _repeats(low, high)
    for line, original in zip(lines[:SHOWN].tolist(), originals[:SHOWN].tolist()):
        out.append(f"{records[line]['source']}: duplicate of {records[original]['source']}")
    if len(lines) > SHOWN:
        out.append(f"{len(lines)} duplicates in all (the first {SHOWN} are listed)")
    if ends.get("user"):
        out.append(f"{ends['user']} conversations end with a user turn that nothing answers (it is not learned)")
    return out


def _repeats(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each line whose digest an earlier line has, that earlier line's first one), in line order."""
    if not len(low):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((np.arange(len(low)), low, high))  # equal digests together, each group in line order
    starts = np.concatenate([[True], (low[order][1:] != low[order][:-1]) | (high[order][1:] != high[order][:-1])])
    firsts = order[starts][np.cumsum(starts) - 1]  # the first line of each sorted position's group
    lines, originals = order[~starts], firsts[~starts]
    by_line = np.argsort(lines, kind="stable")
    return lines[by_line], originals[by_line]


def _content(record: dict) -> bytes:
    """What makes two rows duplicates: the conversation, text, pair or image (a path or its bytes)."""
    if isinstance(record.get("image"), bytes):
        return record["image"]
    if "prompt" in record:
        content = [record.get(k) for k in PREFERENCE_KEYS]
    else:
        content = record.get("messages", record.get("text", record.get("image")))
    return json.dumps(content, sort_keys=True).encode("utf-8", "surrogatepass")


def _length_warnings(lines, counts: np.ndarray, train_at: np.ndarray, max_length: int, source: str) -> list[str]:
    """Conversations that truncation leaves with nothing to learn (training drops them), and a max_length past
    the model's context. `train_at`: the distinct training lines' positions in `lines` and `counts`."""
    out = []
    rows = counts[train_at]
    chats = rows[:, COUNTS.index("chat")] == 1
    empty = chats & (rows[:, COUNTS.index("learned")] == rows[:, COUNTS.index("lost")])
    if empty.any() and empty.sum() < chats.sum():  # all of them is an error, reported above
        first = lines[int(train_at[np.flatnonzero(empty)[0]])]["source"]
        out.append(
            f"{int(empty.sum())} conversations have no learned token left after truncation to {max_length} "
            f"(training drops them; first: {first})"
        )
    context = _context_length(source)
    if context and max_length > context:
        out.append(
            f"data.max_length {max_length} is longer than the model's context ({context} tokens, "
            f"max_position_embeddings in its config.json); positions past it were never trained"
        )
    return out


def _context_length(source: str) -> int | None:
    """max_position_embeddings from a model's config.json (a local folder, or a hub id already in the HF cache);
    None when there is none to read. No weights, no network."""
    config = Path(source) / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - not a valid hub id: nothing to read
            return None
        if not isinstance(found, str):
            return None
        config = Path(found)
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    text = data.get("text_config") if isinstance(data, dict) else None  # multimodal configs nest it
    for part in (data, text):
        value = part.get("max_position_embeddings") if isinstance(part, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def preview(recipe, index: int = 0, count: int = 1) -> list[dict]:
    """Examples `index`..`index+count-1` of the training data as the model sees them: each token's id, text and
    whether it is learned, after truncation to max_length."""
    d = recipe.data
    records = Records.concat(jsonl.read(spec, spec.format, spec.columns, d.system_prompt) for spec in d.files())
    if not 0 <= index < len(records):
        raise FtuneError(f"--index {index}: the training data has {len(records)} examples (0 to {len(records) - 1})")
    shown = records[index : index + count]
    needs_tokenizer = any("image" not in r for r in shown)  # image rows: the model may have no tokenizer at all
    tokenizer = _tokenizer(recipe, [r for r in shown if not classifier.is_row(r)]) if needs_tokenizer else None
    names = labels.ordered(r["label"] for r in records if classifier.is_row(r))
    names = list(d.labels) if d.labels is not None else names
    out = []
    for r in shown:
        if classifier.is_row(r):
            out.append(_preview_row(tokenizer, r, names, d.max_length))
            continue
        if "chosen" in r or "label" in r:
            out += _preview_pair(tokenizer, r, d.max_length, d.system_prompt)
            continue
        if "text" in r:  # training cuts long texts into max_length chunks, losing nothing: show the first
            chunks = tokenize_text(tokenizer, r["text"], d.max_length) or [{"input_ids": [], "labels": []}]
            ids, marks, truncated, parts = chunks[0]["input_ids"], chunks[0]["labels"], False, len(chunks)
        else:
            ex = tokenize(tokenizer, r["messages"], d.max_length, d.train_on)
            ids, marks, truncated, parts = ex["input_ids"], ex["labels"], ex["truncated"], 1
        tokens = [
            {"id": t, "text": tokenizer.decode([t], clean_up_tokenization_spaces=False), "learned": lab != IGNORE}
            for t, lab in zip(ids, marks)
        ]
        out.append(
            {
                "source": r["source"],
                "tokens": tokens,
                "count": len(tokens),
                "learned": sum(t["learned"] for t in tokens),
                "truncated": truncated,
                "chunks": parts,
            }
        )
    return out


def _preview_row(tokenizer, record: dict, names: list[str], max_length: int) -> dict:
    """A classification row as the classifier reads it: its text's tokens after truncation (none is learned: the
    loss is on the class) or its image, and its label with its class id (None: a label outside the classes)."""
    image = record.get("image")
    ids = [] if "image" in record else tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    tokens = [
        {"id": t, "text": tokenizer.decode([t], clean_up_tokenization_spaces=False), "learned": False}
        for t in ids[:max_length]
    ]
    shown = {"image": image if isinstance(image, str) else f"({len(image)} bytes)"} if "image" in record else {}
    return {
        "source": record["source"],
        **shown,
        "tokens": tokens,
        "count": len(tokens),
        "learned": 0,
        "truncated": len(ids) > max_length,
        "chunks": 1,
        "label": record["label"],
        "class_id": names.index(record["label"]) if record["label"] in names else None,
    }


def _preview_pair(tokenizer, record: dict, max_length: int, system_prompt: str | None) -> list[dict]:
    """A preference pair as two previews, chosen then rejected: the shared prompt (not scored) and each reply's
    scored tokens, after truncation to max_length."""
    record = preference.with_system(record, system_prompt)
    if "label" in record:  # a KTO line: its one reply, desirable or not
        ex, truncated = preference.tokenize_reply(tokenizer, record["prompt"], record["completion"], max_length)
        ex = {"prompt_ids": [], "completion_ids": []} if ex is None else ex
        keys = ["completion"]
    else:
        ex, truncated = preference.tokenize_pair(tokenizer, record, max_length)
        ex = ex or {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
        keys = list(PAIR_FIELDS)
    out = []
    for key in keys:
        ids = [(t, False) for t in ex["prompt_ids"]] + [(t, True) for t in ex[f"{key}_ids"]]
        tokens = [
            {"id": t, "text": tokenizer.decode([t], clean_up_tokenization_spaces=False), "learned": scored}
            for t, scored in ids
        ]
        out.append(
            {
                "source": f"{record['source']} ({key if key in PAIR_FIELDS else _desirable(record)})",
                "tokens": tokens,
                "count": len(tokens),
                "learned": len(ex[f"{key}_ids"]),
                "truncated": truncated,
                "chunks": 1,
            }
        )
    return out


def _desirable(record: dict) -> str:
    return "desirable" if record["label"] else "undesirable"
