"""Classification metrics equal scikit-learn's on many random cases (skewed classes, a class absent from the
references, a class never predicted, perfect and all-wrong predictions); generated answers get accuracy and macro F1
only when their references are a closed set of labels."""

import random

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from finetune_cli.classification import metrics
from finetune_cli.evaluation import predict


def cases():
    """(references, predictions, k): random skewed cases plus the edge cases a plausible bug gets wrong."""
    rng = random.Random(0)
    out = []
    for _ in range(60):
        k = rng.randint(2, 7)
        weights = [rng.random() ** 3 for _ in range(k)]  # skewed class frequencies
        n = rng.randint(1, 60)
        refs = rng.choices(range(k), weights, k=n)
        right = rng.random()
        preds = [r if rng.random() < right else rng.randrange(k) for r in refs]
        out.append((refs, preds, k))
    out += [
        ([0, 0, 1, 1, 1], [0, 1, 1, 1, 1], 3),  # class 2 absent from references and predictions
        ([0, 0, 1, 1, 1], [2, 0, 1, 2, 1], 3),  # class 2 absent from references, predicted twice
        ([0, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1], 3),  # class 2 never predicted
        ([0, 1, 2, 3, 3, 3], [0, 1, 2, 3, 3, 3], 4),  # perfect
        ([0, 0, 1, 1, 2], [1, 2, 0, 2, 0], 3),  # all wrong
        ([1] * 9 + [0], [1] * 10, 2),  # majority-class guessing: high accuracy, low macro F1
    ]
    return out


@pytest.mark.parametrize("refs,preds,k", cases())
def test_report_equals_sklearn(refs, preds, k):
    names = [f"class{i}" for i in range(k)]
    labels = list(range(k))
    got = metrics.report(refs, preds, names)
    assert got["examples"] == len(refs) and got["labels"] == names
    assert got["accuracy"] == pytest.approx(accuracy_score(refs, preds), rel=1e-12)
    want_f1 = f1_score(refs, preds, labels=labels, average="macro", zero_division=0)
    assert got["macro_f1"] == pytest.approx(want_f1, rel=1e-12, abs=1e-15)
    p, r, f, s = precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        c = got["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((p[i], r[i], f[i]), rel=1e-12, abs=1e-15)
        assert c["support"] == s[i]
    assert got["confusion"] == confusion_matrix(refs, preds, labels=labels).tolist()


def test_edge_cases_distinguish_macro_from_plausible_bugs():
    """Guards against averaging only the classes present, micro averaging, and support-weighted averaging."""
    absent = metrics.report([0, 0, 1, 1, 1], [0, 1, 1, 1, 1], ["a", "b", "c"])  # c: no support, never predicted
    assert absent["macro_f1"] == pytest.approx((2 / 3 + 6 / 7 + 0) / 3)  # c counts as 0, not skipped
    skewed = metrics.report([1] * 9 + [0], [1] * 10, ["a", "b"])
    assert skewed["accuracy"] == pytest.approx(0.9)  # micro F1 would also be 0.9
    assert skewed["macro_f1"] == pytest.approx((0 + 18 / 19) / 2)


def test_worst_class_and_what_it_is_confused_with():
    names = ["ant", "bee", "cat", "dog"]
    # cat: 4 examples, 1 right, 2 taken for bee, 1 for ant; dog has no support and must not be picked
    refs = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 0, 1, 1, 2, 1, 1, 0]
    worst = metrics.report(refs, preds, names)["worst"]
    f1 = f1_score(refs, preds, labels=[0, 1, 2, 3], average=None, zero_division=0)
    assert min(range(3), key=lambda i: f1[i]) == 2  # sklearn agrees cat is the worst present class
    assert worst == {
        "label": "cat",
        "f1": pytest.approx(f1[2]),
        "recall": pytest.approx(0.25),
        "support": 4,
        "confused_with": "bee",
        "count": 2,
    }
    # a tie on F1 (both 0) goes to the larger support; a class never wrong has nobody to be confused with
    tie = metrics.report([0, 1, 1], [1, 0, 0], ["x", "y"])["worst"]
    assert (tie["label"], tie["support"], tie["confused_with"], tie["count"]) == ("y", 2, "x", 2)
    perfect = metrics.report([0, 1], [0, 1], ["x", "y"])["worst"]
    assert (perfect["label"], perfect["f1"], perfect["confused_with"], perfect["count"]) == ("x", 1.0, None, 0)


LABEL_REFS = ["positive", "negative", " positive", "neutral\n", "negative", "positive", "negative", "positive"]


@pytest.mark.parametrize("seed", range(12))
def test_label_scores_equal_sklearn_on_stripped_strings(seed):
    rng = random.Random(seed)
    labels = metrics.closed_set(LABEL_REFS)
    # answers: right, another label, padded with spaces, outside the label set, or a wrong-case label
    pool = labels + [" negative ", "Positive", "I think positive", ""]
    preds = [r if rng.random() < 0.4 else rng.choice(pool) for r in LABEL_REFS]
    refs_s, preds_s = [r.strip() for r in LABEL_REFS], [p.strip() for p in preds]
    got = metrics.label_scores(preds, LABEL_REFS, labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(refs_s, preds_s), rel=1e-12)
    want = f1_score(refs_s, preds_s, labels=labels, average="macro", zero_division=0)
    assert got["macro_f1"] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_an_answer_outside_the_labels_is_a_miss_not_a_class():
    refs = ["yes", "yes", "no", "no", "yes"]
    preds = ["yes", "maybe", "no", "NO", "yes "]
    got = metrics.label_scores(preds, refs, ["no", "yes"])
    # yes: tp 2, fn 1, fp 0 -> 0.8; no: tp 1, fn 1, fp 0 -> 2/3; "maybe"/"NO" are nobody's false positives
    assert got == {"accuracy": pytest.approx(3 / 5), "macro_f1": pytest.approx((0.8 + 2 / 3) / 2)}
    want = f1_score(refs, [p.strip() for p in preds], labels=["no", "yes"], average="macro")
    assert got["macro_f1"] == pytest.approx(want)


def test_closed_set_accepts_repeated_short_labels_only():
    assert metrics.closed_set(LABEL_REFS) == ["negative", "neutral", "positive"]
    free = [f"The answer is {i} because reasons." for i in range(10)]
    assert metrics.closed_set(free) is None  # every answer distinct
    assert metrics.closed_set(["a", "b", "a", "b"]) is None  # 2 distinct is not fewer than half of 4
    assert metrics.closed_set(["a", "b", "a", "b", "a"]) == ["a", "b"]
    assert metrics.closed_set(["line one\nline two", "x"] * 5) is None  # a multi-line answer is no label
    assert metrics.closed_set(["y" * 65, "x"] * 5) is None and metrics.closed_set(["y" * 64, "x"] * 5) is not None
    many = [str(i) for i in range(21)] * 3
    assert metrics.closed_set(many) is None and metrics.closed_set(many, max_labels=21) is not None


def test_generate_picks_label_metrics_only_for_label_references():
    assert {"accuracy", "macro_f1"} <= set(predict.metrics_for(LABEL_REFS, None))
    free = ["Paris is the capital.", "It rains in spring.", "Two plus two is four.", "Cats purr."]
    chosen = predict.metrics_for(free, None)
    assert "accuracy" not in chosen and "macro_f1" not in chosen and "exact_match" in chosen
    with pytest.raises(Exception, match="closed set of labels"):
        predict.metrics_for(free, ["macro_f1"])
    assert predict.check_metrics("accuracy,macro_f1") == ["accuracy", "macro_f1"]
    preds = ["positive", "positive", "positive", "neutral", "negative", "maybe", "negative", " positive "]
    got = predict.score(preds, LABEL_REFS, ["accuracy", "macro_f1"])
    refs_s, preds_s = [r.strip() for r in LABEL_REFS], [p.strip() for p in preds]
    labels = ["negative", "neutral", "positive"]
    assert got["accuracy"] == pytest.approx(accuracy_score(refs_s, preds_s), abs=1e-6)
    assert got["macro_f1"] == pytest.approx(f1_score(refs_s, preds_s, labels=labels, average="macro"), abs=1e-6)
