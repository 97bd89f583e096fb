"""Recipe loading: schema errors with file, line and key; overrides; resolved paths and defaults."""

import re

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


LORA_DEFAULTS = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": "all-linear",
    "use_dora": False,
    "use_rslora": False,
    "modules_to_save": None,
}
METHOD_DEFAULTS = {  # the README's recipe reference, written out by hand
    "lora": {"name": "lora", **LORA_DEFAULTS},
    "qlora": {
        "name": "qlora",
        **LORA_DEFAULTS,
        "bits": 4,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "auto",
    },
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 20, "init_text": None},
    "full": {"name": "full"},
}


def test_each_method_validates_with_defaults(tmp_path):
    """Each method name gets its own fields, each at the documented default, and nothing of another method."""
    for name, defaults in METHOD_DEFAULTS.items():
        r = recipe.load(write(tmp_path, GOOD + f"method:\n  name: {name}\n"))
        assert r.method.model_dump() == defaults, name
    # no name: LoRA, with the one field given and the other defaults
    assert recipe.load(write(tmp_path, GOOD + "method:\n  r: 4\n")).method.model_dump() == {
        **METHOD_DEFAULTS["lora"],
        "r": 4,
    }
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.seed=-1", "'training.seed' is -1: expected greater than or equal to 0"),
        ("training.seed=4294967296", "'training.seed' is 4294967296: expected less than or equal to 4294967295"),
        ("training.epochs=.inf", "'training.epochs' is inf: expected a finite number"),
        ("training.learning_rate=.nan", "'training.learning_rate' is nan: expected a finite number"),
        ("training.weight_decay=inf", "'training.weight_decay' is 'inf': expected a finite number"),
        ("training.max_grad_norm=.inf", "'training.max_grad_norm' is inf: expected a finite number"),
        ("training.warmup_ratio=nan", "'training.warmup_ratio' is 'nan': expected a finite number"),
        ("method.alpha=-.inf", "'method.alpha' is -inf: expected a finite number"),
        ("training.batch_size=" + "9" * 5000, "'training.batch_size' is '99999"),
    ],
    ids=lambda value: value[:30],  # some values are 100,000 characters long
)
def test_numbers_must_be_finite_and_in_range(tmp_path, override, message):
    with pytest.raises(FtuneError) as err:
        recipe.load(write(tmp_path, GOOD), [override])
    assert str(err.value).startswith(f"--set: {message}") and len(str(err.value)) < 200


def test_ranges_in_the_file_name_line_and_key(tmp_path):
    with pytest.raises(FtuneError, match=r"r.yaml:7: 'training.seed' is -1: expected greater than or equal to 0"):
        recipe.load(write(tmp_path, GOOD + "  seed: -1\n"))
    weighted = GOOD.replace(
        "  train: data/train.jsonl\n", "  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 1e300}\n"
    )
    with pytest.raises(FtuneError, match=r"r.yaml:6: 'data.train.1.weight' is '1e300': a weight .* at most 1000"):
        recipe.load(write(tmp_path, weighted))
    with pytest.raises(FtuneError, match=r"r.yaml:6: 'data.train.1.weight' is inf: expected a finite number"):
        recipe.load(write(tmp_path, weighted.replace("1e300", ".inf")))
    assert recipe.load(write(tmp_path, weighted.replace("1e300", "1000"))).data.train[1].weight == 1000


def test_recipe_encoding(tmp_path):
    latin1 = (GOOD + "  seed: 1\n").replace("data:\n", "data:\n  system_prompt: Répondez en français\n")
    path = tmp_path / "r.yaml"
    path.write_bytes(latin1.encode("latin-1"))
    with pytest.raises(FtuneError) as err:
        recipe.load(path)
    assert str(err.value) == f"{path}:4: not UTF-8 text (byte 0xe9); save the recipe as UTF-8"
    path.write_bytes(b"\xef\xbb\xbf" + latin1.encode("utf-8"))  # a byte order mark, as Windows editors write
    assert recipe.load(path).data.system_prompt == "Répondez en français"
    with pytest.raises(FtuneError, match=r"r.yaml:4: 'data.system_prompt' holds a character that is not Unicode"):
        recipe.load(write(tmp_path, latin1.replace("Répondez en français", '"\\ud800"')))
    with pytest.raises(FtuneError, match=r"--set: 'data.system_prompt' holds a character that is not Unicode"):
        recipe.load(write(tmp_path, GOOD), ["data.system_prompt=caf\udce9"])  # argv bytes that were not UTF-8


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "  seed: " + "1" * 5000 + "\n", r"r.yaml:7: a number too long to read"),
        (GOOD + "x: " + "[" * 5000 + "\n", r"r.yaml: YAML nested too deeply to read"),
        (GOOD + "method: {name: [lora]}\n", r"r.yaml:7: 'method.name' is \['lora'\]; expected one of"),
        (GOOD + "method: {1: 2}\n", r"r.yaml:7: unknown key 'method.1'"),
        (GOOD.replace("  train: data/train.jsonl", "  train: &a [*a]"), r"r.yaml:4: 'data.train.0' is \[\[...\]\]"),
    ],
    ids=lambda value: value[:30],  # some values are 100,000 characters long
)
def test_hostile_yaml_is_a_usage_error(tmp_path, text, message):
    with pytest.raises(FtuneError, match=message):
        recipe.load(write(tmp_path, text))


def test_set_on_a_string_key_takes_the_value_as_typed(tmp_path):
    path = write(tmp_path, GOOD)
    assert recipe.load(path, ["data.system_prompt=#1 priority is JSON"]).data.system_prompt == "#1 priority is JSON"
    assert recipe.load(path, ["data.system_prompt=Rule: answer in JSON"]).data.system_prompt == "Rule: answer in JSON"
    assert recipe.load(path, ["data.system_prompt=[not, a, list]"]).data.system_prompt == "[not, a, list]"
    assert recipe.load(path, ["data.system_prompt=true"]).data.system_prompt == "true"
    assert recipe.load(path, ["method.name=prompt_tuning", "method.init_text=Note: 1"]).method.init_text == "Note: 1"
    assert recipe.load(path, ["output.dir=a #1"]).output.dir == "a #1"
    assert recipe.load(path, ["data.system_prompt="]).data.system_prompt is None  # empty: back to the default
    # other keys are still YAML: numbers, booleans, lists
    r = recipe.load(path, ["training.learning_rate=1e-4", "training.packing=false", "method.target_modules=[q, v]"])
    assert r.training.learning_rate == 1e-4 and r.training.packing is False and r.method.target_modules == ["q", "v"]


def test_yaml_null_unsets_a_path_key(tmp_path):
    """`--set data.eval=null` means what `eval: null` means in the recipe: no eval file (not a file named null)."""
    path = write(tmp_path, GOOD.replace("training:", "  eval: data/eval.jsonl\ntraining:"))
    assert recipe.load(path).data.eval == str(tmp_path / "data" / "eval.jsonl")
    for value in ("null", "~", "NULL", "", " "):
        r = recipe.load(path, [f"data.eval={value}", f"model.chat_template={value}", f"output.dir={value}"])
        assert r.data.eval is None and r.model.chat_template is None, value
        assert r.output.dir == "runs/r", value  # output.dir unset: its default
    assert recipe.load(path, ["data.system_prompt=null"]).data.system_prompt is None
    assert recipe.load(path, ["data.system_prompt=nullable"]).data.system_prompt == "nullable"
    assert recipe.load(path, ["data.eval=null.jsonl"]).data.eval == str(tmp_path / "null.jsonl")


def test_tilde_is_expanded_in_every_path(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)
    (home / "model" / "config.json").write_text("{}", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "recipes"
    folder.mkdir()
    text = """model:
  base: ~/model
  chat_template: ~/t.jinja
data:
  train: [~/train.jsonl, {path: ~/more.jsonl}]
  eval: ~/eval.jsonl
distributed:
  config: ~/accelerate.yaml
output:
  dir: ~/runs/x
"""
    r = recipe.load(write(folder, text))
    assert r.model.base == str(home / "model") and r.model.chat_template == str(home / "t.jinja")
    assert r.data.train[0] == str(home / "train.jsonl") and r.data.train[1].path == str(home / "more.jsonl")
    assert r.data.eval == str(home / "eval.jsonl") and r.distributed.config == str(home / "accelerate.yaml")
    assert r.output.dir == str(home / "runs" / "x")
    # output.dir stays relative to the working directory; environment variables are not expanded
    r = recipe.load(write(folder, text), ["output.dir=out/x", "data.eval=$HOME/e.jsonl"])
    assert r.output.dir == "out/x" and r.data.eval == str(folder / "$HOME" / "e.jsonl")


def test_copy_into_a_folder_and_never_over_other_files(tmp_path):
    made = recipe.copy_shipped("quickstart", f"{tmp_path}/new/")  # a trailing slash: a folder, created
    assert made == tmp_path / "new" / "quickstart.yaml" and made.is_file()
    assert recipe.copy_shipped("smollm2-qlora", tmp_path / "new") == made.parent / "smollm2-qlora.yaml"  # existing
    notes = tmp_path / "notes"
    notes.write_text("mine", encoding="utf-8")
    for dest, overwrite, message in [
        (f"{notes}/", False, "is a file, not a folder"),
        (f"{notes}/", True, "is a file, not a folder"),
        (notes / "x.yaml", True, "is a file, not a folder"),
        (notes, True, "is not a recipe file (.yaml); ftune replaces only those"),
        (made, False, "exists; pass --overwrite"),
    ]:
        with pytest.raises(FtuneError, match=re.escape(message)):
            recipe.copy_shipped("quickstart", dest, overwrite)
    assert notes.read_text(encoding="utf-8") == "mine"
    (tmp_path / "new" / "smollm2-full.yaml").mkdir()
    with pytest.raises(FtuneError, match="is a folder; choose another destination"):
        recipe.copy_shipped("smollm2-full", tmp_path / "new", overwrite=True)
    made.write_text("old", encoding="utf-8")
    assert recipe.copy_shipped("quickstart", made, overwrite=True) == made and made.read_text() != "old"
    names = sorted(p.name for p in made.parent.iterdir())
    assert names == ["quickstart.yaml", "smollm2-full.yaml", "smollm2-qlora.yaml"]  # no temporary file left
