"""`ftune merge-adapter` and `ftune generate`: merged models match plain PEFT and never merge into 4-bit weights."""

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app

runner = CliRunner()
PROMPTS = [
    "Order for Ana Ruiz: 2 x mug (red), deliver to Oslo, deadline Monday.",
    "Hello! Wei Chen from Lima. I need 5 towels, blue if possible, by Friday.",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def batch_logits(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits, enc["attention_mask"].bool()


def greedy(model, tok, prompt):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def plain_peft(base_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()


@pytest.mark.slow
def test_lora_merge_matches_plain_peft(quickstart_run, quickstart_merged, builtin_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, merged_dir = quickstart_run[0], quickstart_merged  # the shared quickstart run and its merge
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert (merged_dir / "chat_template.jinja").is_file()
    card = (merged_dir / "README.md").read_text()
    assert "base_model: smollm2-135m-instruct" in card and '"name": "lora"' in card and "## Recipe" in card
    eos = json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"]
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reference = plain_peft(builtin_dir, run / "adapter")
    (a, mask), (b, _) = batch_logits(merged, tok), batch_logits(reference, tok)
    assert (a - b)[mask].abs().max() < 1e-4
    assert (a - batch_logits(AutoModelForCausalLM.from_pretrained(builtin_dir), tok)[0])[mask].abs().max() > 1e-3
    for prompt in PROMPTS:
        assert greedy(merged, tok, prompt) == greedy(reference, tok, prompt)


@pytest.mark.slow
def test_qlora_merges_into_full_precision_weights(tmp_path, builtin_dir, qlora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_cli import models
    from finetune_cli.recipe import QloraMethod
    from finetune_cli.training import methods

    run = qlora_run[0]
    result = invoke("merge-adapter", run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # plain weights, no 4-bit layers
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged_logits, mask = batch_logits(merged, tok)

    # 1. exact: the merge equals the adapter applied to the same full-precision base through plain PEFT
    reference = plain_peft(builtin_dir, run / "adapter")
    # (5e-4: float32 rounding of (W + BA)x against Wx + BAx, at logits of magnitude ~30)
    assert (merged_logits - batch_logits(reference, tok)[0])[mask].abs().max() < 5e-4
    for prompt in PROMPTS:
        assert greedy(merged, tok, prompt) == greedy(reference, tok, prompt)

    # 2. faithful to training: vs the adapter on the de-quantized 4-bit base it was trained on, the merged model
    # differs by no more than the base's own 4-bit rounding error (measured here as fp32 base vs de-quantized
    # base), with 50% headroom. A merge into 4-bit weights would add a second rounding of the adapter delta.
    from peft import PeftModel

    quantization = methods.quantization_config(QloraMethod(), "float32")
    dequantized = models.load_model(str(builtin_dir), quantization=quantization).dequantize().float().eval()
    base_fp32 = AutoModelForCausalLM.from_pretrained(builtin_dir).eval()
    rounding = (batch_logits(base_fp32, tok)[0] - batch_logits(dequantized, tok)[0])[mask].abs().mean()
    trained_on = PeftModel.from_pretrained(dequantized, run / "adapter").eval()
    diff = (merged_logits - batch_logits(trained_on, tok)[0])[mask].abs().mean()
    assert 0 < rounding and diff < 1.5 * rounding, (float(diff), float(rounding))


@pytest.fixture
def tiny_adapters(tmp_path, tiny_model_dir):
    """A LoRA and a prompt-tuning adapter for the tiny model, made with plain PEFT."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, config in (
        ("lora", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)),
        ("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    ):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    return tmp_path


def test_lora_adapter_folder_merges(tiny_adapters, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_adapters / "merged"
    result = invoke("merge-adapter", tiny_adapters / "lora", "-o", out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ref = plain_peft(tiny_model_dir, tiny_adapters / "lora")
    a, mask = batch_logits(merged.float(), tok)
    assert (a - batch_logits(ref, tok)[0])[mask].abs().max() < 0.05  # bf16 weights: about 3 significant digits
    # the merged folder (marked as merge-adapter's output) opens as a model for eval, generate and serve, not as
    # an unfinished run (the GPU check found `ftune eval merged/` refused with "resume it")
    from finetune_cli import rundir

    target = rundir.open_target(str(out))
    assert (target.kind, target.weights, target.adapter) == ("model", str(out), None)


def test_merge_makes_generation_stop_at_the_end_of_turn(tmp_path, tiny_model_dir):
    """A tokenizer whose EOS (<|endoftext|>) is not the end-of-turn token its ChatML template writes (<|im_end|>),
    and a base whose generation config stops only at that EOS. The merged model's generation config must add
    <|im_end|>, so that plain transformers generate() on the merged folder, given no eos, stops at the end of the
    turn. The base is made to answer <|im_end|> at every position (its hidden state is dominated by one dimension,
    which only <|im_end|>'s output row reads), so the base itself runs on to max_new_tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    tok.eos_token = "<|endoftext|>"
    assert tok.eos_token_id not in (None, eot) and "<|im_end|>" in tok.chat_template
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings, config.eos_token_id = False, tok.eos_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[eot] = 0.0
        model.lm_head.weight[eot, 0] = 10.0
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    assert json.loads((base_dir / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # a small adapter that changes the weights, not the answer
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.01)
    lora.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")

    result = invoke("merge-adapter", tmp_path / "adapter", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    eos = json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted([tok.eos_token_id, eot])

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    n = prompt["input_ids"].shape[1]
    with torch.no_grad():
        on_base = AutoModelForCausalLM.from_pretrained(base_dir).generate(**prompt, max_new_tokens=6, do_sample=False)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        on_merged = merged.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert on_base[0, n:].tolist() == [eot] * 6  # the base's own config does not stop there
    assert on_merged[0, n:].tolist() == [eot]  # the merged one does, after the first


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/prompt", "-o", "{d}/out"], "cannot be merged: it adds virtual tokens"),
        (["{d}/nothing", "-o", "{d}/out"], "no such run directory or adapter folder"),
        (["{d}", "-o", "{d}/out"], "no adapter here"),
        (["{d}/lora", "-o", "{d}/out", "--base", "nobody/no-such-model"], "cannot load 'nobody/no-such-model'"),
        (["{d}/lora", "-o", "{d}/out", "--base", "smollm2-135m-instruct"], "adapter does not fit base"),
        (["{d}/lora", "-o", "{d}/lora"], "holds files ftune did not write"),
        (["{d}/lora", "-o", "{d}/out", "--dtype", "int4"], "--dtype"),
    ],
)
def test_merge_errors_write_nothing(tiny_adapters, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted(p.name for p in tiny_adapters.rglob("*"))
    result = invoke("merge-adapter", *[a.format(d=tiny_adapters) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tiny_adapters.rglob("*")) == before


def plain_reply(model, tok, prompt, max_new_tokens, **sampling):
    """A reply from plain transformers generate(): the chat template's prompt, stopping at <|im_end|>."""
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_generate_applies_the_adapter(tiny_adapters, tiny_model_dir):
    """`ftune generate` on an adapter folder answers as the base with that adapter (plain PEFT), on the base folder
    as the base (plain transformers), and the two answers differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    answers = {}
    for target, model in (
        (tiny_adapters / "lora", plain_peft(tiny_model_dir, tiny_adapters / "lora")),
        (tiny_model_dir, base),
    ):
        result = invoke("generate", target, "-p", "Hello there", "--max-new-tokens", "6")
        assert result.exit_code == 0, result.output
        assert result.stderr == ""  # the reply alone on stdout
        assert result.stdout == plain_reply(model, tok, "Hello there", 6, **greedy) + "\n"
        answers[target] = result.stdout
    assert answers[tiny_adapters / "lora"] != answers[tiny_model_dir]


def test_sampling_flags_change_the_reply(tiny_model_dir):
    """--do-sample draws (different replies for different seeds, the same for the same seed); --temperature is
    used: near 0 the draw is the greedy reply, at 1.5 it is plain transformers' draw with that seed and
    temperature. A flag that were ignored fails one of these."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def sample(temperature, seed):
        args = ["-p", "Hi", "--do-sample", "--temperature", temperature, "--max-new-tokens", "8", "--seed", seed]
        result = invoke("generate", tiny_model_dir, *args)
        assert result.exit_code == 0, result.output
        return result.stdout.removesuffix("\n")

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    greedy = plain_reply(model, tok, "Hi", 8, do_sample=False, temperature=None, top_p=None, top_k=None)
    hot = [sample(1.5, seed) for seed in (1, 2, 3)]
    assert len(set(hot)) == 3 and greedy not in hot, hot  # a random tiny model: each draw its own
    assert sample(1.5, 1) == hot[0]  # same seed, same sample
    torch.manual_seed(1)
    assert hot[0] == plain_reply(model, tok, "Hi", 8, do_sample=True, temperature=1.5)
    # (1e-5: the likeliest token is then sampled with probability ~1 - exp(-gap / 1e-5), gap the logit margin)
    assert [sample(1e-5, seed) for seed in (1, 2)] == [greedy, greedy]


def test_chat_streams_to_stdout(tiny_model_dir):
    result = runner.invoke(app, ["chat", str(tiny_model_dir), "--max-new-tokens", "3"], input="Hi\nAgain\n\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("> ") == 3 and result.stdout.count("\n") >= 2  # two replies, then the end
