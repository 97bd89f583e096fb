"""Each method trains the builtin SmolLM2 from its shipped recipe for a few steps; artifacts load with plain PEFT
or transformers."""

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import ROOT, write_jsonl

runner = CliRunner()
PROMPT = "Order for Ana Ruiz: 2 x mug (red), deliver to Oslo, deadline Monday."


def small_data(folder):
    """Four short conversations: one batch, seen every step, so the loss must fall."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say the code word {i}."},
                {"role": "assistant", "content": f"Zebra-{i}!"},
            ]
        }
        for i in range(4)
    ]
    return write_jsonl(folder / "small.jsonl", rows)


def train(tmp_path, recipe, *overrides):
    data = small_data(tmp_path)
    result = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / recipe),
            "--json",
            "--samples",
            "0",
            "--set",
            f"output.dir={tmp_path / 'run'}",
            "--set",
            f"data.train={data}",
            "--set",
            f"data.eval={data}",
            "--set",
            "training.max_steps=4",
            "--set",
            "training.batch_size=4",
            "--set",
            "training.logging_steps=1",
            "--set",
            "training.warmup_ratio=0",
            "--set",
            "training.lr_scheduler=constant",
            *overrides,
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == json.loads((tmp_path / "run" / "run.json").read_text())["method"]
    assert summary["final_loss"] < summary["first_loss"], summary  # the loss falls
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    return tmp_path / "run", summary


def logits(model, tok):
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def base_logits(builtin_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_dir)
    return logits(AutoModelForCausalLM.from_pretrained(builtin_dir), tok)


def peft_logits(builtin_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_dir), adapter)
    return logits(model, AutoTokenizer.from_pretrained(adapter))


@pytest.mark.slow
def test_lora_with_dora_and_rslora(tmp_path, builtin_dir, base_logits):
    run, summary = train(
        tmp_path,
        "quickstart.yaml",
        "--set",
        "method.use_dora=true",
        "--set",
        "method.use_rslora=true",
        "--set",
        "training.learning_rate=2e-3",
    )
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    assert (peft_logits(builtin_dir, run / "adapter") - base_logits).abs().max() > 1e-3


@pytest.mark.slow
def test_qlora_base_is_4bit(tmp_path, builtin_dir, base_logits):
    from transformers import AutoModelForCausalLM

    from finetune_cli import methods, models
    from finetune_cli.recipe import QloraMethod

    quantized = models.load_model(str(builtin_dir), quantization=methods.quantization_config(QloraMethod(), "float32"))
    full = AutoModelForCausalLM.from_pretrained(builtin_dir)
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # 4-bit linear layers; the (tied) embedding stays full precision, so about a third of fp32 for this small model
    assert quantized.get_memory_footprint() < 0.4 * full.get_memory_footprint()

    run, summary = train(tmp_path, "smollm2-qlora.yaml", "--set", "training.learning_rate=2e-3")
    # as fast as LoRA on one repeated batch (bitsandbytes' CPU repacking after the baseline eval once made it crawl)
    assert summary["final_loss"] < 0.3 * summary["first_loss"], summary
    record = json.loads((run / "adapter" / "ftune.json").read_text())
    assert record["method"]["name"] == "qlora" and record["method"]["bits"] == 4
    assert record["method"]["quant_type"] == "nf4" and record["method"]["double_quant"] is True
    assert record["base"] == "smollm2-135m-instruct"
    # the adapter loads with plain PEFT (here over the full-precision base) and changes the output
    assert (peft_logits(builtin_dir, run / "adapter") - base_logits).abs().max() > 1e-3


@pytest.mark.slow
def test_prompt_tuning_trains_only_virtual_tokens(tmp_path, builtin_dir, base_logits):
    run, summary = train(tmp_path, "smollm2-prompt-tuning.yaml", "--set", "method.num_virtual_tokens=8")
    assert summary["trainable_parameters"] == 8 * 576  # virtual tokens x hidden size, nothing else
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 8
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(builtin_dir), run / "adapter")
    assert model.get_prompt_embedding_to_save("default").shape == (8, 576)


@pytest.mark.slow
def test_full_fine_tuning_saves_a_plain_model(tmp_path, builtin_dir, base_logits):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, summary = train(tmp_path, "smollm2-full.yaml", "--set", "training.learning_rate=1e-4")
    assert summary["trainable_parameters"] == summary["total_parameters"]
    folder = run / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "generation_config.json").is_file()
    assert (folder / "tokenizer.json").is_file() and not (run / "adapter").exists()
    tuned = AutoModelForCausalLM.from_pretrained(folder)
    assert (logits(tuned, AutoTokenizer.from_pretrained(folder)) - base_logits).abs().max() > 1e-3
    # ftune eval knows full runs too
    out = runner.invoke(app, ["eval", str(run), "--compare-base", "--json"])
    assert out.exit_code == 0, out.output
    results = json.loads(out.stdout)["results"]
    assert results["tuned"]["perplexity"] < results["base"]["perplexity"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.precision=fp16", "training.precision: fp16 needs a CUDA GPU"),
        ("training.optimizer=paged_adamw_8bit", "training.optimizer: paged_adamw_8bit needs a CUDA GPU"),
        ("method.num_virtual_tokens=4", "'method.num_virtual_tokens' belongs to method prompt_tuning, not lora"),
    ],
)
def test_refused_before_any_model_loads(tmp_path, monkeypatch, override, message):
    from finetune_cli import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    result = runner.invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / "quickstart.yaml"),
            "--set",
            f"output.dir={tmp_path / 'run'}",
            "--set",
            override,
        ],
    )
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_4bit_training_layout_restored_after_an_eval_forward(tiny_model_dir):
    from finetune_cli import methods, models
    from finetune_cli.recipe import QloraMethod

    model = models.load_model(str(tiny_model_dir), quantization=methods.quantization_config(QloraMethod(), "float32"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        reference = model(ids).logits
    layer = model.model.layers[0].self_attn.q_proj
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    methods.restore_training_layout(model)
    assert not layer.weight.quant_state.packing_format_for_cpu
    model.train()
    with torch.no_grad():
        # the same function again (the packed kernel computes in bf16, hence the tolerance)
        assert torch.allclose(model(ids).logits, reference, rtol=2e-2, atol=5e-3)
