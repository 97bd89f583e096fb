"""Perplexity over a corpus: exp(total NLL / total scored tokens), never a mean of per-example values."""

from __future__ import annotations

import math

from finetune_cli.data.masking import IGNORE


def corpus_nll(model, examples: list[dict], batch_size: int = 8, pad_token_id: int = 0) -> dict:
    """Sum the NLL of every learned token (labels != -100) in float64; batches are length-sorted."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    with torch.no_grad():
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
            targets = labels[:, 1:].to(device)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            nll = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((targets != IGNORE).sum())
    if was_training:
        model.train()
    loss = total / count if count else float("nan")
    return {"tokens": count, "nll": total, "loss": loss, "perplexity": math.exp(loss) if count else float("nan")}
