"""Streamed `hf:` sources (`streaming: true`): the examples the whole-source path makes, a bounded shuffle,
training for max_steps on a stream that is read only as far as training goes, and the recipe's limits as
one-line errors. The Hub is stood in for by a local dataset folder (`hf:./folder`), offline."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli import recipe as recipes
from finetune_cli.cli import app
from finetune_cli.data import jsonl, masking, stream
from finetune_cli.errors import FtuneError
from tests.conftest import conversation, write_jsonl

runner = CliRunner()


def rows(n: int) -> list[dict]:
    """Conversations of one to three turns, one cut by max_length 64, one with nothing left to learn after it."""
    out = [conversation(i, turns=1 + i % 3) for i in range(max(n, 8))][:n]
    if n < 8:
        return out
    out[5]["messages"][1]["content"] = "Please count: " + " ".join(str(k) for k in range(40))  # truncated at 64
    out[7]["messages"][1]["content"] = "word " * 200  # the reply is cut away: dropped
    return out


def hub(folder: Path, records: list[dict]) -> Path:
    """A local dataset folder as `datasets.load_dataset` reads a Hub repository: one JSONL data file."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", records)
    return folder


def spec(folder: Path, buffer: int | None = 0) -> recipes.TrainFile:
    return recipes.TrainFile(path=f"hf:{folder}", streaming=True, shuffle_buffer=buffer, format="auto")


def test_streamed_examples_equal_the_whole_source_tokenized(tmp_path, tokenizer):
    folder = hub(tmp_path / "hub", rows(120))
    streamed = stream.Examples(spec(folder), tokenizer, 64, "assistant", None, seed=1)
    got = list(streamed)
    whole, stats = masking.tokenize_all(tokenizer, jsonl.read(str(folder / "train.jsonl")), 64, "assistant")
    assert got == [whole[i] for i in range(len(whole))]  # ids and labels, example by example, in the file's order
    assert 0 < stats["truncated"] < stats["examples"] and stats["dropped"] >= 1  # cut and dropped rows in both
    counts = streamed.counts
    assert {k: counts[k] for k in stats if k in counts} == {k: stats[k] for k in stats if k in counts}
    assert counts["passes"] == 1


def test_the_trainer_gets_the_stream_shuffled_by_datasets_buffer(tmp_path, tokenizer):
    folder = hub(tmp_path / "hub", rows(60))
    streamed = stream.Examples(spec(folder, 16), tokenizer, 64, "assistant", None, 7)
    in_order = [json.dumps(e) for e in streamed]
    ds = streamed.dataset()
    first, again = [json.dumps(e) for e in ds], [json.dumps(e) for e in ds]
    ds.set_epoch(1)  # the trainer's next epoch
    second = [json.dumps(e) for e in ds]
    assert first == again  # the same seed and epoch: the same order (a resumed run sees what it saw)
    assert sorted(first) == sorted(second) == sorted(in_order) and len(set(in_order)) == len(in_order)
    assert first != in_order and second != first  # shuffled, and anew each epoch
    position = {e: at for at, e in enumerate(first)}
    assert all(position[e] >= j - 16 for j, e in enumerate(in_order))  # never more than the buffer ahead
    assert max(j - position[e] for j, e in enumerate(in_order)) > 8  # and it does move them by most of it
    unshuffled = stream.Examples(spec(folder, 0), tokenizer, 64, "assistant", None, 7)
    assert [json.dumps(e) for e in unshuffled.dataset()] == in_order


def test_a_bad_row_is_named_before_training_or_when_the_stream_reaches_it(tmp_path, tokenizer):
    records = rows(100)
    records[3] = {"question": "no format"}
    with pytest.raises(FtuneError, match=r"hf:.*hub\[train\]: row 4: expected an object"):
        stream.peek(spec(hub(tmp_path / "hub", records)), None)  # within the rows preflight reads
    records = rows(100)
    records[89] = {"messages": [{"role": "user", "content": "no reply"}, {"role": "wizard", "content": "?"}]}
    later = spec(hub(tmp_path / "later", records))
    assert len(stream.peek(later, None)) == stream.PEEK
    with pytest.raises(FtuneError, match=r"hf:.*later\[train\]: row 90: .*wizard"):
        list(stream.Examples(later, tokenizer, 64, "assistant", None, 1))


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory, tiny_model_dir):
    """Three steps of LoRA on a 400-row stream, in order (shuffle_buffer 0), padded batches of two, fp32."""
    folder = tmp_path_factory.mktemp("stream")
    hub(folder / "hub", rows(400))
    write_jsonl(folder / "eval.jsonl", [conversation(i + 1000) for i in range(4)])
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\n"
        "data:\n  train:\n    - path: hf:./hub\n      streaming: true\n      shuffle_buffer: 0\n"
        "  eval: eval.jsonl\n  max_length: 64\n"
        "method:\n  r: 8\ntraining:\n  max_steps: 3\n  batch_size: 2\n  packing: false\n  precision: fp32\n"
        f"  learning_rate: 1.0e-2\n  logging_steps: 1\n  save_steps: 2\noutput:\n  dir: {folder / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--json", "--samples", "0"])
    assert result.exit_code == 0, result.output
    return folder, json.loads(result.stdout), result.output


def test_training_reads_the_stream_only_as_far_as_its_steps(streamed_run):
    folder, summary, output = streamed_run
    info = json.loads((folder / "run" / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 3
    train = info["data"]["train"]
    assert train["files"][0]["streaming"] is True and train["files"][0]["examples"] is None
    seen = train["streamed"]["examples"]
    assert 6 <= seen < 100, seen  # three steps of two, and what the loader read ahead: not the 400 rows
    assert (folder / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "in order" in " ".join(output.split())


def test_the_first_loss_is_plain_transformers_on_the_first_two_rows(streamed_run, tiny_model_dir, tokenizer):
    """In order and unshuffled, step one is the stream's first two examples: the loss a plain forward gives them
    (the LoRA update is zero before the first step)."""
    from transformers import AutoModelForCausalLM

    folder, summary, _ = streamed_run
    info = json.loads((folder / "run" / "run.json").read_text())
    batch = []
    for r in rows(2):  # the chat template's text; learned: each reply with its end-of-turn token
        text = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        spans, cursor = [], 0
        for m in r["messages"]:
            if m["role"] == "assistant":
                start = text.index(m["content"], cursor)
                cursor = text.index("<|im_end|>", start) + len("<|im_end|>")
                spans.append((start, cursor))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][:64]
        inside = [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"][:64]]
        batch.append((ids, [t if learned else -100 for t, learned in zip(ids, inside)]))
    width = max(len(i) for i, _ in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([la + [-100] * (width - len(la)) for _, la in batch])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.item()
    assert info["first_loss"] == pytest.approx(loss, rel=1e-4)


def test_validate_reads_a_stream_through(streamed_run):
    folder, _, _ = streamed_run
    result = runner.invoke(app, ["validate", str(folder / "recipe.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["files"][0]["examples"] == 400 and report["ok"]


@pytest.mark.parametrize(
    "train, training, message",
    [
        ("    - path: train.jsonl\n      streaming: true", "", "streaming applies to hf: datasets"),
        ("    - path: hf:./hub\n      shuffle_buffer: 5", "", "shuffle_buffer applies to a streamed source"),
        ("    - path: hf:./hub\n      streaming: true", "", "set training.max_steps"),
        ("    - path: hf:./hub\n      streaming: true\n    - train.jsonl", "  max_steps: 2\n", "trains alone"),
        ("    - path: hf:./hub\n      streaming: true", "  max_steps: 2\n  objective: dpo\n", "reads SFT data"),
        ("    - path: hf:./hub\n      streaming: true", "  max_steps: 2\n  group_by_length: true\n", "by length"),
    ],
)
def test_what_a_stream_cannot_do_is_exit_2_in_one_line(tmp_path, train, training, message):
    hub(tmp_path / "hub", rows(4))
    write_jsonl(tmp_path / "train.jsonl", rows(4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  base: x\ndata:\n  train:\n{train}\ntraining:\n{training or '  epochs: 1'}\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_eval_split_with_a_stream_is_refused(tmp_path):
    hub(tmp_path / "hub", rows(4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n  base: x\ndata:\n  train:\n    - path: hf:./hub\n      streaming: true\n  eval_split: 0.1\n"
        "training:\n  max_steps: 2\n"
    )
    with pytest.raises(FtuneError, match="give the held-out examples as data.eval"):
        recipes.load(recipe)


def test_a_stream_without_eval_data_and_the_default_buffer_trains(tmp_path, tiny_model_dir):
    hub(tmp_path / "hub", rows(30))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train:\n    - path: hf:./hub\n      streaming: true\n"
        f"  max_length: 64\ntraining:\n  max_steps: 1\n  batch_size: 2\noutput:\n  dir: {tmp_path / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--json", "--samples", "0"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "completed" and "eval" not in info["data"]
    streamed = info["data"]["train"]["streamed"]
    # the 10,000-row buffer takes in the whole stream before it gives the first example (TRL's look at the first
    # example is a pass too, read ahead by datasets' thread as far as it got)
    assert 30 <= streamed["examples"] <= 30 * streamed["passes"]
    assert "shuffled 10000 rows at a time" in " ".join(result.output.split())  # the log line, however wrapped


def test_a_parquet_dataset_streams_the_same_examples(tmp_path, tokenizer, monkeypatch):
    """Most Hub datasets are Parquet: its files read by ftune a row group at a time (sources._stream_batches), the
    same examples as JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = rows(40)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pq" / "train.parquet", row_group_size=16)
    import datasets

    real = datasets.IterableDataset.iter

    def iterate(ds, *args, **kwargs):  # datasets' Parquet scan reads the whole open file ahead: never used for it
        assert ds.info.builder_name != "parquet", "a Parquet dataset streamed through datasets' reader"
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(datasets.IterableDataset, "iter", iterate)
    parquet = list(stream.Examples(spec(tmp_path / "pq"), tokenizer, 64, "assistant", None, 1))
    assert parquet == list(stream.Examples(spec(hub(tmp_path / "hub", records)), tokenizer, 64, "assistant", None, 1))
    assert 30 < len(parquet) < 40  # the dropped rows left out of both
