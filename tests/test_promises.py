"""Promises the README makes, each checked through the real CLI against an independent computation (plain
transformers, PEFT and the tokenizer), on the tiny random-init model.

The expected token ids and loss masks are built by hand from SmolLM2's ChatML template (`chatml` below), not with
ftune's masking code; perplexities come from plain one-sequence forwards summed in float64."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow
import pyarrow.ipc
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune_cli import rundir
from finetune_cli.cli import app
from tests.conftest import ROOT, conversation, write_jsonl

FTUNE = Path(sys.executable).parent / "ftune"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_recipe(path: Path, model_dir: Path, output: Path, data=None, method=None, training=None, **extra) -> Path:
    """A recipe for the tiny model; the tokenized cache is off so that runs never touch ~/.cache/ftune."""
    recipe = {
        "model": {"base": str(model_dir)},
        "data": {"train": "train.jsonl", "max_length": 96, "cache": False, **(data or {})},
        "method": method or {"name": "lora", "r": 4},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1.0e-2, **(training or {})},
        "output": {"dir": str(output)},
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def chatml(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool], list[int | None]]:
    """Token ids, learned flags and the message each learned-or-not reply token belongs to, built by hand for
    SmolLM2's ChatML template: an assistant turn learns its content and the `<|im_end|>` closing it, unless it
    says "train": false or "weight": 0; everything else is context. Each piece is tokenized on its own."""
    assert messages[0]["role"] == "system"  # else the template adds its own default system message
    pieces = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            learned = m.get("train", True) is not False and m.get("weight", 1) != 0
            pieces += [("<|im_start|>assistant\n", False, None), (m["content"] + "<|im_end|>", learned, i)]
            pieces.append(("\n", False, None))
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False, None))
    ids, flags, turn = [], [], []
    for text, learned, i in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        flags += [learned] * len(piece)
        turn += [i] * len(piece)
    # the pieces tokenize as the whole rendering does (no token spans a piece boundary)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ids, flags, turn


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "loss" in r]


# --- 1. --resume --force after a recipe change ------------------------------------------------------------------


@pytest.fixture(scope="module")
def forced_resume(tmp_path_factory, tiny_model_dir):
    """A run stopped by SIGTERM after step 2 of 4 (constant learning rate 1e-3, no warmup), resumed with learning
    rate 5e-3 and max_steps 6: first without --force (refused), then with it. The signal is sent by the process
    to itself from a progress callback at step 2, so the stop is in-process and always at the same step
    (test_sigterm_* below sends SIGTERM from outside)."""
    from transformers import TrainerCallback

    from finetune_cli import ui

    class SigtermAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                # without ftune's handler, SIGTERM would end pytest itself: fail the run instead
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler"
                os.kill(os.getpid(), signal.SIGTERM)

    folder = tmp_path_factory.mktemp("resume-force")
    write_jsonl(folder / "train.jsonl", [conversation(i, turns=1 + i % 2) for i in range(16)])
    training = {
        "max_steps": 4,
        "learning_rate": 1.0e-3,
        "lr_scheduler": "constant",
        "warmup_ratio": 0,
        "save_steps": 100,
    }
    path = write_recipe(folder / "recipe.yaml", tiny_model_dir, folder / "run", training=training)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ui, "progress_callback", lambda: SigtermAtStep2())
        result = invoke("train", path, "--samples", "0")
    assert result.exit_code == 130, result.output
    run = folder / "run"
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    before = {name: (run / name).read_text() for name in ("run.json", "metrics.jsonl", "recipe.yaml")}
    assert json.loads(before["run.json"])["status"] == "interrupted"

    changes = ("--set", "training.learning_rate=5e-3", "--set", "training.max_steps=6")
    refused = invoke("train", run, "--resume", "--samples", "0", *changes)
    untouched = all((run / name).read_text() == text for name, text in before.items())
    untouched = untouched and (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    forced = invoke("train", run, "--resume", "--force", "--samples", "0", *changes)
    assert forced.exit_code == 0, forced.output
    return SimpleNamespace(run=run, refused=refused, untouched=untouched)


def test_resume_with_a_changed_recipe_is_refused_then_forced(forced_resume):
    """Without --force: exit 2 naming both changed keys, nothing touched. With --force: the run continues from
    checkpoint-2 and completes at the new max_steps (6, not the recorded 4), every step logged once."""
    refused, run = forced_resume.refused, forced_resume.run
    assert refused.exit_code == 2, refused.output
    assert "differs from the run's own in training.learning_rate, training.max_steps" in refused.stderr
    assert forced_resume.untouched  # run.json (interrupted), metrics, recipe and checkpoint as they were
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["resumed_from"].endswith("checkpoint-2")
    assert info["steps"] == 6
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "checkpoints").exists()


def test_resume_force_trains_with_the_changed_learning_rate(forced_resume):
    """Constant schedule, no warmup: every step's learning_rate is the recipe's. Steps 1-2 ran at 1e-3; after the
    forced resume with 5e-3 the remaining steps must run at 5e-3."""
    rates = {r["step"]: r["learning_rate"] for r in train_rows(forced_resume.run)}
    assert rates[1] == rates[2] == pytest.approx(1e-3)
    assert [rates[s] for s in (3, 4, 5, 6)] == pytest.approx([5e-3] * 4)


def test_resume_force_records_the_recipe_it_continued_with(forced_resume):
    saved = yaml.safe_load((forced_resume.run / "recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == 6 and saved["training"]["learning_rate"] == pytest.approx(5e-3)


# --- 3. plain-text training -------------------------------------------------------------------------------------

SHORT = "Plain text for continued pre-training."
LONG = " ".join(f"Sentence number {i} of a long document that goes on." for i in range(12))


def test_text_gets_eos_and_long_texts_become_max_length_chunks(tmp_path, tiny_model_dir, tokenizer):
    """`{"text": ...}` lines: the tokenizer's ids plus EOS, every token after the first learned; a text longer than
    max_length becomes consecutive max_length chunks (preview shows the first and the count; run.json counts
    all), against `tokenizer(text)["input_ids"] + [eos]` cut by hand."""
    max_length = 32
    write_jsonl(tmp_path / "train.jsonl", [{"text": SHORT}, {"text": LONG}])
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_model_dir,
        tmp_path / "run",
        data={"max_length": max_length},
        training={"max_steps": 1, "batch_size": 2},
    )
    eos = tokenizer.eos_token_id
    short = tokenizer(SHORT)["input_ids"] + [eos]
    long = tokenizer(LONG)["input_ids"] + [eos]
    chunks = [long[i : i + max_length] for i in range(0, len(long), max_length)]
    assert len(short) < max_length and len(chunks) >= 3 and len(chunks[-1]) > 1  # the cases this test is about

    result = invoke("preview", recipe, "--count", "2", "--json")
    assert result.exit_code == 0, result.output
    shown_short, shown_long = json.loads(result.stdout)
    assert [t["id"] for t in shown_short["tokens"]] == short
    learned = [t["id"] for t in shown_short["tokens"] if t["learned"]]
    assert learned == short[1:] and learned[-1] == eos  # every token after the first, EOS last
    assert shown_short["chunks"] == 1
    assert [t["id"] for t in shown_long["tokens"]] == chunks[0] and shown_long["count"] == max_length
    assert shown_long["chunks"] == len(chunks) and not shown_long["truncated"]

    result = invoke("train", recipe, "--samples", "0", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["data"]["train"]
    assert stats["examples"] == 1 + len(chunks)
    assert stats["tokens"] == len(short) + len(long)  # nothing cut off: each chunk is trained
    assert stats["learned_tokens"] == len(short) - 1 + sum(len(c) - 1 for c in chunks)
    assert stats["truncated"] == 0


# --- 5. "weight": 0 and "train": false ---------------------------------------------------------------------------


def test_weight_0_and_train_false_turns_are_not_learned(tmp_path, tiny_model_dir, tokenizer):
    """A first reply with OpenAI's "weight": 0 and a second one with "train": false: preview shows none of their
    tokens learned and every token of the other reply learned, exactly the hand-built masks; training's
    learned-token count is the hand-built one, without them."""
    first_unlearned = conversation(1, turns=2)
    first_unlearned["messages"][2]["weight"] = 0  # OpenAI's per-message weight
    second_unlearned = conversation(2, turns=2)
    second_unlearned["messages"][4]["train"] = False
    convs = [first_unlearned, second_unlearned, conversation(3, turns=2), conversation(4)]
    write_jsonl(tmp_path / "train.jsonl", convs)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run", training={"max_steps": 1})
    expected = [chatml(tokenizer, c["messages"]) for c in convs]

    result = invoke("preview", recipe, "--count", str(len(convs)), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    for example, (ids, flags, _) in zip(shown, expected):
        assert [t["id"] for t in example["tokens"]] == ids
        assert [t["learned"] for t in example["tokens"]] == flags
    for example, (_, _, turn), off, on in zip(shown, expected, (2, 4), (4, 2)):
        tokens = example["tokens"]
        assert not any(t["learned"] for t, i in zip(tokens, turn) if i == off)  # that reply and its <|im_end|>
        assert all(t["learned"] for t, i in zip(tokens, turn) if i == on)
        assert sum(i == off for i in turn) > 3 and sum(i == on for i in turn) > 3

    result = invoke("train", recipe, "--samples", "0", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["data"]["train"]
    assert stats["learned_tokens"] == sum(sum(flags) for _, flags, _ in expected)
    assert stats["tokens"] == sum(len(ids) for ids, _, _ in expected)


# --- 6. validate warns about an unanswered user turn ------------------------------------------------------------


def test_validate_warns_about_conversations_ending_in_a_user_turn(tmp_path, tiny_model_dir):
    """A warning (exit 0, not a bad line) counting the conversations whose last turn is an unanswered user turn;
    none without them."""
    complete = [conversation(i) for i in range(3)]
    unanswered = []
    for i in (10, 11):
        c = conversation(i)
        c["messages"].append({"role": "user", "content": "And now?"})
        unanswered.append(c)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run")

    def report(records):
        write_jsonl(tmp_path / "train.jsonl", records)
        result = invoke("validate", recipe, "--json")
        assert result.exit_code == 0, result.output  # a warning, not a bad line
        out = json.loads(result.stdout)
        assert out["ok"] and out["error_count"] == 0
        return [w for w in out["warnings"] if "user turn" in w]

    assert report(complete) == []
    warned = report(complete + unanswered)
    assert len(warned) == 1 and warned[0].startswith("2 conversations end with a user turn"), warned


# --- 7. tokenized cache eviction --------------------------------------------------------------------------------


def test_tokenized_cache_keeps_the_32_newest_entries(tmp_path, tiny_model_dir, monkeypatch):
    """32 planted entries, oldest first; each miss writes one entry and drops the oldest; a hit makes its entry
    the newest again, so it outlives entries older than the hit."""
    home = tmp_path / "home"
    folder = home / "tokenized"
    folder.mkdir(parents=True)
    monkeypatch.setenv("FTUNE_HOME", str(home))
    now = time.time()
    planted = [folder / f"planted-{i:02d}.arrow" for i in range(32)]
    for i, path in enumerate(planted):
        path.write_bytes(b"an older entry")
        os.utime(path, (now - 3600 * (100 - i),) * 2)  # planted-00 is the oldest
    write_jsonl(tmp_path / "a.jsonl", [conversation(i) for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [conversation(i) for i in range(3, 6)])

    def score(data):
        result = invoke("eval", tiny_model_dir, "--data", tmp_path / data, "--max-length", "96", "--json")
        assert result.exit_code == 0, result.output
        return {p.name for p in folder.glob("*.arrow")}

    names = score("a.jsonl")
    new = names - {p.name for p in planted}
    assert len(new) == 1 and len(names) == 32
    assert names == {p.name for p in planted[1:]} | new  # the oldest went
    (entry,) = new
    with pyarrow.memory_map(str(folder / entry)) as f:  # an Arrow file of token ids and labels, no pickle
        assert pyarrow.ipc.open_file(f).schema.names == ["input_ids", "labels"]

    os.utime(folder / entry, (now - 3600 * 1000,) * 2)  # now the oldest of all...
    assert score("a.jsonl") == names  # ...a hit: nothing written, nothing dropped
    assert (folder / entry).stat().st_mtime > now - 60  # but used just now

    names_b = score("b.jsonl")
    assert len(names_b) == 32 and entry in names_b
    assert names_b == (names - {planted[1].name}) | (names_b - names)  # the oldest planted one went, not a.jsonl's


# --- 8. prompt tuning initialised from text ---------------------------------------------------------------------

INIT_TEXT = "Answer with a number"


def test_prompt_tuning_init_text_embeddings(tmp_path, tiny_model_dir, tokenizer):
    """One step at learning rate 1e-8 moves no embedding by more than ~1e-8 (Adam's step is about the learning
    rate), so the saved prompt embeddings are their initial values: the base's embedding rows of the init text's
    tokens, repeated and cut to num_virtual_tokens as PEFT does. A random init is ~0.02 away."""
    from transformers import AutoModelForCausalLM

    virtual = 10
    ids = tokenizer(INIT_TEXT)["input_ids"]
    assert 1 < len(ids) < virtual and virtual % len(ids)  # repeated, then cut
    rows = (ids * math.ceil(virtual / len(ids)))[:virtual]
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(4)])
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_model_dir,
        tmp_path / "run",
        method={"name": "prompt_tuning", "num_virtual_tokens": virtual, "init_text": INIT_TEXT},
        training={"max_steps": 1, "learning_rate": 1.0e-8, "warmup_ratio": 0},
    )
    result = invoke("train", recipe, "--samples", "0")
    assert result.exit_code == 0, result.output
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    embeddings = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.detach()
    torch.testing.assert_close(saved["prompt_embeddings"], embeddings[rows], atol=1e-6, rtol=0)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == INIT_TEXT


# --- 10. distributed.config ---------------------------------------------------------------------------------------

USER_ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
use_cpu: true
num_machines: 1
num_processes: 2
mixed_precision: 'no'
"""


@pytest.fixture
def captured_launch(monkeypatch):
    """`ftune train` up to the `accelerate launch` it runs (not started: two CPU ranks would take too long)."""
    from finetune_cli.training import launch

    calls = []

    def run(cmd, **kw):
        calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0 if Path(_config_of(cmd)).is_file() else 1)

    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(run=run))
    return calls


def _config_of(cmd) -> str:
    cmd = [str(c) for c in cmd]
    return cmd[cmd.index("--config_file") + 1]


def test_distributed_config_replaces_the_preset_in_the_launch_command(tmp_path, tiny_model_dir, captured_launch):
    """The recipe asks for FSDP, the user's config file for plain CPU data parallelism: the command ftune runs
    passes the user's file (and no preset), and accelerate, reading it, sets up MULTI_CPU, not FSDP."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = tmp_path / "my-accelerate.yaml"
    config.write_text(USER_ACCELERATE_CONFIG)
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(4)])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run")
    sets = ["--set", f"distributed.config={config}", "--set", "distributed.strategy=fsdp"]
    result = invoke("train", recipe, "--samples", "0", "--num-processes", "2", *sets)
    assert result.exit_code == 0, result.output
    (cmd,) = captured_launch
    assert _config_of(cmd) == str(config) and cmd.count("--config_file") == 1
    assert not any("presets" in part for part in cmd)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    tail = cmd[cmd.index("finetune_cli") - 1 :]  # what each process runs: this train command again
    assert tail[:4] == ["-m", "finetune_cli", "train", str(recipe)] and "--samples=0" in tail
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert defaults.distributed_type.name == "MULTI_CPU" and args.use_cpu
    assert not (tmp_path / "run").exists()  # the ranks write the run, not the launching process


def test_missing_distributed_config_is_refused_naming_the_key(tmp_path, tiny_model_dir, captured_launch):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(4)])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, tmp_path / "run")
    missing = tmp_path / "no-such-accelerate.yaml"
    result = invoke("train", recipe, "--samples", "0", "--set", f"distributed.config={missing}")
    assert captured_launch == []  # refused before launching
    assert result.exit_code == 2, result.output
    assert "distributed.config" in result.stderr and str(missing) in result.stderr
    assert not (tmp_path / "run").exists()


# --- 9, 11, 12: one LoRA run with modules_to_save and an eval_split hold-out -----------------------------------

N_TRAIN, SPLIT, SEED = 16, 0.25, 7


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("lora-lm-head")
    convs = [conversation(i * 37, turns=1 + i % 2) for i in range(N_TRAIN)]
    write_jsonl(folder / "train.jsonl", convs)
    recipe = write_recipe(
        folder / "recipe.yaml",
        tiny_model_dir,
        folder / "run",
        data={"eval_split": SPLIT},
        method={"name": "lora", "r": 4, "modules_to_save": ["lm_head"]},
        training={"max_steps": 3, "seed": SEED},
    )
    result = invoke("train", recipe, "--samples", "0", "--json")
    assert result.exit_code == 0, result.output
    return SimpleNamespace(dir=folder / "run", summary=json.loads(result.stdout), convs=convs)


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def peft_model(model_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(model_dir), adapter).eval()


IDS = torch.tensor([[1, 9690, 198, 28120, 905, 30, 2, 198, 1, 520, 9531, 198]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_modules_to_save_adapter_holds_a_trained_full_copy(lora_run, tiny_model_dir):
    base = base_model(tiny_model_dir)
    head = base.lm_head.weight.detach()
    saved = load_file(lora_run.dir / "adapter" / "adapter_model.safetensors")
    full = [k for k in saved if ".lora_A." not in k and ".lora_B." not in k]
    assert full == ["base_model.model.lm_head.weight"]
    copy = saved[full[0]]
    assert copy.shape == head.shape  # the whole module, not a low-rank factor
    assert (copy - head).abs().max() > 1e-3  # trained
    # trained in full: every lm_head weight counts, on top of the LoRA factors r x (in + out) of each linear layer
    r = 4
    lora = sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")
    )
    assert lora_run.summary["trainable_parameters"] == lora + head.numel()
    model = peft_model(tiny_model_dir, lora_run.dir / "adapter")
    loaded = dict(model.named_parameters())["base_model.model.lm_head.modules_to_save.default.weight"]
    assert torch.equal(loaded, copy)
    with model.disable_adapter():
        plain = logits(model)
    assert not torch.allclose(logits(model), plain, atol=1e-4)
    torch.testing.assert_close(plain, logits(base))


# --- 11. merge-adapter --max-shard-size ---------------------------------------------------------------------------


def test_merge_max_shard_size_writes_shards_that_load_like_the_unsharded_merge(lora_run, tiny_model_dir, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    result = invoke("merge-adapter", lora_run.dir, "--output", whole)
    assert result.exit_code == 0, result.output
    result = invoke("merge-adapter", lora_run.dir, "--output", sharded, "--max-shard-size", "200KB")
    assert result.exit_code == 0, result.output
    assert (whole / "model.safetensors").is_file() and not (whole / "model.safetensors.index.json").exists()
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    with safe_open(str(whole / "model.safetensors"), "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
    for name in shards:  # each shard within 200KB of tensor data, or one tensor larger than that on its own
        with safe_open(str(sharded / name), "pt") as f:
            size = sum(_numel(f, k) * 4 for k in f.keys())  # float32
            assert size <= 200_000 or len(list(f.keys())) == 1, (name, size)
    a, b = logits(base_model(whole)), logits(base_model(sharded))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, logits(peft_model(tiny_model_dir, lora_run.dir / "adapter")), atol=1e-5, rtol=1e-5)


def _numel(f, key) -> int:
    return math.prod(f.get_slice(key).get_shape())


# --- 12. ftune eval RUN on the eval_split hold-out ----------------------------------------------------------------


def test_eval_of_a_run_scores_its_eval_split_hold_out(lora_run, tiny_model_dir, tokenizer):
    """The held-out examples recomputed as the README says (that fraction of the file, chosen with
    training.seed: a seeded shuffle of the line order, its first round(n * fraction)), scored with plain
    transformers + PEFT on hand-built masks: the same tokens and perplexity (1e-4) as `ftune eval RUN`, whose
    result also equals the training summary's eval_after."""
    order = list(range(N_TRAIN))
    random.Random(SEED).shuffle(order)
    held = sorted(order[: round(N_TRAIN * SPLIT)])
    assert lora_run.summary["data"]["eval"]["examples"] == len(held) == 4
    assert lora_run.summary["data"]["train"]["examples"] == N_TRAIN - len(held)

    result = invoke("eval", lora_run.dir, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    tuned = out["results"]["tuned"]

    model = peft_model(tiny_model_dir, lora_run.dir / "adapter")
    nll, count = 0.0, 0
    for i in held:
        ids, flags, _ = chatml(tokenizer, lora_run.convs[i]["messages"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(float(logp[p - 1, ids[p]]) for p in range(1, len(ids)) if flags[p])
        count += sum(flags[1:])
    assert tuned["tokens"] == count
    assert tuned["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    after = lora_run.summary["eval_after"]
    assert after["tokens"] == tuned["tokens"] and after["nll"] == pytest.approx(tuned["nll"], rel=1e-4)
    assert out["data"] == [f"training data (eval_split {SPLIT})"]


# --- 2 and 4: signals, on `ftune train` subprocesses -----------------------------------------------------------


def start(log: Path, *args) -> subprocess.Popen:
    """`ftune` as a user runs it, importing this worktree's finetune_cli; stderr to a file (a long run's output
    must never fill a pipe nobody reads). One thread each: two run at once on a small machine."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        return subprocess.Popen([FTUNE, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, env=env)


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, log.read_text()
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out; stderr:\n{log.read_text()}")
        time.sleep(0.02)


def logged_step(run: Path) -> int:
    """The newest training step in metrics.jsonl (0 before the first); a line being written is skipped."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return max(steps)


MANY_STEPS = 100_000  # steps: no run gets near its end while the tests wait
LONG_RUNS = {
    "sigterm": ("test_sigterm_checkpoints_after_the_step_and_exits_130", {"save_steps": 2 * MANY_STEPS}),
    "limit": (
        "test_save_total_limit_keeps_the_newest_checkpoints_while_running",
        {"save_steps": 1, "save_total_limit": 2},
    ),
}


@pytest.fixture(scope="module")
def long_runs(request, tmp_path_factory, tiny_model_dir):
    """The runs the signal tests stop: far longer than any test waits, so they are still going when a signal
    lands. Both (of those selected) start together, so that their starts (interpreter, imports, model, data:
    ~10 s each) overlap; killed at the end if left running."""
    selected = {item.name for item in request.session.items}
    runs = {}
    for key, (test, settings) in LONG_RUNS.items():
        if test not in selected:
            continue
        folder = tmp_path_factory.mktemp(key)
        write_jsonl(folder / "train.jsonl", [conversation(i, turns=1 + i % 2) for i in range(16)])
        training = {"max_steps": MANY_STEPS, "learning_rate": 1.0e-3, **settings}
        recipe = write_recipe(folder / "recipe.yaml", tiny_model_dir, folder / "run", training=training)
        log = folder / "stderr.txt"
        runs[key] = (folder / "run", log, start(log, "train", recipe, "--samples", "0"))
    yield runs
    for _, _, proc in runs.values():
        proc.kill()
        proc.wait()


# --- 2. SIGTERM ----------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_after_the_step_and_exits_130(long_runs):
    """No save_steps within reach: any checkpoint there is the one the signal asked for."""
    run, log, proc = long_runs["sigterm"]
    wait_for(lambda: logged_step(run) >= 1, proc, log)
    seen = logged_step(run)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err
    info = json.loads((run / "run.json").read_text())
    step = info["steps"]
    assert info["status"] == "interrupted" and "SIGTERM" in info["reason"], info
    assert err.strip().splitlines()[-1].startswith(f"error: interrupted (SIGTERM) at step {step}")
    # stopped after the step that was running when the signal came, long before the end
    assert seen < step < MANY_STEPS
    assert [r["step"] for r in train_rows(run)] == list(range(1, step + 1))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-{step}"]
    state = json.loads((run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert (run / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert not (run / "adapter").exists()  # not completed


# --- 4. training.save_total_limit --------------------------------------------------------------------------------


def stopped(pid: int) -> bool:
    """Every thread of `pid` is stopped (state T): what is on disk cannot change while it is looked at."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT" for t in tasks)
    except FileNotFoundError:  # a thread that ended while being looked at: look again
        return False


def test_save_total_limit_keeps_the_newest_checkpoints_while_running(long_runs):
    """save_steps 1, limit 2: from step 5 on, the run is frozen (SIGSTOP, waited for until every thread is stopped)
    and checkpoints/ is listed, then let go, until three newer checkpoints have come in; every listing is kept, and
    none may hold more than 2 (README: a kill never leaves more than save_total_limit). Then it is killed
    (SIGKILL) while frozen: the two newest checkpoints, complete, and nothing else."""
    run, log, proc = long_runs["limit"]
    folder = run / "checkpoints"
    listings = []
    try:
        wait_for(lambda: logged_step(run) >= 5, proc, log)
        while True:
            proc.send_signal(signal.SIGSTOP)
            wait_for(lambda: stopped(proc.pid), proc, log, timeout=10)
            listings.append(sorted(rundir.checkpoint_step(p) for p in folder.iterdir()))
            if max(listings[-1], default=0) >= max(listings[0]) + 3:
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
            assert len(listings) < 20_000, listings[-5:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert max(len(names) for names in listings) <= 2, [names for names in listings if len(names) > 2][:5]
    numbers = sorted(int(p.name.removeprefix("checkpoint-")) for p in folder.iterdir())
    assert numbers == listings[-1] and numbers[-1] >= 7, numbers
    assert numbers in ([numbers[-1] - 1, numbers[-1]], [numbers[-1]])  # the newest (one, if frozen mid-rotation)
    for n in numbers:
        state = json.loads((folder / f"checkpoint-{n}" / "trainer_state.json").read_text())
        assert state["global_step"] == n
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # killed: the run was going


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_checkpoint_rotation_never_holds_more_than_the_limit_at_any_kill_point(tmp_path, monkeypatch, limit):
    """The rotation callback on staged checkpoints, checkpoints/ listed after every rename and delete (each point a
    kill could land at): never more than the limit (with a limit of 1, never none: the new one goes in before the
    old one leaves, so a kill there leaves 2); at the end, the newest `limit`."""
    import shutil

    from finetune_cli.training.trainer import Checkpoints

    folder = tmp_path / rundir.CHECKPOINTS
    listings = []

    def watched(operation):
        def run(*args, **kwargs):
            result = operation(*args, **kwargs)
            listings.append(sorted(rundir.checkpoint_step(p) for p in folder.glob("checkpoint-*")))
            return result

        return run

    monkeypatch.setattr(os, "replace", watched(os.replace))
    monkeypatch.setattr(shutil, "rmtree", watched(shutil.rmtree))
    rotation = Checkpoints(tmp_path, limit, every_epoch=False)
    for step in range(1, 7):
        staged = tmp_path / rundir.STAGING / f"checkpoint-{step}"
        staged.mkdir(parents=True)
        (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        rotation.on_save(None, state, None)
    assert listings[-1] == list(range(7 - limit, 7))
    after_first = listings[listings.index([1]) :]
    allowed = 2 if limit == 1 else limit
    assert max(map(len, after_first)) <= allowed and min(map(len, after_first)) >= 1, after_first
