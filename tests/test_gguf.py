"""`ftune export --format gguf`: files checked against independent readers (gguf-py's GGUFReader for metadata,
transformers' own GGUF loader for tokenizer and weights), the Modelfile's TEMPLATE rendered and compared with the
chat template, and bad input refused before anything is written."""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune_cli.cli import app
from finetune_cli.data import templates
from finetune_cli.data.masking import render
from finetune_cli.export import gguf_check, gguf_ollama, gguf_vocab, gguf_writer
from tests.conftest import ROOT, conversation, tiny_model, write_jsonl

runner = CliRunner()
BAR = "Converting and de-quantizing"  # transformers' GGUF loader's progress bar: never in non-debug output


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


def test_llama_f16_round_trip_tokenizer_weights_and_metadata(tmp_path, monkeypatch, tiny_model_dir, tokenizer):
    out = tmp_path / "gguf"
    result = export(tiny_model_dir, out, "--quant", "f16")
    info = exported(result)
    assert info["check"]["tokens_equal"] and info["check"]["passed"] and BAR not in result.stderr
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
    probe = gguf_check._probe_text(tokenizer)
    assert "<|im_start|>" in probe and "我想" in probe and "1,000,000" in probe and "   " in probe and "\t" in probe
    # SmolLM2's own template is ChatML that writes a default system turn: TEMPLATE chatml, SYSTEM that default
    modelfile = (out / "Modelfile").read_text()
    assert info["template"] == "chatml" and "<|im_start|>{{ .Role }}" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    # a .gguf as the model of a command is converted by transformers' loader too: no progress bar there either
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["generate", str(gguf_file), "--prompt", "Hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "gguf").is_dir() and BAR not in result.stderr


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
    gguf_check._apply_rope_freqs(loaded, Path(info["file"]))
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
    """Mistral runs on llama.cpp's llama graph: same names, permutation and types as a llama file. The whole model
    read back by transformers (as a llama) gives the source Mistral's logits to within f16 rounding."""
    from transformers import AutoModelForCausalLM

    source = tiny(tmp_path_factory, tokenizer, "mistral")
    info = exported(export(source, tmp_path / "gguf", "--quant", "f16", "--no-check"))
    assert info["architecture"] == "mistral" and info["check"] is None
    meta = fields(Path(info["file"]))
    assert meta["general.architecture"] == "llama" and set(meta["tensors"].values()) == {"F16", "F32"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=Path(info["file"]).name)
    ids = tokenizer(gguf_check._PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(source)(ids).logits
        got = loaded(ids).logits
    assert want.std() > 0.05 and (got - want).abs().max() < 2e-3


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


# The check on a real model: the demo's default export passes and computes what plain PEFT's merge computes; a
# broken conversion fails it (exit 1, nothing written). The quickstart run is shared and trained once per session.


def eval_log_probs(model, tokenizer):
    """Next-token log-probs on the first 4 quickstart eval conversations, chat-templated (about 430 tokens)."""
    rows = (ROOT / "recipes" / "data" / "quickstart" / "eval.jsonl").read_text().splitlines()[:4]
    text = "".join(tokenizer.apply_chat_template(json.loads(r)["messages"], tokenize=False) for r in rows)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].float(), -1)


def mean_kl(p, q) -> float:
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.slow
def test_demo_export_passes_and_computes_what_plain_peft_merged_computes(
    tmp_path, quickstart_run, builtin_dir, tokenizer
):
    """The command `make demo` prints (default q8_0) on the quickstart run (trained at fp32 here; the bf16-trained
    demo run is measured in README). The file, loaded by transformers' GGUF reader, against PEFT's own merge
    (PeftModel.merge_and_unload, no ftune code) and against the base, on the eval conversations."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = quickstart_run[0]
    out = tmp_path / "gguf"
    result = runner.invoke(app, ["export", str(run), "--format", "gguf", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and BAR not in result.stderr
    (gguf_file,) = out.glob("*-q8_0.gguf")
    loaded = eval_log_probs(AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(builtin_dir)
    base_lp = eval_log_probs(base, tokenizer)
    peft = eval_log_probs(PeftModel.from_pretrained(base, run / "adapter").merge_and_unload(), tokenizer)
    to_peft, to_base = mean_kl(peft, loaded), mean_kl(peft, base_lp)
    assert to_peft < to_base / 20, (to_peft, to_base)
    same = (loaded.argmax(-1) == peft.argmax(-1)).float().mean().item()
    assert same > 0.95 and same > (base_lp.argmax(-1) == peft.argmax(-1)).float().mean().item() + 0.1


def swapped(first: str, second: str):
    """gguf_writer._tensors with two tensors' data exchanged (same shape, names kept): a broken converter."""
    real = gguf_writer._tensors

    def tensors(model, config):
        items = list(real(model, config))
        get = {name: g for name, _, g in items}
        for name, shape, g in items:
            yield name, shape, get[second] if name == first else get[first] if name == second else g

    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["q/k permutation skipped", "two layers' ffn_down swapped"])
def test_a_broken_conversion_fails_the_check_exit_1_nothing_written(tmp_path, monkeypatch, quickstart_run, broken):
    if broken.startswith("q/k"):
        monkeypatch.setattr(gguf_writer, "_permute", lambda w, n_head: w)
    else:
        layers = "model.layers.{}.mlp.down_proj.weight"
        monkeypatch.setattr(gguf_writer, "_tensors", swapped(layers.format(3), layers.format(4)))
    out = tmp_path / "exports" / "gguf"
    result = export(quickstart_run[0], out)  # the default q8_0, with --json
    assert result.exit_code == 1, result.output
    failed = json.loads(result.stdout)  # --json: the error and the check's figures on stdout too
    assert failed["exit_code"] == 1 and failed["error"].startswith("GGUF check failed")
    assert result.stderr.strip().splitlines()[-1] == f"error: {failed['error']}" and "Traceback" not in result.output
    check = failed["check"]
    assert check["tokens_equal"] and not check["passed"] and check["kl"] > 10 * check["kl_threshold"]
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []  # no file, no temporary folder


# SentencePiece-style tokenizers (Llama 2, Mistral v0.1-v0.3, TinyLlama): BPE with byte fallback over ▁-escaped text

SPACE = "\u2581"
# Strings the round trip must split exactly like the source: special tokens, unicode (ß, 日本, the emoji and ✅ are
# not in the training text: byte fallback), digits, runs of whitespace, leading spaces.
SPM_STRINGS = [
    "<s>[INST] Zoë's order: 12 x scarf [/INST] Done.</s>[INST] Next?",
    "Ελληνικά, нещо на Български, 我想在apple工作, café naïve Müller",
    "ß 日本 🦙🦙 ✅ straße",
    "3 33 333 3333 1,000,000 3.14159 2024-05-17",
    "a  b   c    d\t\te\n\n\nf     ",
    "  two leading spaces",
    " one leading space",
    "</s>after the end<s>",
]


def spm_corpus() -> list[str]:
    """About 11 KB of generated text: English-like syllables, accented Latin, Cyrillic, Greek, CJK, digits."""
    import random

    rng = random.Random(0)
    syllables = "the an in er on re at st en ka to ri mu sel qu ing ou pl Zo ë ü é ç на що ли бъ λέ ξη κα 我 想 在 工作"
    pieces = syllables.split() + ["Ελληνικά", "Български", "apple", "café", "naïve"]
    lines = [gguf_check._PROBE_TEXT]
    for _ in range(300):
        words = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(3, 9))]
        words += [str(rng.randint(0, 9999))] * rng.randint(0, 1)
        rng.shuffle(words)
        gap = rng.choice(["", "  ", "\t"])
        lines.append(" ".join(words[:3]) + gap + " " + " ".join(words[3:]) + rng.choice(".,!?:;"))
    return lines


def spm_tokenizer():
    """A tiny tokenizer shaped as Llama 2's and Mistral's tokenizer.json are: BPE with byte_fallback over text whose
    spaces are ▁ and which starts with ▁ (Metaspace, no split at ▁), <unk> <s> </s> then the 256 <0xXX> byte
    tokens, ~1.2k tokens trained here (words kept apart while training, as sentencepiece does); a
    LlamaTokenizerFast with ftune's mistral chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(spm_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]  # the byte tokens as plain vocabulary, only <unk> <s> </s> added
    tok = Tokenizer(
        models.BPE(model["vocab"], [tuple(m) for m in model["merges"]], unk_token="<unk>", byte_fallback=True)
    )
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=templates.TEMPLATES["mistral"],
    )


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A tiny random llama (as Llama 2 and TinyLlama: transformers loads their tokenizer as LlamaTokenizer) with the
    SentencePiece-style tokenizer, its embedding padded to a multiple of 64 (ids past the tokenizer's are written
    as UNUSED [PAD] tokens)."""
    tok = spm_tokenizer()
    folder = tiny_model(tmp_path_factory.mktemp("tiny-spm"), tok, "llama", vocab_size=-(-len(tok) // 64) * 64)
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["byte_fallback"]
    return folder


def spm_encode(tokens: list[str], scores: list[float], text: str) -> list[int]:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session in llama-vocab.cpp) on ▁-escaped text: merge the
    adjacent pair whose joined text is the token with the highest score (ties: leftmost), until none is left; a
    symbol that is no token falls back to its bytes."""
    import heapq

    index = {t: i for i, t in enumerate(tokens)}
    symbols = list(text)
    after = list(range(1, len(symbols))) + [-1]
    before = list(range(-1, len(symbols) - 1))
    queue = []

    def bigram(left, right):
        if left >= 0 and right >= 0 and symbols[left] + symbols[right] in index:
            joined = symbols[left] + symbols[right]
            heapq.heappush(queue, (-scores[index[joined]], left, right, len(joined)))

    for i in range(1, len(symbols)):
        bigram(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
            continue
        symbols[left], symbols[right] = symbols[left] + symbols[right], ""
        after[left] = after[right]
        if after[right] >= 0:
            before[after[right]] = left
        bigram(before[left], left)
        bigram(left, after[left])
    ids, i = [], 0 if symbols else -1
    while i >= 0:
        if symbols[i] in index:
            ids.append(index[symbols[i]])
        else:
            ids.extend(index[f"<0x{b:02X}>"] for b in symbols[i].encode())
        i = after[i]
    return ids


def test_sentencepiece_llama_f16_round_trip_tokenizer_scores_and_metadata(tmp_path, spm_model):
    import gguf
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(spm_model)
    out = tmp_path / "gguf"
    info = exported(export(spm_model, out, "--quant", "f16"))
    check = info["check"]
    assert check["tokens_equal"] and check["passed"] and check["positions"] > 200
    assert info["architecture"] == "llama" and info["end_of_turn"] == ["</s>"]
    gguf_file = Path(info["file"])
    reader = gguf.GGUFReader(gguf_file)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.") or k.endswith("vocab_size")}
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in meta  # llama.cpp's SPM tokenizer merges by score
    tokens, scores, types = (
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.token_type"],
    )
    n_vocab = meta["llama.vocab_size"]
    assert len(tokens) == len(scores) == len(types) == n_vocab > len(source)
    assert tokens[: len(source)] == source.convert_ids_to_tokens(list(range(len(source))))
    kinds = gguf.TokenType
    assert [i for i, t in enumerate(types) if t == kinds.CONTROL] == [0, 1, 2]  # <unk> <s> </s>
    assert [tokens[i] for i, t in enumerate(types) if t == kinds.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    assert [i for i, t in enumerate(types) if t == kinds.UNUSED] == list(range(len(source), n_vocab))
    assert types.count(kinds.NORMAL) == len(source) - 259
    normal = [s for s, t in zip(scores, types) if t == kinds.NORMAL]
    assert len(set(normal)) == len(normal) and max(normal) < 0  # one merge rank each, below bytes and controls
    assert meta["tokenizer.ggml.bos_token_id"] == source.bos_token_id == 1
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == source.eos_token_id == 2
    assert meta["tokenizer.ggml.unknown_token_id"] == 0
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == templates.TEMPLATES["mistral"]
    # transformers' loader rebuilds the merges from the scores: the same ids as the source on every string, BOS too
    loaded = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file.name)
    for text in SPM_STRINGS:
        assert loaded(text)["input_ids"] == source(text)["input_ids"], text
    assert "<0xC3>" in source.tokenize(SPM_STRINGS[2]) and "<0xF0>" in source.tokenize(SPM_STRINGS[2])
    assert any(len(t) > 3 for t in source.tokenize(SPM_STRINGS[1]))  # merges at work, not bytes and characters
    # llama.cpp's own algorithm on the file's tokens and scores, on text escaped as the source escapes it (where
    # the leading ▁ goes is llama.cpp's rule, not the file's: see the legacy test below)
    for text in SPM_STRINGS[1:5] + [gguf_check._PROBE_TEXT]:
        escaped = SPACE + text.replace(" ", SPACE)
        assert spm_encode(tokens, scores, escaped) == source(text, add_special_tokens=False)["input_ids"], text


def test_sentencepiece_legacy_mistral_tokenizer_is_checked_with_its_own_space_rule(tmp_path, spm_model):
    """Mistral v0.1's tokenizer.json (`legacy: true`; transformers loads it as it is) prepends ▁ with a normalizer,
    so to the text after each special token too, as llama.cpp does; transformers' GGUF loader puts one only at the
    start of the text. The file holds no such rule, so the check splits the probe with the source's; the file's
    vocabulary and scores then give the same ids."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    folder = tiny_model(tmp_path / "mistral-v01", AutoTokenizer.from_pretrained(spm_model), "mistral")
    spec = json.loads((folder / "tokenizer.json").read_text())
    prepend = {"type": "Prepend", "prepend": SPACE}
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    spec.update(normalizer={"type": "Sequence", "normalizers": [prepend, replace]}, pre_tokenizer=None)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    source = AutoTokenizer.from_pretrained(folder)
    assert source.backend_tokenizer.normalizer is not None  # Mistral's legacy tokenizer.json, loaded as it is
    info = exported(export(folder, tmp_path / "gguf", "--quant", "f16"))
    assert info["check"]["tokens_equal"] and info["check"]["passed"]
    loaded = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=Path(info["file"]).name)
    text = "</s>[INST] after"
    assert loaded(text)["input_ids"] != source(text)["input_ids"]  # why the check applies the source's rule
    gguf_vocab._source_space_prefix(loaded, source)
    for text in SPM_STRINGS:
        assert loaded(text)["input_ids"] == source(text)["input_ids"], text
    # and llama.cpp's rule (a ▁ before each run of text, doubled before a leading space) is this tokenizer's
    reader = GGUFReader(info["file"])
    tokens, scores = (reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores"))
    for text in SPM_STRINGS[1:7]:
        escaped = SPACE + text.replace(" ", SPACE)
        assert spm_encode(tokens, scores, escaped) == source(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("change,words", [("unigram", ["Unigram", "byte-level BPE"]), ("split", ["split=true"])])
def test_tokenizers_llama_cpp_would_split_differently_are_refused(tmp_path, change, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if change == "unigram":
        tok = Tokenizer(models.Unigram([("<unk>", 0.0), (SPACE + "a", -1.0), ("a", -2.0)], unk_id=0))
    else:
        tok = Tokenizer.from_str(spm_tokenizer().backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, split=True)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    folder = tiny_model(tmp_path / "model", wrapped, "llama")
    refused(export(folder, tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


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


@pytest.mark.parametrize("family", sorted(gguf_ollama.OLLAMA_TEMPLATES))
@pytest.mark.parametrize("system", [True, False])
def test_modelfile_template_renders_like_the_chat_template(tokenizer, family, system):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = templates.TEMPLATES[family]  # rendering only: the markers need not be tokens here
    messages = conversation(7, system=system, turns=2)["messages"] + [{"role": "user", "content": "And 2 + 2?"}]
    add_bos = False  # SmolLM2's tokenizer adds no BOS: the template writes all of it
    text = go_render(gguf_ollama.ollama_template(family, tok.eos_token, add_bos, tok.bos_token), messages)
    assert text == render(tok, messages, add_generation_prompt=True)


def test_a_template_with_a_default_system_turn_maps_to_its_family_and_that_system(tokenizer):
    """SmolLM2's own template writes a system turn when a conversation has none; Ollama puts the Modelfile's
    SYSTEM first in such a conversation, so TEMPLATE chatml + SYSTEM renders exactly the same prompt."""
    family, default = gguf_ollama.template_family(tokenizer)
    assert family == "chatml" and default == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    template = gguf_ollama.ollama_template(family, tokenizer.eos_token, False, tokenizer.bos_token)
    for system in (True, False):
        messages = conversation(3, system=system, turns=2)["messages"] + [{"role": "user", "content": "More?"}]
        ollama = messages if system else [{"role": "system", "content": default}, *messages]
        assert go_render(template, ollama) == render(tokenizer, messages, add_generation_prompt=True)
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert gguf_ollama.template_family(tok) == (None, None)  # no known equivalent: no TEMPLATE


def test_a_literal_bos_is_left_to_the_runtime_when_the_file_adds_one():
    text = gguf_ollama.ollama_template("llama3", "<|eot_id|>", True, "<|begin_of_text|>")
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
