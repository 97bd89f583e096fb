"""`ftune feedback DIR -o FILE`: the ratings people gave served replies (`ftune serve --log-requests DIR`) as
training data, closing the loop serve -> feedback -> train -> serve.

DIR holds `requests.jsonl` (one finished request a line) and `feedback.jsonl` (one rating or side-by-side choice a
line). `--format kto` writes one row per rated reply (thumbs up: desirable, down: undesirable); `--format dpo`
writes preference pairs from side-by-side choices and from replies to the same messages rated up and down. Both
are lines ftune's own loader reads (formats.convert_unpaired / convert_pair) with `training.objective: kto|dpo`.

Only replies worth learning from are used: chat replies to a conversation that ends with the user's turn, which
finished on their own (a reply cut at max_tokens would teach the model to stop mid-sentence). Everything left out
is counted with its reason, so the summary says where each rating went."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from finetune_cli import files, rundir
from finetune_cli.data.formats import LineError, convert_unpaired
from finetune_cli.errors import FtuneError

KIND = "serve-log"  # the .ftune marker's kind in a folder `ftune serve --log-requests DIR` writes
REQUESTS = "requests.jsonl"
FEEDBACK = "feedback.jsonl"
FORMATS = ("kto", "dpo")
TABULAR = (".parquet", ".csv", ".tsv")  # names ftune's loader would read as another format than JSON lines

# Why a rating, a choice or a log line was left out (the summary's "skipped" keys, as `describe` shows them).
UNKNOWN = "id not in requests.jsonl"
COMPLETIONS = "completions API"
CUT = "cut at max_tokens"
NOT_USER_LAST = "conversation not ending with a user message"
EMPTY = "empty reply"
INVALID = "not a valid conversation"
CHOICES_IN_KTO = "side-by-side choices: they make DPO pairs"
DIFFERENT = "choices between replies to different messages"
SAME_TEXT = "choices between identical replies"
SELF = "choices of a reply over itself"
DUPLICATE = "choices repeating an earlier one"
REVERSED = "choices reversed by a later one"
CONFLICT = "conflicting ratings"
UNPAIRED = "ratings without an opposite rating of the same messages"
TORN = "incomplete last line"


def export(log_dir: Path, output: Path, fmt: str) -> dict:
    """Write the feedback in `log_dir` as `fmt` (kto or dpo) JSON lines to the new file `output`; the summary.

    Raises FtuneError (exit 2) before anything is written for a folder that is not a request log, an output that
    exists or has no folder, a corrupt line, or no usable feedback."""
    if fmt not in FORMATS:
        raise FtuneError(f"--format: {fmt!r} is not a feedback format; use kto (rated replies) or dpo (pairs)")
    _check_log_dir(log_dir)
    _check_output(output)
    skipped: Counter = Counter()
    ratings, choices, lines = _read_feedback(log_dir / FEEDBACK, skipped)
    if not ratings and not choices:
        raise FtuneError(
            f"no feedback yet in {log_dir / FEEDBACK}: rate replies on ftune serve's chat page (thumbs up/down, or "
            "'this one is better' side by side) or POST /v1/feedback, then run this again"
        )
    wanted = set(ratings) | {i for pair in choices for i in pair[:2]}
    requests, logged = _read_requests(log_dir / REQUESTS, wanted, skipped)
    summary = {
        "format": fmt,
        "log_dir": str(log_dir),
        "output": str(output),
        "requests": logged,
        "feedback_lines": lines,
        "ratings": len(ratings),
        "choices": len(choices),
        "replaced": lines - len(ratings) - len(choices),  # by a later line about the same reply or the same two
    }
    if fmt == "kto":
        rows, counts = _kto(ratings, choices, requests, skipped)
    else:
        rows, counts = _dpo(ratings, choices, requests, skipped)
    summary.update(counts)
    summary["rows"] = len(rows)
    summary["skipped"] = dict(skipped)
    if not rows:
        raise FtuneError(_nothing_usable(log_dir, fmt, summary))
    with files.atomic_text(output) as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return summary


def describe(summary: dict) -> str:
    """Two lines for people: what was written from what and what was left out, then how to train on it."""
    out, fmt = summary["output"], summary["format"]
    if fmt == "kto":
        rows = f"{summary['rows']} KTO row{'s' * (summary['rows'] != 1)}"
        what = f"{rows} ({summary['desirable']} desirable, {summary['undesirable']} undesirable)"
    else:
        what = (
            f"{summary['rows']} DPO pair{'s' * (summary['rows'] != 1)} ({summary['from_choices']} from side-by-side "
            "choices, "
            f"{summary['from_ratings']} from opposite ratings of the same messages)"
        )
    line = f"wrote {what} to {out} from {summary['requests']} logged requests"
    if summary["skipped"]:
        line += "; skipped " + _skips(summary["skipped"])
    hint = (
        f"next: train on it with `training.objective: {fmt}` and `data.train: {out}` in a recipe "
        "(check it first with ftune validate RECIPE)"
    )
    return f"{line}\n{hint}{_balance(summary) if fmt == 'kto' else ''}"


def _balance(summary: dict) -> str:
    """KTO wants desirable and undesirable replies about balanced (TRL: desirable_weight x desirable over
    undesirable_weight x undesirable within 1 to 4/3); people give far more thumbs up than down."""
    good, bad = summary["desirable"], summary["undesirable"]
    if not good or not bad:
        return f"; every row is {'desirable' if good else 'undesirable'}: KTO learns best from both kinds"
    (many, more), (few, less) = sorted([(good, "desirable"), (bad, "undesirable")], reverse=True)
    if many > 2 * few:  # weigh the rarer kind up: the ratio becomes 1
        return f"; {many} {more} to {few} {less}: consider `training.{less}_weight: {round(many / few, 2):g}`"
    return ""


def _skips(skipped: dict) -> str:
    return ", ".join(f"{n} ({why})" for why, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def _nothing_usable(log_dir: Path, fmt: str, summary: dict) -> str:
    """Why no row came out, and what would give one."""
    why = f" (skipped {_skips(summary['skipped'])})" if summary["skipped"] else ""
    if fmt == "kto" and not summary["ratings"]:
        hint = "it holds only side-by-side choices: use --format dpo, or rate replies with thumbs up/down"
    elif fmt == "dpo" and not summary["choices"] and summary["ratings"]:
        hint = (
            "DPO needs two replies to the same messages, one rated up and one down, or a side-by-side choice: "
            "use --format kto for single ratings"
        )
    else:
        hint = "rate finished chat replies (not ones cut at max_tokens), then run this again"
    return f"no feedback yet that makes {fmt.upper()} data in {log_dir}{why}: {hint}"


def _check_log_dir(log_dir: Path) -> None:
    give = "give the DIR of `ftune serve --log-requests DIR`"
    if not log_dir.is_dir():
        what = "a file" if log_dir.exists() else "missing"
        raise FtuneError(f"{log_dir} is {what}, not a request log folder; {give}")
    kind = (rundir.read_marker(log_dir) or {}).get("kind")
    if kind != KIND:
        held = f"it holds a {kind} output of ftune" if kind else f"it has no {rundir.MARKER} marker ftune serve writes"
        raise FtuneError(f"{log_dir} is not a request log of ftune serve ({held}); {give}")
    if not (log_dir / REQUESTS).is_file():
        raise FtuneError(f"{log_dir / REQUESTS} is missing: the log of served requests; {give} (or restore it)")


def _check_output(output: Path) -> None:
    if output.exists() or output.is_symlink():
        raise FtuneError(f"--output: {output} already exists; ftune never overwrites a file it did not write")
    if not output.parent.is_dir():
        raise FtuneError(f"--output: the folder {output.parent} does not exist")
    if output.suffix.lower() in TABULAR:
        raise FtuneError(f"--output: {output} would be read as {output.suffix[1:]}; name it .jsonl (JSON lines)")


def log_lines(path: Path, skipped: Counter):
    """(where, object) of each line of a JSONL log; a corrupt line is an error naming it. A last line without its
    newline that is not a whole JSON object was cut short (the server stopped mid-write, or is writing it now):
    skipped and counted. A whole object without the newline (a file edited by hand) is read."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            torn = not raw.endswith(b"\n")
            try:
                record = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                if torn:
                    skipped[f"{TORN} of {path.name}"] += 1
                    continue
                detail = f"{exc.msg}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)[:80]
                raise FtuneError(f"{where}: not a JSON line ({detail}); fix or delete the line") from None
            if record is None:
                continue
            if not isinstance(record, dict):
                raise FtuneError(f"{where}: expected a JSON object, got {type(record).__name__}; fix or delete it")
            yield where, record


def _read_feedback(path: Path, skipped: Counter) -> tuple[dict, list, int]:
    """The ratings in effect ({id: (rating, line number, comment)}) and side-by-side choices in effect
    ([(better, worse, line number)]): a later line about the same id, or the same two ids in either order,
    replaces an earlier one."""
    ratings: dict[str, tuple[int, int, str | None]] = {}
    pairs: dict[frozenset, tuple[str, str, int]] = {}
    lines = 0
    if not path.is_file():
        return ratings, [], lines
    for number, (where, record) in enumerate(log_lines(path, skipped), 1):
        lines += 1
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise FtuneError(f'{where}: a feedback line needs the "id" of a reply; fix or delete the line')
        if "rating" in record:
            rating = record["rating"]
            if isinstance(rating, bool) or rating not in (1, -1):
                raise FtuneError(f'{where}: "rating" must be 1 or -1, got {rating!r}; fix or delete the line')
            comment = record.get("comment")
            ratings[rid] = (int(rating), number, comment if isinstance(comment, str) and comment.strip() else None)
        elif "better_than" in record:
            other = record["better_than"]
            if not isinstance(other, str) or not other:
                raise FtuneError(f'{where}: "better_than" must be the id of another reply; fix or delete the line')
            pairs.pop(frozenset((rid, other)), None)  # re-inserted: the order of choices is the order they stand
            pairs[frozenset((rid, other))] = (rid, other, number)
        else:
            raise FtuneError(f'{where}: a feedback line needs "rating" (1 or -1) or "better_than"; fix or delete it')
    return ratings, list(pairs.values()), lines


def _read_requests(path: Path, wanted: set[str], skipped: Counter) -> tuple[dict, int]:
    """The logged requests feedback names ({id: record with its position}) and how many requests were logged:
    the log is streamed, and only the rated ones are kept."""
    found: dict[str, dict] = {}
    logged = 0
    for where, record in log_lines(path, skipped):
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise FtuneError(f'{where}: a logged request needs its completion "id"; fix or delete the line')
        logged += 1
        if rid in wanted and rid not in found:
            found[rid] = {**record, "_where": where, "_position": logged}
    return found, logged


def _usable(record: dict | None, cut_ok: bool = False) -> tuple[dict | None, str | None]:
    """A logged request as {"prompt": [...], "completion": [assistant]} (normalised as ftune's loader reads it),
    or (None, why it cannot teach anything). `cut_ok`: a reply cut at max_tokens is usable (as a worse reply)."""
    if record is None:
        return None, UNKNOWN
    if record.get("endpoint", "chat") != "chat" or "messages" not in record:
        return None, COMPLETIONS
    finish = record.get("finish_reason")
    if finish == "length" and not cut_ok:
        return None, CUT
    if finish not in ("stop", "length"):
        return None, f"finish_reason {finish}"
    messages, reply = record.get("messages"), record.get("reply")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None, INVALID
    if messages[-1].get("role") != "user":
        return None, NOT_USER_LAST
    if not isinstance(reply, str) or not reply.strip():
        return None, EMPTY
    try:
        row = convert_unpaired({"prompt": messages, "completion": reply, "label": True}, record["_where"])
    except LineError:
        return None, INVALID
    return {"prompt": row["prompt"], "completion": row["completion"]}, None


def _kto(ratings: dict, choices: list, requests: dict, skipped: Counter) -> tuple[list[dict], dict]:
    """One row per usable rated reply, in the order the requests were logged."""
    if choices:
        skipped[CHOICES_IN_KTO] += len(choices)
    rows = []
    for rid, (rating, _, comment) in ratings.items():
        record = requests.get(rid)
        usable, why = _usable(record)
        if usable is None:
            skipped[why] += 1
            continue
        row = {**usable, "label": rating == 1, "id": rid, "model": record.get("model")}
        if comment:
            row["comment"] = comment
        rows.append((record["_position"], row))
    rows = [row for _, row in sorted(rows, key=lambda r: r[0])]
    desirable = sum(row["label"] for row in rows)
    return rows, {"desirable": desirable, "undesirable": len(rows) - desirable}


def _dpo(ratings: dict, choices: list, requests: dict, skipped: Counter) -> tuple[list[dict], dict]:
    """Pairs from side-by-side choices, then from replies to identical messages rated up and down (each liked
    reply with each disliked one). Pairs are of texts: the same two replies to the same messages make one pair; a
    choice decides over ratings, and a later choice over an earlier one; ratings that say both ways about the same
    two texts (the same reply liked and disliked) make no pair. A reply cut at max_tokens is only ever the worse
    one (a rambling base model's reply, side by side with the tuned one's, is the choice people make most)."""
    usable = {}
    for rid in list(ratings) + [i for c in choices for i in c[:2]]:
        if rid not in usable:
            usable[rid] = _usable(requests.get(rid), cut_ok=True)
    cut = {rid for rid in usable if (requests.get(rid) or {}).get("finish_reason") == "length"}

    def prompt(rid: str) -> str:
        return json.dumps(usable[rid][0]["prompt"], sort_keys=True)

    def text(rid: str) -> str:
        return usable[rid][0]["completion"][0]["content"].strip()

    def pair(better: str, worse: str, source: str) -> dict:
        position = sorted((requests[better]["_position"], requests[worse]["_position"]))
        return {"chosen": better, "rejected": worse, "source": source, "position": position, "conflict": False}

    pairs: dict[tuple, dict] = {}  # (prompt, frozenset of the two texts) -> the pair
    for better, worse, _ in choices:
        why = next((usable[i][1] for i in (better, worse) if usable[i][0] is None), None)
        if why is None and better == worse:
            why = SELF
        elif why is None and better in cut:
            why = CUT
        elif why is None and prompt(better) != prompt(worse):
            why = DIFFERENT
        elif why is None and text(better) == text(worse):
            why = SAME_TEXT
        if why is None:
            k = (prompt(better), frozenset((text(better), text(worse))))
            found = pairs.get(k)
            if found is not None and text(found["chosen"]) == text(better):
                why = DUPLICATE
            elif found is not None:
                skipped[REVERSED] += 1  # the earlier choice about these two replies
            if why is None:
                pairs[k] = pair(better, worse, "choice")
        if why:
            skipped[why] += 1
    liked: dict[str, list[str]] = {}
    disliked: dict[str, list[str]] = {}
    for rid, (rating, _, _) in ratings.items():
        if usable[rid][0] is None or (rating == 1 and rid in cut):
            skipped[usable[rid][1] or CUT] += 1
            continue
        (liked if rating == 1 else disliked).setdefault(prompt(rid), []).append(rid)
    for p, good in liked.items():
        for better in good:
            for worse in disliked.get(p, []):
                if text(better) == text(worse):
                    continue
                k = (p, frozenset((text(better), text(worse))))
                found = pairs.get(k)
                if found is None:
                    pairs[k] = pair(better, worse, "rating")
                elif found["source"] == "rating" and text(found["chosen"]) != text(better):
                    found["conflict"] = True
    written = sorted((p for p in pairs.values() if not p["conflict"]), key=lambda p: p["position"])
    used = {(prompt(i), text(i)) for p in written for i in (p["chosen"], p["rejected"])}
    conflicted = {(prompt(i), text(i)) for p in pairs.values() if p["conflict"] for i in (p["chosen"], p["rejected"])}
    for rid in ratings:
        if ratings[rid][0] == 1 and rid in cut:
            continue  # counted above
        if usable[rid][0] is not None and (prompt(rid), text(rid)) not in used:
            skipped[CONFLICT if (prompt(rid), text(rid)) in conflicted else UNPAIRED] += 1
    rows = []
    for p in written:
        better, worse = p["chosen"], p["rejected"]
        rows.append(
            {
                "prompt": usable[better][0]["prompt"],
                "chosen": usable[better][0]["completion"],
                "rejected": usable[worse][0]["completion"],
                "id": [better, worse],
                "model": [requests[better].get("model"), requests[worse].get("model")],
                "from": p["source"],
            }
        )
    from_choices = sum(p["source"] == "choice" for p in written)
    return rows, {"from_choices": from_choices, "from_ratings": len(written) - from_choices}
