"""`ftune eval --generate`: metrics equal sacrebleu / rouge-score / json computed here on the same strings, batched
answers equal one-at-a-time `ftune generate` answers, exact match rises from base to tuned on the quickstart run,
and bad requests are refused before any model loads."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune_cli.cli import app
from finetune_cli.evaluation import predict
from tests.conftest import ROOT, write_jsonl

runner = CliRunner()

PREDICTIONS = [
    '{"name": "Zoë", "qty": 3}',
    "The cat sat on the mat.",
    "",
    "  exactly this  ",
    "Résumé: naïve café, 12 items; ok?",
]
REFERENCES = [
    '{"qty": 3, "name": "Zoë"}',  # equal as JSON, not as text
    "The cat is on the mat.",
    "Something was expected here.",
    "exactly this",
    "Résumé: naive cafe, 12 items. OK?",
]


def test_each_metric_equals_the_standard_package_on_the_same_strings():
    import sacrebleu
    from rouge_score import rouge_scorer

    got = predict.score(PREDICTIONS, REFERENCES, ["exact_match", "bleu", "chrf", "rouge_l"])
    assert got["exact_match"] == pytest.approx(1 / 5)  # stripped equality: only "exactly this"
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-6)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]
    assert got["rouge_l"] == pytest.approx(sum(rouge) / 5, abs=1e-6)
    assert 0 < got["bleu"] < 100 and 0 < got["rouge_l"] < 1  # not degenerate: the strings partly overlap


def test_json_metrics_parse_both_sides():
    refs = ['{"a": 1, "b": [1, 2]}', '{"a": 2}', "[1, 2]"]
    preds = ['{"b": [1, 2], "a": 1}', '{"a": 2, "extra": 0}', "[1, 2"]
    got = predict.score(preds, refs, ["json_valid", "json_match"])
    assert got == {"json_valid": pytest.approx(2 / 3, abs=1e-6), "json_match": pytest.approx(1 / 3, abs=1e-6)}
    assert predict.metrics_for(refs, None) == [
        m for m in predict.METRICS if m not in ("accuracy", "macro_f1")
    ]  # JSON answers are no closed set of labels
    assert "json_match" not in predict.metrics_for(["plain words"], None)  # JSON metrics only where they apply
    with pytest.raises(Exception, match="not all JSON"):
        predict.metrics_for(["plain words"], ["json_match"])


def test_prompt_is_the_conversation_up_to_its_last_assistant_turn():
    conv = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "2"},
        {"role": "assistant", "content": "two"},
    ]
    prompts, refs = predict.split([{"messages": conv}], "data.jsonl")
    assert prompts == [conv[:4]] and refs == ["two"]


WRITTEN = {"tuned": "prediction", "base": "base_prediction"}  # each model's answers in the predictions file


def recomputed(answers: list[str], refs: list[str]) -> dict[str, float]:
    """Metrics of answers computed here: exact match and JSON match by hand, BLEU and chrF by sacrebleu."""
    import sacrebleu

    def parsed(text):
        try:
            return json.loads(text)
        except ValueError:
            return None

    n = len(refs)
    return {
        "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, refs)) / n,
        "json_match": sum(parsed(a) is not None and parsed(a) == json.loads(r) for a, r in zip(answers, refs)) / n,
        "bleu": sacrebleu.corpus_bleu(answers, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(answers, [refs]).score,
    }


def other_predictions(data: Path) -> str:
    """The documented name of a run's answers on other data: the file's stem and 8 hex digits of the sha256 of its
    resolved path."""
    return f"predictions-{data.stem}-{hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]}.jsonl"


def test_batched_answers_equal_one_at_a_time_and_exact_match_rises(quickstart_run, tmp_path):
    """The real command on the shipped quickstart run, base and tuned; every batched answer (batch 3: a full and
    a partial batch of mixed prompt lengths) equals `generate.reply` on the same messages (`ftune generate`)."""
    from peft import PeftModel

    from finetune_cli import rundir
    from finetune_cli.inference import generate

    run = quickstart_run[0]
    rows = [json.loads(x) for x in (ROOT / "recipes/data/quickstart/eval.jsonl").read_text().splitlines()[:4]]
    data = write_jsonl(tmp_path / "four.jsonl", rows)
    args = ["eval", str(run), "--generate", "--compare-base", "--data", str(data), "--batch-size", "3"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "48", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["kind"] == "generate" and out["examples"] == 4 and out["greedy"]
    assert out["metrics"] == [
        m for m in predict.METRICS if m not in ("accuracy", "macro_f1")
    ]  # JSON references: every metric but the label ones
    tuned, base = out["results"]["tuned"], out["results"]["base"]
    assert tuned["exact_match"] >= 0.75 and base["exact_match"] == 0.0 and tuned["json_match"] >= 0.75
    written = run / other_predictions(data)  # other data than the run's eval set: a file of its own
    lines = [json.loads(x) for x in written.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(4)) and out["predictions"] == str(written)
    for line, row in zip(lines, rows):
        assert line["prompt"] == row["messages"][:-1] and line["reference"] == row["messages"][-1]["content"]
    # the metrics and their change are those of the written answers (each checked against the model below),
    # recomputed here: exact match by hand, BLEU and chrF by sacrebleu, base and tuned each on its own answers
    refs = [x["reference"] for x in lines]
    want = {model: recomputed([x[key] for x in lines], refs) for model, key in WRITTEN.items()}
    for model in WRITTEN:
        for metric, value in want[model].items():
            assert out["results"][model][metric] == pytest.approx(value, abs=1e-5), (model, metric)
    for metric in want["tuned"]:
        assert out["change"][metric] == pytest.approx(want["tuned"][metric] - want["base"][metric], abs=1e-5)
    # eval.json keeps the generate result beside (not instead of) a perplexity result on the same data
    assert runner.invoke(app, ["eval", str(run), "--data", str(data)]).exit_code == 0
    kinds = [e.get("kind", "perplexity") for e in rundir.evaluations(run) if e["data"] == [str(data.resolve())]]
    assert sorted(kinds) == ["generate", "perplexity"]

    model, tokenizer = rundir.load(str(run))  # as `ftune generate` loads it: a PeftModel over the base
    assert isinstance(model, PeftModel)
    for line in lines:
        assert generate.reply(model, tokenizer, line["prompt"], 48) == line["prediction"]
    with model.disable_adapter():
        for line in lines:
            assert generate.reply(model, tokenizer, line["prompt"], 48) == line["base_prediction"]


def refused(result, *words):
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.output
    for word in words:
        assert word in line, line


def test_bad_requests_are_refused_before_a_model_loads(tmp_path, tiny_model_dir):
    missing = tmp_path / "no-such-run"
    # the metric is checked first: the target does not even exist
    refused(
        runner.invoke(app, ["eval", str(missing), "--generate", "--metrics", "bleu,precision"]), "precision", "chrf"
    )
    refused(runner.invoke(app, ["eval", str(missing), "--metrics", "bleu"]), "--generate")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just prose"}, {"text": "more prose"}])
    refused(runner.invoke(app, ["eval", str(tiny_model_dir), "--generate", "--data", str(text)]), "assistant turn")
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    theirs = tmp_path / "mine.jsonl"
    theirs.write_text("the user's own file\n")
    args = ["eval", str(tiny_model_dir), "--generate", "--data", str(chat), "--predictions", str(theirs)]
    refused(runner.invoke(app, args), "already exists")
    assert theirs.read_text() == "the user's own file\n"
    args = ["eval", str(tiny_model_dir), "--generate", "--data", str(chat), "--metrics", "json_valid"]
    refused(runner.invoke(app, args), "not all JSON")


def test_a_model_folder_writes_predictions_only_where_asked(tmp_path, tiny_model_dir):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "x"}]}
            for i in range(3)
        ],
    )
    out = tmp_path / "preds.jsonl"
    args = ["eval", str(tiny_model_dir), "--generate", "--data", str(chat), "--max-new-tokens", "4"]
    result = runner.invoke(app, [*args, "--predictions", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert list(info["results"]) == ["model"] and info["predictions"] == str(out)
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 1, 2]
    assert not any(Path(tiny_model_dir).glob("predictions*"))


def test_each_data_set_gets_its_own_predictions_file(tiny_recipe, tmp_path, monkeypatch):
    """`eval --generate` on the run's eval data, then on other data: two files, neither replacing the other;
    eval.json names each from the run folder, so both resolve when ftune is started elsewhere."""
    from finetune_cli import rundir

    monkeypatch.chdir(tmp_path)  # the run is named as "run", relative to the folder ftune starts in
    trained = runner.invoke(app, ["train", str(tiny_recipe), "--samples", "0", "--set", "training.max_steps=2"])
    assert trained.exit_code == 0, trained.output
    other = write_jsonl(
        tmp_path / "other.jsonl",
        [
            {"messages": [{"role": "user", "content": f"Name {i}."}, {"role": "assistant", "content": "x"}]}
            for i in (1, 2)
        ],
    )
    short = ["--generate", "--max-new-tokens", "4", "--metrics", "exact_match", "--json"]
    own = json.loads(runner.invoke(app, ["eval", "run", *short]).stdout)
    first = (tmp_path / "run" / rundir.PREDICTIONS).read_bytes()
    on_other = json.loads(runner.invoke(app, ["eval", "run", "--data", "other.jsonl", *short]).stdout)
    assert own["predictions"] == str(Path("run") / rundir.PREDICTIONS)
    assert on_other["predictions"] == str(Path("run") / other_predictions(other))
    assert (tmp_path / "run" / rundir.PREDICTIONS).read_bytes() == first  # the eval set's answers are kept

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = tmp_path / "run"
    entries = {tuple(e["data"]): e for e in rundir.evaluations(run) if e.get("kind") == "generate"}
    assert set(entries) == {(str(tmp_path / "eval.jsonl"),), (str(other),)}
    for data, name, count in (("eval.jsonl", rundir.PREDICTIONS, 4), ("other.jsonl", other_predictions(other), 2)):
        entry = entries[(str(tmp_path / data),)]
        assert entry["predictions"] == name and entry["examples"] == count  # relative to the run folder
        lines = [json.loads(x) for x in (run / entry["predictions"]).read_text().splitlines()]
        references = [json.loads(x)["messages"][-1]["content"] for x in (tmp_path / data).read_text().splitlines()]
        assert [x["reference"] for x in lines] == references  # each file holds the answers for its own data
    # the run's own eval file named with --data is the same data set: its file, not a third one
    again = runner.invoke(app, ["eval", str(run), "--data", str(tmp_path / "eval.jsonl"), *short])
    assert json.loads(again.stdout)["predictions"] == str(run / rundir.PREDICTIONS)
    assert sorted(p.name for p in run.glob("predictions*")) == sorted([rundir.PREDICTIONS, other_predictions(other)])
    rundir.check_output(run, "run", True, "output.dir")  # both are ftune's: --overwrite may replace the run
    # --predictions FILE (a new file only) is named in eval.json by its absolute path
    mine = runner.invoke(app, ["eval", str(run), "--data", str(other), *short, "--predictions", "mine.jsonl"])
    assert mine.exit_code == 0, mine.output
    entry = next(e for e in rundir.evaluations(run) if e["data"] == [str(other)] and e.get("kind") == "generate")
    assert entry["predictions"] == str(elsewhere / "mine.jsonl") and (elsewhere / "mine.jsonl").is_file()
