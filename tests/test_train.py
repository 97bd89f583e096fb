"""`ftune train` on a tiny random Llama: run directory, adapter loadable by plain PEFT, metrics, overwrite rules."""

import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One tiny training run shared by the tests below. Precision bf16 on every CPU (emulated where the CPU has no
    native bf16: slower, still correct), so that the eval checks below hold for a bf16 run: eval scores at the
    model's own precision, never under the training's autocast."""
    from tests.conftest import conversation, write_jsonl

    folder = tmp_path_factory.mktemp("train")
    write_jsonl(folder / "train.jsonl", [conversation(i, turns=1 + i % 2) for i in range(16)])
    write_jsonl(folder / "eval.jsonl", [conversation(i + 100) for i in range(4)])
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 128\n"
        "method:\n  r: 8\ntraining:\n  max_steps: 4\n  batch_size: 4\n  learning_rate: 1.0e-2\n  eval_steps: 2\n"
        f"  precision: bf16\noutput:\n  dir: {folder / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--json", "--samples", "1"])
    assert result.exit_code == 0, result.output
    return recipe, folder / "run", json.loads(result.stdout)


def test_run_directory(trained):
    recipe, run, summary = trained
    # .ftune marks the folder as ftune's, so --overwrite may replace it (and nothing else)
    assert sorted(p.name for p in run.iterdir()) == [
        ".ftune",
        "adapter",
        "loss.png",
        "metrics.jsonl",
        "recipe.yaml",
        "report.html",
        "run.json",
    ]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 4
    assert info["versions"]["trl"] and info["data"]["train"]["examples"] == 16
    assert (
        info["data"]["train"]["files"][0]["sha256"]
        == hashlib.sha256((run.parent / "train.jsonl").read_bytes()).hexdigest()
    )
    assert summary["run_dir"] == str(run) and summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["samples"][0]["prompt"] == "What is 100 plus 0?"
    # the saved recipe repeats the run: every default is filled in and paths are absolute
    saved = (run / "recipe.yaml").read_text()
    assert "warmup_ratio: 0.03" in saved and str(recipe.parent / "train.jsonl") in saved


def independent_eval(model, tok, eval_file):
    """(mean NLL, tokens) of each conversation's reply and its <|im_end|>, each conversation alone through a plain
    forward, NLL summed in float64."""
    total, count = 0.0, 0
    for line in eval_file.read_text().splitlines():
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
    return total / count, count


def test_metrics_every_step_and_eval(trained, tiny_model_dir):
    """Eval rows: before training the base model's loss, at the end the tuned model's, each against plain
    transformers / PEFT forwards; perplexity is exp of that loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r["step"] for r in eval_rows] == [0, 2, 4]  # before training, every eval_steps, and the end
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_loss, _ = independent_eval(base, tok, run.parent / "eval.jsonl")
    tuned = PeftModel.from_pretrained(base, run / "adapter").eval()
    tuned_loss, _ = independent_eval(tuned, tok, run.parent / "eval.jsonl")
    assert tuned_loss < base_loss - 0.1  # the two rows are told apart
    for row, loss in ((eval_rows[0], base_loss), (eval_rows[-1], tuned_loss)):
        assert row["eval_loss"] == pytest.approx(loss, rel=1e-4), row
        assert row["eval_perplexity"] == pytest.approx(math.exp(loss), rel=1e-4), row


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
    loss, count = independent_eval(model, tok, run.parent / "eval.jsonl")
    after = summary["eval_after"]
    assert after["tokens"] == count
    assert after["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_refuses_to_overwrite_a_run(trained):
    recipe, run, _ = trained
    before = (run / "run.json").read_text()
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "already holds a run (completed); pass --resume to continue it, --overwrite" in result.stderr
    assert (run / "run.json").read_text() == before


def test_overwrite_replaces_the_run(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))  # an empty tokenized-data cache
    run = tiny_recipe.parent / "run"
    args = ["train", str(tiny_recipe), "--overwrite", "--samples", "0", "--set", "training.max_steps=1"]
    assert runner.invoke(app, args).exit_code == 0
    first = json.loads((run / "run.json").read_text())["data"]["train"]
    (run / ".staging").mkdir()
    (run / ".staging" / "old").write_text("what an earlier run left")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (run / ".staging").exists() and (run / "adapter" / "adapter_config.json").is_file()
    assert "ftune train" in result.stderr and "trainable" in result.stderr  # the summary table
    # the same data, tokenizer and settings again: tokenized once, then read back from the cache, unchanged
    second = json.loads((run / "run.json").read_text())["data"]["train"]
    assert (first.pop("cache"), second.pop("cache")) == ("miss", "hit")
    assert first == second and any((tmp_path / "home" / "tokenized").glob("*.arrow"))
    # a file ftune did not write is never replaced: --overwrite is refused, naming it
    (run / "stale.txt").write_text("mine")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "stale.txt" in refused.stderr and (run / "stale.txt").read_text() == "mine"


def make_probe():
    """A TrainerCallback for `train.run`: what the trainer ftune built was given (its arguments, model, optimizer,
    scheduler) and what happened in its steps (forward passes, compute dtype, gradients after clipping, one LoRA
    weight before and after each optimizer step)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.calls, self.dtypes, self.grad_norms, self.updates = Counter(), set(), [], []

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            self.args, self.optimizer, self.lr_scheduler = args, optimizer, lr_scheduler
            base = model.get_base_model()
            layer = base.model.layers[0]
            self.hooks = [
                base.model.embed_tokens.register_forward_hook(
                    lambda module, inputs, output: self.calls.update(["embed"]) if module.training else None
                ),
                layer.self_attn.q_proj.base_layer.register_forward_hook(
                    lambda module, inputs, output: self.dtypes.add(output.dtype)
                ),
            ]
            # a checkpointed layer's recomputation calls its modules' forward again, but not their hooks
            self.mlp, plain = layer.mlp, layer.mlp.forward

            def counted(*args, **kwargs):
                if self.mlp.training:
                    self.calls.update(["layer"])
                return plain(*args, **kwargs)

            self.mlp.forward = counted

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            params = [p for p in model.parameters() if p.requires_grad]
            self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
            p = next(p for n, p in model.named_parameters() if "lora_A" in n)
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            self.updates.append([p, p.detach().clone(), p.grad.detach().clone(), group["lr"], group["weight_decay"]])

        def on_optimizer_step(self, args, state, control, **kw):
            self.updates[-1].append(self.updates[-1][0].detach().clone())

        def on_train_end(self, args, state, control, **kw):
            self.epoch = state.epoch
            for hook in self.hooks:
                hook.remove()
            del self.mlp.forward

    return Probe()


def probe_run(recipe_path, overrides):
    from finetune_cli import recipe as recipes
    from finetune_cli.training import train

    probe = make_probe()
    base = ["training.max_steps=2", "data.eval="]  # no eval: only training forwards are counted
    summary = train.run(recipes.load(recipe_path, base + overrides), callbacks=[probe], samples=0)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    saved = (recipe_path.parent / "run" / "recipe.yaml").read_text()
    for item in overrides:  # the resolved recipe records them
        key, value = item.split("=")
        assert f"{key.split('.')[-1]}: {value}" in saved
    rows = [json.loads(line) for line in (recipe_path.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    return probe, [r["grad_norm"] for r in rows if "loss" in r]


def test_gradient_checkpointing_and_accumulation_reach_the_trainer(tiny_recipe):
    """Checkpointing recomputes each layer in the backward pass: the first layer's MLP runs twice per forward of
    the embeddings (once without). Accumulation 2 takes two micro-batches per step: 2 steps x 2 x 4 = the 16
    examples, one epoch (half of one without)."""
    probe, _ = probe_run(
        tiny_recipe,
        ["training.gradient_checkpointing=true", "training.gradient_accumulation=2", "training.precision=fp32"],
    )
    assert probe.args.gradient_checkpointing and probe.args.gradient_accumulation_steps == 2
    assert probe.calls["embed"] >= 4 and probe.calls["layer"] == 2 * probe.calls["embed"], probe.calls
    assert probe.epoch == pytest.approx(1.0)
    assert probe.dtypes == {torch.float32}


def test_bf16_adafactor_and_linear_schedule_reach_the_trainer(tiny_recipe):
    from transformers.optimization import Adafactor

    probe, _ = probe_run(
        tiny_recipe, ["training.precision=bf16", "training.optimizer=adafactor", "training.lr_scheduler=linear"]
    )
    assert probe.args.bf16 and not probe.args.fp16
    assert probe.dtypes == {torch.bfloat16}  # the training forward ran under bf16 autocast
    assert isinstance(probe.optimizer.optimizer, Adafactor)
    # linear decay after warmup: a quarter of the way from the warmup's end to the last step, 3/4 of the peak
    # (cosine would give 0.854)
    total = probe.args.max_steps
    warmup = probe.args.get_warmup_steps(total)
    assert warmup < total
    assert probe.lr_scheduler.lr_lambdas[0](warmup + 0.25 * (total - warmup)) == pytest.approx(0.75)


def test_sgd_clipping_and_weight_decay_reach_the_trainer(tiny_recipe):
    """Each update is plain SGD with weight decay, after clipping to training.max_grad_norm:
    w <- w - lr * (clip(g) + weight_decay * w), checked on a LoRA weight against the gradient the optimizer saw."""
    probe, logged = probe_run(
        tiny_recipe,
        [
            "training.optimizer=sgd",
            "training.max_grad_norm=0.05",
            "training.weight_decay=0.1",
            "training.warmup_ratio=0",
            "training.precision=fp32",
        ],
    )
    assert type(probe.optimizer.optimizer) is torch.optim.SGD
    assert probe.args.max_grad_norm == 0.05 and probe.args.weight_decay == 0.1
    # the recipe's defaults where TRL's differ: no checkpointing (each layer runs once per forward of the
    # embeddings), fp32 (as pinned), the cosine schedule (halfway through its first half: 0.854 of the peak)
    assert not probe.args.gradient_checkpointing and probe.calls["layer"] == probe.calls["embed"] > 0, probe.calls
    assert probe.dtypes == {torch.float32} and not probe.args.bf16
    assert probe.args.get_warmup_steps(2) == 0
    assert probe.lr_scheduler.lr_lambdas[0](0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # the logged norm is before clipping, and well over the limit; what the optimizer got was clipped to it
    assert len(logged) == len(probe.grad_norms) == 2 and min(logged) > 0.5, logged
    assert probe.grad_norms == pytest.approx([0.05, 0.05], rel=1e-4)
    for _, before, grad, lr, weight_decay, after in probe.updates:
        assert lr > 0 and weight_decay == 0.1
        expected = before - lr * (grad + weight_decay * before)
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-7)
        assert (lr * weight_decay * before).abs().max() > 1e-5  # the decay term is visible at that tolerance


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


def test_target_modules_naming_no_layer_is_exit_2_listing_the_layers(trained, tmp_path):
    """A misspelt `method.target_modules` (`[query, value]`, the names of older models) fails when PEFT adds the
    adapter: one line naming the key and the model's linear layers, exit 2, not a "training failed" exit 1."""
    recipe, _, _ = trained
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(recipe), "--set", "method.target_modules=[query, value]", "--set", f"output.dir={out}"]
    )
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: method.target_modules: query, value names no layer of ")
    assert "q_proj" in line and "down_proj" in line and "Traceback" not in result.output
    assert json.loads((out / "run.json").read_text())["status"] == "failed"  # the run says why it stopped
