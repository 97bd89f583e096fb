"""Pair metrics of preference data (DPO/ORPO): `accuracy`, how often the chosen reply is the more likely one,
and `margin`, the mean difference of their summed log-probabilities. Training's eval and `ftune eval` report them.
"""

from __future__ import annotations

from typing import Callable


def reply_logps(
    model, examples: list[dict], batch_size: int = 8, pad_token_id: int = 0, on_batch: Callable[[int], None] = None
) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probabilities of each pair's scored reply tokens given its prompt."""
    import torch

    from finetune_cli.evaluation.perplexity import _without_autocast

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = [(e["prompt_ids"], e[key]) for e in examples for key in ("chosen_ids", "rejected_ids")]
    sums = []
    with torch.no_grad(), _without_autocast(model):
        for start in range(0, len(rows), 2 * batch_size):
            batch = rows[start : start + 2 * batch_size]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (prompt, reply) in enumerate(batch):
                n = len(prompt) + len(reply)
                ids[row, :n] = torch.tensor(prompt + reply)
                mask[row, :n] = 1
                scored[row, len(prompt) : n] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -width:]
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token = logps.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            sums += (token.double() * scored[:, 1:].to(device)).sum(dim=1).tolist()
            if on_batch:
                on_batch(len(batch) // 2)
    if was_training:
        model.train()
    return list(zip(sums[0::2], sums[1::2]))


def pair_metrics(model, examples: list[dict], batch_size: int = 8, pad_token_id: int = 0, on_batch=None) -> dict:
    """`accuracy`: the fraction of pairs whose chosen reply is more likely than the rejected one; `margin`: the
    mean difference of their summed log-probabilities."""
    pairs = reply_logps(model, examples, batch_size, pad_token_id, on_batch)
    diffs = [c - r for c, r in pairs]
    return {
        "pairs": len(pairs),
        "accuracy": sum(d > 0 for d in diffs) / len(diffs) if diffs else float("nan"),
        "margin": sum(diffs) / len(diffs) if diffs else float("nan"),
        "chosen_logps": sum(c for c, _ in pairs) / len(pairs) if pairs else float("nan"),
        "rejected_logps": sum(r for _, r in pairs) / len(pairs) if pairs else float("nan"),
    }
