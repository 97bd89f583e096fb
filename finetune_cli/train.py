"""Training: recipe -> model + tokenized data -> TRL SFTTrainer -> run directory."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

from finetune_cli import __version__, attention, files, launch, methods, microbatch, models, rundir
from finetune_cli import recipe as recipes
from finetune_cli.data import cache, jsonl
from finetune_cli.errors import FAILED, INTERRUPTED, FtuneError
from finetune_cli.evaluate import build_examples, corpus_nll, default_stride
from finetune_cli.generate import reply


def preflight(recipe: recipes.Recipe, overwrite: bool = False, resume: bool = False, force: bool = False) -> dict:
    """Everything that can fail on the user's input, before the run directory is touched or processes start.

    Returns the loaded pieces; `previous` is the run.json of a run being resumed."""
    out = Path(recipe.output.dir)
    rundir.check_output(out, "run", overwrite, "output.dir", resume=resume)
    found = {"out": out, "previous": None, "checkpoint": None, "completed": False}
    if resume:
        found["previous"] = _previous_run(recipe, out, force)
        # a run whose adapter or model is saved is complete, whatever stopped it afterwards (samples, run.json)
        if found["previous"].get("status") == "completed" or rundir.artifact(out):
            return {**found, "completed": True}
        found["checkpoint"] = rundir.newest_checkpoint(out)
    t = recipe.training
    methods.check_device(recipe.method, t.precision, t.optimizer, t.liger)
    train_convs, eval_convs, train_files = jsonl.load(recipe.data, recipe.training.seed)
    source = models.resolve(recipe.model.base)
    models.check_config(source, recipe.model.trust_remote_code)
    tokenizer = models.load_tokenizer(
        source,
        recipe.model.chat_template,
        recipe.model.trust_remote_code,
        require_template=any("messages" in r for r in train_convs + eval_convs),
    )
    return {
        **found,
        "train": train_convs,
        "eval": eval_convs,
        "files": train_files,
        "source": source,
        "tokenizer": tokenizer,
    }


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
    found = preflight(recipe, overwrite, resume, force)
    out = found["out"]
    with rundir.lock(out) if main else nullcontext():
        if main:  # again under the lock: another run may have started here since the first check
            rundir.check_output(out, "run", overwrite, "output.dir", resume=resume)
        if found["completed"]:
            return {"run_dir": str(out), **_finish_completed(out, found["previous"], main), "already_completed": True}
        return _run(recipe, found, strategy, callbacks, samples, log, resume, overwrite)


def _run(recipe, found, strategy, callbacks, samples, log, resume, overwrite) -> dict:
    main, out, checkpoint = launch.is_main(), found["out"], found["checkpoint"]
    d, source, tokenizer = recipe.data, found["source"], found["tokenizer"]
    train_convs, eval_convs, train_files = found["train"], found["eval"], found["files"]
    launch.init(_cuda())
    shared = d.cache or launch.world_size() > 1  # the other ranks read what the first one tokenized
    with launch.local_main_first():
        train_examples, train_stats = cache.tokenize(tokenizer, train_convs, d.max_length, d.train_on, shared)
        eval_examples, eval_stats = (
            build_examples(tokenizer, eval_convs, d.max_length, d.train_on, default_stride(d.max_length), shared)
            if eval_convs
            else ([], {})
        )
    if not train_examples:
        raise FtuneError(f"{d.files()[0].path}: no example has a learned token left after truncation to {d.max_length}")
    log(f"model {recipe.model.base}")
    for f in train_files:
        weight = f", weight {f['weight']:g} -> {f['used']}" if f["weight"] != 1 else ""
        detected = " (detected)" if f["detected"] else ""
        log(f"data {f['path']}: {f['format']} format{detected}, {f['examples']} examples{weight}")
    log(
        f"data {train_stats['examples']} train examples ({train_stats['learned_tokens']} learned tokens), "
        f"{eval_stats.get('examples', 0)} eval; {train_stats['truncated']} truncated to {d.max_length} tokens"
        + (f", {train_stats['dropped']} dropped with nothing left to learn" if train_stats["dropped"] else "")
        + f"; tokenized cache {train_stats['cache']}"
    )
    t, processes, budget = recipe.training, launch.world_size(), micro_batch_tokens(recipe)
    effective = t.batch_size * t.gradient_accumulation * processes
    log(
        f"batch {t.batch_size} per device x {t.gradient_accumulation} accumulation x {processes} "
        f"process{'es' if processes > 1 else ''} = {effective} sequences per step"
        + (f" ({strategy})" if processes > 1 else "")
        + (f"; packed micro-batches run in passes of at most {budget} tokens" if budget else "")
    )
    dtype = models.torch_dtype(recipe.model.dtype)
    quantization = methods.quantization_config(
        recipe.method, str(dtype).removeprefix("torch."), shardable=strategy in launch.SHARDED
    )
    model = models.load_model(source, recipe.model.dtype, recipe.model.trust_remote_code, quantization)

    if resume:
        if main:
            rundir.trim_metrics(out / rundir.METRICS, rundir.checkpoint_step(checkpoint))
            if not (out / rundir.RECIPE).is_file():  # only checkpoints were left: record the recipe resumed with
                files.write_text(out / rundir.RECIPE, recipes.dump(recipe))
            rundir.mark(out, "run")
        log(f"resuming from {checkpoint}" if checkpoint else "no complete checkpoint yet: starting from step 0")
    elif main:
        if overwrite:
            rundir.clear(out)  # check_output allowed it: only what ftune wrote is here
        rundir.mark(out, "run")
        files.write_text(out / rundir.RECIPE, recipes.dump(recipe))
    info = {
        "status": "running",
        **({"resumed_from": str(checkpoint)} if checkpoint else {}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "distributed": {
            "processes": processes,
            "strategy": strategy,
            "effective_batch_size": effective,
            "micro_batch_tokens": budget,
        },
        "data": {
            "train": {"files": [{**f, "sha256": _sha256(f["path"])} for f in train_files], **train_stats},
            **({"eval": {"path": d.eval, "sha256": _sha256(d.eval), **eval_stats}} if d.eval else {}),
            **({"eval": {"split": d.eval_split, **eval_stats}} if d.eval_split else {}),
        },
    }
    stop = _StopRequest()
    with _status(out, info, main, stop) as result, stop.on_signals():
        result.update(
            _train(
                recipe,
                source,
                model,
                tokenizer,
                train_examples,
                eval_examples,
                eval_convs,
                out,
                [*callbacks, stop.callback()],
                samples,
                checkpoint,
                stop,
            )
        )
    return {"run_dir": str(out), **info}


@contextmanager
def _status(out: Path, info: dict, main: bool, stop: _StopRequest):
    """run.json says running, then completed, interrupted or failed (with the reason), whatever happens inside.

    The body fills the yielded dict with the run's results; a run whose artifact was saved is completed even
    when a signal came afterwards (during the sample answers)."""
    write = (lambda: files.write_json(out / rundir.RUN_JSON, info)) if main else (lambda: None)
    write()
    started, result = time.time(), {}
    try:
        yield result
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        info.update(status="interrupted" if interrupted else "failed", reason=str(exc) or type(exc).__name__)
        info["seconds"] = round(time.time() - started, 1)
        write()
        if isinstance(exc, (FtuneError, KeyboardInterrupt)):
            raise
        raise FtuneError(f"training failed: {type(exc).__name__}: {exc}", FAILED) from exc
    info["seconds"] = round(time.time() - started, 1)
    if stop.requested and not result.get("artifact"):
        info.update(status="interrupted", reason=f"{stop.requested} at step {result['steps']}", **result)
        write()
        raise FtuneError(
            f"interrupted ({stop.requested}) at step {result['steps']}; checkpoint saved. "
            f"Continue with: ftune train {out} --resume",
            INTERRUPTED,
        )
    info.update(status="completed", **result)
    write()
    if main:
        for folder in (rundir.CHECKPOINTS, rundir.STAGING):  # the run is whole: its artifact replaces them
            shutil.rmtree(out / folder, ignore_errors=True)


def _finish_completed(out: Path, previous: dict, main: bool) -> dict:
    """Resume of a run whose artifact is saved: say completed in run.json (if it did not) and drop checkpoints."""
    if main and previous.get("status") != "completed":
        previous = {**previous, "status": "completed", "artifact": str(rundir.artifact(out))}
        previous.pop("reason", None)
        files.write_json(out / rundir.RUN_JSON, previous)
        for folder in (rundir.CHECKPOINTS, rundir.STAGING, ".adapter.tmp", ".model.tmp"):
            shutil.rmtree(out / folder, ignore_errors=True)
    return previous


def _train(
    recipe,
    source,
    model,
    tokenizer,
    train_examples,
    eval_examples,
    eval_convs,
    out,
    callbacks,
    samples,
    checkpoint,
    stop,
):
    t = recipe.training
    # The base model's own answers and eval loss, before any adapter or update touches it.
    prompts = [c["messages"][: _last_assistant(c["messages"])] for c in eval_convs if "messages" in c][:samples]
    base_replies = [reply(model, tokenizer, p) for p in prompts]
    before = corpus_nll(model, eval_examples, t.batch_size, tokenizer.pad_token_id) if eval_examples else None

    trainer = build_trainer(recipe, source, model, tokenizer, train_examples, out, callbacks)
    main, method = launch.is_main(), recipe.method
    metrics_file = (out / rundir.METRICS).open("a", encoding="utf-8") if main else None
    metrics = _metrics_callback(metrics_file, trainer, eval_examples, t, tokenizer.pad_token_id, before)
    trainer.add_callback(metrics)
    trainer.add_callback(_checkpoints_callback(out, t.save_total_limit, t.save_every_epoch))
    started = time.perf_counter()
    try:
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if metrics_file:
            metrics_file.close()
    model = trainer.model
    after = metrics.last_eval
    stopped = any(getattr(cb, "stop_requested", False) for cb in trainer.callback_handler.callbacks)
    artifact = None if stopped else _save(trainer, recipe, out)
    tuned_replies = _answers(model, tokenizer, prompts, stop) if artifact else []

    trainable, total = methods.count_parameters(model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "method": method.name,
        "steps": trainer.state.global_step,
        "train_seconds": round(time.perf_counter() - started, 2),
        "train_loss": train_output.training_loss,
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        **_peak_gpu_memory(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "eval_before": before,
        "eval_after": after,
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


def build_trainer(recipe, source, model, tokenizer, train_examples, out: Path, callbacks):
    """The SFTTrainer for the recipe: our tokenized examples, TRL's collator (padded, or padding-free when
    `training.packing`), the sampler `training.group_by_length` picks, and the method's PEFT config."""
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig

    t, method = recipe.training, recipe.method
    precision = methods.precision(t.precision)
    packing = packing_applies(recipe)
    model = methods.prepare(model, method, t.gradient_checkpointing)
    if packing:
        attention.use_for_packing(model)
    args = SFTConfig(
        output_dir=str(out / rundir.STAGING),  # checkpoints are written here, then renamed into checkpoints/
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not _cuda(),
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        eval_strategy="no",
        report_to=t.report_to,
        disable_tqdm=True,
        max_length=None,  # examples are truncated by us, with counts reported
        dataset_kwargs={"skip_prepare_dataset": True},
        padding_free=packing,  # one row per micro-batch, positions restart per example: no padding computed
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        torch_compile=t.compile,
        use_liger_kernel=t.liger,
        # packed rows hold no padding; padded batches count their attention mask (pad may equal EOS)
        include_num_input_tokens_seen="all" if packing else "non_padding",
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in each forward
    )
    columns = {"input_ids": [e["input_ids"] for e in train_examples], "labels": [e["labels"] for e in train_examples]}
    trainer = microbatch.trainer_class()(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict(columns),
        processing_class=tokenizer,
        peft_config=methods.peft_config(method, source),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.micro_batch_tokens = micro_batch_tokens(recipe)
    return trainer


def packing_applies(recipe) -> bool:
    """Padding-free packing, except for prompt tuning (its virtual tokens prefix each row, not each example)."""
    return recipe.training.packing and recipe.method.name != "prompt_tuning"


def micro_batch_tokens(recipe) -> int | None:
    """The token budget of each forward/backward pass over a packed micro-batch (None: the whole row)."""
    return microbatch.resolve(recipe.training.micro_batch_tokens, _cuda()) if packing_applies(recipe) else None


def _save(trainer, recipe, out: Path) -> Path:
    """adapter/ (PEFT methods, with ftune.json naming base and quantization) or model/ (full), renamed into place.

    Every rank calls this: under FSDP or ZeRO-3 the whole state dict is gathered from all of them, and the
    main process writes it (never one shard of it)."""
    full = recipe.method.name == "full"
    final = out / (rundir.MODEL if full else rundir.ADAPTER)
    tmp = out / f".{final.name}.tmp"
    main = launch.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save left
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    attention.restore(model)
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))  # weights, config and tokenizer
    if main:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle of TrainingArguments: not ours to ship
        if not full:
            record = {
                "base": recipe.model.base,
                "method": recipe.method.model_dump(),
                "model": recipe.model.model_dump(),
            }
            files.write_json(tmp / rundir.ADAPTER_RECORD, record)
        if final.exists():  # a save that was interrupted after its rename (never the user's: this is our run)
            shutil.rmtree(final)
        tmp.rename(final)
    launch.barrier()
    return final


def _metrics_callback(fh, trainer, eval_examples, t, pad_token_id, before):
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        """One JSON line per log; token-exact eval loss and perplexity every `eval_steps` and at the end."""

        def __init__(self):
            self.start = time.time()
            self.last_eval = None
            self.last_eval_step = None

        def evaluate(self, step: int) -> dict | None:
            if not eval_examples:
                return None
            self.last_eval = corpus_nll(trainer.model, eval_examples, t.batch_size, pad_token_id)
            methods.restore_training_layout(trainer.model)
            self.last_eval_step = step
            logs = {"eval_loss": self.last_eval["loss"], "eval_perplexity": self.last_eval["perplexity"]}
            # straight to the callbacks (this file, the progress bar): TRL's own log() would reset its metrics
            # (a copy of control: on_log clears should_log, which would drop this step's training log)
            trainer.callback_handler.on_log(trainer.args, trainer.state, copy.copy(trainer.control), logs)
            return self.last_eval

        def on_log(self, args, state, control, logs=None, **kw):
            row = {"step": state.global_step}
            if "loss" in logs and not math.isfinite(logs["loss"]):
                raise FtuneError(
                    f"training loss became {logs['loss']} at step {state.global_step}; stopped. The last good "
                    "checkpoint is kept: lower training.learning_rate (or check the data) and start again",
                    FAILED,
                )
            if "loss" in logs:
                elapsed = time.time() - self.start
                row.update(
                    epoch=round(state.epoch or 0, 4),
                    loss=logs["loss"],
                    learning_rate=logs.get("learning_rate"),
                    grad_norm=logs.get("grad_norm"),
                    tokens_per_s=round(state.num_input_tokens_seen / elapsed, 1) if elapsed else None,
                )
            elif "eval_loss" in logs:
                row.update(eval_loss=logs["eval_loss"], eval_perplexity=logs["eval_perplexity"])
            else:
                return
            if fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()
            if before and state.global_step == 0:
                self.last_eval, self.last_eval_step = before, 0
                logs = {"eval_loss": before["loss"], "eval_perplexity": before["perplexity"]}
                trainer.callback_handler.on_log(args, state, copy.copy(control), logs)

        def on_step_end(self, args, state, control, **kw):
            if t.eval_steps and state.global_step % t.eval_steps == 0:
                self.evaluate(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            stopped = any(getattr(cb, "stop_requested", False) for cb in trainer.callback_handler.callbacks)
            if self.last_eval_step != state.global_step and not stopped:
                self.evaluate(state.global_step)

    return Metrics()


def _checkpoints_callback(out: Path, limit: int, every_epoch: bool):
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        """Move each finished checkpoint from .staging/ into checkpoints/ in one rename; keep the newest `limit`."""

        def on_epoch_end(self, args, state, control, **kw):
            if every_epoch:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            launch.barrier()  # every rank has written its part (its RNG state) of the checkpoint
            staged = out / rundir.STAGING / f"checkpoint-{state.global_step}"
            if not state.is_world_process_zero or not staged.is_dir():
                return
            final = out / rundir.CHECKPOINTS / staged.name
            final.parent.mkdir(exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            kept = sorted((p for p in final.parent.glob("checkpoint-*")), key=rundir.checkpoint_step)
            for old in kept[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    return Checkpoints()


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
        from transformers import TrainerCallback

        request = self

        class StopOnSignal(TrainerCallback):
            stop_requested = False

            def on_step_end(self, args, state, control, **kw):
                if launch.world_size() > 1:  # a signal that reached one rank stops them all at the same step
                    request.requested = launch.any_rank(request.requested)
                if request.requested:
                    self.stop_requested = True
                    control.should_save = True
                    control.should_training_stop = True

        return StopOnSignal()


def _previous_run(recipe, out: Path, force: bool) -> dict:
    """The run to resume (its run.json, or {} when only checkpoints are left); refuse a changed recipe (naming
    the keys) unless `force`."""
    import yaml

    if not out.is_dir() or not (rundir.is_run(out) or rundir.newest_checkpoint(out) or rundir.artifact(out)):
        raise FtuneError(f"--resume: {out} holds no run to resume; start it without --resume")
    previous = rundir.read_run_json(out, strict=False) or {"status": "unfinished"}
    if not (out / rundir.RECIPE).is_file():
        return previous  # only checkpoints: resume them with the recipe given
    try:
        saved = _flatten(yaml.safe_load((out / rundir.RECIPE).read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
        if force:
            return previous
        raise FtuneError(
            f"--resume: {out / rundir.RECIPE} is unreadable; pass --force to resume with this recipe"
        ) from None
    now = _flatten(recipe.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and k not in _PER_MACHINE)
    if changed and not force:
        raise FtuneError(
            f"--resume: the recipe differs from the run's own in {', '.join(changed)}; "
            "resume with the run's recipe (ftune train RUN_DIR --resume) or pass --force"
        )
    return previous


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


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
