"""Classification with Hugging Face Hub ids, offline: a classifier and a base model put into a Hub cache folder
(the layout huggingface_hub writes) are found by their ids with HF_HUB_OFFLINE=1, as a user's downloads are."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_as_hub(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the snapshot of `repo` at COMMIT on main, in huggingface_hub's cache layout."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tokenizer):
    """A Hub cache holding `acme/tiny-base` (a causal LM) and `acme/tiny-sentiment` (a classifier of it)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    work = tmp_path_factory.mktemp("hub")
    base = tiny_model(work / "base", tokenizer)
    torch.manual_seed(1)
    classifier = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.save_pretrained(work / "classifier")
    tokenizer.save_pretrained(work / "classifier")
    cache = work / "cache"
    cache_as_hub(cache, "acme/tiny-base", base)
    cache_as_hub(cache, "acme/tiny-sentiment", work / "classifier")
    return cache, work


def ftune(cache: Path, *args: str):
    """The command in this process with `cache` as the Hub cache (offline: tests/conftest.py sets HF_HUB_OFFLINE),
    as the user's HF_HUB_CACHE would set it."""
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from finetune_cli.cli import app

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        result = CliRunner().invoke(app, list(args))
    result.returncode = result.exit_code
    return result


def test_a_hub_classifier_is_classified_offline_as_plain_transformers_predicts(hub, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification

    cache, work = hub
    done = ftune(cache, "classify", "acme/tiny-sentiment", "--text", "what a lovely day", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["predictions"]
    plain = AutoModelForSequenceClassification.from_pretrained(work / "classifier")
    with torch.no_grad():
        probs = plain(**tokenizer("what a lovely day", return_tensors="pt")).logits.softmax(-1)[0]
    assert row["probabilities"] == pytest.approx({"negative": float(probs[0]), "positive": float(probs[1])}, abs=1e-5)
    assert row["prediction"] == ["negative", "positive"][int(probs.argmax())]
    refused = ftune(cache, "generate", "acme/tiny-sentiment", "-p", "hi")
    assert refused.returncode == 2 and "is a classifier (negative, positive)" in refused.stderr


def test_a_hub_base_model_trains_a_classifier_offline(hub, tmp_path):
    cache, _ = hub
    rows = [{"text": f"{word} thing {i}", "label": word} for i in range(6) for word in ("good", "bad")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{base: acme/tiny-base}}\ndata: {{train: {data}, max_length: 16}}\n"
        "training: {objective: classification, max_steps: 1, batch_size: 4, save_steps: null}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    done = ftune(cache, "train", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "adapter" / "ftune.json").read_text())["classification"] == {
        "input": "text",
        "labels": ["bad", "good"],
    }
