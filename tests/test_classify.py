"""Classification fine-tuning, checked against independent computations: metrics against scikit-learn, the merged
folder and the adapter against plain transformers/PEFT, the first training loss against torch's cross-entropy of
the initial model, every data source against the same classes, resume and two processes against one uninterrupted
run; bad labels are one line naming the row; `ftune classify` prints, writes and refuses as promised."""

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import classifier_recipe, write_jsonl

runner = CliRunner()
FTUNE = Path(sys.executable).parent / "ftune"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in rows_of(run / "metrics.jsonl") if "loss" in r]


def base_of(recipe_path: Path) -> str:
    return yaml.safe_load(recipe_path.read_text())["model"]["base"]


def names_of(recipe_path: Path) -> list[str]:
    """The classes in id order, computed here: the training labels sorted."""
    recipe = yaml.safe_load(recipe_path.read_text())
    return sorted({r["label"] for r in rows_of(recipe_path.parent / recipe["data"]["train"])})


@pytest.fixture(scope="module")
def evaluated(classifier_run, tmp_path_factory):
    run = classifier_run[0]
    predictions = tmp_path_factory.mktemp("eval") / "predictions.jsonl"
    result = invoke("eval", run, "--json", "--predictions", predictions)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), rows_of(predictions)


# --- 1. metrics equal scikit-learn's and run.json's --------------------------------------------------------------


def test_eval_metrics_equal_sklearn_on_the_predictions_file(classifier_run, evaluated):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    run, recipe_path, _ = classifier_run
    out, predictions = evaluated
    names = names_of(recipe_path)
    data = rows_of(recipe_path.parent / "eval.jsonl")
    assert [p["index"] for p in predictions] == list(range(len(data)))
    assert [(p["text"], p["label"]) for p in predictions] == [(r["text"], r["label"]) for r in data]
    for p in predictions:
        assert list(p["probabilities"]) == names
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["prediction"] == max(names, key=p["probabilities"].get)
    refs, preds = [p["label"] for p in predictions], [p["prediction"] for p in predictions]
    assert len(set(preds)) > 1  # the classifier learned something: not one class for every row
    got = out["results"]["tuned"]
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(refs, preds, labels=names, average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(refs, preds, labels=names, zero_division=0)
    for i, name in enumerate(names):
        c = got["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert got["confusion"] == confusion_matrix(refs, preds, labels=names).tolist()
    after = json.loads((run / "run.json").read_text())["eval_after"]  # same model, same data
    assert (got["accuracy"], got["macro_f1"]) == pytest.approx((after["accuracy"], after["macro_f1"]), abs=1e-12)
    assert (got["per_class"], got["confusion"], got["labels"]) == (after["per_class"], after["confusion"], names)
    assert got["loss"] == pytest.approx(after["loss"], rel=1e-5)


# --- 2. the merged folder and the adapter load with plain transformers / PEFT -----------------------------------


def plain_probabilities(model, tokenizer, texts: list[str]) -> list[list[float]]:
    """Each text alone, unpadded: no padding side or pad token can matter."""
    model.eval()
    with torch.no_grad():
        return [torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits[0], -1).tolist() for t in texts]


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def test_merged_folder_and_adapter_load_with_plain_transformers_and_peft(classifier_run, evaluated, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, recipe_path, _ = classifier_run
    names = names_of(recipe_path)
    predictions = evaluated[1]
    texts = [p["text"] for p in predictions]
    want = [[p["probabilities"][n] for n in names] for p in predictions]
    merged = tmp_path / "merged"
    result = invoke("merge-adapter", run, "-o", merged)
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.id2label == dict(enumerate(names))
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert flat(plain_probabilities(model, tokenizer, texts)) == pytest.approx(flat(want), abs=1e-5)

    base = yaml.safe_load(recipe_path.read_text())["model"]["base"]
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(names))
    adapter = PeftModel.from_pretrained(plain, run / "adapter")
    assert flat(plain_probabilities(adapter, tokenizer, texts)) == pytest.approx(flat(want), abs=1e-5)


# --- 3. the first logged loss is torch's class-weighted cross-entropy of the initial model ------------------------


def test_first_loss_is_the_balanced_cross_entropy_of_the_initial_model(classifier_run):
    """One optimizer step reads all 24 rows (3 accumulated micro-batches of 8), so the first logged loss is
    order-free and exact up to float rounding: sum over rows of weight[label] * -log p(label), divided by the row
    count. Balanced weights sum to n over the rows, so this equals torch's weighted mean over the step; a per
    micro-batch mean added up over the 3 accumulations would be 3 times it.
    The initial model is the base with a head drawn after `torch.manual_seed(training.seed)`; LoRA starts as the
    identity (B = 0), so the adapter changes nothing yet."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, recipe_path, _ = classifier_run
    recipe = yaml.safe_load(recipe_path.read_text())
    names = names_of(recipe_path)
    rows = rows_of(recipe_path.parent / "train.jsonl")
    count = Counter(r["label"] for r in rows)
    n, k = len(rows), len(names)
    weight = torch.tensor([n / (k * count[c]) for c in names])
    torch.manual_seed(42)  # training.seed's default
    model = AutoModelForSequenceClassification.from_pretrained(recipe["model"]["base"], num_labels=k)
    tokenizer = AutoTokenizer.from_pretrained(recipe["model"]["base"])
    logits = torch.log(torch.tensor(plain_probabilities(model, tokenizer, [r["text"] for r in rows])))
    labels = torch.tensor([names.index(r["label"]) for r in rows])
    want = float(torch.nn.functional.cross_entropy(logits, labels, weight=weight, reduction="sum")) / n
    unweighted = float(torch.nn.functional.cross_entropy(logits, labels))
    first = losses(run)[0]
    assert first == pytest.approx(want, rel=1e-5)
    assert abs(want - unweighted) > 1e-3  # the weights matter for these counts (12:8:4)
    assert losses(run)[-1] < first  # and it learns


# --- 4. bad labels: exit 2, one line naming the file and row -----------------------------------------------------


def bad_recipe(folder: Path, model_dir: Path, train: list[dict], evals=None, data=None, method=None, training=None):
    write_jsonl(folder / "train.jsonl", train)
    recipe = {
        "model": {"base": str(model_dir)},
        "data": {"train": "train.jsonl", "max_length": 32, "cache": False, **(data or {})},
        "method": method or {"name": "lora", "r": 4},
        "training": {"objective": "classification", "max_steps": 1, **(training or {})},
        "output": {"dir": str(folder / "run")},
    }
    if evals is not None:
        write_jsonl(folder / "eval.jsonl", evals)
        recipe["data"]["eval"] = "eval.jsonl"
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


GOOD = [{"text": "red one", "label": "color"}, {"text": "seven", "label": "number"}]


@pytest.mark.parametrize(
    "case,where,words",
    [
        ("eval label unseen", "eval.jsonl:2:", "never appears in the training data"),
        ("one class", "train.jsonl", "at least two classes"),
        ("not in data.labels", "train.jsonl:3:", "not in data.labels"),
        ("empty text", "train.jsonl:3:", "text"),
        ("bool label", "train.jsonl:3:", "true/false"),
        ("yaml booleans", "data.labels", "quote the class names"),
        ("labels with sft", "data.labels", "classification"),
        ("prompt tuning", "recipe.yaml", "prompt_tuning cannot train a classifier"),
        ("rows with sft", "train.jsonl:1:", "training.objective: classification"),
    ],
)
def test_bad_labels_are_one_line_naming_the_row(case, where, words, tmp_path, tiny_model_dir):
    train, evals, data, method, training = GOOD + [{"text": "blue", "label": "color"}], None, None, None, None
    if case == "eval label unseen":
        evals = [GOOD[0], {"text": "pear", "label": "fruit"}]
    elif case == "one class":
        train = [{"text": f"red {i}", "label": "color"} for i in range(3)]
    elif case == "not in data.labels":
        train, data = GOOD + [{"text": "pear", "label": "fruit"}], {"labels": ["color", "number"]}
    elif case == "empty text":
        train = GOOD + [{"text": "  ", "label": "color"}]
    elif case == "bool label":
        train = GOOD + [{"text": "yes", "label": True}]
    elif case == "labels with sft":
        data, training = {"labels": ["color", "number"]}, {"objective": "sft"}
    elif case == "prompt tuning":
        method = {"name": "prompt_tuning"}
    elif case == "rows with sft":
        training = {"objective": "sft"}
    path = bad_recipe(tmp_path, tiny_model_dir, train, evals, data, method, training)
    if case == "yaml booleans":  # written by hand: yaml.safe_dump would quote them
        path.write_text(path.read_text().replace("data:\n", "data:\n  labels: [yes, no]\n"), encoding="utf-8")
    result = invoke("train", path, "--samples", "0")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and words in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


# --- 5. every source gives the same classes ----------------------------------------------------------------------


def test_every_source_resolves_to_the_same_classes(tmp_path, tiny_model_dir, monkeypatch):
    """Integer labels: 10 sorts after 2 numerically (as text it would not), and CSV's strings "0"/"2"/"10" are
    the JSONL integers' classes."""
    import datasets
    import huggingface_hub
    import pandas as pd

    from finetune_cli import recipe as recipes
    from finetune_cli.training import train

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rows = [{"text": f"row {i} {'x' * (i % 3)}", "label": [0, 2, 10, 2][i % 4]} for i in range(12)]
    want = Counter(str(r["label"]) for r in rows)
    frame = pd.DataFrame(rows)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    frame.to_parquet(tmp_path / "rows.parquet")
    frame.to_csv(tmp_path / "rows.csv", index=False)
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    frame.to_parquet(tmp_path / "hub" / "data" / "train.parquet")
    for source in ("rows.jsonl", "rows.parquet", "rows.csv", "saved", "hf:./hub"):
        path = bad_recipe(tmp_path, tiny_model_dir, [])
        recipe = yaml.safe_load(path.read_text())
        recipe["data"]["train"] = source
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        plan = train.preflight(recipes.load(path))
        assert plan.classes.names == ["0", "2", "10"], source
        assert plan.classes.counts == {k: want[k] for k in ("0", "2", "10")}, source


# --- 6. resume after an interruption ends where an uninterrupted run ends ----------------------------------------


def test_resumed_run_equals_the_uninterrupted_one(classifier_run, tmp_path, monkeypatch):
    """SIGTERM after step 2 (the checkpoint), then --resume: the adapter (LoRA layers and head) and the loss rows
    equal the uninterrupted run's, same recipe."""
    from transformers import TrainerCallback

    from finetune_cli import ui

    class SigtermAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    whole = classifier_run[0]
    path = classifier_recipe(tmp_path, base_of(classifier_run[1]))
    with monkeypatch.context() as mp:
        mp.setattr(ui, "progress_callback", lambda: SigtermAtStep2())
        stopped = invoke("train", path, "--samples", "0")
    assert stopped.exit_code == 130, stopped.output
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert len(losses(run)) == 2
    resumed = invoke("train", run, "--resume", "--samples", "0")
    assert resumed.exit_code == 0, resumed.output
    assert losses(run) == pytest.approx(losses(whole), rel=1e-5)
    got, want = (
        load_file(run / "adapter" / "adapter_model.safetensors"),
        load_file(whole / "adapter" / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys() and any("score" in key for key in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


# --- 7. two processes: the first step's loss is the one-process loss of the same rows ----------------------------


def test_two_processes_first_loss_equals_one_process(classifier_run, tmp_path):
    """2 processes x 4 rows x 3 accumulations = the one-process run's 8 x 3: the same 24 rows in step 1, so the
    same loss (summed over both ranks' rows, divided by all 24)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = classifier_recipe(tmp_path, base_of(classifier_run[1]), batch_size=4, epochs=1)
    out = invoke("train", path, "--num-processes", 2, "--samples", 0, "--set", f"distributed.main_process_port={port}")
    assert out.exit_code == 0, out.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["distributed"]["processes"] == 2 and info["distributed"]["effective_batch_size"] == 24
    assert losses(tmp_path / "run")[0] == pytest.approx(losses(classifier_run[0])[0], rel=1e-5)


# --- 8. ftune classify -------------------------------------------------------------------------------------------


def test_classify_texts_json_and_data(classifier_run, evaluated, tmp_path):
    run = classifier_run[0]
    predictions = evaluated[1]
    texts = [p["text"] for p in predictions[:3]]
    plain = invoke("classify", run, "--text", texts[0], "--text", texts[1], "--text", texts[2])
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.splitlines()
    assert lines == [f"{p['prediction']}\t{p['probability']:.4f}" for p in predictions[:3]]
    as_json = invoke("classify", run, "--text", texts[0], "--text", texts[1], "--json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)["predictions"]
    assert [(r["text"], r["prediction"]) for r in rows] == [(p["text"], p["prediction"]) for p in predictions[:2]]
    for r, p in zip(rows, predictions):
        assert r["probabilities"] == pytest.approx(p["probabilities"], abs=1e-5)

    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": p["text"]} for p in predictions])
    stdout = invoke("classify", run, "--data", data)
    assert stdout.exit_code == 0, stdout.output
    got = [json.loads(line) for line in stdout.stdout.splitlines()]
    assert [(g["index"], g["text"], g["prediction"]) for g in got] == [
        (p["index"], p["text"], p["prediction"]) for p in predictions
    ]
    out = tmp_path / "out.jsonl"
    written = invoke("classify", run, "--data", data, "-o", out)
    assert written.exit_code == 0, written.output
    assert rows_of(out) == got and written.stdout == ""
    refused = invoke("classify", run, "--data", data, "-o", out)
    assert refused.exit_code == 2 and "already exists" in refused.stderr
    assert rows_of(out) == got and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "texts.jsonl"]


@pytest.mark.parametrize(
    "command", [["generate", "--prompt", "hi"], ["serve"], ["export", "--format", "gguf", "-o", "out"]]
)
def test_language_model_commands_refuse_a_classifier(classifier_run, command, tmp_path):
    args = [command[0], classifier_run[0], *command[1:]]
    result = invoke(*[str(tmp_path / a) if a == "out" else a for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ftune classify" in lines[0], result.stderr
