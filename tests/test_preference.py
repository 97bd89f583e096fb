"""Preference training (DPO): pairs read and checked line by line, the reply tokens scored exactly as SFT learns
them, pair metrics against an independent computation, and a DPO run through the CLI (ln 2 first loss, margin up,
an adapter plain PEFT loads, resume, ftune eval)."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import write_jsonl

runner = CliRunner()
SYSTEM = "Answer with the number."


def pair(i: int, form: str = "strings") -> dict:
    question, good, bad = f"What is {i} plus 1?", f"The answer is {i + 1}.", "I do not know, sorry."
    if form == "strings":
        return {"prompt": question, "chosen": good, "rejected": bad, "id": i}  # an extra field: ignored
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if form == "messages":
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
    return {  # implicit prompt: two whole conversations sharing their first messages
        "chosen": prompt + [{"role": "assistant", "content": good}],
        "rejected": prompt + [{"role": "assistant", "content": bad}],
    }


def test_preference_lines_in_every_form_and_bad_lines_by_kind(tmp_path):
    from finetune_cli.data import jsonl

    good = [pair(0), pair(1, "messages"), pair(2, "implicit")]
    bad = [
        {"prompt": "Hi", "rejected": "no"},
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], "rejected": "b"},
    ]
    records, errors, fmt = jsonl.parse(write_jsonl(tmp_path / "p.jsonl", good + bad))
    assert fmt == "preference"
    assert [e.kind for e in errors] == ["missing chosen", "chosen equals rejected", "no prompt", "no prompt"]
    assert [e.where.rsplit(":", 1)[1] for e in errors] == ["4", "5", "6", "7"]
    assert records[0]["prompt"] == [{"role": "user", "content": "What is 0 plus 1?"}]
    assert records[2]["prompt"] == pair(2, "messages")["prompt"] and records[1]["prompt"][0]["role"] == "system"
    assert records[2]["chosen"] == [{"role": "assistant", "content": "The answer is 3."}]
    renamed = [{"question": "Q?", "good": "yes", "bad": "no"}]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    records, errors, fmt = jsonl.parse(write_jsonl(tmp_path / "r.jsonl", renamed), columns=columns)
    assert not errors and fmt == "preference" and records[0]["rejected"][0]["content"] == "no"


def test_scored_tokens_are_the_reply_and_its_end_of_turn(tokenizer):
    from finetune_cli.data import formats, preference

    record = formats.convert_pair(pair(5, "messages"), "x:1")
    ex, truncated = preference.tokenize_pair(tokenizer, record, 512)
    assert not truncated
    assert tokenizer.decode(ex["chosen_ids"]) == "The answer is 6.<|im_end|>"  # no newline, no second EOS
    assert tokenizer.decode(ex["rejected_ids"]) == "I do not know, sorry.<|im_end|>"
    prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ex["prompt_ids"]) == prompt
    cut, truncated = preference.tokenize_pair(tokenizer, record, len(ex["prompt_ids"]) + 3)
    assert truncated and len(cut["chosen_ids"]) == 3
    assert preference.tokenize_pair(tokenizer, record, len(ex["prompt_ids"]))[0] is None  # nothing left to score


def test_pair_metrics_equal_an_independent_computation(tiny_model_dir, tokenizer):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune_cli.data import formats, preference
    from finetune_cli.evaluation import pairwise

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    records = [formats.convert_pair(pair(i, "messages"), f"x:{i}") for i in range(5)]
    examples = [preference.tokenize_pair(tokenizer, r, 512)[0] for r in records]
    got = pairwise.pair_metrics(model, examples, batch_size=2, pad_token_id=tokenizer.pad_token_id)

    def logp(prompt, reply) -> float:  # the template rendered by the tokenizer; the reply closes with <|im_end|>
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        assert full.startswith(head)
        body = full[len(head) :].split("<|im_end|>")[0] + "<|im_end|>"
        p = tokenizer(head, add_special_tokens=False)["input_ids"]
        r = tokenizer(body, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double()
        logps = torch.log_softmax(logits, -1)
        return float(sum(logps[len(p) - 1 + k, tok] for k, tok in enumerate(r)))

    diffs = [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in records]
    assert got["pairs"] == 5
    assert got["margin"] == pytest.approx(sum(diffs) / 5, abs=1e-4)
    assert got["accuracy"] == sum(d > 0 for d in diffs) / 5


def dpo_recipe(folder: Path, model_dir: Path, steps: int = 4, extra: str = "") -> Path:
    write_jsonl(folder / "train.jsonl", [pair(i, ("strings", "messages", "implicit")[i % 3]) for i in range(12)])
    write_jsonl(folder / "eval.jsonl", [pair(i + 50, "messages") for i in range(4)])
    recipe = folder / "dpo.yaml"
    recipe.write_text(
        f"model:\n  base: {model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 96\n"
        "method:\n  r: 8\n  alpha: 16\n"
        f"training:\n  objective: dpo\n  beta: 0.1\n  max_steps: {steps}\n  batch_size: 4\n"
        f"  learning_rate: 1.0e-2\n  save_steps: 2\n{extra}"
        f"output:\n  dir: {folder / 'run'}\n"
    )
    return recipe


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """A DPO run interrupted inside step 3 (checkpoint at step 2), then resumed to its end with --resume."""
    from transformers import TrainerCallback

    from finetune_cli import recipe as recipes
    from finetune_cli.training import train as training

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    folder = tmp_path_factory.mktemp("dpo")
    recipe = dpo_recipe(folder, tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        training.run(recipes.load(recipe), callbacks=[Interrupt()], samples=0)
    assert json.loads((folder / "run" / "run.json").read_text())["status"] == "interrupted"
    result = runner.invoke(app, ["train", str(folder / "run"), "--resume", "--samples", "0"])
    assert result.exit_code == 0, result.output
    return recipe, folder / "run"


def test_dpo_run_starts_at_ln2_resumes_raises_the_margin_and_saves_a_peft_adapter(dpo_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run = dpo_run
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["objective"] == "dpo" and "checkpoint-2" in info["resumed_from"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # step 3 again after the resume
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA's B is zero: policy = reference
    before, after = info["eval_before"], info["eval_after"]
    assert before["pairs"] == after["pairs"] == 4
    assert after["margin"] > before["margin"] + 1.0  # held-out pairs
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(rows[1])
    assert [r["step"] for r in rows if "eval_margin" in r] == [0, 4]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_ftune_eval_reports_pair_metrics_for_both_models(dpo_run):
    _, run = dpo_run
    result = runner.invoke(app, ["eval", str(run), "--compare-base", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    info = json.loads((run / "run.json").read_text())
    assert out["results"]["tuned"]["margin"] == pytest.approx(info["eval_after"]["margin"], abs=1e-4)
    assert out["results"]["base"]["margin"] == pytest.approx(info["eval_before"]["margin"], abs=1e-4)
    assert out["change"]["margin"] > 1.0


def test_objective_and_data_must_match(tmp_path, tiny_model_dir):
    recipe = dpo_recipe(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["train", str(recipe), "--set", "training.objective=sft", "--set", "training.beta="])
    assert result.exit_code == 2 and "training.objective: dpo" in result.output
    result = runner.invoke(app, ["train", str(recipe), "--set", "training.objective=sft"])
    assert result.exit_code == 2 and "training.beta applies to training.objective dpo" in result.output
    result = runner.invoke(app, ["train", str(recipe), "--set", "training.loss_type=[sigmoidd]"])
    assert result.exit_code == 2 and "training.loss_type" in result.output


def test_a_finished_run_as_model_base_is_the_start_and_the_reference(dpo_run, tmp_path):
    """SFT -> DPO: model.base names a finished LoRA run (here the DPO run itself, continued). Its adapter is merged
    into its base as start/, which is both where training starts and the reference: the first loss is ln 2, and the
    new run's eval before training equals the finished run's eval after it (the same model scored on the same
    pairs). Eval, generate and merge of the new run load start/ under the new adapter; QLoRA from an adapter run and
    an unfinished run are refused."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_cli import rundir

    recipe, first = dpo_run
    out = tmp_path / "again"
    result = runner.invoke(app, ["train", str(recipe), f"--set=model.base={first}", f"--set=output.dir={out}",
                                 "--set=training.max_steps=2", "--samples", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    earlier = json.loads((first / "run.json").read_text())
    assert info["eval_before"]["margin"] == pytest.approx(earlier["eval_after"]["margin"], abs=1e-4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "loss" in r][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)

    base_dir = json.loads((first / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(first / "adapter"))
    start = AutoModelForCausalLM.from_pretrained(out / "start")
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.allclose(start(ids).logits, plain.merge_and_unload()(ids).logits, atol=1e-4)
    target = rundir.open_target(str(out))
    assert target.weights == str(out / "start") and target.adapter == out / "adapter"
    result = runner.invoke(app, ["eval", str(out), "--compare-base", "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["results"]
    assert scored["base"]["margin"] == pytest.approx(earlier["eval_after"]["margin"], abs=1e-4)  # the reference
    assert scored["tuned"]["margin"] == pytest.approx(info["eval_after"]["margin"], abs=1e-4)

    # --overwrite of that run: start/ is merged again and written after the old folder is emptied (it is never
    # loaded from the run being replaced, whose start/ the overwrite deletes)
    result = runner.invoke(app, ["train", str(recipe), f"--set=model.base={first}", f"--set=output.dir={out}",
                                 "--set=training.max_steps=1", "--samples", "0", "--overwrite"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "start" / "config.json").is_file() and rundir.open_target(str(out)).weights == str(out / "start")

    result = runner.invoke(app, ["train", str(recipe), f"--set=model.base={first}", f"--set=output.dir={tmp_path}/q",
                                 "--set=method.name=qlora"])  # fmt: skip
    assert result.exit_code == 2 and "ftune merge-adapter" in result.output
    (first.parent / "unfinished").mkdir()
    (first.parent / "unfinished" / "recipe.yaml").write_text((first / "recipe.yaml").read_text())
    (first.parent / "unfinished" / "run.json").write_text(json.dumps({**earlier, "status": "interrupted"}))
    (first.parent / "unfinished" / ".ftune").write_text((first / ".ftune").read_text())  # a run's own marker
    result = runner.invoke(app, ["train", str(recipe), f"--set=model.base={first.parent / 'unfinished'}",
                                 f"--set=output.dir={tmp_path}/u"])  # fmt: skip
    assert result.exit_code == 2 and "resume it" in result.output


def test_validate_reports_pairs_by_kind_with_token_counts_and_preview_shows_both(tmp_path, tiny_model_dir, tokenizer):
    recipe = dpo_recipe(tmp_path, tiny_model_dir)
    result = runner.invoke(app, ["preview", str(recipe), "--index", "1", "--json"])
    chosen, rejected = json.loads(result.stdout)
    assert chosen["source"].endswith("(chosen)") and rejected["source"].endswith("(rejected)")
    scored = "".join(t["text"] for t in rejected["tokens"] if t["learned"])
    assert scored == "I do not know, sorry.<|im_end|>"
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}) + "\n")
        f.write(json.dumps({"prompt": "Hi", "chosen": "Hello."}) + "\n")
    result = runner.invoke(app, ["validate", str(recipe), "--json"])
    report = json.loads(result.stdout)
    assert set(report["errors"]) == {"chosen equals rejected", "missing rejected"}
    assert report["errors"]["missing rejected"][0]["where"].endswith("train.jsonl:14")
    assert report["stats"]["examples"] == 12 and not any("duplicate" in w for w in report["warnings"])
    longest = max(len(tokenizer(f"The answer is {i + 1}.<|im_end|>")["input_ids"]) for i in range(12))
    assert report["stats"]["pairs"]["chosen_tokens"]["max"] == longest


def test_fuzz_preference_lines(tmp_path, tiny_model_dir):
    """Mutated preference lines: validate lists each bad one by line (exit 1) and train refuses with one
    `error:` line naming it (exit 2), before any weights load; never a traceback."""
    import random

    import yaml

    rng = random.Random(7)
    values = [None, "", " ", 3, [], {}, [1], "ok", [{"role": "user", "content": "hi"}], [{"role": "bot"}], {"a": 1}]
    trained = 0
    for case in range(6):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        lines = [pair(i, rng.choice(["strings", "messages", "implicit"])) for i in range(4)]
        bad = rng.randrange(1, 4)
        line = lines[bad]
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(["prompt", "chosen", "rejected"])
            if rng.random() < 0.3:
                line.pop(key, None)
            else:
                line[key] = rng.choice(values)
        write_jsonl(folder / "train.jsonl", lines)
        write_jsonl(folder / "eval.jsonl", [pair(9)])
        recipe = {
            "model": {"base": str(tiny_model_dir)},
            "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
            "training": {"objective": "dpo", "max_steps": 1, "batch_size": 2},
            "output": {"dir": str(folder / "out")},
        }
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
        where = f"case {case}: {json.dumps(line)}"
        check = runner.invoke(app, ["validate", str(folder / "recipe.yaml"), "--json"])
        assert check.exit_code in (0, 1) and "Traceback" not in check.output, where
        report = json.loads(check.stdout)
        listed = {int(e["where"].rsplit(":", 1)[1]) for items in report["errors"].values() for e in items}
        if check.exit_code == 0:  # a mutation that is still a valid pair (e.g. "ok" as a reply)
            continue
        assert listed == {bad + 1}, (where, report["errors"])
        if trained == 2:
            continue
        trained += 1
        result = runner.invoke(app, ["train", str(folder / "recipe.yaml"), "--samples", "0"])
        errors = [x for x in result.stderr.strip().splitlines() if x.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and f"train.jsonl:{bad + 1}:" in errors[0], where
        assert not (folder / "out").exists(), where


def test_orpo_first_loss_is_the_chosen_nll_plus_beta_times_the_odds_ratio_loss(tmp_path, tiny_model_dir, tokenizer):
    """ORPO, not DPO: the first step (one batch of all 12 pairs, LoRA's B zero: the base model) logs TRL's ORPO
    terms, each equal to a plain-transformers computation on the base: `nll_loss` is the mean token NLL of the chosen
    conversations (TRL scores the prompt's tokens too), `log_odds_chosen` the mean log odds ratio of the per-token
    mean log-probabilities of the replies, and the loss is nll - beta * mean(log sigmoid(log odds))."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = dpo_recipe(tmp_path, tiny_model_dir, steps=2)
    sets = ["objective=orpo", "beta=0.5", "loss_type=", "save_steps=", "batch_size=12", "precision=fp32"]
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0", *[f"--set=training.{s}" for s in sets]])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["objective"] == "orpo" and info["steps"] == 2 and info["eval_after"]["pairs"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and all(math.isfinite(r["loss"]) for r in losses)
    first = losses[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    nll_sum, nll_tokens, odds = 0.0, 0, []
    for i in range(12):
        system = [{"role": "system", "content": SYSTEM}] if i % 3 else []  # pair()'s strings form has none
        prompt = system + [{"role": "user", "content": f"What is {i} plus 1?"}]
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        mean_logp = {}
        for key, reply in (("chosen", f"The answer is {i + 1}."), ("rejected", "I do not know, sorry.")):
            body = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([head_ids + body])).logits[0].double()
            logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor([head_ids + body])[0, 1:, None])[:, 0]
            mean_logp[key] = float(logps[len(head_ids) - 1 :].mean())
            if key == "chosen":
                nll_sum, nll_tokens = nll_sum - float(logps.sum()), nll_tokens + len(logps)
        c, r = mean_logp["chosen"], mean_logp["rejected"]
        odds.append((c - r) - (math.log(-math.expm1(c)) - math.log(-math.expm1(r))))
    log_odds = torch.tensor(odds, dtype=torch.float64)
    ratio = float(torch.nn.functional.logsigmoid(log_odds).mean())
    assert first["nll_loss"] == pytest.approx(nll_sum / nll_tokens, abs=1e-4)
    assert first["log_odds_chosen"] == pytest.approx(float(log_odds.mean()), abs=1e-4)
    assert first["log_odds_ratio"] == pytest.approx(ratio, abs=1e-4)
    assert first["loss"] == pytest.approx(nll_sum / nll_tokens - 0.5 * ratio, abs=1e-4)
    assert first["loss"] != pytest.approx(math.log(2), abs=1e-2)  # not DPO's first loss
    assert {"rewards/margins", "logps/chosen"} <= set(first)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))


def test_dpo_with_prompt_tuning_trains_only_the_virtual_tokens(tmp_path, tiny_model_dir):
    """TRL's DPO takes a prompt-tuning model: the reference is the base without the virtual tokens (PEFT's
    disable_adapter), so the first loss is near, not at, ln 2; only the virtual tokens train."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = dpo_recipe(tmp_path, tiny_model_dir, steps=2)
    method = "method:\n  name: prompt_tuning\n  num_virtual_tokens: 4\n"
    recipe.write_text(recipe.read_text().replace("method:\n  r: 8\n  alpha: 16\n", method))
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0", "--set", "training.save_steps="])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert info["steps"] == 2 and info["trainable_parameters"] == 4 * hidden
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2] and all(math.isfinite(r["loss"]) for r in losses)
    assert abs(losses[0]["loss"] - math.log(2)) < 0.1
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    # its virtual tokens cannot be merged into weights: no later run can start from it
    result = runner.invoke(app, ["train", str(recipe), f"--set=model.base={run}", f"--set=output.dir={tmp_path}/x"])
    assert result.exit_code == 2 and "cannot be a starting point" in result.output


def test_kto_run_on_labelled_replies_and_pairs_saves_an_adapter_peft_loads(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_cli.data import jsonl

    recipe = dpo_recipe(tmp_path, tiny_model_dir, steps=2)
    lines = [{"prompt": f"What is {i} plus 1?", "completion": f"It is {i + 1}.", "label": i % 3 > 0} for i in range(8)]
    bad = [{"prompt": "Hi", "completion": "Hello.", "label": "yes"}, {"prompt": "", "completion": "a", "label": True}]
    records, errors, fmt = jsonl.parse(write_jsonl(tmp_path / "kto.jsonl", lines + bad))
    assert fmt == "unpaired_preference" and len(records) == 8
    assert [(e.kind, e.where.rsplit(":", 1)[1]) for e in errors] == [("wrong type", "9"), ("no prompt", "10")]
    write_jsonl(tmp_path / "kto.jsonl", lines)
    sets = ["training.objective=kto", "training.loss_type=", "training.save_steps=", "data.train=kto.jsonl"]
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0", *[f"--set={s}" for s in sets]])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["objective"] == "kto" and info["steps"] == 2 and info["eval_after"]["pairs"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] == pytest.approx(0.5, abs=1e-5)  # policy = reference: KTO's loss is 1 - sigmoid(0)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    result = runner.invoke(app, ["train", str(recipe), "--set=data.train=kto.jsonl", f"--set=output.dir={tmp_path}/x"])
    assert result.exit_code == 2 and "which trains on preference pairs" in result.output  # dpo needs pairs


def test_a_run_from_before_training_objective_resumes_without_a_recipe_change(tmp_path):
    import yaml

    from finetune_cli import recipe as recipes
    from finetune_cli import rundir

    (tmp_path / "r.yaml").write_text("data:\n  train: train.jsonl\n")
    now = recipes.load(tmp_path / "r.yaml")
    old = now.model_dump(mode="json")
    for key in ("objective", "beta", "loss_type", "desirable_weight", "undesirable_weight"):
        del old["training"][key]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert rundir.recipe_changes(tmp_path, now.model_dump(mode="json")) == []
    changed = now.model_copy(update={"training": now.training.model_copy(update={"objective": "dpo"})})
    assert rundir.recipe_changes(tmp_path, changed.model_dump(mode="json")) == ["training.objective"]
