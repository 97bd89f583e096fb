"""Perplexity over a corpus: exp(total NLL / total scored tokens), never a mean of per-example values.

Chat examples are scored on exactly the tokens training learns (same template, same masks); plain
text on every token after the first, with a sliding window when it is longer than the context.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from finetune_cli import models, rundir
from finetune_cli.data import cache, jsonl
from finetune_cli.data.masking import IGNORE
from finetune_cli.errors import FtuneError


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


def run(
    target: str,
    data: list[str] = (),
    base_only: bool = False,
    compare_base: bool = False,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    progress: Callable[[int], Callable[[int], None]] = lambda total: None,
) -> dict:
    """Score TARGET (run directory, adapter or model folder, base name) on its eval data or `data`.

    `progress(total_examples)` returns a per-batch callback, called once per scored model."""
    found = rundir.open_target(target)
    recipe = found.recipe
    if (compare_base or base_only) and found.kind == "model":
        raise FtuneError(f"--compare-base and --base need a run directory or an adapter; {target} is a model")
    if data:
        names = [str(f) for f in data]
        d = recipe.data if recipe else None
        # extra data is read the way the run reads its own: its format, columns and system prompt
        read = (lambda f: jsonl.read(f, d.format, d.columns, d.system_prompt)) if d else jsonl.read
        records = [r for f in data for r in read(f)]
    else:
        names, records = _run_eval_data(recipe, target)
    tokenizer = models.load_tokenizer(
        found.tokenizer, trust_remote_code=found.trust_remote_code, require_template=False
    )
    context = max_length or (recipe.data.max_length if recipe else 2048)
    train_on = recipe.data.train_on if recipe else "assistant"
    if any("messages" in r for r in records) and not tokenizer.chat_template:
        raise FtuneError(f"{target}: the model has no chat template, so chat data cannot be scored")
    stride = stride or default_stride(context)
    if not 0 < stride <= context:
        raise FtuneError(f"--stride must be between 1 and the context length ({context})")
    examples = build_examples(tokenizer, records, context, train_on, stride, recipe.data.cache if recipe else True)[0]
    if not examples:
        raise FtuneError(f"{', '.join(names)}: no scorable tokens (every example is fully masked or empty)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(model) -> dict:
        return corpus_nll(model, examples, batch_size, pad, progress(len(examples)))

    def load(weights: str):
        return models.load_model(weights, found.dtype, found.trust_remote_code)

    results = {}
    if found.kind == "model":
        results["model"] = score(load(found.weights))
    elif found.adapter is None:  # full fine-tuning: two separate models
        if compare_base or base_only:
            results["base"] = score(load(models.resolve(found.base)))
        if not base_only:
            results["tuned"] = score(load(found.weights))
    else:  # one base model, scored with the adapter and with it switched off
        from peft import PeftModel

        model = PeftModel.from_pretrained(load(found.weights), str(found.adapter))
        if compare_base or base_only:
            with model.disable_adapter():
                results["base"] = score(model)
        if not base_only:
            results["tuned"] = score(model)
    out = {
        "target": str(target),
        "base": found.base or str(target),
        "data": names,
        "data_sha256": [_sha256(f) for f in data] if data else None,
        "context": context,
        "stride": stride,
        "results": results,
    }
    if "base" in results and "tuned" in results:
        b, t = results["base"]["perplexity"], results["tuned"]["perplexity"]
        out["change"] = {"perplexity": t - b, "relative": (t - b) / b}
    if found.run_dir:
        rundir.save_evaluation(found.run_dir, out)
    return out


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_eval_data(recipe, target: str) -> tuple[list[str], list[dict]]:
    """The run's own eval data: its eval file, or the same held-out split training used."""
    if recipe is None:
        raise FtuneError(f"{target} is a model, not a run: pass the data to score with --data FILE.jsonl")
    d = recipe.data
    if d.eval:
        return [d.eval], jsonl.read(d.eval, d.format, d.columns, d.system_prompt)
    if d.eval_split:
        held = jsonl.load(d, recipe.training.seed)[1]
        return [f"training data (eval_split {d.eval_split})"], held
    raise FtuneError(f"{target}: the run's recipe has no eval data; pass --data FILE.jsonl")
