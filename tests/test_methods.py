"""Each method trains the builtin SmolLM2 from its shipped recipe for a few steps; artifacts load with plain PEFT
or transformers."""

import json
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app
from tests.conftest import ROOT, train_builtin

runner = CliRunner()
PROMPT = "Order for Ana Ruiz: 2 x mug (red), deliver to Oslo, deadline Monday."


def train(tmp_path, recipe, *overrides):
    """A few steps of a shipped recipe (tests/conftest.py: train_builtin); `--set` pairs as on the command line."""
    run, summary = train_builtin(tmp_path, recipe, *[o for o in overrides if o != "--set"])
    assert summary["final_loss"] < summary["first_loss"], summary  # the loss falls
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    return run, summary


@pytest.fixture
def cpu_only(monkeypatch):
    """For what only a machine without CUDA does (the refusals below, bitsandbytes' CPU layout of 4-bit weights):
    on a GPU box these run as on a CPU one, with CUDA hidden from torch, which is what ftune, transformers (where
    to load 4-bit weights) and the trainer (which device) ask."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


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
def test_qlora_base_is_4bit(qlora_run, builtin_dir, base_logits):
    from transformers import AutoModelForCausalLM

    from finetune_cli import models
    from finetune_cli.recipe import QloraMethod
    from finetune_cli.training import methods

    quantized = models.load_model(str(builtin_dir), quantization=methods.quantization_config(QloraMethod(), "float32"))
    full = AutoModelForCausalLM.from_pretrained(builtin_dir)
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # 4-bit linear layers; the (tied) embedding stays full precision, so about a third of fp32 for this small model
    assert quantized.get_memory_footprint() < 0.4 * full.get_memory_footprint()

    run, summary = qlora_run  # the shared 4-step QLoRA run (tests/conftest.py), as train() below runs it
    assert summary["method"] == "qlora" and summary["final_loss"] < summary["first_loss"]
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
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
def test_refused_before_any_model_loads(tmp_path, monkeypatch, cpu_only, override, message):
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


def four_bit_layers(model) -> list:
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    return layers


def packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def test_4bit_training_layout_restored_after_cpu_repacking(tiny_model_dir, cpu_only):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel in any
    no-grad forward in eval mode (our baseline eval, evals during training, sample answers). Here that repacking is
    forced on any CPU with bitsandbytes' own function (the one its forward calls); `methods.prepare`, which runs
    before the adapter is added, must put back bitsandbytes' training layout: the same 4-bit codes, the same
    (double-quantized) state, the same function."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from finetune_cli import models
    from finetune_cli.recipe import QloraMethod
    from finetune_cli.training import methods

    model = models.load_model(str(tiny_model_dir), quantization=methods.quantization_config(QloraMethod(), "float32"))
    model.train()  # no repacking in training mode, on any CPU
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        reference = model(ids).logits
    layers = four_bit_layers(model)
    before = [(layer.weight.data.clone(), layer.weight.quant_state.nested) for layer in layers]
    assert not any(packed(layer) for layer in layers) and all(nested for _, nested in before)
    for layer in layers:
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
    assert all(packed(layer) and layer.weight.shape != data.shape for layer, (data, _) in zip(layers, before))

    model = methods.prepare(model, QloraMethod(), gradient_checkpointing=False)
    for layer, (data, nested) in zip(layers, before):
        assert not packed(layer) and layer.weight.quant_state.nested == nested
        assert layer.weight.dtype == data.dtype and torch.equal(layer.weight.data, data)  # the same 4-bit codes
    model.train()
    with torch.no_grad():
        # the block scales went through bfloat16 in the packed layout: equal to about 3 significant digits
        torch.testing.assert_close(model(ids).logits, reference, rtol=2e-2, atol=5e-3)


def test_4bit_layers_train_in_the_training_layout_after_every_eval(tiny_recipe, monkeypatch, cpu_only):
    """A QLoRA run on a simulated AVX512-BF16 CPU: every no-grad forward of a 4-bit layer in eval mode leaves the
    layer repacked, as bitsandbytes does there (its own repacking function; the output is computed the portable
    way, so this runs on any CPU). The baseline eval before the adapter is added and the evals after steps 1 and
    2 all repack every layer; no training forward may meet a repacked layer."""
    import copy

    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

    from finetune_cli import recipe as recipes
    from finetune_cli.training import train

    plain = bnb.nn.Linear4bit.forward
    events = Counter()

    def forward(self, x):
        state, was_packed = self.weight.quant_state, packed(self)
        if self.training and torch.is_grad_enabled():
            events["training forward on a repacked layer" if was_packed else "training forward"] += 1
        self.support_avx512bf16_for_cpu = False  # bitsandbytes' own repacking and kernel stay out of it
        if was_packed:  # compute from an unpacked copy: the packed kernel exists only on AVX512-BF16 CPUs
            keep = self.weight.data
            self.weight.data, self.weight.quant_state = _convert_weight_packed_for_cpu_inverse(keep, copy.copy(state))
        try:
            out = plain(self, x)
        finally:
            if was_packed:
                self.weight.data, self.weight.quant_state = keep, state
        if not self.training and not x.requires_grad and not was_packed:
            self.weight.data, self.weight.quant_state = _convert_weight_packed_for_cpu(self.weight.data, state)
            events["repacked"] += 1
        return out

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)
    overrides = ["method.name=qlora", "training.max_steps=2", "training.eval_steps=1", "training.precision=fp32"]
    summary = train.run(recipes.load(tiny_recipe, overrides), samples=0)
    assert summary["steps"] == 2
    layers = 2 * 7  # the tiny Llama's 4-bit linear layers: q, k, v, o, gate, up, down in each of 2 layers
    assert events["training forward"] > 0 and events["repacked"] == 3 * layers, events  # 3 evals, each repacked all
    assert events["training forward on a repacked layer"] == 0, events


@pytest.mark.skipif(
    not __import__("bitsandbytes.functional").functional.has_avx512bf16(),
    reason="this CPU has no AVX512-BF16: bitsandbytes does not repack here (the tests above force it)",
)
def test_bitsandbytes_repacks_on_this_cpu_and_restoring_keeps_the_function(tiny_model_dir, cpu_only):
    """Where the instruction exists: a real eval forward repacks (what the tests above simulate), and after
    `restore_training_layout` the training forward computes what the packed kernel computed."""
    from finetune_cli import models
    from finetune_cli.recipe import QloraMethod
    from finetune_cli.training import methods

    model = models.load_model(str(tiny_model_dir), quantization=methods.quantization_config(QloraMethod(), "float32"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    layers = four_bit_layers(model)
    assert all(packed(layer) for layer in layers)
    methods.restore_training_layout(model)
    assert not any(packed(layer) for layer in layers)
    model.train()
    with torch.no_grad():
        # the same function again (the packed kernel computes in bf16, hence the tolerance)
        assert torch.allclose(model(ids).logits, reference, rtol=2e-2, atol=5e-3)
