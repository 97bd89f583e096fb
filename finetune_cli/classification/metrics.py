"""Classification metrics in plain Python, defined exactly as scikit-learn's (accuracy, macro F1 over every class
including those absent from the references, per-class precision/recall/F1 with zero_division=0, confusion matrix),
so the package needs no sklearn at run time; the tests check them against sklearn itself."""

from __future__ import annotations


def _per_class(references: list[int], predictions: list[int], k: int) -> list[dict]:
    """Precision, recall, F1 and support of each class id in range(k); an id outside it (-1) counts for no class,
    so a prediction outside is a false negative of the true class only, as with sklearn's `labels=`."""
    true_pos, predicted, support = [0] * k, [0] * k, [0] * k
    for ref, pred in zip(references, predictions):
        if 0 <= ref < k:
            support[ref] += 1
        if 0 <= pred < k:
            predicted[pred] += 1
            true_pos[pred] += ref == pred
    return [
        {
            "precision": tp / p if p else 0.0,
            "recall": tp / s if s else 0.0,
            "f1": 2 * tp / (s + p) if s + p else 0.0,  # sklearn's form: 2tp / (true + predicted)
            "support": s,
        }
        for tp, p, s in zip(true_pos, predicted, support)
    ]


def report(references: list[int], predictions: list[int], names: list[str]) -> dict:
    """Accuracy, macro F1, per-class scores, the confusion matrix (rows: reference, columns: prediction) and the
    worst class with what it is most often mistaken for: the numbers a user needs to see where the head fails."""
    k, n = len(names), len(references)
    classes = _per_class(references, predictions, k)
    confusion = [[0] * k for _ in range(k)]
    for ref, pred in zip(references, predictions):
        confusion[ref][pred] += 1
    worst = None
    present = [i for i in range(k) if classes[i]["support"]]
    if present:
        i = min(present, key=lambda c: (classes[c]["f1"], -classes[c]["support"], c))
        wrong = [j for j in range(k) if j != i and confusion[i][j]]
        j = max(wrong, key=lambda c: (confusion[i][c], -c)) if wrong else None
        worst = {
            "label": names[i],
            "f1": classes[i]["f1"],
            "recall": classes[i]["recall"],
            "support": classes[i]["support"],
            "confused_with": None if j is None else names[j],
            "count": 0 if j is None else confusion[i][j],
        }
    return {
        "examples": n,
        "accuracy": sum(r == p for r, p in zip(references, predictions)) / n if n else 0.0,
        "macro_f1": sum(c["f1"] for c in classes) / k if k else 0.0,
        "per_class": dict(zip(names, classes)),
        "confusion": confusion,
        "labels": list(names),
        "worst": worst,
    }


def closed_set(references: list[str], max_labels: int = 20) -> list[str] | None:
    """The sorted distinct stripped references when they are a small closed set of short one-line labels, repeated
    (fewer distinct values than half the examples, so free-form answers never qualify); else None."""
    distinct = {r.strip() for r in references}
    short = all(0 < len(v) <= 64 and "\n" not in v for v in distinct)
    if short and len(distinct) <= max_labels and 2 * len(distinct) < len(references):
        return sorted(distinct)
    return None


def label_scores(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro F1 of generated answers against `labels`, compared after `.strip()`; an answer outside
    the labels is simply wrong (sklearn's `f1_score(..., labels=labels, average="macro", zero_division=0)`)."""
    ids = {label: i for i, label in enumerate(labels)}
    refs = [r.strip() for r in references]
    preds = [p.strip() for p in predictions]
    classes = _per_class([ids.get(r, -1) for r in refs], [ids.get(p, -1) for p in preds], len(labels))
    return {
        "accuracy": sum(r == p for r, p in zip(refs, preds)) / len(refs),
        "macro_f1": sum(c["f1"] for c in classes) / len(labels),
    }
