"""`ftune eval`: perplexity of a run, adapter, model folder or base model on its eval data or other data, and with
`--generate` task metrics of the answers it generates (finetune_cli.evaluation.predict)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from finetune_cli import models, rundir
from finetune_cli.data import jsonl, preference, sources
from finetune_cli.errors import FtuneError
from finetune_cli.evaluation import pairwise
from finetune_cli.evaluation.perplexity import build_examples, corpus_nll, default_stride
from finetune_cli.reports import page
from finetune_cli.results import Change, EvalResult, GenerateEval, PairChange


def run(
    target: str,
    data: list[str] = (),
    base_only: bool = False,
    compare_base: bool = False,
    batch_size: int = 8,
    max_length: int | None = None,
    stride: int | None = None,
    progress: Callable[[int], Callable[[int], None]] = lambda total: None,
    predictions: str | None = None,
) -> EvalResult:
    """Score TARGET (run directory, adapter or model folder, base name) on its eval data or `data`: perplexity, pair
    metrics, or a classifier's metrics (with each row's prediction in `predictions`, by default the run's
    predictions file).

    `progress(total_examples)` returns a per-batch callback, called once per scored model."""
    found = rundir.open_target(target)
    recipe = found.recipe
    if found.task:
        return _classifier(found, target, data, base_only or compare_base, batch_size, progress, predictions, stride)
    if predictions is not None:
        raise FtuneError("--predictions needs --generate (or a classifier, whose predictions eval writes)")
    if (compare_base or base_only) and found.kind == "model":
        raise FtuneError(f"--compare-base and --base need a run directory or an adapter; {target} is a model")
    names, records = _records(found, target, data)
    tokenizer = models.load_tokenizer(
        found.tokenizer, trust_remote_code=found.trust_remote_code, require_template=False
    )
    context = max_length or (recipe.data.max_length if recipe else 2048)
    train_on = recipe.data.train_on if recipe else "assistant"
    pairs = preference.is_pairs(records)
    if any("messages" in r or "chosen" in r for r in records) and not tokenizer.chat_template:
        raise FtuneError(f"{target}: the model has no chat template, so chat data cannot be scored")
    if any(preference.is_reply(r) for r in records):
        raise FtuneError(f"{', '.join(names)}: labelled replies (KTO) have no pair metrics; score preference pairs")
    if pairs and not all("chosen" in r for r in records):
        raise FtuneError(f"{', '.join(names)}: preference pairs and other data cannot be scored together")
    stride = None if pairs else stride or default_stride(context)
    if stride is not None and not 0 < stride <= context:
        raise FtuneError(f"--stride must be between 1 and the context length ({context})")
    if pairs:  # the pair metrics (accuracy, margin) on the tokens DPO scores
        system = recipe.data.system_prompt if recipe else None
        examples = preference.tokenize_all(tokenizer, records, context, system)[0]
    else:
        use_cache = recipe.data.cache if recipe else True
        examples = build_examples(tokenizer, records, context, train_on, stride, use_cache)[0]
    if not examples:
        raise FtuneError(f"{', '.join(names)}: no scorable tokens (every example is fully masked or empty)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    measure = pairwise.pair_metrics if pairs else corpus_nll

    def score(model) -> dict:
        return measure(model, examples, batch_size, pad, progress(len(examples)))

    results = each_model(found, score, compare_base or base_only, tuned=not base_only)
    out = EvalResult(
        target=str(target),
        base=found.base or str(target),
        data=names,
        data_sha256=[_sha256(f) for f in data] if data else None,
        context=context,
        stride=stride,
        results=results,
    )
    if "base" in results and "tuned" in results and pairs:
        b, t = results["base"], results["tuned"]
        out.change = PairChange(accuracy=t["accuracy"] - b["accuracy"], margin=t["margin"] - b["margin"])
    elif "base" in results and "tuned" in results:
        b, t = results["base"]["perplexity"], results["tuned"]["perplexity"]
        out.change = Change(perplexity=t - b, relative=(t - b) / b)
    if found.run_dir:
        rundir.save_evaluation(found.run_dir, out.dump())
        page.refresh_report(found.run_dir)  # report.html shows the result saved
    return out


def run_generate(
    target: str,
    data: list[str] = (),
    compare_base: bool = False,
    metrics: list[str] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    predictions: str | None = None,
    sampling: dict | None = None,
    progress: Callable[[int], Callable[[int], None]] = lambda total: None,
) -> GenerateEval:
    """`ftune eval --generate`: generate an answer to each eval conversation and score it against the reference
    with `metrics` (None: all that apply), for the tuned model and with `compare_base` the base too."""
    import time

    from finetune_cli import files
    from finetune_cli.evaluation import predict
    from finetune_cli.inference import generate

    found = rundir.open_target(target)
    if found.task:
        raise FtuneError(
            f"{target} is a classifier: it answers with a class, not generated text; drop --generate (ftune eval "
            "reports its accuracy and macro F1)"
        )
    if compare_base and found.kind == "model":
        raise FtuneError(f"--compare-base needs a run directory or an adapter; {target} is a model")
    out_path = _predictions_path(predictions)
    names, records = _records(found, target, data)
    if not predictions:  # the run's own file for this data set, replaced only by the same evaluation
        out_path = found.run_dir / _predictions_name(found.recipe, names) if found.run_dir else None
    prompts, references = predict.split(records, ", ".join(names))
    metrics = predict.metrics_for(references, metrics)
    tokenizer = models.load_tokenizer(found.tokenizer, trust_remote_code=found.trust_remote_code)
    sampling = sampling or {}

    def answer(model) -> tuple[list[str], float]:
        started = time.perf_counter()
        replies, tokens = generate.replies(
            model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress(len(prompts)), **sampling
        )
        return replies, tokens / max(time.perf_counter() - started, 1e-9)

    answered = each_model(found, answer, compare_base)
    answers = {name: replies for name, (replies, _) in answered.items()}
    speed = {name: rate for name, (_, rate) in answered.items()}
    results = {name: predict.score(replies, references, metrics) for name, replies in answers.items()}
    if out_path is not None:
        main = answers.get("tuned", answers.get("model"))
        rows = []
        for i, (prompt, reference) in enumerate(zip(prompts, references)):
            row = {"index": i, "prompt": prompt, "reference": reference, "prediction": main[i]}
            if "base" in answers:
                row["base_prediction"] = answers["base"][i]
            rows.append(json.dumps(row, ensure_ascii=False))
        files.write_text(out_path, "\n".join(rows) + "\n")
    out = GenerateEval(
        kind="generate",
        target=str(target),
        base=found.base or str(target),
        data=names,
        data_sha256=[_sha256(f) for f in data] if data else None,
        examples=len(prompts),
        max_new_tokens=max_new_tokens,
        greedy=not sampling.get("do_sample", False),
        metrics=metrics,
        results=results,
        tokens_per_second={k: round(v, 2) for k, v in speed.items()},
        predictions=str(out_path) if out_path is not None else None,
    )
    if "base" in results and "tuned" in results:
        out.change = {m: round(results["tuned"][m] - results["base"][m], 6) for m in metrics}
    if found.run_dir:
        saved = out.dump()
        if out_path is not None:  # eval.json names it from the run folder, so it resolves from anywhere
            saved["predictions"] = _from_run(found.run_dir, out_path)
        rundir.save_evaluation(found.run_dir, saved)
        page.refresh_report(found.run_dir)  # report.html shows the result saved
    return out


def each_model(found: rundir.Target, score: Callable, base: bool = False, tuned: bool = True) -> dict:
    """`score(model)` for each model an evaluation compares, loaded as ftune loads them: {"model": ...} for a model
    folder or name, else "base" (when `base`) and "tuned" (when `tuned`). A full run's base and model are two
    models; an adapter is loaded once on its base and scored with it switched off and on."""
    results = {}

    def load(weights: str):
        return models.load_model(weights, found.dtype, found.trust_remote_code)

    if found.kind == "model":
        results["model"] = score(load(found.weights))
    elif found.adapter is None:  # full fine-tuning: two separate models
        if base:
            results["base"] = score(load(models.resolve(found.base)))
        if tuned:
            results["tuned"] = score(load(found.weights))
    else:  # one base model, scored with the adapter and with it switched off
        from peft import PeftModel

        model = PeftModel.from_pretrained(load(found.weights), str(found.adapter))
        if base:
            with model.disable_adapter():
                results["base"] = score(model)
        if tuned:
            results["tuned"] = score(model)
    return results


def _classifier(found, target, data, base, batch_size, progress, predictions, stride) -> EvalResult:
    """A classifier's eval: accuracy, macro F1, per-class figures and confusion, its predictions written."""
    from finetune_cli.evaluation import classifier

    if base:
        raise FtuneError(
            f"{target} is a classifier: its base model has no trained head, so --base and --compare-base would "
            "score a random one (the run's run.json holds that chance baseline as eval_before)"
        )
    if stride is not None:
        raise FtuneError("--stride applies to perplexity; a classifier reads each text whole (up to max_length)")
    out_path = _predictions_path(predictions)
    names, records = _records(found, target, data)
    if out_path is None and found.run_dir is not None:
        out_path = found.run_dir / _predictions_name(found.recipe, names)
    out = classifier.evaluate(found, target, names, records, batch_size, out_path, progress)
    out.data_sha256 = [_sha256(f) for f in data] if data else None
    if found.run_dir:
        saved = out.dump()
        if out_path is not None:
            saved["predictions"] = _from_run(found.run_dir, out_path)
        rundir.save_evaluation(found.run_dir, saved)
        page.refresh_report(found.run_dir)  # report.html shows the result saved
    return out


def _predictions_path(predictions: str | None) -> Path | None:
    """--predictions: a new file in an existing folder (ftune never overwrites a file it did not write)."""
    if not predictions:
        return None
    out_path = Path(predictions).expanduser()
    if not out_path.parent.is_dir():
        raise FtuneError(f"--predictions: the folder {out_path.parent} does not exist")
    if out_path.exists() or out_path.is_symlink():
        raise FtuneError(f"--predictions: {out_path} already exists; ftune never overwrites a file it did not write")
    return out_path


def _predictions_name(recipe, names: list[str]) -> str:
    """The name of a run's answers on data `names`: predictions.jsonl for its own eval data, else
    predictions-<first file's name without its extension>-<the first 8 hex digits of the sha256 of the data's
    resolved paths, one a line>.jsonl: one file per data set, as eval.json keeps one result per data set."""
    if recipe is not None and names == _run_eval_names(recipe):
        return rundir.PREDICTIONS
    stem = re.sub(r"[^\w.-]+", "_", Path(names[0]).stem)[:40].strip("._") or "data"
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"predictions-{stem}-{digest}.jsonl"  # rundir.OTHER_PREDICTIONS: a name a run folder may hold


def _from_run(run_dir: Path, path: Path) -> str:
    """`path` relative to the run folder when inside it, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def _records(found: rundir.Target, target: str, data: list[str]) -> tuple[list[str], list[dict]]:
    """(names, records) of the data to evaluate: `data` read the way the run reads its own (its format, columns
    and system prompt), or the run's own eval data."""
    recipe = found.recipe
    if not data:
        return _run_eval_data(recipe, target)
    names = [f if f.startswith(sources.HUB_PREFIX) else str(Path(f).resolve()) for f in data]  # one entry per file
    d = recipe.data if recipe else None
    read = (lambda f: jsonl.read(f, d.format, d.columns, d.system_prompt)) if d else jsonl.read
    return names, [r for f in data for r in read(f)]


def _sha256(path: str | Path) -> str:
    """A file's or folder's sha256; for an hf: dataset its commit (a local one's fingerprint)."""
    found = sources.identity(str(path))
    return found.get("sha256") or found.get("commit") or found["fingerprint"]


def _run_eval_names(recipe) -> list[str] | None:
    """How eval.json names the run's own eval data: its eval file, or its held-out split; None without either."""
    d = recipe.data
    if d.eval:
        return [d.eval_source().path]
    if d.eval_split:
        return [f"training data (eval_split {d.eval_split})"]
    return None


def _run_eval_data(recipe, target: str) -> tuple[list[str], list[dict]]:
    """The run's own eval data: its eval file, or the same held-out split training used."""
    if recipe is None:
        raise FtuneError(f"{target} is a model, not a run: pass the data to score with --data FILE.jsonl")
    d, names = recipe.data, _run_eval_names(recipe)
    if d.eval:
        source = d.eval_source()
        return names, jsonl.read(source, source.format, source.columns, d.system_prompt)
    if d.eval_split:
        return names, jsonl.load(d, recipe.training.seed)[1]
    raise FtuneError(f"{target}: the run's recipe has no eval data; pass --data FILE.jsonl")
