"""`ftune eval --generate`: the prompt and reference answer of each eval conversation, and
the generated answers (`inference.generate.replies`) scored against the references with the standard packages
(sacrebleu, rouge-score, json), never reimplemented; accuracy and macro F1 when the references are a closed set of
labels (instruction-style classification), defined as scikit-learn's.

The prompt of each conversation is its messages up to the last assistant turn, rendered with the chat template
training used; the reference is that turn's content.
"""

from __future__ import annotations

import json

from finetune_cli.errors import FtuneError

METRICS = ("exact_match", "bleu", "chrf", "rouge_l", "json_valid", "json_match", "accuracy", "macro_f1")
_JSON_METRICS = ("json_valid", "json_match")
_LABEL_METRICS = ("accuracy", "macro_f1")


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
    """The metrics to compute: `wanted`, or all that apply (the JSON ones when every reference is JSON, the label
    ones when the references are a closed set of labels)."""
    from finetune_cli.classification import metrics

    is_json = all(_json(r) is not None for r in references)
    is_labels = metrics.closed_set(references) is not None
    if wanted is None:
        return [m for m in METRICS if (is_json or m not in _JSON_METRICS) and (is_labels or m not in _LABEL_METRICS)]
    if not is_json and any(m in _JSON_METRICS for m in wanted):
        raise FtuneError("--metrics json_valid/json_match: the reference answers are not all JSON objects or arrays")
    if not is_labels and any(m in _LABEL_METRICS for m in wanted):
        raise FtuneError(
            "--metrics accuracy/macro_f1: the reference answers are not a closed set of labels (at most 20 distinct "
            "short one-line answers, fewer than half the examples); use exact_match for free-form answers"
        )
    return wanted


def _json(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def score(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Each metric over the whole set: fractions for exact_match, rouge_l, the JSON and the label ones, 0-100 for
    BLEU/chrF."""
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
    if "accuracy" in names or "macro_f1" in names:
        from finetune_cli.classification import metrics

        labels = metrics.label_scores(predictions, references, metrics.closed_set(references))
        out.update({m: labels[m] for m in _LABEL_METRICS if m in names})
    return {k: round(v, 6) for k, v in out.items()}
