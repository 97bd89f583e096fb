"""The GGUF file's vocabulary: BPE (with the pre-tokenizer named by the hash of how the tokenizer
splits llama.cpp's probe text; anything else is refused) or SentencePiece, and the tokenizer metadata.
"""

from __future__ import annotations

import re
from hashlib import sha256

from finetune_cli.errors import FtuneError

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
