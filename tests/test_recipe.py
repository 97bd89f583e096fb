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
