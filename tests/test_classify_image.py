"""Image classification end to end on a tiny random ViT (built from a config, with a ViTImageProcessor) and generated
images of three colours: one trained run shared by every test; figures checked against scikit-learn, the merged
folder against plain transformers, and bad image data refused before training."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import write_jsonl

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def image_bytes(colour: tuple, rng) -> bytes:
    from PIL import Image

    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def recipe_text(model: Path, train: str, out: Path, evals: str | None = None, extra: str = "") -> str:
    data = f"  train: {train}\n" + (f"  eval: {evals}\n" if evals else "")
    return f"""model:
  base: {model}
data:
{data}method:
  name: lora
  r: 8
{extra}training:
  objective: classification
  epochs: 3
  batch_size: 8
  learning_rate: 1.0e-2
  precision: fp32
  logging_steps: 5
  seed: 0
output:
  dir: {out}
"""


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny ViT, its image processor, images of each colour (paths in JSONL rows) and the trained run."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("vit")
    model = root / "vit"
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    ViTForImageClassification(config).save_pretrained(model)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        model
    )
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    rows = []
    for i in range(48):
        label = list(COLOURS)[i % 3]
        (root / "img" / f"{i}.png").write_bytes(image_bytes(COLOURS[label], rng))
        rows.append({"image": f"img/{i}.png", "label": label})
    write_jsonl(root / "train.jsonl", rows[:36])
    write_jsonl(root / "eval.jsonl", rows[36:])
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text(model, "train.jsonl", root / "run", "eval.jsonl"), encoding="utf-8")
    result = invoke("train", recipe, "--json", "--samples", "0")
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


@pytest.fixture(scope="module")
def predictions(vit):
    """`ftune eval RUN --json --predictions F` of the run on its eval images."""
    root, _ = vit
    result = invoke("eval", root / "run", "--json", "--predictions", root / "pred.jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (root / "pred.jsonl").read_text().splitlines()]
    return json.loads(result.stdout), rows


def test_training_learns_and_eval_equals_sklearn(vit, predictions):
    from sklearn.metrics import accuracy_score, f1_score

    root, summary = vit
    assert summary["status"] == "completed", summary
    out, rows = predictions
    assert len(rows) == 12 and {r["label"] for r in rows} == set(COLOURS)
    refs, preds = [r["label"] for r in rows], [r["prediction"] for r in rows]
    result = next(iter(out["results"].values()))
    assert result["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert result["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro", zero_division=0))
    assert accuracy_score(refs, preds) >= 0.9  # chance is 1/3
    for r in rows:
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)


def test_merged_folder_loads_with_plain_transformers(vit, predictions, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root, _ = vit
    merged = tmp_path / "merged"
    result = invoke("merge-adapter", root / "run", "-o", merged)
    assert result.exit_code == 0, result.output
    model = AutoModelForImageClassification.from_pretrained(merged).eval()
    processor = AutoImageProcessor.from_pretrained(merged)
    names = sorted(COLOURS)  # the run's class order: labels sorted
    assert [model.config.id2label[i] for i in range(3)] == names
    rows = predictions[1]
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    with torch.no_grad():
        probs = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1)
    for row, p in zip(rows, probs):
        np.testing.assert_allclose([row["probabilities"][n] for n in names], p.numpy(), atol=1e-5)


def test_classify_image_json(vit, predictions):
    root, _ = vit
    row = predictions[1][0]
    result = invoke("classify", root / "run", "--image", row["image"], "--json")
    assert result.exit_code == 0, result.output
    (got,) = json.loads(result.stdout)["predictions"]
    assert got["image"] == row["image"]
    assert got["prediction"] == row["prediction"]
    assert got["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)


def test_parquet_image_bytes_read_as_paths(vit, predictions):
    """Image cells {"bytes", "path"} in Parquet (as datasets stores images) give the path rows' predictions."""
    import pandas as pd

    root, _ = vit
    rows = predictions[1]
    cells = [{"image": {"bytes": Path(r["image"]).read_bytes(), "path": None}, "label": r["label"]} for r in rows]
    pd.DataFrame(cells).to_parquet(root / "eval.parquet")
    out = root / "pred-parquet.jsonl"
    result = invoke("eval", root / "run", "--data", root / "eval.parquet", "--predictions", out)
    assert result.exit_code == 0, result.output
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["label"] for g in got] == [r["label"] for r in rows]
    for g, r in zip(got, rows):
        assert g["probabilities"] == pytest.approx(r["probabilities"], abs=1e-6)


def bad_run(root: Path, tmp_path: Path, rows: list[dict], model: Path | None = None, extra: str = ""):
    """`ftune train` on `rows` (written to tmp_path/train.jsonl); the run folder must not be created."""
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(model or root / "vit", "train.jsonl", tmp_path / "run", extra=extra), "utf-8")
    return invoke("train", recipe, "--samples", "0")


def rows_of(root: Path, n: int = 6) -> list[dict]:
    return [{"image": str(root / "img" / f"{i}.png"), "label": list(COLOURS)[i % 3]} for i in range(n)]


def test_missing_and_corrupt_images_are_named_before_training(vit, tmp_path):
    root, _ = vit
    rows = rows_of(root)
    rows[2] = {"image": "nowhere.png", "label": "red"}
    result = bad_run(root, tmp_path, rows)
    assert result.exit_code == 2, result.output
    assert "train.jsonl:3" in result.stderr and "nowhere.png" in result.stderr
    assert not (tmp_path / "run").exists()
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    rows = rows_of(root)
    rows[4] = {"image": "corrupt.png", "label": "red"}
    result = bad_run(root, tmp_path, rows)
    assert result.exit_code == 2, result.output
    assert "train.jsonl:5" in result.stderr and "cannot be read" in result.stderr
    assert not (tmp_path / "run").exists()


def test_mixed_text_and_image_rows_refused(vit, tmp_path):
    root, _ = vit
    rows = rows_of(root) + [{"text": "a red square", "label": "red"}]
    result = bad_run(root, tmp_path, rows)
    assert result.exit_code == 2, result.output
    assert "both text and images" in result.stderr
    assert not (tmp_path / "run").exists()


def test_model_without_image_processor_refused(vit, tmp_path):
    root, _ = vit
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(root / "vit" / name)
    result = bad_run(root, tmp_path, rows_of(root), model=bare)
    assert result.exit_code == 2, result.output
    assert "no image processor" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_target_modules_naming_no_layer_lists_the_linear_ones(vit, tmp_path):
    """The PEFT guide's ViT names (query, value) are q_proj, v_proj in transformers 5: say so, exit 2."""
    root, _ = vit
    result = bad_run(root, tmp_path, rows_of(root), extra="  target_modules: [query, value]\n")
    assert result.exit_code == 2, result.output
    assert "method.target_modules: query, value" in result.stderr
    assert "q_proj" in result.stderr and "v_proj" in result.stderr and "classifier" not in result.stderr
