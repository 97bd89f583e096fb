"""Fixtures: the builtin model's tokenizer and a tiny random-init Llama built from a config (no downloads)."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers: one thread each, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"

# Tests that share a trained run go to one worker (pytest-xdist's loadgroup), so each run is trained once.
SHARED_RUNS = {
    "quickstart_run": "quickstart",
    "quickstart_merged": "quickstart",
    "qlora_run": "qlora",
    "classifier_run": "classifier",
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        groups = {SHARED_RUNS[f] for f in getattr(item, "fixturenames", ()) if f in SHARED_RUNS}
        if groups:
            item.add_marker(pytest.mark.xdist_group("+".join(sorted(groups))))


class _GroupCheck:
    """Fail loudly, not slowly: with pytest 9.2, pytest-xdist 3.8's loadgroup silently stopped grouping, each worker
    trained the shared runs again and the suite took 18 minutes instead of 12."""

    @pytest.hookimpl(trylast=True)  # after pytest-xdist has written each test's group into its id (`name@group`)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
            return
        for item in items:
            if any(f in SHARED_RUNS for f in getattr(item, "fixturenames", ())) and "@" not in item.nodeid:
                message = (
                    f"pytest-xdist did not group {item.nodeid} with the tests that share its trained run (pytest "
                    f"{pytest.__version__}); install the pytest that pyproject.toml's dev extra names"
                )
                os.write(2, f"\nerror: {message}\n".encode())  # a worker's exception reaches the terminal without it
                pytest.exit(message, returncode=4)


def pytest_configure(config):
    config.pluginmanager.register(_GroupCheck(), "ftune-group-check")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    from finetune_cli import models

    return Path(models.resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(builtin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


def tiny_model(path: Path, tokenizer, kind: str = "llama", tied: bool = True, vocab_size: int | None = None) -> Path:
    """A 2-layer random model of `kind` (llama, mistral, qwen2...) with `tokenizer` (SmolLM2's in most tests), saved
    in `path`; `vocab_size` pads the embedding past the tokenizer's ids."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        kind,
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_dir, tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a local HF folder."""
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def conversation(i: int, system: bool = True, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "Answer with the number spelled out."}] if system else []
    for t in range(turns):
        messages.append({"role": "user", "content": f"What is {i} plus {t}?"})
        messages.append({"role": "assistant", "content": f"The answer is {i + t}."})
    return {"messages": messages}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir) -> Path:
    """A recipe that trains the tiny model for a few steps on small chat data in tmp_path."""
    write_jsonl(tmp_path / "train.jsonl", [conversation(i, turns=1 + i % 2) for i in range(16)])
    write_jsonl(tmp_path / "eval.jsonl", [conversation(i + 100) for i in range(4)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""model:
  base: {tiny_model_dir}
data:
  train: train.jsonl
  eval: eval.jsonl
  max_length: 128
method:
  name: lora
  r: 8
  alpha: 16
training:
  max_steps: 4
  batch_size: 4
  learning_rate: 1.0e-2
  logging_steps: 1
output:
  dir: {tmp_path / "run"}
""",
        encoding="utf-8",
    )
    return recipe


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module, for the pages ftune writes or serves (the distribution's packages)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("/usr/bin/chromium or /usr/bin/chromedriver is missing: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


# Trained runs of the builtin model, shared by every test that needs one (each is trained once per session).


def train_builtin(folder: Path, recipe: str, *overrides: str) -> tuple[Path, dict]:
    """A few steps of a shipped recipe on four short conversations (one batch, seen every step: the loss falls)."""
    from typer.testing import CliRunner

    from finetune_cli.cli import app

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say the code word {i}."},
                {"role": "assistant", "content": f"Zebra-{i}!"},
            ]
        }
        for i in range(4)
    ]
    data = write_jsonl(folder / "small.jsonl", rows)
    sets = [
        f"output.dir={folder / 'run'}",
        f"data.train={data}",
        f"data.eval={data}",
        "training.max_steps=4",
        "training.batch_size=4",
        "training.logging_steps=1",
        "training.warmup_ratio=0",
        "training.lr_scheduler=constant",
        "training.precision=fp32",  # about what each method trains and saves, not precision: same on every CPU
        *overrides,
    ]
    args = ["train", str(ROOT / "recipes" / recipe), "--json", "--samples", "0"]
    result = CliRunner().invoke(app, args + [x for s in sets for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    return folder / "run", json.loads(result.stdout)


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory, builtin_dir) -> tuple[Path, dict]:
    """4-bit QLoRA on the builtin model (test_methods checks the training, test_export the merge)."""
    return train_builtin(tmp_path_factory.mktemp("qlora"), "smollm2-qlora.yaml", "training.learning_rate=2e-3")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, builtin_dir) -> tuple[Path, dict, str]:
    """The shipped quickstart recipe, trained by the real `ftune` command at fp32 (exact answers and 1e-4
    agreements are checked at float32; `precision: auto` would use bf16 autocast on a CPU with native bf16)."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("quickstart") / "run"
    ftune = Path(sys.executable).parent / "ftune"
    recipe = [ROOT / "recipes" / "quickstart.yaml", "--set", f"output.dir={run}", "--set", "training.precision=fp32"]
    out = subprocess.run([ftune, "train", *recipe, "--json"], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr
    return run, json.loads(out.stdout), out.stderr


@pytest.fixture(scope="session")
def quickstart_merged(quickstart_run, tmp_path_factory) -> Path:
    """`ftune merge-adapter` of the quickstart run."""
    import subprocess
    import sys

    merged = tmp_path_factory.mktemp("quickstart-merged") / "merged"
    ftune = Path(sys.executable).parent / "ftune"
    out = subprocess.run([ftune, "merge-adapter", quickstart_run[0], "-o", merged], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return merged


# A text classifier trained once per session (tests/test_classify.py): a keyword decides the class.

CLASS_WORDS = {"red": "color", "blue": "color", "seven": "number", "nine": "number", "apple": "fruit"}


def classification_rows(n: int, offset: int = 0) -> list[dict]:
    """Rows {"text", "label"} whose label is decided by one keyword; classes 12:8:4 in 24 rows (imbalanced, so
    balanced class weights differ from none); texts of varied length, so batches are padded."""
    words = ["red", "seven", "blue", "nine", "red", "apple"]
    return [
        {"text": f"item {i + offset} is {words[i % 6]}" + " indeed" * (i % 3), "label": CLASS_WORDS[words[i % 6]]}
        for i in range(n)
    ]


def classifier_recipe(folder: Path, model_dir: Path, **training) -> Path:
    """24 rows, one optimizer step per epoch (3 micro-batches of 8 accumulated), balanced class weights, fp32."""
    import yaml

    write_jsonl(folder / "train.jsonl", classification_rows(24))
    write_jsonl(folder / "eval.jsonl", classification_rows(9, offset=100))
    recipe = {
        "model": {"base": str(model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 32, "cache": False},
        "method": {"name": "lora", "r": 8, "dropout": 0.0},
        "training": {
            "objective": "classification",
            "class_weights": "balanced",
            "epochs": 4,
            "batch_size": 8,
            "gradient_accumulation": 3,
            "learning_rate": 1.0e-2,
            "lr_scheduler": "constant",
            "warmup_ratio": 0,
            "precision": "fp32",
            "logging_steps": 1,
            "save_steps": 2,
            **training,
        },
        "output": {"dir": str(folder / "run")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, tokenizer):
    """(run directory, recipe path, train() summary) of the classifier above, trained in-process. Its base's
    config has no pad_token_id, like many a real base: ftune must set it for padded batches and the saved head."""
    from finetune_cli import recipe
    from finetune_cli.training import train

    folder = tmp_path_factory.mktemp("classifier")
    base = tiny_model(folder / "base", tokenizer)
    config = json.loads((base / "config.json").read_text())
    del config["pad_token_id"]
    (base / "config.json").write_text(json.dumps(config))
    path = classifier_recipe(folder, base)
    summary = train.run(recipe.load(path), samples=0)
    return Path(summary["run_dir"]), path, summary
