"""`ftune eval`: corpus perplexity checked against plain transformers forwards, NLL summed in float64."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app
from finetune_cli.evaluation.perplexity import windows
from tests.conftest import conversation, write_jsonl

runner = CliRunner()
WORDS = "the quick brown fox jumps over the lazy dog while seven sleepy cats watch from a sunny window".split()


def eval_json(*args):
    result = runner.invoke(app, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def nll_positions(model, ids, positions):
    """Float64 NLL of `ids[p]` for each p in positions, one plain forward of `ids` alone."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return -sum(float(logp[p - 1, ids[p]]) for p in positions)


def chat_nll(model, tok, chats):
    """(float64 NLL, tokens) of each conversation's one reply and its <|im_end|>, after the prompt with the
    generation header, each conversation alone."""
    total, count = 0.0, 0
    for c in chats:
        prompt = tok.apply_chat_template(c["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt + c["messages"][-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        total += nll_positions(model, ids, range(n_prompt, len(ids)))
        count += len(ids) - n_prompt
    return total, count


def texts(n):
    return [{"text": " ".join(WORDS[(i * 3) % len(WORDS) :] + WORDS[: 2 + i])} for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_text_and_chat_match_independent_computation(tmp_path, tiny_model_dir, plain, batch_size):
    model, tok = plain
    chats = [conversation(i, system=i % 2 == 0) for i in range(5)]
    write_jsonl(tmp_path / "chat.jsonl", chats)
    write_jsonl(tmp_path / "text.jsonl", texts(4))
    got = eval_json(
        tiny_model_dir, "--data", tmp_path / "chat.jsonl", "--data", tmp_path / "text.jsonl", "--batch-size", batch_size
    )["results"]["model"]

    total, count = chat_nll(model, tok, chats)
    for t in texts(4):  # text: every token after the first
        ids = tok(t["text"])["input_ids"]
        total += nll_positions(model, ids, range(1, len(ids)))
        count += len(ids) - 1
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_sliding_window_matches_independent_computation(tmp_path, tiny_model_dir, plain):
    model, tok = plain
    text = " ".join(WORDS * 12)
    write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    context, stride = 48, 20
    got = eval_json(
        tiny_model_dir,
        "--data",
        tmp_path / "long.jsonl",
        "--max-length",
        context,
        "--stride",
        stride,
        "--batch-size",
        4,
    )["results"]["model"]

    ids = tok(text)["input_ids"]
    assert len(ids) > 3 * context
    total, count, prev_end = 0.0, 0, 1
    for begin in range(0, len(ids), stride):  # the classic loop: score only what the previous window did not
        end = min(begin + context, len(ids))
        window = ids[begin:end]
        total += nll_positions(model, window, range(prev_end - begin, len(window)))
        count += end - prev_end
        prev_end = end
        if end == len(ids):
            break
    assert got["tokens"] == count == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_windows_score_each_token_once():
    ids = list(range(100))
    for context, stride in ((10, 10), (10, 3), (100, 50), (7, 1)):
        scored = [t for w in windows(ids, context, stride) for t in w["labels"] if t != -100]
        assert scored == ids[1:]
        assert all(len(w["input_ids"]) <= context for w in windows(ids, context, stride))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("evalrun")
    write_jsonl(folder / "train.jsonl", [conversation(i) for i in range(12)])
    write_jsonl(folder / "eval.jsonl", [conversation(i + 50) for i in range(4)])
    # fp32: these tests are about scoring, which never autocasts; bf16 training is test_train's
    (folder / "recipe.yaml").write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 96\n"
        "training:\n  max_steps: 6\n  batch_size: 4\n  learning_rate: 2.0e-2\n  precision: fp32\n"
        f"output:\n  dir: {folder / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(folder / "recipe.yaml"), "--samples", "0", "--json"])
    assert result.exit_code == 0, result.output
    return folder / "run", json.loads(result.stdout)


def test_run_compare_base(tiny_run, tiny_model_dir, plain):
    """Base and tuned perplexity of a run, each against plain transformers / plain PEFT forwards of the run's eval
    data (float64 NLL), and the change against the difference of those independent values."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, summary = tiny_run
    out = eval_json(run, "--compare-base")
    base, tuned = out["results"]["base"], out["results"]["tuned"]
    chats = [json.loads(line) for line in (run.parent / "eval.jsonl").read_text().splitlines()]
    base_model, tok = plain
    base_nll, count = chat_nll(base_model, tok, chats)
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter")
    tuned_nll, tuned_count = chat_nll(tuned_model.eval(), tok, chats)
    assert base["tokens"] == tuned["tokens"] == count == tuned_count == summary["eval_after"]["tokens"]
    want_base, want_tuned = math.exp(base_nll / count), math.exp(tuned_nll / count)
    assert base["perplexity"] == pytest.approx(want_base, rel=1e-4)
    assert tuned["perplexity"] == pytest.approx(want_tuned, rel=1e-4)
    assert want_tuned < want_base  # the run learned something, so the change below is not ~0
    assert out["change"]["perplexity"] == pytest.approx(want_tuned - want_base, rel=1e-3)
    assert out["change"]["relative"] == pytest.approx((want_tuned - want_base) / want_base, rel=1e-3)
    assert tuned["perplexity"] == pytest.approx(summary["eval_after"]["perplexity"], rel=1e-4)
    assert json.loads((run / "eval.json").read_text()) == {"evaluations": [out]}  # one result per data set
    # --base scores the base alone; the same number as the base model folder scored directly
    only_base = eval_json(run, "--base")["results"]
    assert list(only_base) == ["base"] and only_base["base"]["nll"] == pytest.approx(base["nll"], rel=1e-6)
    direct = eval_json(tiny_model_dir, "--data", run.parent / "eval.jsonl", "--max-length", 96)["results"]["model"]
    assert direct["nll"] == pytest.approx(base["nll"], rel=1e-5)


def test_training_eval_on_text_equals_ftune_eval(tmp_path, tiny_model_dir):
    """Plain-text eval data: the eval loss training logs is the number `ftune eval` gives (same sliding windows)."""
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"Document {i}. " * 30} for i in range(6)])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "A held-out document, longer than one window. " * 12}])
    (tmp_path / "recipe.yaml").write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 48\n"
        f"training:\n  max_steps: 2\n  batch_size: 2\n  precision: fp32\noutput:\n  dir: {tmp_path / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--samples", "0", "--json"])
    assert result.exit_code == 0, result.output
    after = json.loads(result.stdout)["eval_after"]
    tuned = eval_json(tmp_path / "run")["results"]["tuned"]
    assert tuned["tokens"] == after["tokens"] and tuned["nll"] == pytest.approx(after["nll"], rel=1e-4)


def test_human_table(tiny_run):
    result = runner.invoke(app, ["eval", str(tiny_run[0]), "--compare-base"])
    assert result.exit_code == 0
    assert "fine-tuned" in result.stderr and "perplexity change" in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: p.write_text(""), ["--data", "{f}"], "no examples"),
        (lambda p: write_jsonl(p, [{"text": "the"}, {"text": "a"}]), ["--data", "{f}"], "no scorable tokens"),
        (lambda p: None, ["--data", "{f}"], "data file not found"),
        (lambda p: p.write_text("{oops\n"), ["--data", "{f}"], "d.jsonl:1: not valid JSON"),
        (lambda p: None, [], "is a model, not a run: pass the data"),
    ],
)
def test_errors(tmp_path, tiny_model_dir, setup, args, message):
    f = tmp_path / "d.jsonl"
    setup(f)
    result = runner.invoke(app, ["eval", str(tiny_model_dir), *[a.format(f=f) for a in args]])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_target(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(tmp_path / "d.jsonl", texts(1))
    for target, message in ((tmp_path, "neither a run directory"), ("nobody/nothing-here", "cannot load")):
        result = runner.invoke(app, ["eval", str(target), "--data", str(tmp_path / "d.jsonl")])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
