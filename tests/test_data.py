"""JSONL reading: each kind of bad line is reported with its file and line."""

import pytest

from finetune_cli.data.jsonl import read_conversations
from finetune_cli.errors import FtuneError

OK = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json\n", r":3: not valid JSON"),
        ('{"text": "plain"}\n', r':3: expected an object with a "messages" list'),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r":3: conversation has no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', r":3: message 0 has unknown role 'robot'"),
        ('{"messages": [{"role": "user"}]}\n', r":3: message 0 \(user\) needs a string 'content'"),
    ],
)
def test_bad_lines(tmp_path, bad, message):
    path = tmp_path / "d.jsonl"
    path.write_text(OK + "\n" + bad, encoding="utf-8")  # a blank line still counts as a line
    with pytest.raises(FtuneError, match=message):
        read_conversations(path)


def test_reads_and_records_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(OK + OK, encoding="utf-8")
    convs = read_conversations(path)
    assert [c["source"] for c in convs] == [f"{path}:1", f"{path}:2"]
    assert convs[0]["messages"][1] == {"role": "assistant", "content": "hello"}


def test_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(FtuneError, match="no examples"):
        read_conversations(tmp_path / "e.jsonl")
    with pytest.raises(FtuneError, match="data file not found"):
        read_conversations(tmp_path / "missing.jsonl")
