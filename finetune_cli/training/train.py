"""Training, top to bottom: preflight (everything that can fail on the user's input) -> prepare (tokenize,
load the model, start the run directory) -> fit (TRL's trainer, through trainer.py) -> save; run.json's status
is written by one context manager whatever happens."""

from __future__ import annotations

import platform
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from finetune_cli import __version__, files, hardware, models, rundir
from finetune_cli import recipe as recipes
from finetune_cli.data import cache, jsonl, preference, sources, stream
from finetune_cli.errors import FAILED, INTERRUPTED, FtuneError
from finetune_cli.evaluation import pairwise
from finetune_cli.evaluation.perplexity import build_examples, corpus_nll, default_stride
from finetune_cli.inference.generate import reply
from finetune_cli.reports import page
from finetune_cli.results import RunInfo
from finetune_cli.training import classifier, launch, methods, trainer


@dataclass
class Plan:
    """What preflight found and loaded (the run to resume, data, tokenizer) and prepare adds (tokens, model)."""

    out: Path
    previous: dict | None = None  # run.json of the run being resumed
    checkpoint: Path | None = None  # the newest complete checkpoint to resume from
    completed: bool = False  # --resume of a run whose artifact is saved
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    files: list = field(default_factory=list)
    source: str = ""
    start: object = None  # model.base naming a finished run: that run opened (rundir.Target)
    tokenizer: object = None
    train_examples: list = field(default_factory=list)
    eval_examples: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    classes: object = None  # classification: the run's classes (classification.labels.Classes)


def preflight(recipe: recipes.Recipe, overwrite: bool = False, resume: bool = False, force: bool = False) -> Plan:
    """Everything that can fail on the user's input, before the run directory is touched or processes start."""
    plan = Plan(Path(recipe.output.dir))
    rundir.check_output(plan.out, "run", overwrite, "output.dir", resume=resume)
    if resume:
        plan.previous = _previous_run(recipe, plan.out, force)
        # a run whose adapter or model is saved is complete, whatever stopped it afterwards (samples, run.json)
        if plan.previous.get("status") == "completed" or rundir.artifact(plan.out):
            plan.completed = True
            return plan
        plan.checkpoint = rundir.newest_checkpoint(plan.out)
    t, m = recipe.training, recipe.model
    methods.check_device(recipe.method, t.precision, t.optimizer, t.liger)
    if recipe.data.streamed():
        plan.train, plan.eval, plan.files = stream.load(recipe.data)
    else:
        plan.train, plan.eval, plan.files = jsonl.load(recipe.data, t.seed)
    first = recipe.data.files()[0].path
    preference.check_data(t.objective, plan.train, plan.eval, first)
    classifier.check_data(t.objective, plan.train, plan.eval, first)
    if t.objective == "classification":
        plan.classes = classifier.classes(recipe, plan.train, plan.eval, first)
    plan.start = rundir.start_point(m.base)  # SFT -> DPO: a finished run as the starting point
    if plan.start is not None:
        _check_start(recipe, plan.start)
        # a LoRA run is merged into its base when training starts, and kept as this run's start/ folder
        merged = plan.start.adapter is not None
        plan.source = str(plan.out.absolute() / rundir.START) if merged else plan.start.weights
        tokenizer_source = plan.start.tokenizer
        models.check_config(plan.start.weights, m.trust_remote_code)
    else:
        plan.source = tokenizer_source = models.resolve(m.base)
        models.check_config(plan.source, m.trust_remote_code)
    chat = any("messages" in r or "prompt" in r for r in plan.train + plan.eval)
    if plan.classes is not None and plan.classes.input == "image":
        from finetune_cli.classification import model as classifier_model

        plan.tokenizer = classifier_model.load_processor(tokenizer_source, True, m.trust_remote_code)
    else:
        plan.tokenizer = models.load_tokenizer(
            tokenizer_source, m.chat_template, m.trust_remote_code, require_template=chat
        )
    trainer.check_trackers(recipe)  # last: it opens MLflow's tracking store
    return plan


def _check_start(recipe, start) -> None:
    """What a run named as model.base cannot be the start of."""
    if start.adapter is not None and recipe.training.objective == "classification":
        raise FtuneError(
            f"model.base: {recipe.model.base} is an adapter run; a classifier starts from whole weights: merge it "
            f"first (ftune merge-adapter {recipe.model.base} --output DIR) and set model.base to DIR"
        )
    if start.adapter is not None and recipe.method.name == "qlora":
        raise FtuneError(
            f"model.base: {recipe.model.base} is an adapter run, which is merged into its base in memory, and QLoRA "
            f"loads its base quantized from a folder: merge it first (ftune merge-adapter {recipe.model.base} "
            "--output DIR) and set model.base to DIR"
        )


def run(
    recipe: recipes.Recipe,
    overwrite: bool = False,
    callbacks: list = (),
    samples: int = 1,
    log: Callable[[str], None] = lambda msg: None,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """Train as the recipe says and write the run directory; return the summary that run.json holds.

    Under a launcher every rank runs this; only the main one writes (run directory, metrics, artifact) and holds
    the run directory's lock, so two runs never share a folder."""
    main = launch.is_main()
    strategy = launch.check_rank(recipe)
    plan = preflight(recipe, overwrite, resume, force)
    with rundir.lock(plan.out) if main else nullcontext():
        if main:  # again under the lock: another run may have started here since the first check
            rundir.check_output(plan.out, "run", overwrite, "output.dir", resume=resume)
        if plan.completed:
            return {
                "run_dir": str(plan.out),
                **_finish_completed(plan.out, plan.previous, main),
                "already_completed": True,
            }
        _tokenize(recipe, plan)
        info = _describe(recipe, plan, strategy, log)
        merge = _start_to_merge(plan)
        model = _load_model(recipe, plan, strategy, merge)
        _start_run_dir(recipe, plan, resume, overwrite, log)
        if merge:
            _save_start(model, plan)
        stop = _StopRequest()
        with _status(plan.out, info, main, stop) as result, stop.on_signals():
            result.update(_fit_and_save(recipe, plan, model, callbacks, samples, stop))
        return {"run_dir": str(plan.out), **RunInfo.model_validate(info).dump()}


def _tokenize(recipe, plan: Plan) -> None:
    d = recipe.data
    launch.init(hardware.cuda())
    shared = d.cache or launch.world_size() > 1  # the other ranks read what the first one tokenized
    if recipe.training.objective == "classification":
        classifier.tokenize(recipe, plan)
    elif recipe.training.objective in preference.OBJECTIVES:  # pairs: quick to tokenize, not cached
        plan.train_examples, plan.stats["train"] = preference.tokenize_all(
            plan.tokenizer, plan.train, d.max_length, d.system_prompt, unpaired=recipe.training.objective == "kto"
        )
        if plan.eval:
            plan.eval_examples, plan.stats["eval"] = preference.tokenize_all(
                plan.tokenizer, plan.eval, d.max_length, d.system_prompt
            )
    else:
        _tokenize_sft(recipe, plan, shared)
    if not plan.train_examples:
        raise FtuneError(f"{d.files()[0].path}: no example has a learned token left after truncation to {d.max_length}")


def _tokenize_sft(recipe, plan: Plan, shared: bool) -> None:
    d = recipe.data
    with launch.local_main_first():
        if d.streamed():  # tokenized as the trainer reads it; its counts fill in as it goes (run.json's "streamed")
            seed = recipe.training.seed
            plan.train_examples = stream.Examples(
                d.streamed(), plan.tokenizer, d.max_length, d.train_on, d.system_prompt, seed
            )
            plan.stats["train"] = {"streamed": plan.train_examples.counts}
        else:
            plan.train_examples, plan.stats["train"] = cache.tokenize(
                plan.tokenizer, plan.train, d.max_length, d.train_on, shared
            )
        if plan.eval:
            stride = default_stride(d.max_length)
            plan.eval_examples, plan.stats["eval"] = build_examples(
                plan.tokenizer, plan.eval, d.max_length, d.train_on, stride, shared
            )
    plan.train = []  # the examples stand for the records from here on: their memory goes to the model and the steps


def _describe(recipe, plan: Plan, strategy: str, log) -> dict:
    """Log what the run will do; return run.json's first contents."""
    d, t = recipe.data, recipe.training
    train_stats, eval_stats = plan.stats["train"], plan.stats.get("eval", {})
    log(f"model {recipe.model.base}")
    if plan.start is not None:
        s = plan.start
        log(f"starting from the run's {'adapter merged into ' + str(s.base) if s.adapter else 'model ' + s.weights}")
    identities = [sources.identity(spec) for spec in d.files()]  # a file's sha256, an hf: dataset's commit
    for f, found in zip(plan.files, identities):
        weight = f", weight {f['weight']:g} -> {f['used']}" if f["weight"] != 1 else ""
        detected = " (detected)" if f["detected"] else ""
        commit = f", commit {found['commit']}" if found.get("commit") else ""
        count = "streamed" if f.get("streaming") else f"{f['examples']} examples"
        log(f"data {f['path']}: {f['format']} format{detected}, {count}{weight}{commit}")
    if plan.classes is not None:
        classifier.describe(plan, log)
    elif "streamed" in train_stats:
        shuffle = plan.train_examples.buffer
        log(
            f"data streamed: tokenized as training reads it, {t.max_steps} steps, "
            + (f"shuffled {shuffle} rows at a time" if shuffle > 1 else "in order")
            + f"; {eval_stats.get('examples', 0)} eval"
        )
    else:
        log(
            f"data {train_stats['examples']} train examples ({train_stats['learned_tokens']} learned tokens), "
            f"{eval_stats.get('examples', 0)} eval; {train_stats['truncated']} truncated to {d.max_length} tokens"
            + (f", {train_stats['dropped']} dropped with nothing left to learn" if train_stats["dropped"] else "")
            + f"; tokenized cache {train_stats['cache']}"
        )
    processes, budget = launch.world_size(), trainer.micro_batch_tokens(recipe)
    effective = t.batch_size * t.gradient_accumulation * processes
    log(
        f"batch {t.batch_size} per device x {t.gradient_accumulation} accumulation x {processes} "
        f"process{'es' if processes > 1 else ''} = {effective} "
        + {"dpo": "pairs", "orpo": "pairs", "kto": "replies", "classification": "rows"}.get(t.objective, "sequences")
        + " per step"
        + (f" ({strategy})" if processes > 1 else "")
        + (f"; packed micro-batches run in passes of at most {budget} tokens" if budget else "")
    )
    device, precision = _device(), methods.precision(t.precision)
    log(f"device {device}, precision {precision}")
    return {
        "status": "running",
        **({"resumed_from": str(plan.checkpoint)} if plan.checkpoint else {}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "device": device,
        "precision": precision,
        "distributed": {
            "processes": processes,
            "strategy": strategy,
            "effective_batch_size": effective,
            "micro_batch_tokens": budget,
        },
        "data": {
            "train": {"files": [{**f, **found} for f, found in zip(plan.files, identities)], **train_stats},
            **({"eval": {"path": e.path, **sources.identity(e), **eval_stats}} if (e := d.eval_source()) else {}),
            **({"eval": {"split": d.eval_split, **eval_stats}} if d.eval_split else {}),
        },
    }


def _device() -> str:
    """What trains: `cuda (NVIDIA H100 80GB HBM3)` or `cpu (avx2)`, the CPU kernels torch picked."""
    import torch

    if hardware.cuda():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({torch.backends.cpu.get_cpu_capability().lower()})"


def _load_model(recipe, plan: Plan, strategy: str, merge_start: bool = False):
    if plan.classes is not None:
        return classifier.load_model(recipe, plan, strategy)
    m = recipe.model
    dtype = str(models.torch_dtype(m.dtype)).removeprefix("torch.")
    if merge_start:  # the start run's adapter folded into its base, as merge-adapter does
        from finetune_cli.export import merge

        return merge.merged_model(plan.start, dtype)[0]
    quantization = methods.quantization_config(recipe.method, dtype, shardable=strategy in launch.SHARDED)
    return models.load_model(plan.source, m.dtype, m.trust_remote_code, quantization)


def _start_to_merge(plan: Plan) -> bool:
    """A LoRA start to merge now: every new run (an old start/ in the folder belongs to the run --overwrite
    replaces); a resumed run loads the start/ it saved."""
    if plan.start is None or plan.start.adapter is None:
        return False
    return plan.previous is None or not (Path(plan.source) / "config.json").is_file()


def _save_start(model, plan: Plan) -> None:
    """start/: the merged start, the weights this run's adapter applies to (eval, merge, export and serve load it),
    written before any adapter is added; atomically, by the main process."""
    if launch.is_main():
        with files.temporary_folder(Path(plan.source)) as tmp:
            model.save_pretrained(tmp)
            plan.tokenizer.save_pretrained(tmp)
            files.umask_modes(tmp)
            tmp.rename(plan.source)
    launch.barrier()


def _start_run_dir(recipe, plan: Plan, resume: bool, overwrite: bool, log) -> None:
    """A new run: the folder emptied of an old run (--overwrite), marked, the resolved recipe written.
    A resumed one: metrics after the checkpoint dropped."""
    out, main = plan.out, launch.is_main()
    if resume:
        log(
            f"resuming from {plan.checkpoint}"
            if plan.checkpoint
            else "no complete checkpoint yet: starting from step 0"
        )
        if not main:
            return
        rundir.trim_metrics(out / rundir.METRICS, rundir.checkpoint_step(plan.checkpoint))
        # the recipe the run continues with (changed only with --force, or written anew when only checkpoints
        # were left): recipe.yaml always says how the run was trained, and a later --resume compares with it
        files.write_text(out / rundir.RECIPE, recipes.dump(recipe))
        rundir.mark(out, "run")
    elif main:
        if overwrite:
            rundir.clear(out)  # check_output allowed it: only what ftune wrote is here
        rundir.mark(out, "run")
        files.write_text(out / rundir.RECIPE, recipes.dump(recipe))


@contextmanager
def _status(out: Path, info: dict, main: bool, stop: _StopRequest):
    """run.json says running, then completed, interrupted or failed (with the reason), whatever happens inside.

    The body fills the yielded dict with the run's results; a run whose artifact was saved is completed even
    when a signal came afterwards (during the sample answers)."""
    write = (
        (lambda: files.write_json(out / rundir.RUN_JSON, RunInfo.model_validate(info).dump()))
        if main
        else (lambda: None)
    )
    write()
    started, result = time.time(), {}

    def pictures():  # loss.png and report.html once run.json says how the run ended (errors skipped)
        if main:
            page.write_pictures(out)

    try:
        yield result
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        info.update(status="interrupted" if interrupted else "failed", reason=str(exc) or type(exc).__name__)
        info["seconds"] = round(time.time() - started, 1)
        write()
        pictures()
        if isinstance(exc, (FtuneError, KeyboardInterrupt)):
            raise
        raise FtuneError(f"training failed: {type(exc).__name__}: {exc}", FAILED) from exc
    info["seconds"] = round(time.time() - started, 1)
    if stop.requested and not result.get("artifact"):
        info.update(status="interrupted", reason=f"{stop.requested} at step {result['steps']}", **result)
        write()
        pictures()
        raise FtuneError(
            f"interrupted ({stop.requested}) at step {result['steps']}; checkpoint saved. "
            f"Continue with: ftune train {out} --resume",
            INTERRUPTED,
        )
    info.update(status="completed", **result)
    write()
    if main:
        rundir.drop_checkpoints(out)  # the run is whole: its artifact replaces them
    pictures()


def _finish_completed(out: Path, previous: dict, main: bool) -> dict:
    """Resume of a run whose artifact is saved: say completed in run.json (if it did not) and drop checkpoints."""
    if main and previous.get("status") != "completed":
        previous = {**previous, "status": "completed", "artifact": str(rundir.artifact(out))}
        previous.pop("reason", None)
        files.write_json(out / rundir.RUN_JSON, RunInfo.model_validate(previous).dump())
        rundir.drop_checkpoints(out)
        for folder in (".adapter.tmp", ".model.tmp"):
            shutil.rmtree(out / folder, ignore_errors=True)
    return previous


def _fit_and_save(recipe, plan: Plan, model, callbacks, samples: int, stop: _StopRequest) -> dict:
    """Base answers and eval, training, the artifact, then the tuned answers; the run's results."""
    t, tokenizer, out = recipe.training, plan.tokenizer, plan.out
    # The base model's own answers and eval loss, before any adapter or update touches it.
    prompts = [c["messages"][: _last_assistant(c["messages"])] for c in plan.eval if "messages" in c][:samples]
    base_replies = [reply(model, tokenizer, p) for p in prompts]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    classes = plan.classes
    if classes is not None:
        from finetune_cli.classification import predict

        def measure(model, examples, batch_size, pad):
            return predict.score(model, examples, classes.names, classes.collate, batch_size)[0]

        log_class = trainer.ClassifierMetricsLog
    elif t.objective in preference.OBJECTIVES:
        measure, log_class = pairwise.pair_metrics, trainer.PairMetricsLog
    else:
        measure, log_class = corpus_nll, trainer.MetricsLog
    before = measure(model, plan.eval_examples, t.batch_size, pad) if plan.eval_examples else None

    stopper = stop.callback()
    fit = trainer.build(recipe, plan.source, model, tokenizer, plan.train_examples, out, [*callbacks, stopper], classes)
    metrics_file = (out / rundir.METRICS).open("a", encoding="utf-8") if launch.is_main() else None
    metrics = log_class(fit, metrics_file, plan.eval_examples, t.batch_size, t.eval_steps, pad, before, stopper)
    metrics.classes = classes
    fit.add_callback(metrics)
    fit.add_callback(trainer.Checkpoints(out, t.save_total_limit, t.save_every_epoch))
    fit.add_callback(trainer.RecipeOnResume())
    trainer.route_trackers(fit, out)
    started = time.perf_counter()
    try:
        train_output = fit.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
    finally:
        if metrics_file:
            metrics_file.close()
    seconds = time.perf_counter() - started  # the training loop alone, as a plain trainer.train() is timed
    base = plan.source if plan.start is not None else None  # a start run: the adapter applies to its weights
    artifact = None if stopper.stopped else trainer.save_artifact(fit, recipe, out, base, classes)
    tuned_replies = _answers(fit.model, tokenizer, prompts, stop) if artifact else []

    trainable, total = methods.count_parameters(fit.model)
    losses = [h["loss"] for h in fit.state.log_history if "loss" in h]
    return {
        "method": recipe.method.name,
        "objective": t.objective,
        "steps": fit.state.global_step,
        "train_seconds": round(seconds, 2),
        "train_loss": train_output.training_loss,
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "tokens_seen": int(fit.state.num_input_tokens_seen),
        **_peak_gpu_memory(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "eval_before": before,
        "eval_after": metrics.last_eval,
        "samples": [
            {"prompt": p[-1]["content"], "base": b, "tuned": a} for p, b, a in zip(prompts, base_replies, tuned_replies)
        ],
        "artifact": str(artifact) if artifact else None,
    }


def _answers(model, tokenizer, prompts: list, stop: _StopRequest) -> list[str]:
    """The tuned model's sample answers; a signal now only cuts them short (the artifact is saved)."""
    answers = []
    try:
        for prompt in prompts:
            if stop.requested:
                break
            answers.append(reply(model, tokenizer, prompt))
    except KeyboardInterrupt:
        pass
    return answers


class _StopRequest:
    """First Ctrl-C or SIGTERM: checkpoint and stop after the current step. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = None

    @contextmanager
    def on_signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
        previous = {sig: signal.getsignal(sig) for sig in names}

        def handler(sig, frame):
            self.requested = names[sig]
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGTERM, previous[signal.SIGTERM])

        for sig in names:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def callback(self):
        return trainer.StopOnSignal(self)


def _previous_run(recipe, out: Path, force: bool) -> dict:
    """The run to resume (its run.json, or {"status": "unfinished"} when only checkpoints are left); refuse a
    changed recipe (naming the keys) unless `force`."""
    if not out.is_dir() or not (rundir.is_run(out) or rundir.newest_checkpoint(out) or rundir.artifact(out)):
        raise FtuneError(f"--resume: {out} holds no run to resume; start it without --resume")
    previous = rundir.read_run_json(out, strict=False) or {"status": "unfinished"}
    changed = rundir.recipe_changes(out, recipe.model_dump(mode="json"))
    if changed is None and not force:
        raise FtuneError(f"--resume: {out / rundir.RECIPE} is unreadable; pass --force to resume with this recipe")
    if changed and not force:
        raise FtuneError(
            f"--resume: the recipe differs from the run's own in {', '.join(changed)}; "
            "resume with the run's recipe (ftune train RUN_DIR --resume) or pass --force"
        )
    fixed = [k for k in changed or [] if k in _FIXED_BY_CHECKPOINT]
    if fixed:
        raise FtuneError(
            f"--resume: {', '.join(fixed)} cannot change in a resumed run, even with --force: the checkpoint's "
            "optimizer and scheduler state hold them; start a new run instead"
        )
    return previous


# what the checkpoint's optimizer and scheduler state fix (the learning rate is re-applied: trainer.RecipeOnResume)
_FIXED_BY_CHECKPOINT = {"training.optimizer", "training.lr_scheduler", "training.weight_decay"}


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _peak_gpu_memory() -> dict:
    """The run's peak allocated GPU memory for run.json; nothing on CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"ftune": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
