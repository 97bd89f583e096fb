"""Data of any size in bounded memory: records on disk (`store.Records`), tokenized by row ranges into a
memory-mapped file; and the same examples as the list-based reading gave, on the shipped and generated data."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune_cli import recipe as recipes
from finetune_cli.data import cache, jsonl, masking
from finetune_cli.data.masking import IGNORE
from finetune_cli.data.store import Errors, Records

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is you that it he was for on are as with his they at be this have from".split()


def reference_load(data, seed: int, read) -> tuple[list, list]:
    """jsonl.load as it was with lists of dicts: split by a shuffled list of positions, `records * n` and
    `rng.sample(records, k)` for weights."""
    rng = random.Random(seed)
    train, held = [], []
    for spec in data.files():
        records = read(spec)
        if data.eval_split:
            order = list(range(len(records)))
            random.Random(seed).shuffle(order)
            out = set(order[: round(len(records) * data.eval_split)])
            held += [r for i, r in enumerate(records) if i in out]
            records = [r for i, r in enumerate(records) if i not in out]
        weighted = records * int(spec.weight)
        weighted += rng.sample(records, round(len(records) * (spec.weight - int(spec.weight))))
        train += weighted
    source = data.eval_source()
    return train, (read(source) if source else held)


def reference_examples(tokenizer, records: list, max_length: int, train_on: str) -> list[dict]:
    """Each record tokenized on its own by the per-conversation functions, dropping those with nothing learned."""
    out = []
    for r in records:
        if "text" in r:
            out += masking.tokenize_text(tokenizer, r["text"], max_length)
            continue
        ex = masking.tokenize(tokenizer, r["messages"], max_length, train_on)
        if any(label != IGNORE for label in ex["labels"]):
            out.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
    return out


def same_examples(examples, expected: list[dict]) -> bool:
    ids, labels, offsets = examples.flat()
    got = [
        {"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist()}
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    ]
    return got == expected


@pytest.mark.parametrize("name", ["quickstart", "smollm2-dpo", "smollm2-classify", "smollm2-classify-chat"])
def test_shipped_data_reads_as_the_list_based_load(name):
    r = recipes.load(ROOT / "recipes" / f"{name}.yaml")
    d = r.data
    train, evals, _ = jsonl.load(d, r.training.seed)
    assert isinstance(train, Records) and isinstance(evals, Records)
    expected = reference_load(d, r.training.seed, lambda s: list(jsonl.read(s, s.format, s.columns, d.system_prompt)))
    assert list(train) == expected[0] and list(evals) == expected[1]


def generated(tmp_path: Path) -> tuple:
    """Two files in two formats, some conversations with a system message, weights 0.5 and 2, eval_split and a
    system prompt; and the messages each row must give, from the rows themselves."""
    rng = random.Random(5)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))  # noqa: E731
    chats, alpacas, want = [], [], {}
    for i in range(420):
        messages = [{"role": "system", "content": f"sys {i}"}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"a{i} {text(12)}"}, {"role": "assistant", "content": text(30)}]
        chats.append({"messages": messages})
        want[f"{tmp_path / 'a.jsonl'}:{i + 1}"] = (
            messages if i % 3 == 0 else [{"role": "system", "content": "Be brief."}, *messages]
        )
    for i in range(150):
        alpacas.append({"instruction": f"b{i} {text(10)}", "input": "", "output": text(20)})
        want[f"{tmp_path / 'b.jsonl'}:{i + 1}"] = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": alpacas[-1]["instruction"]},
            {"role": "assistant", "content": alpacas[-1]["output"]},
        ]
    for name, rows in (("a.jsonl", chats), ("b.jsonl", alpacas)):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (tmp_path / "r.yaml").write_text(
        "data:\n  train:\n    - {path: a.jsonl, weight: 0.5}\n    - {path: b.jsonl, weight: 2}\n"
        "  eval_split: 0.15\n  system_prompt: Be brief.\n  max_length: 48\n",
        encoding="utf-8",
    )
    return recipes.load(tmp_path / "r.yaml").data, want


def test_generated_mix_gives_the_list_based_examples(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FTUNE_TOKENIZE_WORKERS", "2")  # forked workers reading their row ranges from the store
    d, want = generated(tmp_path)

    def read(spec):  # the rows as written, in file order: independent of jsonl's reading
        path = str(tmp_path / Path(spec.path).name)
        return [{"source": s, "messages": m} for s, m in want.items() if s.startswith(f"{path}:")]

    expected_train, expected_evals = reference_load(d, 11, read)
    train, evals, info = jsonl.load(d, seed=11)
    assert [(r["source"], r["messages"]) for r in train] == [(r["source"], r["messages"]) for r in expected_train]
    assert [(r["source"], r["messages"]) for r in evals] == [(r["source"], r["messages"]) for r in expected_evals]
    assert [f["used"] for f in info] == [round(357 * 0.5), 2 * 128] and len(evals) == 63 + 22
    expected = reference_examples(tokenizer, expected_train, d.max_length, d.train_on)
    cold, stats = cache.tokenize(tokenizer, train, d.max_length, d.train_on)
    hit, again = cache.tokenize(tokenizer, train, d.max_length, d.train_on)
    off, _ = cache.tokenize(tokenizer, train, d.max_length, d.train_on, enabled=False)
    assert (stats["cache"], again["cache"]) == ("miss", "hit")
    assert same_examples(cold, expected) and same_examples(hit, expected) and same_examples(off, expected)
    assert stats["examples"] == len(expected) and stats["tokens"] == sum(len(e["input_ids"]) for e in expected)
    # a list of the same records has the same cache key: the digests Records kept equal the records' own
    assert cache.key(tokenizer, list(train), 48, "assistant") == cache.key(tokenizer, train, 48, "assistant")


def test_records_views_index_like_lists(tmp_path):
    rows = [{"source": f"s{i}", "text": f"t{i}", "n": i} for i in range(2500)]
    records = Records.from_list(rows)
    assert len(records) == 2500 and records[7] == rows[7] and records[-1] == rows[-1] and records[10:13] == rows[10:13]
    index = np.array([5, 2400, 5, 0])
    assert list(records.take(index)) == [rows[i] for i in index] and records[::700] == rows[::700]
    mixed = records.take(index) + Records.from_list(rows[:3]) + rows[:2]
    assert mixed == [rows[i] for i in index] + rows[:3] + rows[:2]
    assert list(records.repeat(2)) == rows * 2 and len(mixed.unique()) == 5
    with pytest.raises(IndexError):
        records[2500]


def test_errors_keep_the_first_of_each_kind_and_count_all():
    from finetune_cli.data.formats import LineError

    many = Errors(LineError("bad json", f"f: line {i}", "x") for i in range(1000))
    many.append(LineError("missing field", "f: line 1001", "y"))
    joined = Errors([LineError("bad json", "g: line 1", "x")])
    joined.extend(many)
    assert joined.total == 1002 and joined.counts == {"bad json": 1001, "missing field": 1}
    assert [e.where for e in joined][:2] == ["g: line 1", "f: line 0"] and len(joined) < 200


CAPPED = """
import json, resource, sys, threading
from finetune_cli import recipe as recipes
from finetune_cli.data import jsonl
from finetune_cli.training import validate

def data_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

small, big, margin, task = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20, sys.argv[4]
threading.stack_size(256 << 10)  # the tokenizing pool's 3 threads would reserve 8 MiB of stack each (ulimit -s)
validate.validate(recipes.load(small))  # every module validate imports, the tokenizer's caches: not the data's
cap = data_bytes() + margin
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
if task == "validate":
    report = validate.validate(recipes.load(big))
    stats = report.stats
    print(json.dumps({"examples": stats["examples"], "tokens": stats["tokens"], "errors": report.error_count}))
else:  # the records as a list of dicts, as jsonl.load kept them
    try:
        print(json.dumps({"dicts": len(list(jsonl.read(recipes.load(big).data.files()[0])))}))
    except MemoryError:
        print(json.dumps({"dicts": "MemoryError"}))
"""


def test_validate_under_a_memory_cap_the_rows_as_dicts_exceed(tokenizer, tmp_path, tiny_model_dir):
    """RLIMIT_DATA (private memory: malloc's heap and anonymous maps; not the libraries' mapped code, which
    RLIMIT_AS would count, a lot) at what validate of a tiny file took + MARGIN MiB: validating 100,000 rows
    fits (a few int arrays a row), the same rows as a list of dicts (87 MiB) do not, each
    in a process started the same way."""
    margin, n = 28, 100_000
    rng = random.Random(0)
    for name, count in (("small", 20), ("big", n)):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(count):
                f.write(json.dumps({"text": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(100))}) + "\n")
        (tmp_path / f"{name}.yaml").write_text(
            f"model:\n  base: {tiny_model_dir}\ndata:\n  train: {name}.jsonl\n  max_length: 256\n", encoding="utf-8"
        )
    env = {**os.environ, "FTUNE_TOKENIZE_WORKERS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", CAPPED, str(tmp_path / "small.yaml"), str(tmp_path / "big.yaml"), str(margin)]
    run = lambda task: subprocess.run([*args, task], env=env, capture_output=True, text=True, timeout=180)  # noqa: E731
    done, dicts = run("validate"), run("dicts")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(dicts.stdout) == {"dicts": "MemoryError"}, dicts.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["examples"] == n and out["errors"] == 0, out
    # the counts are right: tokens per text (with the EOS ftune appends), by the tokenizer on all texts at once
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [json.loads(line)["text"] for line in open(tmp_path / "big.jsonl", encoding="utf-8")]
    lengths = sorted(len(ids) + (ids[-1:] != [tok.eos_token_id]) for ids in tok(texts)["input_ids"])
    assert max(lengths) <= 256  # one chunk a text
    rank = lambda q: lengths[-(-len(lengths) * q // 100) - 1]  # noqa: E731 - nearest rank
    assert out["tokens"] == {"min": lengths[0], "p50": rank(50), "p95": rank(95), "max": lengths[-1]}


def test_parquet_rows_stream_in_flat_arrow_memory(tmp_path):
    """Arrow's own allocation counter stays at about one row group while every row of 40 is read (pyarrow's
    pre_buffer would keep each row group read until the file closes: 40 times as much)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune_cli.data import sources

    text = " ".join(WORDS) * 4
    with pq.ParquetWriter(tmp_path / "t.parquet", pa.schema([("text", pa.string())])) as writer:
        for g in range(40):
            writer.write_table(pa.table({"text": [f"{g} {i} {text}" for i in range(2000)]}))
    group = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0).total_byte_size
    start, peak, n = pa.total_allocated_bytes(), 0, 0
    for _row in sources.open_source(str(tmp_path / "t.parquet")).rows:
        n += 1
        if n % 500 == 0:
            peak = max(peak, pa.total_allocated_bytes() - start)
    assert n == 80_000 and peak < 4 * group, (peak, group)
