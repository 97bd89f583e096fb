"""Recipe loading: schema errors with file, line and key; overrides; resolved paths and defaults."""

import pytest

from finetune_cli import recipe
from finetune_cli.errors import FtuneError

GOOD = """model:
  base: smollm2-135m-instruct
data:
  train: data/train.jsonl
training:
  learning_rate: 2e-4
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_relative_paths(tmp_path):
    r = recipe.load(write(tmp_path, GOOD))
    assert r.data.train == str(tmp_path / "data" / "train.jsonl")
    assert r.training.learning_rate == 2e-4  # YAML 1.1 reads 2e-4 as a string; the schema makes it a float
    assert r.method.name == "lora" and r.method.target_modules == "all-linear"
    assert r.output.dir == "runs/r"
    # the dump is complete and loads back to the same recipe
    again = recipe.load(write(tmp_path, recipe.dump(r), "again.yaml"))
    assert again == r


def test_unknown_key_suggests_and_names_line(tmp_path):
    path = write(tmp_path, GOOD + "  batch_sise: 4\n")
    with pytest.raises(FtuneError) as err:
        recipe.load(path)
    assert str(err.value) == f"{path}:7: unknown key 'training.batch_sise'; did you mean 'training.batch_size'?"


def test_unknown_section(tmp_path):
    with pytest.raises(FtuneError, match=r"r.yaml:7: unknown key 'trainng'; did you mean 'training'"):
        recipe.load(write(tmp_path, GOOD + "trainng:\n  epochs: 1\n"))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(FtuneError, match=r"r.yaml:7: 'training.batch_size' is 'eight': expected a valid integer"):
        recipe.load(write(tmp_path, GOOD + "  batch_size: eight\n"))


def test_bad_choice_lists_choices(tmp_path):
    with pytest.raises(FtuneError, match=r"'training.precision' is 'fp8'; expected one of 'auto', 'fp32'"):
        recipe.load(write(tmp_path, GOOD + "  precision: fp8\n"))


def test_missing_required_key(tmp_path):
    with pytest.raises(FtuneError, match=r"r.yaml:3: missing required key 'data.train'"):
        recipe.load(write(tmp_path, "model:\n  base: x\ndata:\n  eval: e.jsonl\n"))


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(FtuneError, match=r"r.yaml:4: YAML syntax error: expected .,. or .]."):
        recipe.load(write(tmp_path, "data:\n  train: a.jsonl\n  eval: [oops\nmodel: {}\n"))


def test_missing_file(tmp_path):
    with pytest.raises(FtuneError, match="recipe file not found"):
        recipe.load(tmp_path / "nope.yaml")


def test_overrides_are_yaml_scalars(tmp_path):
    r = recipe.load(
        write(tmp_path, GOOD),
        [
            "training.learning_rate=1e-4",
            "training.batch_size=2",
            "method.target_modules=[q_proj, v_proj]",
            "output.dir=out",
        ],
    )
    assert r.training.learning_rate == 1e-4 and r.training.batch_size == 2
    assert r.method.target_modules == ["q_proj", "v_proj"] and r.output.dir == "out"


def test_override_errors(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(FtuneError, match=r"--set: unknown key 'training.learnin_rate'; did you mean"):
        recipe.load(path, ["training.learnin_rate=1"])
    with pytest.raises(FtuneError, match="expected KEY=VALUE"):
        recipe.load(path, ["training.learning_rate"])
    with pytest.raises(FtuneError, match=r"--set: 'training.epochs' is 'x'"):
        recipe.load(path, ["training.epochs=x"])


def test_eval_and_eval_split_conflict(tmp_path):
    with pytest.raises(FtuneError, match="either data.eval or data.eval_split"):
        recipe.load(write(tmp_path, GOOD.replace("data:\n", "data:\n  eval: e.jsonl\n  eval_split: 0.1\n")))


@pytest.mark.parametrize(
    "method, message",
    [
        (
            "  name: lora\n  num_virtual_tokens: 8\n",
            "r.yaml:9: 'method.num_virtual_tokens' belongs to method prompt_tuning, not lora",
        ),
        ("  name: full\n  r: 8\n", "r.yaml:9: 'method.r' belongs to method lora / qlora, not full"),
        ("  name: lora\n  quant_type: nf4\n", "'method.quant_type' belongs to method qlora, not lora"),
        ("  name: qlora\n  bits: 3\n", "r.yaml:9: 'method.bits' is 3; expected one of 4 or 8"),
        ("  name: prompt_tuning\n  num_virtual_token: 8\n", "did you mean 'method.num_virtual_tokens'?"),
        ("  name: dpo\n", "r.yaml:8: 'method.name' is 'dpo'; expected one of 'lora', 'qlora', 'prompt_tuning', 'full'"),
    ],
)
def test_method_fields_belong_to_their_method(tmp_path, method, message):
    with pytest.raises(FtuneError) as err:
        recipe.load(write(tmp_path, GOOD + "method:\n" + method))
    assert message in str(err.value)


def test_each_method_validates_with_defaults(tmp_path):
    for name in ("lora", "qlora", "prompt_tuning", "full"):
        r = recipe.load(write(tmp_path, GOOD + f"method:\n  name: {name}\n"))
        assert r.method.name == name
    assert recipe.load(write(tmp_path, GOOD + "method:\n  r: 4\n")).method.name == "lora"
    r = recipe.load(write(tmp_path, GOOD), ["method.name=qlora", "method.bits=8"])
    assert r.method.bits == 8 and r.method.quant_type == "nf4"


def test_every_shipped_recipe_validates():
    names = [r["name"] for r in recipe.shipped()]
    assert {
        "quickstart",
        "smollm2-qlora",
        "smollm2-prompt-tuning",
        "smollm2-full",
        "llama-3.1-8b-qlora",
        "mistral-7b-lora",
        "qwen2.5-1.5b-full",
        "gemma-2-2b-lora",
    } <= set(names)
    for item in recipe.shipped():
        r = recipe.load(item["path"])
        assert item["description"] and r.data.train.endswith(".jsonl")
        text = open(item["path"]).read()
        if "8b" in item["name"] or "7b" in item["name"] or "2b" in item["name"] or "1.5b" in item["name"]:
            assert "GB" in text  # GPU recipes say how much memory they need


def test_recipes_cli_list_and_copy(tmp_path):
    import json

    from typer.testing import CliRunner

    from finetune_cli.cli import app

    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["recipes", "list", "--json"]).stdout)
    assert any(r["name"] == "quickstart" for r in listed)
    result = runner.invoke(app, ["recipes", "copy", "smollm2-qlora", str(tmp_path)])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "smollm2-qlora.yaml"
    assert "# QLoRA on the builtin" in copied.read_text()  # comments kept
    r = recipe.load(copied)  # runs from anywhere: the data paths point at the shipped files
    assert r.method.name == "qlora" and open(r.data.train).readline().startswith('{"messages"')
    again = runner.invoke(app, ["recipes", "copy", "smollm2-qlora", str(copied)])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.stderr
    missing = runner.invoke(app, ["recipes", "copy", "nope", str(tmp_path)])
    assert missing.exit_code == 2 and "choose one of: " in missing.stderr
