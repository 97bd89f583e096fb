"""A model whose classes live in its own folder (`auto_map`, an unknown model_type): trained with
`model.trust_remote_code: true`, then evaluated, generated from and merged without extra flags."""

import json

import pytest
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import conversation, write_jsonl

runner = CliRunner()

CONFIGURATION = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
"""

MODELING = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


@pytest.fixture(scope="module")
def remote_model(tmp_path_factory, tiny_model_dir):
    """The tiny Llama's weights behind classes that only the folder's own Python files define."""
    import shutil

    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "configuration_tiny.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="tiny-remote",
        architectures=["TinyRemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def recipe(remote_model, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(8)])
    write_jsonl(tmp_path / "eval.jsonl", [conversation(i + 50) for i in range(2)])
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"model:\n  base: {remote_model}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  max_length: 96\n"
        f"training:\n  max_steps: 2\n  batch_size: 4\n  learning_rate: 1.0e-2\noutput:\n  dir: {tmp_path / 'run'}\n"
    )
    return path


def test_without_the_flag_train_refuses_naming_the_key(recipe, tmp_path):
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0"], input="y\n")
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: model.trust_remote_code:") and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    validate = runner.invoke(app, ["validate", str(recipe)])
    assert "Traceback" not in validate.output


def test_trained_run_is_evaluated_generated_and_merged_without_flags(recipe, tmp_path):
    trained = runner.invoke(
        app, ["train", str(recipe), "--samples", "0", "--set", "model.trust_remote_code=true", "--json"]
    )
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "run"
    scored = runner.invoke(app, ["eval", str(run), "--compare-base", "--json"])
    assert scored.exit_code == 0, scored.output
    results = json.loads(scored.stdout)["results"]
    assert results["tuned"]["loss"] == pytest.approx(json.loads(trained.stdout)["eval_after"]["loss"], rel=1e-6)
    answered = runner.invoke(app, ["generate", str(run), "-p", "What is 1 plus 1?", "--max-new-tokens", "4"])
    assert answered.exit_code == 0, answered.output
    merged = runner.invoke(app, ["merge-adapter", str(run), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "tiny-remote"
    # the adapter folder alone remembers the option too
    alone = runner.invoke(app, ["generate", str(run / "adapter"), "-p", "hi", "--max-new-tokens", "2"])
    assert alone.exit_code == 0, alone.output
