"""`ftune inspect` logic: figures checked against independent computations, and no weights loaded."""

import json
import shutil

import pytest

from finetune_cli.errors import FtuneError
from finetune_cli.inspect_model import inspect
from finetune_cli.ui import inspect_table as render


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """inspect must never load weights: any from_pretrained on a model class fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded model weights")

    for cls in ("AutoModelForCausalLM", "AutoModel", "LlamaForCausalLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse)


@pytest.fixture(scope="module")
def tiny_params(tiny_model_dir):
    """Parameter count of the real tiny model, loaded (module scope: before the autouse patch applies)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    return sum(p.numel() for p in model.parameters())


def test_tiny_model_figures(tiny_model_dir, tiny_params):
    from transformers import AutoTokenizer, LlamaConfig

    info = inspect(str(tiny_model_dir))
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    assert info["model"] == str(tiny_model_dir)
    assert info["path"] == str(tiny_model_dir)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["model_type"] == "llama"
    assert info["parameters"] == tiny_params
    assert info["layers"] == 2 and info["hidden_size"] == 64
    assert info["context_length"] == config.max_position_embeddings == 512
    assert info["vocab_size"] == config.vocab_size
    assert info["tokenizer_size"] == len(tokenizer)
    assert info["dtype"] == "float32"
    special = info["special_tokens"]
    assert special["eos"] == {"token": tokenizer.eos_token, "id": tokenizer.eos_token_id}
    assert special["pad"] == {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id}
    assert special["bos"]["token"] == tokenizer.bos_token
    assert special["unk"]["id"] == tokenizer.unk_token_id
    assert info["pad_is_eos"] is (tokenizer.pad_token_id == tokenizer.eos_token_id)
    assert {"token": "<|im_end|>", "id": tokenizer.convert_tokens_to_ids("<|im_end|>")} in info["end_of_turn"]
    assert info["chat_template"] is True
    assert "What is the capital of France?" in info["template_sample"]
    assert "<|im_start|>user" in info["template_sample"]

    memory = info["memory"]
    assert set(memory) == {"float32", "bfloat16", "float16", "int8", "nf4"}
    assert memory["float32"] == 4 * tiny_params
    assert memory["bfloat16"] == memory["float16"] == 2 * tiny_params
    assert memory["nf4"] < memory["int8"] < memory["bfloat16"]
    json.dumps(info)  # plain data, ready for --json


def test_quantized_memory_counts_decoder_linears(tiny_model_dir, tiny_params):
    """int8/nf4 quantize only the decoder layers' linear weights; the rest stays at 2 bytes a parameter."""
    h, inter, layers, kv = 64, 128, 2, 2 * (64 // 4)  # hidden, MLP, layers, k/v width (2 kv heads of 16)
    linear = layers * (h * h + 2 * h * kv + h * h + 3 * h * inter)
    rows = layers * (h + 2 * kv + h + 2 * inter + h)
    memory = inspect(str(tiny_model_dir))["memory"]
    assert memory["int8"] == linear + 4 * rows + 2 * (tiny_params - linear)
    assert 0.5 * linear + 2 * (tiny_params - linear) < memory["nf4"] < 0.53 * linear + 2 * (tiny_params - linear)


def test_builtin_model(builtin_dir):
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(builtin_dir)
    h, inter, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h  # q, k, v, o, MLP, two norms
    expected = config.vocab_size * h + n * per_layer + h  # tied embeddings counted once, final norm
    assert expected == 134_515_008

    info = inspect("smollm2-135m-instruct")
    assert info["model"] == "smollm2-135m-instruct"
    assert info["path"] == str(builtin_dir)
    assert info["parameters"] == expected
    assert info["context_length"] == 8192
    assert info["vocab_size"] == 49152
    assert info["memory"]["bfloat16"] == 2 * expected


def test_no_chat_template(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = folder / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    data.pop("chat_template", None)
    tok_config.write_text(json.dumps(data))

    info = inspect(str(folder))
    assert info["chat_template"] is False
    assert info["template_sample"] is None
    assert info["end_of_turn"] == [{"token": info["special_tokens"]["eos"]["token"], "id": 2}]


def test_folder_without_config(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FtuneError, match="no config.json"):
        inspect(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(FtuneError, match="not found"):
        inspect(str(tmp_path / "nope"))


def test_bad_config(tmp_path, tiny_model_dir):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(FtuneError) as err:
        inspect(str(folder))
    message = str(err.value)
    assert str(folder) in message and "\n" not in message


def test_render(tiny_model_dir):
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None)
    console.print(render(inspect(str(tiny_model_dir))))
    out = console.export_text()
    assert "LlamaForCausalLM" in out
    assert "512 tokens" in out
    assert "49,152" in out
    assert "<|im_end|> (id 2)" in out
    assert "weights only" in out
    assert "MiB" in out
    assert "What is the capital of France?" in out  # the template sample, below the table
