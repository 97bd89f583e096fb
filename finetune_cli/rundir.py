"""Run directories and output folders: their file names, what ftune wrote, the lock, and what a TARGET is.

Every command that writes a folder (train, merge-adapter) asks `check_output` first and replaces only what
ftune wrote; every command that reads a model (eval, generate, chat, merge-adapter) opens it with `open_target`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from finetune_cli.errors import FtuneError

RECIPE = "recipe.yaml"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
PREDICTIONS = "predictions.jsonl"  # `ftune eval --generate`'s answers on the run's eval data, one JSON line each
OTHER_PREDICTIONS = re.compile(r"predictions-[\w.-]+-[0-9a-f]{8}\.jsonl")  # its answers on other data (evaluate.py)
ADAPTER = "adapter"
MODEL = "model"
CHECKPOINTS = "checkpoints"
STAGING = ".staging"
START = "start"  # a run started from a LoRA run (model.base: RUN): that run's adapter merged into its base
MARKER = ".ftune"  # {"kind": "run" | "merge", "files": [...]}: this folder was written by ftune
ADAPTER_RECORD = "ftune.json"  # in an adapter folder: base model, method and model options
LOSS_PLOT = "loss.png"  # train loss per step, eval loss, learning rate (reports.plots)
REPORT = "report.html"  # the run's self-contained page (reports.page)
TENSORBOARD = "tensorboard"  # training.report_to: tensorboard writes its event files here

# What a run directory may hold; anything else is the user's and is never deleted.
RUN_ENTRIES = {
    RECIPE,
    RUN_JSON,
    METRICS,
    EVAL,
    PREDICTIONS,
    ADAPTER,
    MODEL,
    START,
    CHECKPOINTS,
    STAGING,
    MARKER,
    LOSS_PLOT,
    REPORT,
    TENSORBOARD,
}
_TEMPORARY = re.compile(r"\.(?P<name>.+?)\.(tmp|old)(-[\w-]+)?")  # files.py's and our renames' temporary names
_CHECKPOINT = re.compile(r"checkpoint-\d+")  # a checkpoint folder in checkpoints/ (trainer.Checkpoints)


def project_root() -> Path | None:
    """The checkout ftune runs from (when installed from one): never an output folder."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def _protected(path: Path) -> str | None:
    """Why `path` can never be an output folder, or None."""
    real = path.expanduser().resolve()
    if real == Path(real.anchor):
        return "the root folder"
    if real == Path.home().resolve():
        return "your home folder"
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "the current folder"
    if real in cwd.parents:
        return "a parent of the current folder"
    if real == project_root():
        return "ftune's own checkout"
    return None


def read_marker(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_run(folder: Path) -> bool:
    return (read_marker(folder) or {}).get("kind") == "run"


def _ours(name: str, known: set[str], pattern: re.Pattern | None = None) -> bool:
    temporary = _TEMPORARY.fullmatch(name)
    name = temporary["name"] if temporary else name
    return name in known or bool(pattern and pattern.fullmatch(name))


def _foreign(folder: Path, kind: str) -> list[str]:
    """The entries of `folder` ftune did not write, for a folder of `kind` ("run" or an output such as "merge")."""
    if kind == "run":
        known = RUN_ENTRIES
    else:
        known = set((read_marker(folder) or {}).get("files", [])) | {MARKER}
    pattern = OTHER_PREDICTIONS if kind == "run" else None
    found = [p.name for p in folder.iterdir() if not _ours(p.name, known, pattern)]
    return sorted(found + (_foreign_checkpoints(folder) if kind == "run" else []))


def _foreign_checkpoints(folder: Path) -> list[str]:
    """What a run's checkpoints/ holds besides the checkpoint-N folders ftune moves there (a finished, resumed or
    replaced run deletes it): a user's checkpoints/epoch3.pt is theirs."""
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_symlink() or (checkpoints.exists() and not checkpoints.is_dir()):
        return [CHECKPOINTS]
    if not checkpoints.is_dir():
        return []
    return [
        f"{CHECKPOINTS}/{p.name}"
        for p in checkpoints.iterdir()
        if p.is_symlink() or not p.is_dir() or not _CHECKPOINT.fullmatch(p.name)
    ]


def _contents(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_recipe(path: Path, overrides: list[str], resume: bool):
    """The recipe `ftune train PATH` means: a recipe file, or (with --resume) a run directory's own recipe."""
    from finetune_cli import recipe as recipes

    path = Path(path)
    if not path.is_dir():
        return recipes.load(path, overrides)
    if not resume:
        raise FtuneError(f"{path} is a run directory; pass --resume to continue it")
    if not (path / RECIPE).is_file():
        raise FtuneError(
            f"{path}: no recipe.yaml to resume with; give the recipe: "
            f"ftune train RECIPE --resume --set output.dir={path}"
        )
    resolved = recipes.load(path / RECIPE, overrides)
    resolved.output.dir = str(path)
    return resolved


def check_output(path: Path, kind: str, overwrite: bool, key: str, resume: bool = False) -> None:
    """Refuse, before anything is written, an output folder that is not free for a new `kind` folder.

    Free: missing or empty. With `overwrite` (or `resume`, for a run): also a folder whose .ftune marker says it
    is ftune's `kind` and that holds only what ftune writes there (a resumed run leaves other files alone, but
    deletes its checkpoints/ when it completes). Never: a file or a path under one, a symbolic link, `/`, home,
    the current folder or its parents, ftune's checkout."""
    why = _protected(path)
    if why:
        example = {"run": "runs/NAME", "merge": "merged/NAME"}.get(kind, f"{kind}s/NAME")
        raise FtuneError(f"{key}: {path} is {why}; give the {kind} a folder of its own, e.g. {example}")
    if path.is_symlink() and (overwrite or resume):
        raise FtuneError(f"{key}: {path} is a symbolic link; give the folder it points to ({path.resolve()})")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise FtuneError(f"{key}: {path} is inside {above}, which is a file, not a folder; choose another {key}")
    if path.exists() and not path.is_dir():
        raise FtuneError(f"{key}: {path} is a file, not a folder; choose another {key}")
    if not path.exists() or not _contents(path):
        return
    marker = read_marker(path) or {}
    if marker.get("kind") not in (None, kind):  # another command's output: never replaced here
        raise FtuneError(f"{key}: {path} holds a {marker['kind']} output of ftune, not a {kind}; choose another {key}")
    if marker.get("kind") != kind:  # only the marker ftune wrote proves the folder is ftune's
        foreign = _contents(path)
    else:
        foreign = _foreign_checkpoints(path) if resume else _foreign(path, kind)
    if foreign:
        raise FtuneError(
            f"{key}: {path} holds files ftune did not write ({_listing(foreign)}); "
            f"ftune never replaces them: choose another {key}"
        )
    if resume or overwrite:
        return
    if kind != "run":
        raise FtuneError(f"{key}: {path} exists; pass --overwrite to replace it or choose another folder")
    status = (read_run_json(path, strict=False) or {}).get("status", "unfinished")
    raise FtuneError(
        f"{key}: {path} already holds a run ({status}); pass --resume to continue it, --overwrite to "
        "replace it, or choose another output.dir"
    )


def drop_checkpoints(out: Path) -> None:
    """A completed run's checkpoints: the checkpoint-N folders ftune moved into checkpoints/ and its staging;
    anything else found there stays (and so does checkpoints/ then)."""
    checkpoints = out / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for entry in checkpoints.iterdir():
            if _CHECKPOINT.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        try:
            checkpoints.rmdir()
        except OSError:
            pass
    shutil.rmtree(out / STAGING, ignore_errors=True)


def clear(path: Path) -> None:
    """Empty a folder `check_output` allowed to overwrite (the folder itself stays: it holds our lock); the marker
    goes last, so a clear cut short leaves a folder --overwrite still knows as ftune's."""
    for entry in sorted(path.iterdir(), key=lambda p: p.name == MARKER):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextmanager
def lock(path: Path, key: str = "output.dir"):
    """Hold `path` (created if missing) for this process alone: a second ftune is refused, exit 2.

    The lock is the kernel's flock on the folder itself: no lock file to leave behind, and it is dropped when its
    process dies, so a killed run never blocks the next one."""
    import fcntl

    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise FtuneError(
            f"{key}: {path} is in use by another ftune run; wait for it to finish or choose another {key}"
        ) from None
    done = False
    try:
        yield
        done = True
    finally:
        if created and not done and not _contents(path):  # nothing written: leave no trace of the attempt
            try:
                path.rmdir()
            except OSError:
                pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def mark(path: Path, kind: str, written: list[str] = ()) -> None:
    from finetune_cli import files

    files.write_json(path / MARKER, {"kind": kind, "files": sorted(written)})


def replace_folder(tmp: Path, out: Path, kind: str, written: list[str]) -> None:
    """Put a finished temporary folder in place of `out` (checked with check_output), marked as ftune's."""
    from finetune_cli import files

    mark(tmp, kind, written)
    files.replace_folder(tmp, out)


def read_run_json(folder: Path, strict: bool = True) -> dict | None:
    """A run's run.json; a corrupt one is an error naming it (or None when not `strict`)."""
    path = folder / RUN_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        if not strict:
            return None
        raise FtuneError(f"{path} is unreadable ({exc}); restore it, or resume the run to rewrite it") from None
    return info


def read_json(path: Path, what: str) -> dict:
    """A JSON object file ftune or PEFT wrote; a missing or corrupt one is an error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise FtuneError(f"{path} is missing: {what}") from None
    except (OSError, ValueError) as exc:
        raise FtuneError(f"{path} is corrupt ({exc}): {what}") from None
    return data


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: renamed into checkpoints/ only once fully written."""
    found = [p for p in (out / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(found, key=checkpoint_step) if found else None


def checkpoint_step(path: Path | None) -> int:
    match = re.search(r"(\d+)$", path.name) if path else None
    return int(match.group(1)) if match else 0


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (no step twice) and a torn last line (kill -9)."""
    from finetune_cli import files

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    files.write_text(path, "".join(line + "\n" for line in kept))


def save_evaluation(run_dir: Path, result: dict) -> None:
    """Keep one result per data set and kind (perplexity, generate, tasks: its list of tasks) in the run's eval.json:
    scoring other data, generating answers or running benchmarks never replaces the run's own perplexity."""
    from finetune_cli import files

    def key(e: dict):
        return e.get("data"), e.get("kind", "perplexity")

    kept = [e for e in evaluations(run_dir) if key(e) != key(result)]
    files.write_json(run_dir / EVAL, {"evaluations": [*kept, result]})


def evaluations(run_dir: Path) -> list[dict]:
    """The results in a run's eval.json, each naming its data ([] for an older or unreadable file)."""
    try:
        found = json.loads((run_dir / EVAL).read_text(encoding="utf-8")).get("evaluations", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in found if isinstance(e, dict) and isinstance(e.get("results"), dict)]


def evaluation_markdown(run_dir: Path | None) -> list[str]:
    """The run's eval.json as Markdown tables for a model card: classification, perplexity, generation metrics,
    then the harness's benchmarks."""
    results = evaluations(run_dir) if run_dir is not None else []
    perplexity = [e for e in results if e.get("kind", "perplexity") == "perplexity"]
    generated = [e for e in results if e.get("kind") == "generate"]
    classified = [e for e in results if e.get("kind") == "classification"]
    benchmarks = [e for e in results if e.get("kind") == "tasks"]
    lines = []
    if classified:
        lines += ["", "## Classification (ftune eval)", "", "| data | model | rows | accuracy | macro F1 |"]
        lines.append("|---|---|---|---|---|")
        for e in classified:
            data = ", ".join(str(d) for d in e.get("data", [])) or "?"
            for m, r in e["results"].items():
                lines.append(f"| {data} | {m} | {r['examples']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} |")
    if perplexity:
        lines += ["", "## Evaluation (ftune eval)", "", "| data | model | scored tokens | perplexity |"]
        lines.append("|---|---|---|---|")
        for e in perplexity:
            data = ", ".join(str(d) for d in e.get("data", [])) or "?"
            lines += [f"| {data} | {m} | {r['tokens']} | {r['perplexity']:.4f} |" for m, r in e["results"].items()]
    if generated:
        lines += ["", "## Generated answers (ftune eval --generate)", "", "| data | model | metrics |", "|---|---|---|"]
        for e in generated:
            data = ", ".join(str(d) for d in e.get("data", [])) or "?"
            for m, r in e["results"].items():
                lines.append(f"| {data} | {m} | {', '.join(f'{k} {v:.4g}' for k, v in r.items())} |")
    if benchmarks:
        lines += ["", "## Benchmarks (ftune eval --tasks, lm-evaluation-harness)", ""]
        lines += ["| task metric | model | value | stderr | n-shot |", "|---|---|---|---|---|"]
        for e in benchmarks:
            for m, r in e["results"].items():
                for name, v in r.items():
                    error = (e.get("stderr") or {}).get(m, {}).get(name)
                    shots = (e.get("num_fewshot") or {}).get(name.split(" ")[0], "")
                    lines.append(f"| {name} | {m} | {v:.4f} | {'' if error is None else f'{error:.4f}'} | {shots} |")
    return lines


def recipe_changes(folder: Path, recipe: dict) -> list[str] | None:
    """The keys in which `recipe` (a resolved recipe as a dict) differs from the run's own recipe.yaml, apart from
    the ones each machine may set differently; [] without a recipe.yaml (only checkpoints left), None when the
    file is unreadable."""
    import yaml

    path = folder / RECIPE
    if not path.is_file():
        return []
    try:
        saved = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    now = _flatten(recipe)
    if now.get("training.packing") == "auto" and isinstance(saved.get("training.packing"), bool):
        from finetune_cli import hardware  # a run from before `auto`: the same if auto means the same here

        now["training.packing"] = hardware.packing_default()
    added = _added_defaults(saved, now)
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in _PER_MACHINE | added)


def _added_defaults(saved: dict, now: dict) -> set[str]:
    """Keys a newer ftune added (absent from the run's recipe.yaml) that still hold their default: not changes,
    so a run started before `training.objective` existed resumes as it did."""
    from finetune_cli import recipe as recipes

    defaults = _flatten(recipes.Recipe.model_validate({"data": {"train": "x"}}).model_dump(mode="json"))
    return {k for k in now.keys() - saved.keys() if k in defaults and now[k] == defaults[k]}


# keys that may differ between the run's recipe and a resume of it (each machine of a multi-node run has its own)
_PER_MACHINE = {
    "output.dir",
    "distributed.machine_rank",
    "distributed.main_process_ip",
    "distributed.main_process_port",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def artifact(folder: Path) -> Path | None:
    """A run's finished adapter/ or model/ folder."""
    if (folder / ADAPTER / "adapter_config.json").is_file():
        return folder / ADAPTER
    if (folder / MODEL / "config.json").is_file():
        return folder / MODEL
    return None


@dataclass
class Target:
    """What a command needs to load what the user named, as training loaded it."""

    name: str
    kind: str  # "run" | "adapter" | "model" (a model folder, a merged folder, a base name or hub id)
    weights: str  # the folder or hub id whose weights load first (the base, for adapters)
    tokenizer: str  # where the tokenizer (with the chat template training used) is saved
    adapter: Path | None = None
    base: str | None = None  # the base model as the run or adapter names it
    run_dir: Path | None = None
    recipe: object = None  # the run's Recipe
    dtype: str = "auto"
    trust_remote_code: bool = False
    method: dict = field(default_factory=dict)
    task: str | None = None  # a classifier: "text" or "image"; None for a causal language model
    labels: list[str] = field(default_factory=list)  # a classifier's class names in id order

    def refuse_classifier(self, why: str) -> None:
        """Verbs of causal language models (generate, chat, serve, GGUF export) refuse a classifier, saying why."""
        if self.task:
            raise FtuneError(
                f"{self.name} is a classifier ({', '.join(self.labels)}): {why}; use ftune classify {self.name} "
                "--text ... or ftune eval"
            )


def open_target(name: str, base: str | None = None) -> Target:
    """A run directory, an adapter folder, a model folder, or a base model name / hub id.

    `base` replaces the base model an adapter records."""
    from finetune_cli import models

    path = Path(name).expanduser()
    if path.is_file() and path.suffix != ".gguf":
        folder = path.parent
        model = is_run(folder) or (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()
        hint = f", such as the folder this file is in: {folder}" if model else ""
        raise FtuneError(
            f"{name} is a file, not a model: give a run directory, an adapter folder, a model folder, a .gguf file "
            f"or a model name{hint}"
        )
    kind = (read_marker(path) or {}).get("kind")  # merge-adapter's and export's folders are marked too: models
    if path.is_dir() and (kind == "run" or (kind is None and ((path / RUN_JSON).exists() or (path / RECIPE).exists()))):
        return _open_run(name, path, base)
    if path.is_dir() and (path / "adapter_config.json").exists():
        return _open_adapter(name, path, base)
    if path.is_dir() and (path / "config.json").is_file():
        return _classifier(Target(name, "model", str(path), str(path)), str(path))
    if path.is_dir():
        raise FtuneError(
            f"{name}: neither a run directory, an adapter folder (adapter_config.json) nor a model folder (config.json)"
        )
    source = models.resolve(name)
    return _classifier(Target(name, "model", source, source), source)


def _classifier(target: Target, folder: str) -> Target:
    """A model folder that is a classifier (*ForSequenceClassification, *ForImageClassification) says so."""
    from finetune_cli.classification import model as classifier

    target.task = classifier.architecture_task(folder)
    if target.task:
        target.labels = classifier.labels_of(folder)
    return target


def load(target: str):
    """(model, tokenizer) for a run directory, an adapter folder, a model folder or a base model name, loaded as
    training loaded it (dtype, trust_remote_code, the chat template saved with the adapter or model)."""
    found = open_target(target)
    found.refuse_classifier("it answers with a class, not text")
    from finetune_cli import models

    tokenizer = models.load_tokenizer(found.tokenizer, None, found.trust_remote_code, require_template=False)
    model = models.load_model(found.weights, found.dtype, found.trust_remote_code)
    if found.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(found.adapter))
    return model, tokenizer


def start_point(base: str) -> Target | None:
    """`model.base` naming a finished ftune run (the SFT -> DPO pipeline, or any run continued): that run opened,
    its weights the new run's start. None when `base` is not a run. A LoRA/QLoRA run's adapter is merged into its
    base (in full precision) when training starts; a full run's model/ is used as it is."""
    path = Path(base).expanduser()
    if not path.is_dir() or not is_run(path):
        return None
    found = open_target(str(path))
    if found.adapter is not None:
        try:
            check_lora(found.adapter)  # prompt tuning's virtual tokens cannot be merged into weights
        except FtuneError as exc:
            raise FtuneError(f"model.base: {base} cannot be a starting point: {exc}") from None
    return found


def _open_run(name: str, path: Path, base: str | None) -> Target:
    from finetune_cli import recipe as recipes

    info = read_run_json(path) or {}
    found = artifact(path) or next((path / n for n in (ADAPTER, MODEL) if (path / n).is_dir()), None)
    if found is None:
        status = info.get("status", "unfinished")
        if status == "completed":
            raise FtuneError(f"{path}: the run says completed but its adapter/ or model/ is missing; train it again")
        if status == "running":
            raise FtuneError(
                f"{path}: this run has not finished (status running): wait for it, or if it was killed, "
                f"resume it with `ftune train {path} --resume`"
            )
        raise FtuneError(
            f"{path}: this run did not finish (status {status}): resume it with `ftune train {path} --resume`"
        )
    if not (path / RECIPE).is_file():
        raise FtuneError(f"{path / RECIPE} is missing: the run's recipe says how to load its model; restore it")
    recipe = recipes.load(path / RECIPE)
    m = recipe.model
    options = {"dtype": m.dtype, "trust_remote_code": m.trust_remote_code}
    if found.name == MODEL:
        target = Target(name, "run", str(found), str(found), base=m.base, run_dir=path, recipe=recipe, **options)
        return _classifier(target, str(found))
    # started from another run: the adapter's own record names the weights it trained on (this run's start/)
    target = _open_adapter(name, found, base or (None if is_run(Path(m.base).expanduser()) else m.base))
    target.kind, target.run_dir, target.recipe = "run", path, recipe
    target.dtype, target.trust_remote_code = m.dtype, m.trust_remote_code
    return target


def _open_adapter(name: str, folder: Path, base: str | None = None) -> Target:
    config = read_json(folder / "adapter_config.json", "an adapter folder needs PEFT's config; restore it")
    weights = folder / "adapter_model.safetensors"
    _check_safetensors(weights)
    has_record = (folder / ADAPTER_RECORD).exists()
    record = read_json(folder / ADAPTER_RECORD, "ftune's record of the adapter") if has_record else {}
    base = base or record.get("base") or config.get("base_model_name_or_path")
    if not base:
        raise FtuneError(f"{folder}: the adapter does not record its base model; pass --base")
    options = record.get("model", {})
    return Target(
        name,
        "adapter",
        _resolve_base(base),
        str(folder),
        adapter=folder,
        base=base,
        dtype=options.get("dtype", "auto"),
        trust_remote_code=bool(options.get("trust_remote_code", False)),
        method=record.get("method") or {"name": str(config.get("peft_type", "lora")).lower()},
        task=(record.get("classification") or {}).get("input"),
        labels=list((record.get("classification") or {}).get("labels", [])),
    )


def _resolve_base(base: str) -> str:
    from finetune_cli import models

    return models.resolve(base)


def _check_safetensors(path: Path) -> None:
    """A missing or truncated weights file is named before any model is loaded."""
    if not path.is_file():
        raise FtuneError(f"{path} is missing; restore the adapter folder or train again")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt"):  # checks the header covers the whole file
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise FtuneError(f"{path} is corrupt or truncated ({exc}); restore it or train again") from None


def check_lora(adapter: Path) -> None:
    """Only LoRA adapters change weights; prompt tuning (and other virtual-token methods) cannot be folded in."""
    config = read_json(adapter / "adapter_config.json", "an adapter folder needs PEFT's config")
    if config.get("peft_type") != "LORA":
        raise FtuneError(
            f"{adapter}: a {config.get('peft_type', 'non-LoRA').lower()} adapter cannot be merged: it adds virtual "
            "tokens in front of the input rather than changing weights. Use the adapter folder itself with "
            "peft.PeftModel.from_pretrained(base, adapter)"
        )
