"""`ftune train` on a tiny random Llama: run directory, adapter loadable by plain PEFT, metrics, overwrite rules."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One tiny training run shared by the tests below."""
    from tests.conftest import conversation, write_jsonl

    folder = tmp_path_factory.mktemp("train")
    write_jsonl(folder / "train.jsonl", [conversation(i, turns=1 + i % 2) for i in range(16)])
    write_jsonl(folder / "eval.jsonl", [conversation(i + 100) for i in range(4)])
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 128\n"
        "method:\n  r: 8\ntraining:\n  max_steps: 4\n  batch_size: 4\n  learning_rate: 1.0e-2\n  eval_steps: 2\n"
        f"output:\n  dir: {folder / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--json", "--samples", "1"])
    assert result.exit_code == 0, result.output
    return recipe, folder / "run", json.loads(result.stdout)


def test_run_directory(trained):
    recipe, run, summary = trained
    # .ftune marks the folder as ftune's, so --overwrite may replace it (and nothing else)
    assert sorted(p.name for p in run.iterdir()) == [".ftune", "adapter", "metrics.jsonl", "recipe.yaml", "run.json"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 4
    assert info["versions"]["trl"] and info["data"]["train"]["examples"] == 16
    assert len(info["data"]["train"]["files"][0]["sha256"]) == 64 and info["data"]["train"]["cache"] in ("hit", "miss")
    assert summary["run_dir"] == str(run) and summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["samples"][0]["prompt"] == "What is 100 plus 0?"
    # the saved recipe repeats the run: every default is filled in and paths are absolute
    saved = (run / "recipe.yaml").read_text()
    assert "warmup_ratio: 0.03" in saved and str(recipe.parent / "train.jsonl") in saved


def test_metrics_every_step_and_eval(trained):
    _, run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r["step"] for r in eval_rows] == [0, 2, 4]  # before training, every eval_steps, and the end
    assert eval_rows[-1]["eval_perplexity"] == pytest.approx(math.exp(eval_rows[-1]["eval_loss"]))


def test_adapter_loads_with_plain_peft_and_changes_logits(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, _ = trained
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    ids = tok("What is 7 plus 1?", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, run / "adapter")
        tuned_logits = tuned(ids).logits
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (tuned_logits - base_logits).abs().max() > 1e-3


def test_eval_perplexity_matches_independent_computation(trained, tiny_model_dir):
    """The summary's eval perplexity equals a plain forward over each example alone, NLL summed in float64."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, summary = trained
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "adapter").eval()
    total, count = 0.0, 0
    for line in (run.parent / "eval.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, tokenize=False)
        answer = msgs[-1]["content"] + "<|im_end|>"
        assert full.startswith(prompt + answer)
        ids = tok(prompt + answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        for pos in range(n_prompt, ids.shape[1]):
            total -= float(logp[pos - 1, ids[0, pos]])
            count += 1
    after = summary["eval_after"]
    assert after["tokens"] == count
    assert after["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_refuses_to_overwrite_a_run(trained):
    recipe, run, _ = trained
    before = (run / "run.json").read_text()
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "already holds a run (completed); pass --resume to continue it, --overwrite" in result.stderr
    assert (run / "run.json").read_text() == before


def test_overwrite_replaces_the_run(tiny_recipe):
    run = tiny_recipe.parent / "run"
    args = ["train", str(tiny_recipe), "--overwrite", "--samples", "0", "--set", "training.max_steps=1"]
    assert runner.invoke(app, args).exit_code == 0
    (run / ".staging").mkdir()
    (run / ".staging" / "old").write_text("what an earlier run left")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (run / ".staging").exists() and (run / "adapter" / "adapter_config.json").is_file()
    assert "ftune train" in result.stderr and "trainable" in result.stderr  # the summary table
    # a file ftune did not write is never replaced: --overwrite is refused, naming it
    (run / "stale.txt").write_text("mine")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "stale.txt" in refused.stderr and (run / "stale.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "overrides",
    [
        ["training.gradient_checkpointing=true", "training.gradient_accumulation=2"],
        ["training.precision=bf16", "training.optimizer=adafactor", "training.lr_scheduler=linear"],
        ["training.optimizer=sgd", "training.max_grad_norm=0.5", "training.weight_decay=0.1"],
    ],
)
def test_training_options(tiny_recipe, overrides):
    args = ["train", str(tiny_recipe), "--json", "--samples", "0", "--set", "training.max_steps=2"]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    saved = (tiny_recipe.parent / "run" / "recipe.yaml").read_text()
    for item in overrides:
        key, value = item.split("=")
        assert f"{key.split('.')[-1]}: {value}" in saved


def test_secrets_never_written(tiny_recipe, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    result = runner.invoke(
        app, ["train", str(tiny_recipe), "--json", "--samples", "0", "--set", "training.max_steps=1"]
    )
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    for path in (tiny_recipe.parent / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # weights are safetensors, never pickles
    assert not list((tiny_recipe.parent / "run").rglob("*.bin"))
