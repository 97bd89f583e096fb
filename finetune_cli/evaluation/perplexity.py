"""Perplexity over a corpus: exp(total NLL / total scored tokens), never a mean of per-example values.

Chat examples are scored on exactly the tokens training learns (same template, same masks); plain
text on every token after the first, with a sliding window when it is longer than the context. Training's
eval and `ftune eval` both score with these functions, so their numbers agree.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

from finetune_cli.data import cache
from finetune_cli.data.masking import IGNORE


def windows(ids: list[int], context: int, stride: int) -> list[dict]:
    """Sliding-window examples over one long sequence: every token after the first is scored exactly once,
    with up to `context - stride` tokens of left context that are not scored again."""
    out, scored_until = [], 1  # position 0 has no left context and is never scored
    begin = 0
    while True:
        end = min(begin + context, len(ids))
        labels = [IGNORE if pos < scored_until else tok for pos, tok in enumerate(ids[begin:end], begin)]
        out.append({"input_ids": ids[begin:end], "labels": labels})
        scored_until = end
        if end == len(ids):
            return out
        begin += stride


def default_stride(context: int) -> int:
    """Half the context: each scored token keeps at least half a window of left context."""
    return max(1, context // 2)


def build_examples(
    tokenizer, records: list[dict], max_length: int, train_on: str, stride: int, use_cache: bool = True
) -> tuple[list[dict], dict]:
    """Token ids and labels for chat records (training's masks) and text records (sliding windows), and counts.
    Training's eval and `ftune eval` both score these, so their numbers agree."""
    chats = [r for r in records if "messages" in r]
    examples, stats = cache.tokenize(tokenizer, chats, max_length, train_on, use_cache)
    for r in records:
        if "text" in r:
            ids = tokenizer(r["text"])["input_ids"]
            if len(ids) > 1:
                scored = windows(ids, max_length, stride)
                examples += scored
                stats["examples"] += len(scored)
                stats["tokens"] += sum(len(w["input_ids"]) for w in scored)
                stats["learned_tokens"] += len(ids) - 1
    return examples, stats


def corpus_nll(
    model, examples: list[dict], batch_size: int = 8, pad_token_id: int = 0, on_batch: Callable[[int], None] = None
) -> dict:
    """Sum the NLL of every scored token (labels != -100); batches are length-sorted, padded on the right."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    with torch.no_grad(), _without_autocast(model):
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[row, :n] = torch.tensor(e["input_ids"])
                labels[row, :n] = torch.tensor(e["labels"])
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits[:, -width:]  # prompt tuning prepends virtual tokens' logits
            targets = labels[:, 1:].to(device)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            nll = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((targets != IGNORE).sum())
            if on_batch:
                on_batch(len(batch))
    if was_training:
        model.train()
    loss = total / count if count else float("nan")
    return {"tokens": count, "nll": total, "loss": loss, "perplexity": math.exp(loss) if count else float("nan")}


@contextmanager
def _without_autocast(model):
    """Score at the model's own precision, also inside bf16/fp16 training: accelerate wraps a prepared model's
    forward in autocast (keeping the plain one as `_original_forward`), which would make eval during training
    differ from eval before it and from `ftune eval` by the dtype alone."""
    plain = getattr(model, "_original_forward", None)
    if plain is None or "forward" not in vars(model):
        yield
        return
    wrapped = model.forward
    model.forward = plain
    try:
        yield
    finally:
        model.forward = wrapped
