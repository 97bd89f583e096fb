"""`ftune eval --tasks`: standard benchmarks through EleutherAI's lm-evaluation-harness, to see what fine-tuning
cost elsewhere. The harness is driven through its Python API (`simple_evaluate` with its `HFLM` wrapped around the
model ftune loaded), so an adapter is scored on its base without merging, with ftune's dtype rules, and the figures
are the harness's own: `lm_eval --model hf --model_args pretrained=MERGED --tasks ...` gives the same (tested).

Tasks are checked and their data loaded before any weights load: an unknown name is an error with the closest
names, a Hub task whose data is neither cached nor reachable (offline) an error naming it and HF_DATASETS_OFFLINE.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from finetune_cli import models, rundir
from finetune_cli.errors import FtuneError
from finetune_cli.evaluation.evaluate import each_model
from finetune_cli.results import TasksEval

EXTRA = "pip install 'ftune[tasks]' (EleutherAI's lm-evaluation-harness, the lm-eval package)"
YAML = (".yaml", ".yml")


def _harness():
    try:
        import lm_eval
    except ImportError:
        raise FtuneError(f"--tasks needs lm-evaluation-harness: {EXTRA}") from None
    for name in ("lm_eval", "lm-eval"):  # its INFO lines would bury ftune's table; warnings still show
        logging.getLogger(name).setLevel(logging.WARNING)
    return lm_eval


def parse(spec: str) -> list[str]:
    """`hellaswag,arc_easy,path/to/task.yaml` as its entries."""
    entries = [e.strip() for e in spec.split(",")]
    if not spec.strip() or not all(entries):
        raise FtuneError(f"--tasks {spec!r}: give task names or task YAML paths separated by commas")
    return list(dict.fromkeys(entries))


def _is_path(entry: str) -> bool:
    return entry.lower().endswith(YAML) or "/" in entry or entry.startswith(".") or Path(entry).is_dir()


def _configs(entry: str) -> list[dict]:
    """A task YAML (or each one in a folder) as the harness's CLI reads it (its `include:`s and `!function`s
    resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(entry).expanduser()
    if not path.exists():
        raise FtuneError(f"--tasks {entry}: no such file or folder (a task YAML, a folder of them, or a task name)")
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in YAML) if path.is_dir() else [path]
    if not found:
        raise FtuneError(f"--tasks {entry}: the folder holds no task YAML (*.yaml)")
    configs = []
    for file in found:
        try:
            config = load_yaml(str(file.resolve()), resolve_func=True)
        except Exception as exc:  # noqa: BLE001 - YAML syntax, a missing include, a bad !function
            detail = " ".join(str(exc).split())[:300]
            raise FtuneError(f"{file}: not a task the harness can read ({type(exc).__name__}: {detail})") from None
        if not isinstance(config, dict) or not (config.get("task") or config.get("group")):
            raise FtuneError(f"{file}: a harness task YAML needs a `task:` name (see the harness's task guide)")
        configs.append(config)
    return configs


def resolve(spec: str):
    """(what to pass simple_evaluate, its TaskManager, the task names): checked, and each task's data loaded once
    (the datasets cache keeps it), so a bad task fails before a model loads."""
    _harness()
    from lm_eval.tasks import TaskManager

    entries = parse(spec)
    names = [e for e in entries if not _is_path(e)]
    manager = TaskManager(include_defaults=bool(names))
    wanted = []
    for entry in entries:
        if _is_path(entry):
            wanted += _configs(entry)
        elif manager.match_tasks([entry]):
            wanted.append(entry)
        else:
            close = difflib.get_close_matches(entry, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else "; `lm-eval ls tasks` lists them"
            raise FtuneError(f"--tasks {entry}: no such task in lm-evaluation-harness{hint}")
    for item in wanted:
        _load_data(manager, item)
    return wanted, manager


def _load_data(manager, item) -> None:
    name = item if isinstance(item, str) else item.get("task") or item.get("group")
    try:
        manager.load([item])
    except FtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the datasets library's many errors for data it cannot get
        import datasets

        offline = datasets.config.HF_HUB_OFFLINE
        why = (
            "offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set) and not in the datasets cache"
            if offline
            else "not in the datasets cache and the Hub cannot be reached (set HF_DATASETS_OFFLINE=1 to fail fast)"
        )
        detail = " ".join(str(exc).split())[:200]
        raise FtuneError(
            f"--tasks {name}: its data cannot be loaded ({why}): {type(exc).__name__}: {detail}; run it once with "
            "network to cache it, or point a task YAML at local files"
        ) from None


def run_tasks(
    target: str,
    spec: str,
    compare_base: bool = False,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
) -> TasksEval:
    """Score TARGET (and with `compare_base` its base) on the harness's tasks."""
    lm_eval = _harness()
    found = rundir.open_target(target)
    found.refuse_classifier("the harness's tasks score a language model's text")
    if compare_base and found.kind == "model":
        raise FtuneError(f"--compare-base needs a run directory or an adapter; {target} is a model")
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise FtuneError(f"--limit {limit}: a number of examples per task (1, 2, ...) or a fraction below 1")
    wanted, manager = resolve(spec)
    tokenizer = models.load_tokenizer(
        found.tokenizer, trust_remote_code=found.trust_remote_code, require_template=False
    )

    def score(model) -> dict:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=wanted,
            num_fewshot=num_fewshot,
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            task_manager=manager,
            log_samples=False,
        )

    raw = each_model(found, score, compare_base)
    first = next(iter(raw.values()))
    figures = {name: _figures(out) for name, out in raw.items()}
    results = {name: values for name, (values, _) in figures.items()}
    metrics = list(next(iter(results.values())))
    result = TasksEval(
        kind="tasks",
        target=str(target),
        base=found.base or str(target),
        data=parse(spec),
        harness=lm_eval.__version__,
        tasks=sorted(first["results"]),
        num_fewshot=first.get("n-shot", {}),
        limit=limit,
        samples={k: v.get("effective") for k, v in first.get("n-samples", {}).items()},
        metrics=metrics,
        higher_is_better=_higher(first, metrics),
        results=results,
        stderr={name: errors for name, (_, errors) in figures.items()},
    )
    if "base" in results and "tuned" in results:
        result.change = {m: round(results["tuned"][m] - results["base"][m], 6) for m in metrics}
    if found.run_dir:
        from finetune_cli.reports import page

        rundir.save_evaluation(found.run_dir, result.dump())
        page.refresh_report(found.run_dir)
    return result


def metric_name(task: str, key: str) -> str:
    """`arc_easy acc` for the harness's `acc,none`; a filter other than `none` stays: `gsm8k exact_match,flexible`."""
    metric, _, filter_name = key.partition(",")
    return f"{task} {metric}" + (f",{filter_name}" if filter_name and filter_name != "none" else "")


def _figures(out: dict) -> tuple[dict[str, float], dict[str, float]]:
    """The harness's results as {"task metric": value} and their standard errors (groups' aggregates included)."""
    values, errors = {}, {}
    for task in sorted(out["results"]):
        for key, value in out["results"][task].items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr"):
                errors[metric_name(task, f"{metric[: -len('_stderr')]},{filter_name}")] = float(value)
            else:
                values[metric_name(task, key)] = float(value)
    return values, {k: v for k, v in errors.items() if k in values}


def _higher(out: dict, metrics: list[str]) -> dict[str, bool]:
    """Whether a higher value is better, per metric, as each task declares it."""
    higher = out.get("higher_is_better", {})
    found = {}
    for name in metrics:
        task, metric = name.split(" ", 1)
        flag = higher.get(task, {}).get(metric.split(",")[0])
        if isinstance(flag, bool):
            found[name] = flag
    return found
