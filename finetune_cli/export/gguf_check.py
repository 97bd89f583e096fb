"""The GGUF file read back and checked: its tensors and the metadata llama.cpp needs, then
transformers' own GGUF loader (an independent reader) must tokenize the probe text as the source does
and predict the next tokens as closely as the quant's thresholds allow.
"""

from __future__ import annotations

import gc
from pathlib import Path

from finetune_cli.errors import FAILED, FtuneError
from finetune_cli.export.gguf_vocab import _source_space_prefix, _tokenizer_model
from finetune_cli.export.gguf_writer import QUANTS
from finetune_cli.results import ExportCheck

# A position is confident when the source model's top token is at least this much more probable than its second.
# Nearer ties flip under any rounding (a 135M model has many on any text), so they say nothing about the file.
MARGIN = 0.1


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
