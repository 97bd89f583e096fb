"""`ftune export --format gguf`: a run or model written as one GGUF file (llama.cpp, Ollama, LM Studio) with the
`gguf` package (llama.cpp's own gguf-py), a Modelfile and a README, then read back and checked.

Conversion follows llama.cpp's convert_hf_to_gguf.py where it matters: tensor names from gguf's TensorNameMap,
the Q/K row permutation of the llama layout, 1-D tensors and norms kept in F32, no output tensor for tied
embeddings, rope/norm/context hyper-parameters, and the BPE pre-tokenizer named by the hash of how the tokenizer
splits llama.cpp's probe text. Everything bad is refused before the model is loaded.

The check loads the written file with transformers' own GGUF reader and compares its next-token distributions with
the source model's (merged in float32) on a probe text: mean KL divergence, and top-1 agreement at the positions
where the source is confident. A failed check exits 1 and writes nothing.
"""

from __future__ import annotations

import gc
import re
import resource
import time
from hashlib import sha256
from pathlib import Path

from finetune_cli import files, rundir
from finetune_cli.errors import FAILED, FtuneError
from finetune_cli.results import ExportCheck, ExportResult

# quant name -> (GGMLQuantizationType name, LlamaFileType name, largest mean KL divergence (nats) from the source
# model's next-token distributions the check accepts, least top-1 agreement it accepts at confident positions).
# Measured on the probe text with the SmolLM2-135M quickstart run (README, "What the GGUF check measures"): correct
# files gave mean KL 0.00001 (f16), 0.0002 (bf16), 0.0024 (q8_0), 0.18 (q5_0), 0.63 (q4_0) and agreement 1.0, 1.0,
# 1.0, 0.89, 0.70; broken q8_0 conversions gave mean KL 1.2 (layers 3 and 4's ffn_down swapped) to 7 (q_proj of
# two layers swapped; Q/K permutation skipped: 3.8) and agreement 0.59 down to 0.06. f16 to q8_0 thresholds sit
# about 10x above a correct file, so they catch every broken file measured; 4/5-bit blocks cost a 135M model
# nearly as much as a swap of two middle layers, so their thresholds (about 3x a correct file) catch only grosser
# breakage (permutation, swapped attention or late layers). q5_1 and q4_1 (finer) share q5_0's and q4_0's.
QUANTS = {
    "f32": ("F32", "ALL_F32", 0.001, 0.99),
    "f16": ("F16", "MOSTLY_F16", 0.001, 0.99),
    "bf16": ("BF16", "MOSTLY_BF16", 0.005, 0.98),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", 0.03, 0.98),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0", 0.6, 0.75),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1", 0.6, 0.75),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", 2.0, 0.5),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1", 2.0, 0.5),
}
# A position is confident when the source model's top token is at least this much more probable than its second.
# Nearer ties flip under any rounding (a 135M model has many on any text), so they say nothing about the file.
MARGIN = 0.1
# model_type -> gguf architecture; llama.cpp converts Mistral with its llama graph (same layout, same permutation)
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
_PERMUTED = {"llama", "mistral"}  # rotary in the interleaved llama layout: q/k rows reordered as llama.cpp does

# llama.cpp's probe text and the pre-tokenizers it recognises by the hash of its token ids (convert_hf_to_gguf.py,
# get_vocab_base_pre); only these BPE pre-tokenizers are written, anything else is refused.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
# The probe the check compares on: a conversation rendered with the model's own template, then plain prose (where
# a model predicts confidently), digits, unicode and runs of whitespace.
_PROBE_CHAT = [
    {"role": "user", "content": "Order 12 x scarf (orange) for Zoë Müller, deliver to Lisbon by Friday."},
    {"role": "assistant", "content": '{"name": "Zoë Müller", "item": "scarf", "quantity": 12, "city": "Lisbon"}'},
]
_PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time, there was a little girl who lived in a "
    "village near the forest. Whenever she went out, the little girl wore a red riding cloak, so everyone in the "
    "village called her Little Red Riding Hood. One morning, she asked her mother if she could go to visit her "
    "grandmother, as it had been a while since they had seen each other.\n\n"
    "Numbers: 3 33 333 3.14159 2024-05-17, 1,000,000.   Tabs\tand   spaces\n\n\n"
    "Unicode: 我想在apple工作, нещо на Български, café, naïve, 😀🚀."
)


def export(target: str, out: str, quant: str = "q8_0", overwrite: bool = False, check: bool = True) -> ExportResult:
    """Write TARGET as DIR/<name>-<quant>.gguf with a Modelfile and a README; check it unless `check` is False."""
    quant = _check_quant(quant)
    folder = Path(out).expanduser()
    found = rundir.open_target(target)
    if found.adapter is not None:
        from finetune_cli.export import check_lora

        check_lora(found.adapter)
    config = _check_config(found)
    rundir.check_output(folder, "gguf", overwrite, "--output")
    from finetune_cli import models

    tokenizer = models.load_tokenizer(found.tokenizer, None, found.trust_remote_code, require_template=False)
    vocab = _vocab(tokenizer, config.vocab_size, target)  # refuses SentencePiece and unknown pre-tokenizers

    started = time.perf_counter()
    from finetune_cli.export import merged_model

    # float32: the adapter is merged and every tensor converted from full precision, as llama.cpp's converter does
    model, tokenizer = merged_model(found, "float32")
    name = _safe_name(found)
    filename = f"{name}-{quant}.gguf"
    family, default_system = template_family(tokenizer)
    eot = _end_of_turn(tokenizer)
    probe = _probe_ids(tokenizer) if check else None
    expected = _log_probs(model, probe) if check else None
    with files.temporary_folder(folder) as tmp:
        plan = _write(tmp / filename, model, config, tokenizer, vocab, quant, name, found, eot)
        del model
        gc.collect()
        size = (tmp / filename).stat().st_size
        _check_file(tmp / filename, plan, config, tokenizer, eot)
        system = _system_prompt(found) or default_system
        files.write_text(tmp / "Modelfile", modelfile(filename, tokenizer, family, eot, system))
        result_check = None
        if check:
            result_check = _check_runtime(tmp, filename, tokenizer, probe, expected, quant)
        files.write_text(tmp / "README.md", _readme(found, filename, quant, family, result_check, config))
        rundir.check_output(folder, "gguf", overwrite, "--output")  # again: something may have appeared meanwhile
        rundir.replace_folder(tmp, folder, "gguf", [p.name for p in tmp.iterdir()])
    return ExportResult(
        output=str(folder),
        file=str(folder / filename),
        format="gguf",
        quant=quant,
        architecture=config.model_type,
        base=found.base or found.weights,
        method=(found.method or {}).get("name") if found.adapter is not None else None,
        template=family,
        end_of_turn=[tokenizer.convert_ids_to_tokens(i) for i in eot],
        tensors=len(plan),
        size_bytes=size,
        seconds=round(time.perf_counter() - started, 2),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        check=result_check,
    )


def _check_quant(quant: str) -> str:
    q = quant.lower()
    if q in QUANTS:
        return q
    if re.fullmatch(r"(q[2-6]_k(_[sml])?|iq\w+|tq\w+)", q):
        raise FtuneError(
            f"--quant: {quant} is a K-quant (or i-quant), which only llama.cpp's C code can compute; export "
            f"f16 or q8_0 and run llama.cpp's `llama-quantize FILE.gguf OUT.gguf {quant.upper()}`"
        )
    raise FtuneError(f"--quant: {quant!r}; expected one of {', '.join(QUANTS)}")


def _check_config(found: rundir.Target):
    """The model's config: a supported architecture with plain rope, refused before any weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(found.weights, trust_remote_code=found.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loading failure is one line naming the model
        raise FtuneError(f"{found.weights}: cannot read the model's config ({exc})") from None
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise FtuneError(
            f"{found.name}: architecture '{kind}' cannot be exported to GGUF by ftune; supported: "
            f"{', '.join(ARCHS)} (for others use llama.cpp's convert_hf_to_gguf.py on a merged folder)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise FtuneError(
            f"{found.name}: rope scaling '{rope_type}' is not exported by ftune yet (default, linear, llama3); "
            "use llama.cpp's convert_hf_to_gguf.py on a merged folder (ftune merge-adapter)"
        )
    return config


def _vocab(tokenizer, vocab_size: int, target: str) -> dict:
    """Tokens, scores, token types and tokenizer model for the file: GPT-2-style byte-level BPE as llama.cpp's
    get_vocab_base writes it (model `gpt2`, with `tokenizer.ggml.pre`), or SentencePiece-style BPE with byte
    fallback (Llama 2, Mistral v0.1-v0.3, TinyLlama) as its SentencePiece vocabularies (model `llama`)."""
    import gguf

    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _spm_vocab(tokenizer, spec, vocab_size, target)
    if model.get("type") != "BPE":
        kind = model.get("type") or "slow (no tokenizer.json)"
        raise FtuneError(
            f"{target}: its tokenizer is {kind}, which ftune does not export to GGUF; supported: byte-level BPE "
            "(SmolLM2, Llama 3, Qwen2) and SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1-v0.3)"
        )
    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    pre = _PRE.get(chkhsh)
    if pre is None:
        raise FtuneError(
            f"{target}: llama.cpp does not know this tokenizer's pre-tokenizer (hash {chkhsh[:16]}...); without "
            f"it llama.cpp would split text differently. Known: {', '.join(sorted(set(_PRE.values())))}"
        )
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab_size, len(tokenizer))):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return {"model": "gpt2", "tokens": tokens, "types": types, "pre": pre}


def _tokenizer_json(tokenizer) -> dict:
    """The fast tokenizer's own serialization (model, normalizer, pre-tokenizer), {} for a slow tokenizer."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _tokenizer_model(tokenizer) -> str:
    """`tokenizer.ggml.model` for this tokenizer: `llama` (SentencePiece-style) or `gpt2` (byte-level BPE)."""
    model = _tokenizer_json(tokenizer).get("model", {})
    return "llama" if model.get("type") == "BPE" and model.get("byte_fallback") else "gpt2"


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE = "\u2581"  # SentencePiece's visible space


def _spm_vocab(tokenizer, spec: dict, vocab_size: int, target: str) -> dict:
    """A SentencePiece-style tokenizer (BPE with byte fallback on ▁-escaped text) as llama.cpp's SentencePiece
    vocabularies are written: every id in order with a score and a type; no merges.

    llama.cpp's SPM tokenizer (and transformers' GGUF loader, which rebuilds merges from the scores) merges first
    the adjacent pair whose joined text is the token with the highest score. A tokenizer.json converted from a
    SentencePiece model lists its merges in that order (by the merged piece's score), so a token's score here is
    minus one minus the rank of the first merge that produces it: score order is merge order. Tokens no merge
    produces (single characters) score below all of them; byte and control tokens score 0, as a SentencePiece model
    stores them, and added (user-defined) and padding tokens -1000, as llama.cpp's converter writes them. No
    `tokenizer.model` is read: these scores give the same merge order as its own, and most fine-tuned folders
    have only tokenizer.json."""
    import gguf

    prefix = _spm_prefix(spec, target)
    first_merge: dict[str, int] = {}
    for merge in spec["model"].get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        first_merge.setdefault(left + right, len(first_merge))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    unmerged = len(first_merge)
    tokens, scores, types = [], [], []
    for i in range(max(vocab_size, len(tokenizer))):
        token = reverse.get(i)
        if token is None:
            token, score, kind = f"[PAD{i}]", -1000.0, gguf.TokenType.UNUSED
        elif i in added:
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            score = 0.0 if special else -1000.0
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        elif _BYTE_TOKEN.fullmatch(token):
            score, kind = 0.0, gguf.TokenType.BYTE
        elif token in first_merge:
            score, kind = -1.0 - first_merge[token], gguf.TokenType.NORMAL
        else:
            score, kind, unmerged = -1.0 - unmerged, gguf.TokenType.NORMAL, unmerged + 1
        tokens.append(token)
        scores.append(score)
        types.append(kind)
    if types.count(gguf.TokenType.BYTE) != 256:
        raise FtuneError(
            f"{target}: its SentencePiece-style tokenizer has {types.count(gguf.TokenType.BYTE)} byte tokens "
            "(<0x00>..<0xFF>), not 256: llama.cpp could not encode characters outside its vocabulary"
        )
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "space_prefix": prefix != "never"}


def _spm_prefix(spec: dict, target: str) -> str:
    """How the tokenizer escapes spaces and adds SentencePiece's leading ▁: 'first' (at the start of the text),
    'always' (before every run of text, also after special tokens), 'legacy' (as 'always', but even before a
    leading space, as sentencepiece itself and llama.cpp do) or 'never'. Anything else is refused: llama.cpp
    only escapes spaces as ▁ and adds that prefix."""
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    kinds = [(s.get("type"), s.get("prepend"), s.get("content"), (s.get("pattern") or {}).get("String")) for s in steps]
    if pre is None and kinds in (
        [("Prepend", _SPACE, None, None), ("Replace", None, _SPACE, " ")],
        [("Replace", None, _SPACE, " ")],
    ):
        return "legacy" if len(kinds) == 2 else "never"
    if not steps and pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE:
        if pre.get("split", True):
            raise FtuneError(
                f"{target}: its tokenizer splits text at every ▁ before merging (Metaspace split=true), which "
                "llama.cpp's SentencePiece tokenizer does not do; it would split text differently"
            )
        return pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
    raise FtuneError(
        f"{target}: its SentencePiece-style tokenizer normalizes or pre-tokenizes text in a way llama.cpp does not "
        f"(normalizer {[k[0] for k in kinds]}, pre-tokenizer {(pre or {}).get('type')}); it would split text "
        "differently"
    )


def _source_space_prefix(loaded, tokenizer) -> None:
    """Where SentencePiece's leading ▁ goes is not stored in a GGUF: llama.cpp adds it before every run of text
    (at the start and after each special token), as sentencepiece does; transformers' GGUF loader only at the start
    (the non-legacy Llama tokenizer). For a source that does otherwise (Mistral's `legacy: true`), the check splits
    the probe with the source's own rule, so that it compares what the file holds: tokens, scores, special tokens.
    `_spm_prefix` admitted only the shapes that differ in that rule, so nothing else is copied."""
    if _tokenizer_model(tokenizer) == "llama":
        loaded.backend_tokenizer.normalizer = tokenizer.backend_tokenizer.normalizer
        loaded.backend_tokenizer.pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer


def _end_of_turn(tokenizer) -> list[int]:
    from finetune_cli.data.masking import end_of_turn_ids

    return end_of_turn_ids(tokenizer)


def _safe_name(found: rundir.Target) -> str:
    source = found.run_dir or Path(found.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(source)).name).strip("-.") or "model"


def _gguf_name(hf_name: str, tensor_map) -> str:
    name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise FtuneError(f"GGUF export: no GGUF name for tensor {hf_name}")
    return name


def _qtype(gguf_name: str, shape: tuple, quant: str):
    """The GGML type of one tensor: llama.cpp's converter keeps 1-D tensors and norms in F32, and falls back to
    F16 where a row does not split into the quant's blocks."""
    import gguf

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _permute(w, n_head: int):
    """llama.cpp's LlamaModel.permute: HF's rotary halves -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, config):
    """(HF name, tensor getter) in the model's order; the tied output head is not written (llama.cpp reuses the
    embedding for it)."""
    tied = getattr(config, "tie_word_embeddings", False)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, param in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue

        def get(p=param, n=hf_name):
            w = p.detach().float().cpu().numpy()
            if config.model_type in _PERMUTED and n.endswith("self_attn.q_proj.weight"):
                w = _permute(w, n_head)
            elif config.model_type in _PERMUTED and n.endswith("self_attn.k_proj.weight"):
                w = _permute(w, n_kv)
            return w

        yield hf_name, tuple(param.shape), get


def _write(path: Path, model, config, tokenizer, vocab: dict, quant: str, name: str, found, eot: list[int]) -> dict:
    """Write the file tensor by tensor: every tensor's info first, then each converted and written in turn, so at
    most one converted tensor is in memory besides the model. Returns {gguf name: (shape, type)}."""
    import gguf
    import numpy as np

    arch = gguf.MODEL_ARCH[ARCHS[config.model_type]]
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _metadata(writer, config, quant, name, found)
    _tokenizer_metadata(writer, tokenizer, vocab, eot)
    plan, getters = {}, []
    for hf_name, shape, get in _tensors(model, config):
        gname = _gguf_name(hf_name, tensor_map)
        qtype = _qtype(gname, shape, quant)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(gname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        plan[gname] = (shape, qtype.name)
        getters.append((get, qtype))
    factors = _rope_factors(config)
    if factors is not None:  # Llama 3.1+: llama.cpp divides each rotary frequency by its factor
        gname = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor_info(gname, factors.shape, factors.dtype, factors.nbytes)
        plan[gname] = (tuple(factors.shape), gguf.GGMLQuantizationType.F32.name)
        getters.append((lambda: factors, gguf.GGMLQuantizationType.F32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for get, qtype in getters:
            data = get()
            if qtype == gguf.GGMLQuantizationType.F32:
                data = data.astype(np.float32)
            elif qtype == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            else:
                data = gguf.quants.quantize(data, qtype)
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return plan


def _rope_factors(config):
    """For llama3 rope scaling, the per-frequency divisors llama.cpp reads from its `rope_freqs` tensor: the
    default inverse frequencies over transformers' own llama3-scaled ones. None for other rope types."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    default = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return (default / scaled.double().numpy()).astype(np.float32)


def _metadata(writer, config, quant: str, name: str, found) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if found.base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(found.base))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer_metadata(writer, tokenizer, vocab: dict, eot: list[int]) -> None:
    """Tokens and types; merges (gguf's SpecialVocab reads them from the saved tokenizer) for byte-level BPE, scores
    for SentencePiece-style vocabularies (llama.cpp's convert_hf_to_gguf.py writes `default` as their pre-tokenizer
    and no merges); the special ids and flags of the tokenizer training used, its end-of-turn token and chat
    template."""
    import logging
    import tempfile

    import gguf

    spm = vocab["model"] == "llama"
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre("default" if spm else vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if spm:
        writer.add_token_scores(vocab["scores"])
        if not vocab["space_prefix"]:  # llama.cpp adds SentencePiece's leading space unless told not to
            writer.add_add_space_prefix(False)
    writer.add_token_types(vocab["types"])
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        quiet = logging.getLogger("gguf.vocab")  # it warns about the pair template of Llama's post-processor
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            special = gguf.SpecialVocab(scratch, load_merges=not spm, n_vocab=len(vocab["tokens"]))
        finally:
            quiet.setLevel(level)
    if not spm and not special.merges:
        raise FtuneError("GGUF export: the tokenizer has no BPE merges")
    # the ids the loaded tokenizer uses (a run's tokenizer may have set pad = eos), not what its files imply
    special.special_token_ids = {
        kind: tid
        for kind, tid in {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id,
            "eot": eot[-1] if eot else None,
        }.items()
        if tid is not None
    }
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": bos is not None and ids[:1] == [bos],
        "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
    }
    special.chat_template = tokenizer.chat_template or None
    special.add_to_gguf(writer, quiet=True)


def _check_file(path: Path, plan: dict, config, tokenizer, eot: list[int]) -> None:
    """Read the file back: every tensor with its shape and type, and the metadata llama.cpp needs to run it."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    found = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    expected = {n: (tuple(s), q) for n, (s, q) in plan.items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
        raise FtuneError(f"GGUF check failed: tensors read back differ from those written: {wrong}", FAILED)
    fields = reader.fields

    def value(key):
        field = fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    wanted = {
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.embedding_length": config.hidden_size,
        "tokenizer.ggml.model": _tokenizer_model(tokenizer),
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.eot_token_id": eot[-1] if eot else None,
        "tokenizer.chat_template": tokenizer.chat_template or None,
    }
    wrong = {k: (value(k), v) for k, v in wanted.items() if value(k) != v}
    n_tokens = max(config.vocab_size, len(tokenizer))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if key in fields and len(fields[key].data) != n_tokens:
            wrong[key] = (f"{len(fields[key].data)} entries", f"{n_tokens} entries")
    if wrong:
        raise FtuneError(f"GGUF check failed: metadata read back differs (found, expected): {wrong}", FAILED)


def _probe_text(tokenizer) -> str:
    from finetune_cli.data.masking import render

    try:
        chat = render(tokenizer, _PROBE_CHAT) if tokenizer.chat_template else ""
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation: prose only
        chat = ""
    return chat + _PROBE_TEXT


def _probe_ids(tokenizer) -> list[int]:
    return tokenizer(_probe_text(tokenizer), add_special_tokens=False)["input_ids"]


def _log_probs(model, ids: list[int]):
    """The model's next-token log-probabilities at every position of `ids`, in float32."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def compare(source, other) -> tuple[float, int, float]:
    """(mean KL divergence KL(source || other) of the next-token distributions, in nats; the number of confident
    positions, where the source's top token is at least MARGIN more probable than its second; the share of those
    where `other` predicts the same top token, 1.0 where there are none) for two [positions, vocab] log-prob
    tensors. A lossy file moves probabilities a little everywhere (small KL) and flips only near ties; a broken one
    moves them a lot and flips confident predictions."""
    p = source.exp()
    kl = (p * (source - other)).sum(-1).mean().item()
    top = p.topk(2, -1)
    confident = top.values[:, 0] - top.values[:, 1] >= MARGIN
    same = (top.indices[:, 0] == other.argmax(-1))[confident]
    return kl, len(same), same.float().mean().item() if len(same) else 1.0


class CheckFailed(FtuneError):
    """The file was written but does not compute what the source model does; `check` holds the figures."""

    def __init__(self, message: str, check: ExportCheck):
        super().__init__(f"GGUF check failed: {message}; nothing was written", FAILED)
        self.check = check


def _apply_rope_freqs(model, path: Path) -> None:
    """transformers' GGUF loader ignores the `rope_freqs` tensor; apply the file's factors as llama.cpp does (each
    rotary frequency divided by its factor) so the check runs what llama.cpp would."""
    import torch
    from gguf import GGUFReader

    tensor = next((t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return
    factors = torch.tensor(tensor.data.copy(), dtype=torch.float32)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rotary = model.model.rotary_emb
    rotary.inv_freq = (default / factors.double()).float()
    rotary.original_inv_freq = rotary.inv_freq


def _check_runtime(folder: Path, filename: str, tokenizer, probe: list[int], expected, quant: str):
    """transformers' own GGUF loader (an independent reader) must tokenize like the source tokenizer, and its
    next-token distributions on the probe text must be as close to the source's (`expected`, log-probs) as the
    quant's thresholds allow."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_cli import models

    models.quiet_gguf_loader()
    try:
        loaded_tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a file transformers cannot read is a failed export
        raise FtuneError(f"GGUF check failed: transformers cannot load the file ({exc})", FAILED) from None
    _apply_rope_freqs(loaded, folder / filename)
    _source_space_prefix(loaded_tokenizer, tokenizer)
    ids = loaded_tokenizer(_probe_text(tokenizer), add_special_tokens=False)["input_ids"]
    tokens_equal = ids == probe
    got = _log_probs(loaded, probe)
    del loaded
    gc.collect()
    kl, confident, agreement = compare(expected, got)
    max_kl, least = QUANTS[quant][2:]
    check = ExportCheck(
        tokens_equal=tokens_equal,
        positions=len(probe),
        kl=round(kl, 6),
        kl_threshold=max_kl,
        confident_positions=confident,
        agreement=round(agreement, 4),
        agreement_threshold=least,
        passed=tokens_equal and kl <= max_kl and agreement >= least,
    )
    if not tokens_equal:
        first = next((i for i, (a, b) in enumerate(zip(ids, probe)) if a != b), min(len(ids), len(probe)))
        raise CheckFailed(
            f"the file's tokenizer splits the probe text differently from the model's (first difference at token "
            f"{first})",
            check,
        )
    if not check.passed:
        raise CheckFailed(
            f"next-token distributions differ from the source model's more than {quant} rounding does (mean KL "
            f"divergence {kl:.4f}, at most {max_kl}; top-1 agreement {agreement:.3f} at {confident} confident "
            f"positions, at least {least}): the conversion is broken",
            check,
        )
    return check


# Ollama (Go text/template) equivalents of ftune's builtin templates, for conversations that end with a user turn
# (Ollama appends the model's reply). Ollama gives a Messages template every message, system ones included, and
# `.System`, the system messages joined; a Modelfile's SYSTEM becomes the first message when a request has none.
# {{ $.BOS }} and {{ $.EOS }} are replaced by the tokenizer's own tokens when the Modelfile is written.
_FIRST_TURN_SYSTEM = "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}"  # system text opens turn one
OLLAMA_TEMPLATES = {
    "chatml": (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|>{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": (
        '{{ $.BOS }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] '
        + _FIRST_TURN_SYSTEM
        + '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }} {{ .Content }}{{ $.EOS }}{{ end }}{{ end }}'
    ),
    "gemma": (
        '{{ $.BOS }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
        + _FIRST_TURN_SYSTEM
        + '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
        "<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    ),
    "zephyr": "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{{ $.EOS }}\n{{ end }}<|assistant|>\n",
    "alpaca": (
        '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        "{{ else }}### Response:\n{{ .Content }}{{ $.EOS }}\n\n{{ end }}{{ end }}### Response:\n"
    ),
}
_PROBES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}],
]


def template_family(tokenizer) -> tuple[str | None, str | None]:
    """(family, default system prompt): the builtin template family whose rendering equals the tokenizer's chat
    template on conversations with and without a system message, where a template that writes a system turn of
    its own when there is none (SmolLM2's) counts as the family with that default; (None, None) if none does."""
    from finetune_cli.data import templates
    from finetune_cli.data.masking import render

    current = tokenizer.chat_template
    if not current:
        return None, None
    try:
        wanted = [render(tokenizer, m, add_generation_prompt=True) for m in _PROBES]
    except Exception:  # noqa: BLE001 - a template that cannot render these has no known equivalent
        return None, None
    mark = "\x00SYSTEM\x00"
    for family in OLLAMA_TEMPLATES:
        tokenizer.chat_template = templates.TEMPLATES[family]
        try:
            bare = _PROBES[2]
            before, _, after = render(tokenizer, [{"role": "system", "content": mark}, *bare], True).partition(mark)
            default = None
            alone = wanted[2]
            if render(tokenizer, bare, True) != alone and alone.startswith(before) and alone.endswith(after):
                default = alone[len(before) : len(alone) - len(after)] or None
            system = [{"role": "system", "content": default}] if default else []
            got = [render(tokenizer, m if m[0]["role"] == "system" else system + m, True) for m in _PROBES]
        except Exception:  # noqa: BLE001
            got = None
        finally:
            tokenizer.chat_template = current
        if got == wanted:
            return family, default
    return None, None


def ollama_template(family: str, eos: str, add_bos: bool, bos: str | None) -> str:
    """The Ollama TEMPLATE for a family; a literal BOS is left to the runtime when the GGUF says to add one."""
    text = OLLAMA_TEMPLATES[family].replace("{{ $.EOS }}", eos).replace("{{ $.BOS }}", bos or "")
    if add_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def modelfile(filename: str, tokenizer, family: str | None, eot: list[int], system: str | None) -> str:
    """Ollama's Modelfile: the file, its TEMPLATE where ftune knows an equivalent, one stop per end-of-turn token,
    and the system prompt: the recipe's, else the one the chat template writes when a conversation has none."""
    lines = [f"FROM ./{filename}", ""]
    if family is not None:
        ids = tokenizer("a")["input_ids"]
        add_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
        template = ollama_template(family, tokenizer.eos_token, add_bos, tokenizer.bos_token)
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: this chat template has no known Ollama equivalent; Ollama uses the GGUF's own.", ""]
    for tid in eot:
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(tid)}"')
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def _system_prompt(found: rundir.Target) -> str | None:
    recipe = found.recipe
    return getattr(getattr(recipe, "data", None), "system_prompt", None) if recipe is not None else None


def _readme(found: rundir.Target, filename: str, quant: str, family, check, config) -> str:
    import json

    base = found.base or found.weights
    lines = [
        f"# {filename}",
        "",
        f"GGUF ({quant}) of {'a ' + found.method.get('name', 'lora') + ' fine-tune of ' if found.adapter else ''}"
        f"`{base}` ({config.model_type}), written by `ftune export --format gguf` from `{found.name}`"
        f"{' (adapter merged in float32 first)' if found.adapter else ''}.",
        "",
        "## Run it",
        "",
        "```bash",
        f"llama-cli -m {filename} -cnv          # llama.cpp: chat with the model's own chat template",
        f"llama-server -m {filename} --jinja    # llama.cpp: OpenAI-compatible server",
        "ollama create my-model -f Modelfile && ollama run my-model",
        "```",
        "",
        f"LM Studio: put `{filename}` under its models folder (`~/.lmstudio/models/ftune/<name>/`) or use "
        "`lms import " + filename + "`; it reads the chat template and stop token from the file.",
        "",
        "The file carries the chat template training used (`tokenizer.chat_template`) and its end-of-turn token "
        "(`tokenizer.ggml.eot_token_id`), so chat modes stop after a reply.",
    ]
    if family is None:
        lines += ["", "The Modelfile has no TEMPLATE (no known Ollama equivalent): Ollama uses the GGUF's own."]
    if check is not None:
        lines += [
            "",
            "## Check",
            "",
            f"Read back with transformers' GGUF loader and compared with the source model on {check.positions} "
            f"tokens of probe text: tokenization identical: {check.tokens_equal}; mean KL divergence of the "
            f"next-token distributions {check.kl:.6f} (at most {check.kl_threshold}); same top token at "
            f"{check.agreement:.4f} of {check.confident_positions} confident positions (at least "
            f"{check.agreement_threshold}).",
        ]
    if found.adapter is not None and found.method:
        lines += ["", "## Method", "", "```json", json.dumps(found.method, indent=2), "```"]
    run = found.run_dir
    if run is not None and (run / rundir.RECIPE).is_file():
        lines += ["", "## Recipe", "", "```yaml", (run / rundir.RECIPE).read_text(encoding="utf-8").rstrip(), "```"]
    lines += rundir.evaluation_markdown(run)
    return "\n".join(lines) + "\n"
