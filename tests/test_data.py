"""Data formats, detection, columns, system prompts, weighted mixing and splits; each bad line named."""

import json
import re

import pytest

from finetune_cli import recipe as recipes
from finetune_cli.data import jsonl
from finetune_cli.data.masking import IGNORE, tokenize
from finetune_cli.errors import FtuneError

OK = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
SYSTEM, USER, REPLY = "Be terse.", "What is 2+2?", "4."
EXPECTED = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": REPLY},
]
# One example in every format, each meaning EXPECTED.
SAMPLES = {
    "messages": {"messages": EXPECTED},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": USER},
            {"from": "gpt", "value": REPLY},
        ]
    },
    "prompt_completion": {"system": SYSTEM, "prompt": USER, "completion": REPLY},
    "alpaca": {"system": SYSTEM, "instruction": USER, "input": "", "output": REPLY},
}


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", list(SAMPLES))
@pytest.mark.parametrize("given", ["auto", "explicit"])
def test_each_format_converts_to_the_same_messages(tmp_path, fmt, given):
    path = write(tmp_path / "d.jsonl", [SAMPLES[fmt]] * 2)
    records, errors, found = jsonl.parse(path, "auto" if given == "auto" else fmt)
    assert errors == [] and found == fmt
    assert [r["messages"] for r in records] == [EXPECTED, EXPECTED]


def test_more_format_details(tmp_path):
    cases = [
        ({"instruction": "Sum", "input": "2 2", "output": "4"}, [("user", "Sum\n\n2 2"), ("assistant", "4")]),
        ({"conversations": [{"from": "user", "value": "a"}, {"from": "model", "value": "b"}]}, None),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}, None),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "a"}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            None,
        ),
    ]
    for record, want in cases:
        want = want or [("user", "a"), ("assistant", "b")]
        rec = jsonl.read(write(tmp_path / "d.jsonl", [record]))[0]
        assert [(m["role"], m["content"]) for m in rec["messages"]] == want, record
    text = jsonl.parse(write(tmp_path / "t.jsonl", [{"text": "Once upon a time"}]))
    assert text[0][0]["text"] == "Once upon a time" and text[2] == "text"


def test_columns_rename_fields(tmp_path):
    path = write(
        tmp_path / "d.jsonl", [{"dialog": [{"speaker": "user", "says": "a"}, {"speaker": "assistant", "says": "b"}]}]
    )
    rec = jsonl.read(path, columns={"messages": "dialog", "role": "speaker", "content": "says"})[0]
    assert rec["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    q = write(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    assert jsonl.read(q, columns={"prompt": "question", "completion": "answer"})[0]["messages"][1]["content"] == "b"


def test_system_prompt_added_only_where_missing(tmp_path):
    path = write(tmp_path / "d.jsonl", [SAMPLES["messages"], json.loads(OK)])
    a, b = jsonl.read(path, system_prompt="House style.")
    assert a["messages"] == EXPECTED
    assert b["messages"][0] == {"role": "system", "content": "House style."} and len(b["messages"]) == 3


def test_mixed_formats_name_the_first_odd_line(tmp_path):
    path = write(tmp_path / "d.jsonl", [SAMPLES["sharegpt"], SAMPLES["sharegpt"], SAMPLES["alpaca"], OK.strip()])
    with pytest.raises(FtuneError, match=r"d.jsonl:3: this line is in alpaca format but the file is sharegpt"):
        jsonl.read(path)
    errors = jsonl.parse(path)[1]
    assert [e.where.rsplit(":", 1)[1] for e in errors] == ["3", "4"] and {e.kind for e in errors} == {"other format"}
    # an explicit format makes even the first line wrong
    with pytest.raises(FtuneError, match=r"d.jsonl:1: this line is in sharegpt format but the file is alpaca"):
        jsonl.read(path, "alpaca")


@pytest.mark.parametrize(
    "bad, kind, message",
    [
        ("{not json", "not JSON", r":3: not valid JSON"),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            "no assistant turn",
            r":3: conversation has no assistant",
        ),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}',
            "unknown role",
            r":3: message 0 has unknown role 'robot'",
        ),
        ('{"messages": [{"role": "user"}]}', "missing field", r":3: message 0 \(user\) needs a string 'content'"),
        ('{"messages": "hi"}', "missing field", r':3: expected an object with a "messages" list'),
        (
            '{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}',
            "empty content",
            r":3: message 0 \(user\) has empty content",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
            "wrong message order",
            r":3: turns must alternate user, assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
            '{"role": "assistant", "content": "b"}]}',
            "wrong message order",
            r":3: message 1 is a system message",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": false}]}',
            "no assistant turn",
            r':3: every assistant turn has "train": false',
        ),
        ('{"foo": 1}', "missing field", r':3: expected an object with a "messages" list'),
        ("[1, 2]", "missing field", r":3: expected a JSON object \(messages format\), got list"),
    ],
)
def test_bad_lines(tmp_path, bad, kind, message):
    path = tmp_path / "d.jsonl"
    path.write_text(OK + "\n" + bad + "\n", encoding="utf-8")  # a blank line still counts as a line
    with pytest.raises(FtuneError, match=message):
        jsonl.read(path)
    assert [e.kind for e in jsonl.parse(path)[1]] == [kind]


def test_a_file_in_no_format(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(FtuneError, match=r"d.jsonl:1: fits no data format: .* map other field names with data.columns"):
        jsonl.read(path)


def test_reads_and_records_source(tmp_path):
    path = write(tmp_path / "d.jsonl", [OK.strip(), OK.strip()])
    convs = jsonl.read(path)
    assert [c["source"] for c in convs] == [f"{path}:1", f"{path}:2"]
    assert convs[0]["messages"][1] == {"role": "assistant", "content": "hello"}


def test_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(FtuneError, match="no examples"):
        jsonl.read(tmp_path / "e.jsonl")
    with pytest.raises(FtuneError, match="data file not found"):
        jsonl.read(tmp_path / "missing.jsonl")


def data_section(tmp_path, text):
    (tmp_path / "r.yaml").write_text(f"data:\n{text}", encoding="utf-8")
    return recipes.load(tmp_path / "r.yaml").data


def numbered(tmp_path, name, n, fmt="messages"):
    def record(i):
        if fmt == "alpaca":
            return {"instruction": f"{name} {i}", "output": "ok"}
        return {"messages": [{"role": "user", "content": f"{name} {i}"}, {"role": "assistant", "content": "ok"}]}

    return write(tmp_path / f"{name}.jsonl", [record(i) for i in range(n)])


def test_weighted_mixing_of_files_in_different_formats(tmp_path):
    numbered(tmp_path, "a", 10)
    numbered(tmp_path, "b", 10, "alpaca")
    d = data_section(tmp_path, "  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 2.5}\n")
    train, evals, info = jsonl.load(d, seed=1)
    users = [r["messages"][0]["content"] for r in train]
    assert sum(u.startswith("a ") for u in users) == 10 and sum(u.startswith("b ") for u in users) == 25
    assert all(users.count(f"b {i}") in (2, 3) for i in range(10)) and evals == []
    assert [(f["examples"], f["used"]) for f in info] == [(10, 10), (10, 25)]
    again = [r["messages"][0]["content"] for r in jsonl.load(d, seed=1)[0]]
    assert again == users  # the fractional part is chosen by the seed
    half = data_section(tmp_path, "  train: [{path: a.jsonl, weight: 0.5}]\n")
    assert len(jsonl.load(half, seed=1)[0]) == 5


def test_eval_split_is_seeded_and_disjoint(tmp_path):
    numbered(tmp_path, "a", 20)
    d = data_section(tmp_path, "  train: [{path: a.jsonl, weight: 2}]\n  eval_split: 0.2\n")
    train, evals, _ = jsonl.load(d, seed=7)
    held = {r["source"] for r in evals}
    assert len(held) == 4 and len(train) == 32 and not held & {r["source"] for r in train}
    assert held == {r["source"] for r in jsonl.load(d, seed=7)[1]}
    assert held != {r["source"] for r in jsonl.load(d, seed=8)[1]}


def test_train_false_and_train_on_choices(tokenizer, tmp_path):
    msgs = jsonl.read(
        write(
            tmp_path / "d.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": "one"},
                        {"role": "assistant", "content": "skip me", "train": False},
                        {"role": "user", "content": "two"},
                        {"role": "assistant", "content": "learn me"},
                        {"role": "user", "content": "three"},
                        {"role": "assistant", "content": "me too", "weight": 1},
                    ]
                }
            ],
        )
    )[0]["messages"]

    def learned(train_on):
        ex = tokenize(tokenizer, msgs, 4096, train_on)
        return tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])

    assert learned("assistant") == "learn me<|im_end|>me too<|im_end|>"
    assert learned("last_assistant") == "me too<|im_end|>"
    everything = tokenize(tokenizer, msgs, 4096, "all")
    assert everything["labels"] == everything["input_ids"]


def test_recipe_rejects_unknown_columns_and_formats(tmp_path):
    with pytest.raises(FtuneError, match="'mesages' is not one of ftune's fields; did you mean 'messages'"):
        data_section(tmp_path, "  train: t.jsonl\n  columns: {mesages: dialog}\n")
    with pytest.raises(FtuneError, match=r"r.yaml:3: 'data.format' is 'jsonl'; expected one of"):
        data_section(tmp_path, "  train: t.jsonl\n  format: jsonl\n")
    with pytest.raises(
        FtuneError, match=r"r.yaml:3: unknown key 'data.train.0.wieght'; did you mean 'data.train.0.weight'"
    ):
        data_section(tmp_path, "  train:\n    - {path: t.jsonl, wieght: 2}\n")


CHAT = '{"conversations": [{"from": %s, "value": %s}, {"from": "gpt", "value": "a"}]}'


@pytest.mark.parametrize(
    "bad, kind, message",
    [
        ("[" * 100_000, "not JSON", "arrays or objects nested too deeply to read"),
        ('{"a": ' * 100_000, "not JSON", "arrays or objects nested too deeply to read"),
        ('{"text": %s}' % ("7" * 5000), "not JSON", "a number of more than 4300 digits, too long to read"),
        (CHAT % ('["human"]', '"hi"'), "unknown role", "turn 0 is from ['human']; use one of"),
        (CHAT % ('{"human": 1}', '"hi"'), "unknown role", "turn 0 is from {'human': 1}; use one of"),
        (CHAT % ("7", '"hi"'), "unknown role", "turn 0 is from 7; use one of"),
        (CHAT % ('"human"', '{"a": 1}'), "missing field", "message 0 (user) needs a string 'content'"),
        (CHAT % ('"human"', "[1]"), "wrong type", "message 0 (user) has content parts that are not text"),
        ('{"messages": [{"role": ["user"], "content": "hi"}]}', "unknown role", "unknown role ['user']"),
        ('{"messages": [{"role": {"a": 1}, "content": "hi"}]}', "unknown role", "unknown role {'a': 1}"),
        ('{"messages": [{"role": "user", "content": 5}]}', "missing field", "needs a string 'content'"),
        ('{"messages": [{"role": "user", "content": "a", "train": [1]}]}', "wrong type", '"train" must be true'),
        ('{"messages": {"role": "user"}}', "missing field", 'expected an object with a "messages" list'),
        ('{"prompt": {"a": 1}, "completion": "b"}', "wrong type", '"prompt" must be a string or a list'),
        ('{"prompt": [1], "completion": "b"}', "missing field", "message 0 is not an object"),
        ('{"instruction": ["a"], "output": "b"}', "wrong type", '"instruction" must be a string'),
        ('{"instruction": "a", "output": "b", "input": 5}', "wrong type", '"input" must be a string'),
        ('{"instruction": "a", "output": "b", "system": []}', "wrong type", '"system" must be a string'),
        ('{"text": {"a": 1}}', "wrong type", '"text" must be a string'),
        ('{"text": "half \\ud800 a character"}', "not UTF-8", "without its pair is half a character"),
        (CHAT % ('"human"', '"\\udfff"'), "not UTF-8", "without its pair"),
    ],
    ids=lambda value: value[:30],  # some values are 100,000 characters long
)
def test_a_hostile_line_is_one_bad_line(tmp_path, bad, kind, message):
    path = tmp_path / "d.jsonl"
    path.write_text(bad + "\n", encoding="utf-8")
    records, errors, _ = jsonl.parse(path)
    assert records == [] and [(e.kind, e.where) for e in errors] == [(kind, f"{path}:1")], errors
    assert message in errors[0].detail and len(errors[0].detail) < 200
    with pytest.raises(FtuneError, match=f"d.jsonl:1: .*{re.escape(message)}"):
        jsonl.read(path)


def test_encoding_bom_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    ok = OK.strip().encode()
    # a byte order mark (spreadsheet exports), Latin-1 bytes, CRLF and lone CR line ends
    path.write_bytes(b"\xef\xbb\xbf" + ok + b"\r\n" + ok.replace(b"hello", b"caf\xe9") + b"\r\n\r\n" + ok + b"\r" + ok)
    records, errors, found = jsonl.parse(path)
    column = ok.index(b"hello") + 4  # 1-based, the byte after "caf"
    assert found == "messages" and [r["source"] for r in records] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert [(e.kind, e.where, e.detail) for e in errors] == [
        ("not UTF-8", f"{path}:2", f"not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8")
    ]
    assert "\ufffd" not in json.dumps([r["messages"] for r in records])
    with pytest.raises(FtuneError, match=r"d.jsonl:2: not UTF-8 text"):
        jsonl.read(path)
    bom_only = write(tmp_path / "e.jsonl", [SAMPLES["alpaca"]])
    bom_only.write_bytes(b"\xef\xbb\xbf" + bom_only.read_bytes())
    assert jsonl.parse(bom_only)[1:] == ([], "alpaca")


def test_weights_are_bounded(tmp_path):
    numbered(tmp_path, "a", 3)
    with pytest.raises(FtuneError, match=r"r.yaml:2: 'data.train.0.weight' is 1e\+300: a weight .* at most 1000"):
        data_section(tmp_path, "  train: [{path: a.jsonl, weight: 1.0e+300}]\n")
    with pytest.raises(FtuneError, match=r"'data.train.0.weight' is nan: expected a finite number"):
        data_section(tmp_path, "  train: [{path: a.jsonl, weight: .nan}]\n")
    train = jsonl.load(data_section(tmp_path, "  train: [{path: a.jsonl, weight: 1000}]\n"), seed=1)[0]
    assert len(train) == 3000
