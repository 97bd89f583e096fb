"""Class labels: their names, the set and order a run trains (ids), the checks on the data, counts and weights.

A label is a string or an integer in the data; both are named by their text, so `1` in JSONL and `"1"` in a CSV
(which has no integers) are one class. The order is `data.labels` when given, else the training labels sorted
(numerically when every one is an integer)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from finetune_cli.errors import FtuneError


@dataclass
class Classes:
    """A classification run's classes and how its rows are read: what training, its evals and the saved adapter
    share."""

    names: list[str]  # in id order
    input: str  # "text" or "image"
    weights: list[float] | None = None  # per class, for the loss (training.class_weights: balanced)
    head: str | None = None  # the head module's name, once the model is loaded
    collate: object = None  # classification.inputs.Collator
    counts: dict = field(default_factory=dict)  # training rows per class


def names_from_recipe(values: list) -> list[str]:
    """data.labels as class names: strings or integers, at least two, no repeats. YAML reads yes/no/on/off as
    booleans: say so rather than train a class called True."""
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool):
            raise ValueError(
                f"data.labels[{i}] is {str(value).lower()}: YAML reads yes/no/on/off/true/false as booleans; "
                "quote the class names, e.g. ['yes', 'no']"
            )
        if not isinstance(value, (str, int)) or not str(value).strip():
            raise ValueError(f"data.labels[{i}] is {value!r}; a class name is a non-empty string or an integer")
        out.append(str(value).strip())
    repeated = [n for n, c in Counter(out).items() if c > 1]
    if repeated:
        raise ValueError(f"data.labels names {repeated[0]!r} twice; each class once")
    if len(out) < 2:
        raise ValueError("data.labels needs at least two classes")
    return out


def ordered(found) -> list[str]:
    """Class names sorted: numerically when every one is an integer, else as text."""
    found = set(found)
    if all(_integer(n) for n in found):
        return sorted(found, key=int)
    return sorted(found)


def _integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def resolve(fixed: list[str] | None, train: list[dict], evals: list[dict], train_name: str) -> list[str]:
    """The class names in id order; raise FtuneError naming the row for a label outside them, and for training
    data that holds one class only."""
    found = Counter(r["label"] for r in train)
    if fixed is not None:
        known = set(fixed)
        for r in train:
            if r["label"] not in known:
                raise FtuneError(
                    f"{r['source']}: label {r['label']!r} is not in data.labels ({', '.join(fixed)}); "
                    "add it there or fix the row"
                )
        names = list(fixed)
    else:
        names = ordered(found)
    if len(found) < 2:
        only = next(iter(found), "none")
        raise FtuneError(
            f"{train_name}: every training row has the label {only!r}; a classifier needs at least two classes"
        )
    known = set(names)
    for r in evals:
        if r["label"] not in known:
            raise FtuneError(
                f"{r['source']}: label {r['label']!r} never appears in the training data, so the model cannot "
                f"learn it (classes: {', '.join(names)}); fix the row, or add the class to data.labels and training"
            )
    return names


def counts(records: list[dict], names: list[str]) -> dict[str, int]:
    found = Counter(r["label"] for r in records)
    return {n: found.get(n, 0) for n in names}


def imbalance(count: dict[str, int]) -> float | None:
    """Largest class over smallest present one (1.0: balanced)."""
    present = [c for c in count.values() if c]
    return round(max(present) / min(present), 2) if present else None


def balanced_weights(count: dict[str, int]) -> list[float]:
    """scikit-learn's `class_weight="balanced"`: n / (classes x count), so the weights average 1 over the training
    rows and rare classes count as much as common ones; a class absent from training gets 1."""
    total, present = sum(count.values()), sum(1 for c in count.values() if c)
    return [total / (present * c) if c else 1.0 for c in count.values()]
