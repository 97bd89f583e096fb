"""`ftune eval --tasks`: lm-evaluation-harness tasks over local files (one multiple-choice, one generation task),
offline. ftune's figures for base and tuned equal the harness's own CLI (`lm_eval --model hf --model_args
pretrained=FOLDER`) on the base folder and the tuned model's folder (a full run's model, a LoRA run merged); bad task
lists fail before any weights load."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_model, write_jsonl

pytest.importorskip("lm_eval")

QUESTIONS = [  # the full run learns the first three; the fourth shows it did not just learn to say one thing
    ("What color is the sky?", ["blue", "green", "red"], 0),
    ("What is two plus two?", ["3", "4", "5"], 1),
    ("What is the capital of France?", ["Rome", "Paris", "Oslo"], 1),
    ("What is the opposite of hot?", ["warm", "cold", "big"], 1),
]


def task_yaml(path: Path, name: str, data: Path, kind: str) -> Path:
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "Q: {{question}}\nA:",
    }
    if kind == "mc":
        config |= {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}"}
        config["metric_list"] = [{"metric": "acc"}, {"metric": "acc_norm"}]
    else:
        config |= {"output_type": "generate_until", "doc_to_target": " {{answer}}"}
        config["generation_kwargs"] = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
        config["metric_list"] = [{"metric": "exact_match"}]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def train(folder: Path, base: Path, method: dict, learning_rate: float) -> Path:
    from finetune_cli import recipe
    from finetune_cli.training import train as training

    texts = [{"text": f"Q: {q}\nA: {choices[a]}\n"} for q, choices, a in QUESTIONS[:3]]
    write_jsonl(folder / "train.jsonl", texts)
    config = {
        "model": {"base": str(base)},
        "data": {"train": "train.jsonl", "max_length": 24, "cache": False},
        "method": method,
        "training": {
            "max_steps": 30,
            "batch_size": 3,
            "learning_rate": learning_rate,
            "lr_scheduler": "constant",
            "warmup_ratio": 0,
            "precision": "fp32",
            "logging_steps": 10,
        },
        "output": {"dir": str(folder / "run")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return Path(training.run(recipe.load(folder / "recipe.yaml"), samples=0)["run_dir"])


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tokenizer):
    """The base (tiny, untied), the two task YAMLs, a full run that learnt three of the four answers and a LoRA
    run (which on this random base moves the figures without learning the answers)."""
    folder = tmp_path_factory.mktemp("tasks")
    base = tiny_model(folder / "base", tokenizer, tied=False)
    mc = write_jsonl(folder / "mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS])
    gen = write_jsonl(folder / "gen.jsonl", [{"question": q, "answer": c[a]} for q, c, a in QUESTIONS])
    (folder / "tasks").mkdir()
    tasks = [
        task_yaml(folder / "tasks" / "tiny_mc.yaml", "tiny_mc", mc, "mc"),
        task_yaml(folder / "tasks" / "tiny_gen.yaml", "tiny_gen", gen, "gen"),
    ]
    (folder / "full").mkdir()
    full = train(folder / "full", base, {"name": "full"}, 1e-2)
    (folder / "lora").mkdir()
    lora = train(folder / "lora", base, {"name": "lora", "r": 16, "alpha": 32}, 5e-2)
    return {"folder": folder, "base": base, "tasks": tasks, "full": full, "lora": lora}


def harness_cli(model_folder: Path, tasks: list[Path], out: Path) -> dict:
    """The harness's own command on a model folder: {"task metric": (value, stderr)}, read from its results file."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    args = [lm_eval, "--model", "hf", "--model_args", f"pretrained={model_folder},dtype=float32"]
    args += ["--tasks", ",".join(map(str, tasks)), "--device", "cpu", "--output_path", str(out)]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env={**__import__("os").environ, **env}, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    figures = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name == "none" and not metric.endswith("_stderr"):
                figures[f"{task} {metric}"] = (value, values[f"{metric}_stderr,none"])
    return figures


def ftune_eval(*args) -> dict:
    from finetune_cli.cli import app

    result = CliRunner().invoke(app, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_figures_equal_the_harness_cli_for_base_and_tuned(bench, tmp_path):
    tasks = ",".join(map(str, bench["tasks"]))
    full = ftune_eval(bench["full"], "--tasks", tasks, "--compare-base")
    lora = ftune_eval(bench["lora"], "--tasks", tasks, "--compare-base", "--batch-size", "3")
    from finetune_cli.export import merge

    merged = tmp_path / "merged"
    merge.merge(str(bench["lora"]), str(merged))
    with ThreadPoolExecutor(3) as pool:
        jobs = {
            name: pool.submit(harness_cli, folder, bench["tasks"], tmp_path / f"cli-{name}")
            for name, folder in (("base", bench["base"]), ("full", bench["full"] / "model"), ("lora", merged))
        }
        cli = {name: job.result() for name, job in jobs.items()}
    for name, ours, theirs in (
        ("base", full["results"]["base"], cli["base"]),
        ("base", lora["results"]["base"], cli["base"]),
        ("tuned", full["results"]["tuned"], cli["full"]),
        ("tuned", lora["results"]["tuned"], cli["lora"]),
    ):
        assert set(ours) == set(theirs) == {"tiny_mc acc", "tiny_mc acc_norm", "tiny_gen exact_match"}
        for metric, (value, _) in theirs.items():
            assert ours[metric] == pytest.approx(value, abs=1e-9), (name, metric)
    for result, tuned in ((full, cli["full"]), (lora, cli["lora"])):
        for metric, (value, error) in tuned.items():
            assert result["stderr"]["tuned"][metric] == pytest.approx(error, abs=1e-9)
            assert result["change"][metric] == pytest.approx(value - cli["base"][metric][0], abs=1e-6)
    # the full run learnt answers it generates and chooses (0.25 and 0.75 here); the random base none
    tuned, base = full["results"]["tuned"], full["results"]["base"]
    assert tuned["tiny_gen exact_match"] > base["tiny_gen exact_match"] == 0.0
    assert tuned["tiny_mc acc"] > base["tiny_mc acc"]
    assert lora["results"]["tuned"] != lora["results"]["base"]  # the adapter was applied (and off for the base)
    assert full["harness"] == __import__("importlib.metadata").metadata.version("lm_eval")
    assert full["num_fewshot"] == {"tiny_gen": 0, "tiny_mc": 0} and full["samples"] == {"tiny_gen": 4, "tiny_mc": 4}
    # kept in eval.json (kind tasks), shown by `ftune runs`, the report page and the merged model's card
    saved = [e for e in json.loads((bench["full"] / "eval.json").read_text())["evaluations"] if e["kind"] == "tasks"]
    assert len(saved) == 1 and saved[0]["results"] == full["results"] and saved[0]["data"] == tasks.split(",")
    from finetune_cli.reports import runs

    summary = runs.summarize(bench["full"])
    assert summary["task_metrics"]["tiny_gen exact_match"] == tuned["tiny_gen exact_match"]
    page = (bench["full"] / "report.html").read_text()
    assert "Benchmarks (--tasks, lm-evaluation-harness" in page and "tiny_gen exact_match" in page
    card = (merged / "README.md").read_text()
    assert "## Benchmarks (ftune eval --tasks" in card
    assert f"| tiny_mc acc | tuned | {lora['results']['tuned']['tiny_mc acc']:.4f} |" in card


def test_limit_and_fewshot_reach_the_harness(bench):
    tasks = str(bench["tasks"][0])
    result = ftune_eval(bench["full"], "--tasks", tasks, "--limit", "2", "--num-fewshot", "1")
    assert result["samples"] == {"tiny_mc": 2} and result["num_fewshot"] == {"tiny_mc": 1} and result["limit"] == 2
    assert set(result["results"]) == {"tuned"} and result.get("change") is None
    folder = ftune_eval(bench["full"], "--tasks", str(bench["tasks"][0].parent), "--limit", "1")
    assert folder["tasks"] == ["tiny_gen", "tiny_mc"]  # a folder of task YAMLs: each of them


@pytest.fixture(scope="module")
def one_index():
    """The harness's task index built once for the tests that need its names (it reads ~15,000 YAML files)."""
    from lm_eval import tasks

    real, built = tasks.TaskManager, {}

    def shared(*args, **kwargs):
        key = kwargs.get("include_defaults", True)
        if key not in built:
            built[key] = real(*args, **kwargs)
        return built[key]

    return shared


def test_bad_task_lists_fail_before_a_model_loads(bench, tmp_path, monkeypatch, one_index):
    import datasets
    from lm_eval import tasks

    from finetune_cli import models
    from finetune_cli.cli import app

    monkeypatch.setattr(tasks, "TaskManager", one_index)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    no_task = tmp_path / "no-task.yaml"
    no_task.write_text("dataset_path: json\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    run = str(bench["full"])
    cases = [
        (["--tasks", "hellaswg"], "--tasks hellaswg: no such task in lm-evaluation-harness; closest: hellaswag"),
        (["--tasks", "arc_easy"], "--tasks arc_easy: its data cannot be loaded (offline (HF_DATASETS_OFFLINE"),
        (["--tasks", str(tmp_path / "missing.yaml")], "no such file or folder"),
        (["--tasks", str(no_task)], "needs a `task:` name"),
        (["--tasks", str(broken)], "not a task the harness can read"),
        (["--tasks", "a,,b"], "separated by commas"),
        (["--tasks", str(bench["tasks"][0]), "--generate"], "drop --generate"),
        (["--tasks", str(bench["tasks"][0]), "--limit", "1.5"], "--limit 1.5"),
        (["--num-fewshot", "2"], "--num-fewshot and --limit go with --tasks"),
    ]
    for flags, expected in cases:
        result = CliRunner().invoke(app, ["eval", run, *flags])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], (flags, result.output)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the extra not installed
    result = CliRunner().invoke(app, ["eval", run, "--tasks", "arc_easy"])
    assert result.exit_code == 2 and "pip install 'ftune[tasks]'" in result.output, result.output
