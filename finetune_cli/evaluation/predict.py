"""`ftune eval --generate`: answers generated for the eval conversations, scored against the reference answers
with the standard packages (sacrebleu, rouge-score, json), never reimplemented.

The prompt of each conversation is its messages up to the last assistant turn, rendered with the chat template
training used; the reference is that turn's content. Generation is batched: prompts sorted by length, left
padded, decoded with the KV cache by transformers' `generate`, each row ending at the template's end-of-turn
token; a reply is decoded exactly as `ftune generate` decodes it, so greedy batched answers equal one-at-a-time
answers (a test holds them equal).
"""

from __future__ import annotations

import json
from typing import Callable

from finetune_cli.data.masking import end_of_turn_ids, render
from finetune_cli.errors import FtuneError
from finetune_cli.generate import sampling_kwargs

METRICS = ("exact_match", "bleu", "chrf", "rouge_l", "json_valid", "json_match")
_JSON_METRICS = ("json_valid", "json_match")


def check_metrics(spec: str | None) -> list[str] | None:
    """The metric names of `--metrics a,b` (None: every metric that applies); checked before any model loads."""
    if spec is None:
        return None
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise FtuneError(f"--metrics: unknown metric {', '.join(unknown) or repr(spec)}; valid: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def split(records: list[dict], where: str) -> tuple[list[list[dict]], list[str]]:
    """(prompts, references): each conversation up to its last assistant turn, and that turn's content."""
    prompts, references, missing = [], [], 0
    for record in records:
        messages = record.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0)
        if last == 0:  # no assistant turn, or nothing before it to answer
            missing += 1
            continue
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
    if missing:
        raise FtuneError(
            f"{where}: {missing} of {len(records)} examples have no assistant turn after a prompt (text-only or "
            "prompt-only data); --generate needs a reference answer to compare with: use chat data"
        )
    return prompts, references


def metrics_for(references: list[str], wanted: list[str] | None) -> list[str]:
    """The metrics to compute: `wanted`, or all that apply (the JSON ones when every reference is JSON)."""
    is_json = all(_json(r) is not None for r in references)
    if wanted is None:
        return [m for m in METRICS if is_json or m not in _JSON_METRICS]
    if not is_json and any(m in _JSON_METRICS for m in wanted):
        raise FtuneError("--metrics json_valid/json_match: the reference answers are not all JSON objects or arrays")
    return wanted


def _json(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def score(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Each metric over the whole set: fractions for exact_match, rouge_l and the JSON ones, 0-100 for BLEU/chrF."""
    out: dict[str, float] = {}
    n = len(references)
    if "exact_match" in names:
        out["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    if "bleu" in names or "chrf" in names:
        import sacrebleu

        if "bleu" in names:
            out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
        if "chrf" in names:
            out["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    if "rouge_l" in names:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        out["rouge_l"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n
    if "json_valid" in names or "json_match" in names:
        parsed = [_json(p) for p in predictions]
        if "json_valid" in names:
            out["json_valid"] = sum(p is not None for p in parsed) / n
        if "json_match" in names:
            out["json_match"] = sum(p is not None and p == _json(r) for p, r in zip(parsed, references)) / n
    return {k: round(v, 6) for k, v in out.items()}


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[list[str], int]:
    """(replies in the order of `prompts`, generated tokens): batches of similar length, left padded."""
    import torch

    encoded = [
        tokenizer(render(tokenizer, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    eot = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]
    kwargs = sampling_kwargs(do_sample, temperature, top_p, seed)
    device = next(model.parameters()).device
    replies: list[str] = [""] * len(encoded)
    generated = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eot,
                **kwargs,
            )
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in eot), None)
            new = new if end is None else new[: end + 1]  # up to its end-of-turn token, as one-at-a-time stops
            generated += len(new)
            replies[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        progress(len(rows))
    if was_training:
        model.train()
    return replies, generated
