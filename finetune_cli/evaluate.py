"""`ftune eval`: perplexity of a run, adapter, model folder or base model on its eval data or other data."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from finetune_cli import models, rundir
from finetune_cli.data import jsonl
from finetune_cli.errors import FtuneError
from finetune_cli.perplexity import build_examples, corpus_nll, default_stride
from finetune_cli.results import Change, EvalResult


def run(
    target: str,
    data: list[str] = (),
    base_only: bool = False,
    compare_base: bool = False,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    progress: Callable[[int], Callable[[int], None]] = lambda total: None,
) -> EvalResult:
    """Score TARGET (run directory, adapter or model folder, base name) on its eval data or `data`.

    `progress(total_examples)` returns a per-batch callback, called once per scored model."""
    found = rundir.open_target(target)
    recipe = found.recipe
    if (compare_base or base_only) and found.kind == "model":
        raise FtuneError(f"--compare-base and --base need a run directory or an adapter; {target} is a model")
    if data:
        names = [str(Path(f).resolve()) for f in data]  # one eval.json entry per file, however it is named
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
    out = EvalResult(
        target=str(target),
        base=found.base or str(target),
        data=names,
        data_sha256=[_sha256(f) for f in data] if data else None,
        context=context,
        stride=stride,
        results=results,
    )
    if "base" in results and "tuned" in results:
        b, t = results["base"]["perplexity"], results["tuned"]["perplexity"]
        out.change = Change(perplexity=t - b, relative=(t - b) / b)
    if found.run_dir:
        rundir.save_evaluation(found.run_dir, out.dump())
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
