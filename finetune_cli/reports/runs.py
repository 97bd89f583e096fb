"""`ftune runs`: every run folder under some folders, each summed up from its run.json, recipe.yaml, metrics.jsonl
and eval.json, its status read live (a training run holds the flock on its folder: rundir.lock)."""

from __future__ import annotations

import math
import os
import time
from datetime import datetime
from pathlib import Path

from finetune_cli import rundir
from finetune_cli.errors import FtuneError
from finetune_cli.reports import plots

DEPTH = 3  # folders below each DIR searched for runs: runs/, runs/project/, runs/project/sweep/NAME
# folders inside a run (or beside one) that never hold runs: a run's artifacts, checkpoints and logs
SKIPPED = {rundir.ADAPTER, rundir.MODEL, rundir.CHECKPOINTS, rundir.START, rundir.STAGING, rundir.TENSORBOARD}

# run.json's eval_before/eval_after figures: (its key there, the summary's name)
EVAL_FIGURES = (("loss", "eval_loss"), ("perplexity", "perplexity"), ("accuracy", "accuracy"),
                ("macro_f1", "macro_f1"), ("margin", "margin"))  # fmt: skip
# which way a figure is better; the before figures (the base model's) and the others have no best
BETTER = {
    "final_loss": "lower",
    "eval_loss_after": "lower",
    "perplexity_after": "lower",
    "accuracy_after": "higher",
    "macro_f1_after": "higher",
    "margin_after": "higher",
}
# the summary's other columns (--sort takes each)
FIGURES = {"name", "status", "started", "objective", "method", "base", "parent", "step", "max_steps", "eta_seconds",
           "steps", "train_seconds", "final_loss"}  # fmt: skip
TASK_BETTER = "higher"  # `eval --generate` metrics (exact match, BLEU, chrF, ...) and most harness metrics


def find(dirs: list[str | Path]) -> list[dict]:
    """The summaries of the runs under each folder in `dirs` (each run once), newest first."""
    found, seen = [], set()
    for d in dirs:
        folder = Path(d).expanduser()
        if not folder.is_dir():
            what = "not a folder" if folder.exists() else "no such folder"
            raise FtuneError(f"{d}: {what}; give folders that hold run folders (default: runs/)")
        for run in _run_folders(folder, DEPTH):
            if run.resolve() not in seen:
                seen.add(run.resolve())
                summary = summarize(run)
                if run != folder:  # runs/sweep/lr-1e-4 is named sweep/lr-1e-4: names stay apart
                    summary["name"] = run.relative_to(folder).as_posix()
                found.append(summary)
    return sort(found, "started")


def _run_folders(folder: Path, depth: int):
    if rundir.is_run(folder):
        yield folder
        return
    if depth == 0:
        return
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIPPED)
    except OSError:  # unreadable folders hold no runs we can show
        return
    for child in children:
        if not child.name.startswith("."):  # temporaries (files.py) and hidden folders
            yield from _run_folders(child, depth - 1)


def summarize(folder: Path) -> dict:
    """One run's figures; a run whose run.json or recipe.yaml cannot be read says so and why."""
    folder = Path(folder)
    out = {"path": str(folder), "name": folder.name}
    try:
        info = rundir.read_run_json(folder) or {}
        recipe = read_recipe(folder)
    except FtuneError as exc:
        return {**out, "status": "unreadable", "reason": str(exc)}
    status = info.get("status", "unfinished")  # no run.json yet: a run starting, or only checkpoints left
    if status in ("running", "unfinished") and _locked(folder):
        status = "running"
    elif status == "running":
        status = "stopped"  # killed without a word: its process, and so its lock, is gone
    out["status"] = status
    if info.get("reason") and status in ("failed", "interrupted"):
        out["reason"] = info["reason"]
    if status == "running":
        out.update(_progress(folder, info))
    out["started"] = info.get("started")
    out["objective"] = info.get("objective") or recipe.get("training.objective")
    out["method"] = info.get("method") or recipe.get("method.name")
    out["base"] = recipe.get("model.base")
    parent = Path(str(out["base"])).expanduser() if out["base"] else None
    if parent is not None and parent.is_dir() and rundir.is_run(parent):
        out["parent"] = parent.name
    for key in ("steps", "train_seconds", "final_loss"):
        out[key] = info.get(key)
    for when in ("before", "after"):
        figures = info.get(f"eval_{when}")
        for key, name in EVAL_FIGURES:
            if isinstance(figures, dict) and is_number(figures.get(key)):
                out[f"{name}_{when}"] = figures[key]
    out["task_metrics"] = _task_metrics(folder, recipe)
    benchmarks, lower = _benchmarks(folder)
    out["task_metrics"].update(benchmarks)
    if lower:
        out["lower_is_better"] = lower
    return out


def read_recipe(folder: Path) -> dict:
    """The run's recipe.yaml flattened (`training.learning_rate`); {} without one."""
    import yaml

    path = folder / rundir.RECIPE
    if not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FtuneError(f"{path} is unreadable ({str(exc).splitlines()[0]}); restore it") from None
    if not isinstance(recipe, dict):
        raise FtuneError(f"{path} is not a recipe (a YAML mapping of sections); restore it")
    return rundir._flatten(recipe)


def _locked(folder: Path) -> bool:
    """Whether a process holds the run folder's lock: taken and released at once when free."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _progress(folder: Path, info: dict) -> dict:
    """A running run's step of max_steps (its last logged loss) and the time left at its pace since it started
    (or resumed: the steps before its checkpoint took no time in this start)."""
    last = next((r for r in reversed(plots.read_metrics(folder)) if "loss" in r), {})
    step, total = last.get("step", 0), last.get("max_steps")
    out = {"step": step, "max_steps": total, "eta_seconds": None}
    started = _time(info.get("started"))
    done = step - rundir.checkpoint_step(Path(info["resumed_from"]) if info.get("resumed_from") else None)
    if started is not None and is_number(total) and done > 0:
        out["eta_seconds"] = round(max(time.time() - started, 0) / done * max(total - step, 0))
    return out


def _time(stamp) -> float | None:
    try:
        return datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _task_metrics(folder: Path, recipe: dict) -> dict:
    """The fine-tuned model's `eval --generate` metrics on the run's own eval data (eval.json names it as
    evaluate._run_eval_names does); {} when none were measured."""
    own, split = recipe.get("data.eval.path", recipe.get("data.eval")), recipe.get("data.eval_split")
    if not own and not split:
        return {}
    names = [own] if own else [f"training data (eval_split {split})"]
    for e in rundir.evaluations(folder):
        if e.get("kind") == "generate" and e.get("data") == names:
            scores = e["results"].get("tuned") or e["results"].get("model") or {}
            return {k: v for k, v in scores.items() if is_number(v)}
    return {}


def _benchmarks(folder: Path) -> tuple[dict, list[str]]:
    """The fine-tuned model's `eval --tasks` figures (the latest result of each metric), and the metrics of them
    whose lower values are better (a harness task declares it: perplexities)."""
    figures, lower = {}, []
    for e in rundir.evaluations(folder):
        if e.get("kind") != "tasks":
            continue
        scores = e["results"].get("tuned") or e["results"].get("model") or {}
        figures.update({k: v for k, v in scores.items() if is_number(v)})
        lower += [k for k, higher in (e.get("higher_is_better") or {}).items() if higher is False and k in scores]
    return figures, lower


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best(values: list, which: str | None) -> set[int]:
    """The indices of the best values ("lower" or "higher" better); none without an order or two different
    numbers to choose from."""
    numbers = {i: v for i, v in enumerate(values) if is_number(v)}
    if which not in ("lower", "higher") or len(set(numbers.values())) < 2:
        return set()
    top = (min if which == "lower" else max)(numbers.values())
    return {i for i, v in numbers.items() if v == top}


def value(summary: dict, column: str):
    """A summary's figure in `column`: its own key, or one of its task metrics."""
    return summary[column] if column in summary else summary.get("task_metrics", {}).get(column)


def better(column: str, summaries: list[dict]) -> str | None:
    """Which way is better in `column`, "lower" or "higher"; None for names, times and the base model's figures."""
    if column in BETTER:
        return BETTER[column]
    if column not in task_metrics(summaries):
        return None
    return "lower" if any(column in s.get("lower_is_better", ()) for s in summaries) else TASK_BETTER


def task_metrics(summaries: list[dict]) -> list[str]:
    """The task metrics any of these runs has, in the order first met."""
    return list(dict.fromkeys(k for s in summaries for k in s.get("task_metrics", {})))


def columns(summaries: list[dict]) -> list[str]:
    """Every column --sort takes for these runs."""
    return sorted(FIGURES | {f"{name}_{when}" for _, name in EVAL_FIGURES for when in ("before", "after")}) + [
        k for k in task_metrics(summaries) if k not in FIGURES
    ]


def sort(summaries: list[dict], column: str) -> list[dict]:
    """Sorted by `column`: the best first where one is better, the newest first by `started`, else A to Z; runs
    without the figure last."""
    if column not in columns(summaries):
        raise FtuneError(f"--sort: no column {column!r}; choose one of {', '.join(columns(summaries))}")
    have = [s for s in summaries if value(s, column) is not None]
    missing = [s for s in summaries if value(s, column) is None]
    numeric = all(is_number(value(s, column)) for s in have)
    descending = better(column, summaries) == "higher" or column == "started"

    def key(s: dict):
        found = value(s, column)
        if column == "started":
            return _time(found) or 0.0
        return found if numeric else str(found)

    have.sort(key=key, reverse=descending)
    return have + missing
