"""`ftune runs` and `ftune compare` over run folders written by hand in the shapes training and `ftune eval` write
(run.json, recipe.yaml, metrics.jsonl, eval.json): the figures checked against those files, no training."""

import io
import json
import re
import time

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from finetune_cli import rundir, ui
from finetune_cli.cli import app

runner = CliRunner()
EVAL_FILE = "/data/eval.jsonl"


@pytest.fixture
def wide(monkeypatch):
    """The tables ftune prints, one line per row (a wide console instead of the terminal's)."""
    out = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=out, width=400))
    return out


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def stamp(seconds_ago: float = 0.0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - seconds_ago))


def make_run(folder, info=None, recipe=None, rows=(), evaluations=()):
    """A run folder as ftune leaves it: marker, run.json, recipe.yaml, metrics.jsonl, eval.json."""
    folder.mkdir(parents=True)
    (folder / ".ftune").write_text(json.dumps({"kind": "run", "files": []}))
    run = {
        "status": "completed",
        "started": stamp(3600),
        "method": "lora",
        "objective": "sft",
        "steps": 15,
        "train_seconds": 108.02,
        "train_loss": 0.15,
        "final_loss": 0.0279,
        "first_loss": 0.40,
        "eval_before": {"tokens": 1802, "nll": 1250.9, "loss": 0.6942, "perplexity": 2.0020},
        "eval_after": {"tokens": 1802, "nll": 34.8, "loss": 0.0193, "perplexity": 1.0195},
        **(info or {}),
    }
    (folder / "run.json").write_text(json.dumps(run, indent=2))
    spec = {
        "model": {"base": "smollm2-135m-instruct", "dtype": "auto"},
        "data": {"train": "/data/train.jsonl", "eval": EVAL_FILE, "eval_split": None, "max_length": 256},
        "method": {"name": "lora", "r": 16, "alpha": 32},
        "training": {"objective": "sft", "learning_rate": 2e-4, "epochs": 1.0, "report_to": "none"},
        "output": {"dir": str(folder)},
    }
    for section, values in (recipe or {}).items():
        spec[section] = {**spec[section], **values}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluations:
        (folder / "eval.json").write_text(json.dumps({"evaluations": list(evaluations)}, indent=2))
    return folder


def generated(scores: dict, data=EVAL_FILE) -> dict:
    return {
        "kind": "generate",
        "target": "runs/x",
        "base": "smollm2-135m-instruct",
        "data": [data],
        "metrics": list(scores),
        "results": {"base": {k: 0.0 for k in scores}, "tuned": scores},
        "predictions": "predictions.jsonl",
    }


def perplexity_result(data=EVAL_FILE) -> dict:
    return {"target": "runs/x", "data": [data], "results": {"tuned": {"tokens": 9, "loss": 0.5, "perplexity": 1.6}}}


def listed(*args) -> list[dict]:
    result = cli("runs", *args, "--json")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def test_runs_report_run_json_and_eval_json(tmp_path):
    root = tmp_path / "runs"
    sft = make_run(
        root / "sft",
        rows=[{"step": 0, "eval_loss": 0.69}, {"step": 15, "epoch": 1.0, "max_steps": 15, "loss": 0.0279}],
        evaluations=[
            generated({"exact_match": 0.10}, data="/data/other.jsonl"),  # other data: not the run's task metrics
            perplexity_result(),
            generated({"exact_match": 0.85, "bleu": 99.7, "json_valid": 1.0}),
        ],
    )
    classifier = make_run(
        root / "project" / "cls",  # a level deeper
        info={
            "started": stamp(60),
            "objective": "classification",
            "method": "full",
            "final_loss": 0.397,
            "eval_before": {"examples": 16, "loss": 1.11, "accuracy": 0.3125, "macro_f1": 0.2454},
            "eval_after": {"examples": 16, "loss": 0.72, "accuracy": 0.625, "macro_f1": 0.4556},
        },
        recipe={"training": {"objective": "classification"}, "method": {"name": "full"}},
    )
    broken = make_run(root / "broken")
    (broken / "run.json").write_text('{"status": "comp')  # torn
    bad_recipe = make_run(root / "bad-recipe")
    (bad_recipe / "recipe.yaml").write_text("model: [unclosed\n")
    (root / "notes").mkdir()
    (root / "notes" / "run.json").write_text("{}")  # no marker: not a run
    merged = root / "merged"
    merged.mkdir()
    (merged / ".ftune").write_text(json.dumps({"kind": "merge", "files": []}))  # another command's output
    make_run(root / "checkpoints" / "inner")  # checkpoints/ never holds runs to list

    found = {s["name"]: s for s in listed(root)}
    assert set(found) == {"sft", "project/cls", "broken", "bad-recipe"}  # a nested run is named by its path
    found["cls"] = found["project/cls"]
    for name, folder in (("sft", sft), ("cls", classifier)):
        s, info = found[name], json.loads((folder / "run.json").read_text())
        assert s["path"] == str(folder)
        assert s["status"] == "completed"
        assert (s["objective"], s["method"]) == (info["objective"], info["method"])
        assert (s["steps"], s["train_seconds"], s["final_loss"]) == (
            info["steps"],
            info["train_seconds"],
            info["final_loss"],
        )
        assert s["started"] == info["started"]
        assert s["base"] == "smollm2-135m-instruct" and "parent" not in s
    info = json.loads((sft / "run.json").read_text())
    assert found["sft"]["eval_loss_before"] == info["eval_before"]["loss"]
    assert found["sft"]["eval_loss_after"] == info["eval_after"]["loss"]
    assert found["sft"]["perplexity_before"] == info["eval_before"]["perplexity"]
    assert found["sft"]["perplexity_after"] == info["eval_after"]["perplexity"]
    own = json.loads((sft / "eval.json").read_text())["evaluations"][2]
    assert found["sft"]["task_metrics"] == own["results"]["tuned"]
    info = json.loads((classifier / "run.json").read_text())
    for key in ("accuracy", "macro_f1"):
        assert found["cls"][f"{key}_before"] == info["eval_before"][key]
        assert found["cls"][f"{key}_after"] == info["eval_after"][key]
    assert "perplexity_after" not in found["cls"] and found["cls"]["task_metrics"] == {}
    assert found["broken"]["status"] == "unreadable" and "run.json" in found["broken"]["reason"]
    assert found["bad-recipe"]["status"] == "unreadable" and "recipe.yaml" in found["bad-recipe"]["reason"]
    # newest first (started a minute and an hour ago), the unreadable ones last
    assert [s["name"] for s in listed(root)] == ["project/cls", "sft", "bad-recipe", "broken"]
    assert [s["name"] for s in listed(root, "--sort", "final_loss")][:2] == ["sft", "project/cls"]  # lowest first


def test_running_run_shows_its_step_and_eta_and_a_killed_one_stopped(tmp_path, wide):
    rows = [{"step": 0, "eval_loss": 1.0}] + [
        {"step": s, "epoch": s / 50, "max_steps": 50, "loss": 1.0 / s} for s in (5, 10)
    ]
    running = {"status": "running", "started": stamp(100)}
    for key in ("steps", "train_seconds", "final_loss", "eval_before", "eval_after"):
        running[key] = None
    fresh = make_run(tmp_path / "runs" / "fresh", info=running, rows=rows)
    resumed = make_run(
        tmp_path / "runs" / "resumed",
        info={**running, "resumed_from": str(tmp_path / "runs" / "resumed" / "checkpoints" / "checkpoint-5")},
        rows=rows,
    )
    done = make_run(tmp_path / "runs" / "done")
    with rundir.lock(fresh), rundir.lock(resumed), rundir.lock(done):
        found = {s["name"]: s for s in listed(tmp_path / "runs")}
        assert found["done"]["status"] == "completed"  # what run.json says, unless it says running
        table = cli("runs", tmp_path / "runs")
    for name, done in (("fresh", 10), ("resumed", 5)):  # steps this start made in its 100 seconds
        s = found[name]
        assert (s["status"], s["step"], s["max_steps"]) == ("running", 10, 50)
        expected = 100 / done * (50 - 10)
        assert expected - 5 <= s["eta_seconds"] <= expected * 1.5  # the seconds this test took add a little
    assert table.exit_code == 0 and "running 10/50" in wide.getvalue()
    found = {s["name"]: s for s in listed(tmp_path / "runs")}  # the locks are free: killed without a word
    assert found["fresh"]["status"] == found["resumed"]["status"] == "stopped"
    assert "eta_seconds" not in found["fresh"]


def test_lineage_names_the_run_a_run_started_from(tmp_path):
    sft = make_run(tmp_path / "runs" / "sft")
    make_run(
        tmp_path / "runs" / "dpo",
        info={"objective": "dpo", "eval_before": {"pairs": 8, "accuracy": 0.5, "margin": 0.01}},
        recipe={"model": {"base": str(sft)}, "training": {"objective": "dpo"}},
    )
    found = {s["name"]: s for s in listed(tmp_path / "runs")}
    assert found["dpo"]["parent"] == "sft" and found["dpo"]["base"] == str(sft)
    assert found["dpo"]["accuracy_before"] == 0.5 and found["dpo"]["margin_before"] == 0.01
    assert "parent" not in found["sft"]


def _rows(text: str) -> dict:
    """The table's rows as {run name: {column header: cell lines}} (a row goes on where its first cell is empty)."""
    split = re.compile("[│┃]")
    lines = [split.split(line)[1:-1] for line in text.splitlines() if split.match(line)]
    heads = [h.strip() for h in lines[0]]
    rows, name = {}, None
    for cells in lines[1:]:
        name = cells[0].strip() or name
        for head, cell in zip(heads, cells):
            rows.setdefault(name, {}).setdefault(head, []).extend([cell.strip()] if cell.strip() else [])
    return rows


def _line(cell: list[str], start: str) -> str:
    return next(line for line in cell if line.startswith(start))


def test_the_best_of_each_column_is_marked(tmp_path, wide):
    figures = {  # name: (final loss, perplexity after, exact match)
        "a": (0.30, 1.50, 0.40),
        "b": (0.50, 1.20, 0.80),
        "c": (0.10, 1.90, 0.60),
    }
    for name, (loss, ppl, em) in figures.items():
        make_run(
            tmp_path / "runs" / name,
            info={"final_loss": loss, "eval_after": {"tokens": 9, "loss": 0.1, "perplexity": ppl}},
            evaluations=[generated({"exact_match": em})],
        )
    assert cli("runs", tmp_path / "runs").exit_code == 0
    rows = _rows(wide.getvalue())
    assert set(rows) == set(figures)
    cells = {  # how to find each figure's text in a row; which figure; the best is the lowest or the highest
        "last loss": (lambda row: row["last loss"][0], 0, min),
        "perplexity": (lambda row: _line(row["eval before → after"], "ppl "), 1, min),
        "exact match": (lambda row: _line(row["task metrics"], "exact_match "), 2, max),
    }
    for what, (cell, i, pick) in cells.items():
        winner = pick(figures, key=lambda n: figures[n][i])
        for name in figures:
            assert cell(rows[name]).endswith("★") == (name == winner), (what, rows[name])
    assert not any("★" in _line(rows[n]["eval before → after"], "loss ") for n in figures)  # all equal: no best


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_compare_lists_exactly_the_differing_keys(tmp_path):
    rows = [{"step": s, "epoch": s / 4, "max_steps": 4, "loss": loss} for s, loss in ((2, 0.9), (4, 0.7))]
    a = make_run(tmp_path / "a", info={"final_loss": 0.7}, rows=rows)
    b = make_run(
        tmp_path / "b",
        info={"final_loss": 0.6, "eval_after": {"tokens": 9, "loss": 0.2, "perplexity": 1.22}},
        recipe={"training": {"learning_rate": 1e-4}, "method": {"name": "lora", "r": 8, "use_dora": True}},
    )
    result = cli("compare", a, b, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    recipes = [_flatten(yaml.safe_load((f / "recipe.yaml").read_text())) for f in (a, b)]
    expected = {
        k for k in recipes[0].keys() | recipes[1].keys() if recipes[0].get(k) != recipes[1].get(k) and k != "output.dir"
    }
    assert expected == {"training.learning_rate", "method.r", "method.use_dora"}
    assert {d["key"] for d in data["differences"]} == expected
    for d in data["differences"]:
        assert d["values"] == [r.get(d["key"]) for r in recipes]
    metrics = {m["name"]: m for m in data["metrics"]}
    assert metrics["final_loss"] == {"name": "final_loss", "values": [0.7, 0.6], "better": "lower"}
    assert metrics["perplexity_after"]["values"] == [1.0195, 1.22]
    assert [r["name"] for r in data["runs"]] == ["a", "b"]
    assert data["curves"][0] == {"name": "a", "rows": rows} and data["curves"][1]["rows"] == []

    shown = cli("compare", a, b)
    assert shown.exit_code == 0 and "training.learning_rate" in shown.stderr and "★" in shown.stderr

    page = tmp_path / "compare.html"
    assert cli("compare", a, b, "-o", page).exit_code == 0
    assert "training.learning_rate" in page.read_text()
    assert cli("compare", a, b, "-o", page).exit_code == 0  # an earlier compare page is replaced
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my notes</html>")
    refused = cli("compare", a, b, "-o", mine)
    assert refused.exit_code == 2 and mine.read_text() == "<html>my notes</html>"


@pytest.mark.parametrize(
    "args",
    [
        ("runs", "{tmp}/missing"),
        ("runs", "{tmp}/runs", "--sort", "colour"),
        ("compare", "{tmp}/runs/a"),
        ("compare", "{tmp}/runs/a", "{tmp}/runs/plain"),
        ("compare", "{tmp}/runs/a", "{tmp}/runs/missing"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, args):
    make_run(tmp_path / "runs" / "a")
    (tmp_path / "runs" / "plain").mkdir()
    result = cli(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output


def test_a_real_run_is_listed_as_its_run_json_says(quickstart_run):
    """The shared quickstart run (trained once per session): its figures, and the max_steps each loss row carries
    for the ETA of a running run."""
    run, result, _ = quickstart_run
    info = json.loads((run / "run.json").read_text())
    (s,) = listed(run.parent)
    assert (s["name"], s["status"], s["steps"]) == (run.name, "completed", info["steps"])
    assert s["final_loss"] == info["final_loss"] == result["final_loss"]
    assert (s["perplexity_before"], s["perplexity_after"]) == (
        info["eval_before"]["perplexity"],
        info["eval_after"]["perplexity"],
    )
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in losses if "loss" in r]
    assert losses and all(r["max_steps"] == info["steps"] for r in losses)
