"""Fixtures: the builtin model's tokenizer and a tiny random-init Llama built from a config (no downloads)."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def builtin_dir() -> Path:
    from finetune_cli import models

    return Path(models.resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tokenizer(builtin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_dir, tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a local HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


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
