"""`ftune compare RUN RUN...`: what differs between the runs' recipes, their figures side by side and their
curves, as one dict for the terminal, --json and the page (reports.page.compare_page)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_cli import files, rundir
from finetune_cli.errors import FtuneError
from finetune_cli.reports import plots, runs

IGNORED = {"output.dir"}  # differs between any two runs: says nothing about them
# the figures shown side by side, in this order (then the task metrics): the before ones are the base model's
FIGURES = ["steps", "train_seconds", "final_loss"] + [
    f"{name}_{when}" for _, name in runs.EVAL_FIGURES for when in ("before", "after")
]
PAGE_TITLE = "<title>ftune compare:"  # how an earlier compare page is known (reports.page's template)


def collect(paths: list[str | Path]) -> dict:
    """{"runs": summaries, "differences": the recipe keys whose values differ, "metrics": figures with which way
    is better, "curves": each run's metrics.jsonl rows}."""
    if len(paths) < 2:
        raise FtuneError("ftune compare needs at least two run folders, e.g. ftune compare runs/a runs/b")
    folders = [Path(p).expanduser() for p in paths]
    for folder in folders:
        if not folder.is_dir() or not rundir.is_run(folder):
            raise FtuneError(f"{folder}: not a run folder (none with ftune's .ftune marker of a run); give run folders")
    summaries = [runs.summarize(f) for f in folders]
    for s in summaries:
        if s["status"] == "unreadable":
            raise FtuneError(s["reason"])
    recipes = [runs.read_recipe(f) for f in folders]
    keys = dict.fromkeys(k for r in recipes for k in r if k not in IGNORED)  # the recipes' order
    differences = [
        {"key": k, "values": [r.get(k) for r in recipes]}
        for k in keys
        if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in recipes}) > 1
    ]
    metrics = [
        {"name": name, "values": [runs.value(s, name) for s in summaries], "better": runs.better(name, summaries)}
        for name in FIGURES + runs.task_metrics(summaries)
    ]
    return {
        "runs": summaries,
        "differences": differences,
        "metrics": [m for m in metrics if any(v is not None for v in m["values"])],
        "curves": [{"name": s["name"], "rows": plots.read_metrics(f)} for s, f in zip(summaries, folders)],
    }


def write_page(data: dict, out: Path) -> None:
    """The compare page in `out`, written whole or not at all; an existing file is replaced only when it is an
    earlier compare page."""
    from finetune_cli.reports import page

    out = Path(out).expanduser()
    if out.is_dir() or out.is_symlink():
        raise FtuneError(f"-o: {out} is a folder or a link; give a new file such as compare.html")
    if out.exists() and PAGE_TITLE not in out.read_text(encoding="utf-8", errors="replace")[:4096]:
        raise FtuneError(f"-o: {out} exists and is not an ftune compare page; ftune never overwrites it")
    if not out.parent.is_dir():
        raise FtuneError(f"-o: the folder {out.parent} does not exist")
    files.write_text(out, page.compare_page(data))
