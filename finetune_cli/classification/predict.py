"""A classifier's class probabilities for examples, batched, and what they score against the labels."""

from __future__ import annotations

from typing import Callable

from finetune_cli.classification.inputs import Collator


def probabilities(
    model, examples: list[dict], collate: Collator, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
) -> tuple[list[list[float]], float | None]:
    """(each example's class probabilities, mean cross-entropy over the examples that have a label or None), at
    the model's own precision also inside bf16 training (perplexity._without_autocast)."""
    import torch

    from finetune_cli.evaluation.perplexity import _without_autocast

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, nll, labelled = [], 0.0, 0
    with torch.no_grad(), _without_autocast(model):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            probs += torch.softmax(logits, dim=-1).tolist()
            known = labels >= 0
            if known.any():
                nll += float(torch.nn.functional.cross_entropy(logits[known], labels[known], reduction="sum"))
                labelled += int(known.sum())
            if on_batch:
                on_batch(len(labels))
    if was_training:
        model.train()
    return probs, (nll / labelled if labelled else None)


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def score(model, examples: list[dict], names: list[str], collate: Collator, batch_size: int = 8, on_batch=None):
    """(the metrics report with the loss, each example's probabilities) for labelled examples."""
    from finetune_cli.classification import metrics

    probs, loss = probabilities(model, examples, collate, batch_size, on_batch)
    report = metrics.report([e["label"] for e in examples], [argmax(p) for p in probs], names)
    return {"loss": loss, **report}, probs
