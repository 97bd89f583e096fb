"""`ftune export --format gguf`: files checked against independent readers (gguf-py's GGUFReader for metadata,
transformers' own GGUF loader for tokenizer and weights), the Modelfile's TEMPLATE rendered and compared with the
chat template, and bad input refused before anything is written."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_cli import gguf_export
from finetune_cli.cli import app
from finetune_cli.data import templates
from finetune_cli.data.masking import render
from tests.conftest import conversation, tiny_model, write_jsonl

runner = CliRunner()


def export(target, out, *args):
    return runner.invoke(app, ["export", str(target), "--format", "gguf", "-o", str(out), "--json", *map(str, args)])


def exported(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def tiny(tmp_path_factory, tokenizer, kind: str) -> Path:
    """A tiny random model of `kind` (qwen2 with an untied head: the output tensor is written and checked too)."""
    return tiny_model(tmp_path_factory.mktemp(f"tiny-{kind}"), tokenizer, kind, tied=kind != "qwen2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A LoRA run trained a few steps through the CLI, with the chatml template and a system prompt."""
    folder = tmp_path_factory.mktemp("gguf-run")
    write_jsonl(folder / "train.jsonl", [conversation(i, system=False) for i in range(8)])
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model:\n  base: {tiny_model_dir}\n  chat_template: chatml\ndata:\n  train: train.jsonl\n  max_length: 64\n"
        "  system_prompt: Answer with the number spelled out.\nmethod:\n  r: 4\n"
        "training:\n  max_steps: 2\n  batch_size: 8\n  learning_rate: 5.0e-2\n"
        f"output:\n  dir: {folder / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(recipe), "--samples", "0"])
    assert result.exit_code == 0, result.output
    return folder / "run"


def fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    wanted = ("general.", "llama.", "qwen2.", "tokenizer.ggml.eos", "tokenizer.ggml.eot", "tokenizer.ggml.bos")
    values = {k: f.contents() for k, f in reader.fields.items() if k.startswith(wanted) or k.endswith("template")}
    values.update({k: reader.fields[k].contents() for k in ("tokenizer.ggml.pre", "tokenizer.ggml.model")})
    values["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return values


# A. Round trips through transformers' GGUF loader


def test_llama_f16_round_trip_tokenizer_weights_and_metadata(tmp_path, tiny_model_dir, tokenizer):
    out = tmp_path / "gguf"
    info = exported(export(tiny_model_dir, out, "--quant", "f16"))
    assert info["check"]["tokens_equal"] and info["check"]["agreement"] >= 0.99 and info["check"]["passed"]
    gguf_file = Path(info["file"])
    assert gguf_file.name == f"{tiny_model_dir.name}-f16.gguf"
    assert sorted(p.name for p in out.iterdir()) == [".ftune", "Modelfile", "README.md", gguf_file.name]
    meta = fields(gguf_file)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["llama.context_length"] == 512 and meta["llama.rope.dimension_count"] == 16
    assert "output.weight" not in meta["tensors"]  # tied embeddings: llama.cpp reuses token_embd
    assert meta["tensors"]["blk.0.attn_norm.weight"] == "F32" and meta["tensors"]["blk.0.attn_q.weight"] == "F16"
    # the check's probe holds special tokens, unicode, digits and runs of whitespace: tokens_equal covers them
    probe = gguf_export._probe_text(tokenizer)
    assert "<|im_start|>" in probe and "我想" in probe and "1,000,000" in probe and "   " in probe and "\t" in probe
    # SmolLM2's own template is ChatML that writes a default system turn: TEMPLATE chatml, SYSTEM that default
    modelfile = (out / "Modelfile").read_text()
    assert info["template"] == "chatml" and "<|im_start|>{{ .Role }}" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def test_llama3_rope_scaling_is_written_as_llama_cpp_rope_freqs(tmp_path, tmp_path_factory, tokenizer):
    """Llama 3.1+ rope scaling: the rope_freqs tensor holds llama.cpp's converter's factors (its formula, written
    out here), and the check applies them as llama.cpp does, giving transformers' own llama3 frequencies."""
    import math

    import numpy as np
    from gguf import GGUFReader

    source = tiny(tmp_path_factory, tokenizer, "llama")
    config = json.loads((source / "config.json").read_text())
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope.update(high_freq_factor=4.0, original_max_position_embeddings=64)
    config["rope_parameters"] = rope
    (source / "config.json").write_text(json.dumps(config))
    info = exported(export(source, tmp_path / "gguf", "--quant", "f32", "--no-check"))  # the steps below are it
    freqs = next(t for t in GGUFReader(info["file"]).tensors if t.name == "rope_freqs.weight")
    want = []  # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    for freq in 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16)):
        wavelen = 2 * math.pi / freq
        if wavelen < 64 / 4.0:
            want.append(1.0)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_allclose(np.asarray(freqs.data), want, rtol=1e-5)
    assert len(set(np.round(want, 3))) > 2  # the tiny context puts frequencies in all three bands
    # the check runs the file as llama.cpp would: transformers' loader ignores rope_freqs, the check applies it
    # (_apply_rope_freqs), giving the rotary frequencies transformers computes for the source's llama3 config
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file=Path(info["file"]).name)
    plain = loaded.model.rotary_emb.inv_freq.clone()
    gguf_export._apply_rope_freqs(loaded, Path(info["file"]))
    want = AutoModelForCausalLM.from_pretrained(source).model.rotary_emb.inv_freq
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, want, rtol=1e-6, atol=0)
    assert not torch.allclose(plain, want)  # without the factors the frequencies would be wrong


def test_qwen2_q8_0_with_biases_and_untied_head(tmp_path, tmp_path_factory, tokenizer):
    """Read back with gguf-py and compared with the source weights (the transformers round trip runs for the llama
    file and the LoRA run; a third one here would cost ~20 s of the suite): q/k/v biases exact, Q8_0 weights
    within the format's rounding (a 1/127 step of each 32-value block's largest magnitude)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    source = tiny(tmp_path_factory, tokenizer, "qwen2")
    info = exported(export(source, tmp_path / "gguf", "--no-check"))
    assert info["quant"] == "q8_0" and info["architecture"] == "qwen2" and info["check"] is None
    weights = load_file(source / "model.safetensors")
    tensors = {t.name: t for t in GGUFReader(info["file"]).tensors}
    bias = tensors["blk.0.attn_v.bias"]
    np.testing.assert_array_equal(np.asarray(bias.data), weights["model.layers.0.self_attn.v_proj.bias"])
    down = tensors["blk.1.ffn_down.weight"]
    got = dequantize(down.data, down.tensor_type).reshape(weights["model.layers.1.mlp.down_proj.weight"].shape)
    want = weights["model.layers.1.mlp.down_proj.weight"]
    step = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - want).reshape(-1, 32) <= step * 0.6 + 1e-7).all()
    meta = fields(Path(info["file"]))
    assert meta["general.architecture"] == "qwen2"
    tensors = meta["tensors"]
    assert tensors["blk.1.ffn_down.weight"] == "Q8_0" and tensors["output_norm.weight"] == "F32"
    assert tensors["blk.0.attn_q.bias"] == "F32" and tensors["blk.0.attn_k.bias"] == "F32"
    assert tensors["output.weight"] == "Q8_0"  # the untied head is written


def test_mistral_is_written_with_the_llama_layout(tmp_path, tmp_path_factory, tokenizer):
    """Mistral runs on llama.cpp's llama graph: same names, permutation and types as the llama file, whose numbers
    the transformers check above verifies (here --no-check keeps the suite fast)."""
    info = exported(
        export(tiny(tmp_path_factory, tokenizer, "mistral"), tmp_path / "gguf", "--quant", "f16", "--no-check")
    )
    assert info["architecture"] == "mistral" and info["check"] is None
    meta = fields(Path(info["file"]))
    assert meta["general.architecture"] == "llama" and meta["tensors"]["blk.0.attn_k.weight"] == "F16"


def test_lora_run_is_merged_then_exported_with_modelfile_and_readme(tmp_path, lora_run):
    out = tmp_path / "gguf"
    info = exported(export(lora_run, out, "--quant", "q8_0"))
    assert info["method"] == "lora" and info["template"] == "chatml" and info["check"]["passed"]
    assert info["end_of_turn"] == ["<|im_end|>"] and info["peak_rss_mib"] > 0
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{Path(info['file']).name}\n")
    assert (
        'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """Answer with the number spelled out."""' in modelfile
    )
    assert "TEMPLATE" in modelfile
    readme = (out / "README.md").read_text()
    assert "llama-cli" in readme and "ollama create" in readme and "LM Studio" in readme
    assert "## Recipe" in readme and "chat_template: chatml" in readme


# B. The Modelfile's TEMPLATE renders like the chat template


def go_render(template: str, messages: list[dict]) -> str:
    """Render the subset of Go's text/template the Modelfile uses, with Ollama's values (every message in
    .Messages, system ones too; .System the system messages joined by a blank line): `range .Messages` and
    `range $i, $_ := .Messages`, if/else if/else on `eq .Role "x"` and on `and $.System (eq $i N)`, .Role,
    .Content and $.System. Anything else fails the test."""
    parts = re.split(r"({{.*?}})", template)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    pos = 0

    def block(message, index):
        nonlocal pos
        out = []
        while pos < len(parts):
            part = parts[pos]
            pos += 1
            if not part.startswith("{{"):
                out.append(part)
                continue
            action = part[2:-2].strip()
            if action == "end" or action.startswith("else"):
                pos -= 1
                return "".join(out)
            if action in ("range .Messages", "range $i, $_ := .Messages"):
                start = pos
                for i, m in enumerate(messages):
                    pos = start
                    out.append(block(m, i))
                    assert parts[pos] == "{{ end }}"
                    pos += 1
                if not messages:
                    block(None, None)
                    pos += 1
            elif action.startswith("if "):
                out.append(branch(message, index, action))
            elif action == ".Role":
                out.append(message["role"])
            elif action == ".Content":
                out.append(message["content"])
            elif action == "$.System":
                out.append(system)
            else:
                raise AssertionError(f"unexpected template action {action!r}")
        return "".join(out)

    def holds(action, message, index):
        if action == "else":
            return True
        role = re.fullmatch(r'(?:else )?if eq \.Role "(\w+)"', action)
        if role:
            return message["role"] == role.group(1)
        first = re.fullmatch(r"(?:else )?if and \$\.System \(eq \$i (\d+)\)", action)
        if first:
            return bool(system) and index == int(first.group(1))
        raise AssertionError(f"unexpected condition {action!r}")

    def branch(message, index, action):
        nonlocal pos
        taken, text = False, ""
        while True:
            hit = (not taken) and holds(action, message, index)
            body = block(message, index)
            if hit:
                taken, text = True, body
            action = parts[pos][2:-2].strip()
            pos += 1
            if action == "end":
                return text

    return block(None, None)


@pytest.mark.parametrize("family", sorted(gguf_export.OLLAMA_TEMPLATES))
@pytest.mark.parametrize("system", [True, False])
def test_modelfile_template_renders_like_the_chat_template(tokenizer, family, system):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = templates.TEMPLATES[family]  # rendering only: the markers need not be tokens here
    messages = conversation(7, system=system, turns=2)["messages"] + [{"role": "user", "content": "And 2 + 2?"}]
    add_bos = False  # SmolLM2's tokenizer adds no BOS: the template writes all of it
    text = go_render(gguf_export.ollama_template(family, tok.eos_token, add_bos, tok.bos_token), messages)
    assert text == render(tok, messages, add_generation_prompt=True)


def test_a_template_with_a_default_system_turn_maps_to_its_family_and_that_system(tokenizer):
    """SmolLM2's own template writes a system turn when a conversation has none; Ollama puts the Modelfile's
    SYSTEM first in such a conversation, so TEMPLATE chatml + SYSTEM renders exactly the same prompt."""
    family, default = gguf_export.template_family(tokenizer)
    assert family == "chatml" and default == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = gguf_export.ollama_template(family, tokenizer.eos_token, False, tokenizer.bos_token)
    for system in (True, False):
        messages = conversation(3, system=system, turns=2)["messages"] + [{"role": "user", "content": "More?"}]
        ollama = messages if system else [{"role": "system", "content": default}, *messages]
        assert go_render(template, ollama) == render(tokenizer, messages, add_generation_prompt=True)
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert gguf_export.template_family(tok) == (None, None)  # no known equivalent: no TEMPLATE


def test_a_literal_bos_is_left_to_the_runtime_when_the_file_adds_one():
    text = gguf_export.ollama_template("llama3", "<|eot_id|>", True, "<|begin_of_text|>")
    assert text.startswith("{{ range .Messages }}<|start_header_id|>")


# C. Bad input: exit 2, one line, nothing written


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, *words):
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.output
    for word in words:
        assert word in line, line
    return line


@pytest.mark.parametrize(
    "quant,words", [("q4_k_m", ["K-quant", "llama-quantize"]), ("q3", ["--quant", "q8_0"]), ("Q6_K", ["K-quant"])]
)
def test_bad_quant_is_refused_before_loading(tmp_path, tiny_model_dir, quant, words):
    refused(export(tiny_model_dir, tmp_path / "out", "--quant", quant), *words)
    assert not (tmp_path / "out").exists()


def test_bad_format_and_unknown_architecture_are_refused(tmp_path, tmp_path_factory, tokenizer, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    result = runner.invoke(app, ["export", str(tiny_model_dir), "--format", "onnx", "-o", str(tmp_path / "o")])
    refused(result, "--format", "gguf")
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    refused(export(folder, tmp_path / "out"), "gpt2", "llama, mistral, qwen2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_prompt_tuning_adapter_is_refused(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "PROMPT_TUNING", "base_model_name_or_path": str(tiny_model_dir), "num_virtual_tokens": 2}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": torch.zeros(2, 64)}, str(adapter / "adapter_model.safetensors"))
    refused(export(adapter, tmp_path / "out"), "virtual tokens")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_a_users_folder_is_never_replaced(tmp_path, tiny_model_dir):
    out = tmp_path / "gguf"
    out.mkdir()
    (out / ".ftune").write_text(json.dumps({"kind": "gguf", "files": ["old.gguf"]}))
    (out / "old.gguf").write_bytes(b"old")
    before = snapshot(out)
    refused(export(tiny_model_dir, out), "--overwrite")
    assert snapshot(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("my thesis")
    refused(export(tiny_model_dir, mine, "--overwrite"), "thesis.txt", "did not write")
    assert snapshot(mine) == {"thesis.txt": b"my thesis"}
