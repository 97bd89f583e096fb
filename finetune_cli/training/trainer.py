"""ftune's one seam with TRL's trainer: the SFTTrainer subclass, its callbacks, and saving what it trained.

Every private or unstable API of transformers, TRL, PEFT, accelerate or bitsandbytes that ftune relies on is
listed here, with why, and the test that fails if an upgrade breaks it:

- `Trainer.callback_handler.on_log(args, state, copy(control), logs)` (MetricsLog.evaluate): eval rows go
  straight to the callbacks (metrics.jsonl, the progress bar); TRL's `log()` would average and reset its own
  metrics, and `on_log` clears `should_log` on the control it gets. tests/test_train.py
  (test_metrics_every_step_and_eval: eval rows at 0, every eval_steps and the end, loss rows every step).
- `Trainer.training_step(model, inputs, num_items_in_batch)` and `accelerator.no_sync` (FtuneTrainer): a
  packed micro-batch runs as several passes whose losses are normalised by the step's token count.
  tests/test_speed.py (same gradients for whole rows and 64-token passes; DDP at budget 32 equals one process).
- `Trainer._track_num_input_tokens(inputs)`, `Trainer.log` and `Trainer._save_checkpoint(model, trial)`
  (FtuneTrainer): the tokens-seen count stays on the device until it is logged or saved; `SFTConfig.padding_free`
  and `Trainer.data_collator` (wrapped by microbatch.with_edges); PEFT's `disable_input_dtype_casting` (it sets
  each tuner layer's `cast_input_dtype_enabled`). tests/test_speedpaths.py (no host syncs of ours in a step, the
  epoch's tokens counted; bit-identical LoRA losses and gradients without the casts).
- `accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")` (save_artifact): FSDP gathers the
  whole state dict before saving. tests/test_distributed.py (test_fsdp_writes_the_whole_adapter).
- `SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, padding_free=...)`: TRL takes our tokenized
  `input_ids`/`labels` as they are. tests/test_masking.py, tests/test_speed.py (packed losses).
- `DPOTrainer._prepare_dataset(dataset, processing_class, args, name)` returned as is (FtuneDPOTrainer): TRL takes
  our tokenized `prompt_ids`/`chosen_ids`/`rejected_ids`. tests/test_preference.py (the first DPO loss is ln 2;
  scored tokens equal the pair metrics' own). The same for `KTOTrainer._prepare_dataset` (FtuneKTOTrainer, which
  adds only TRL's rotated `KL_completion_ids`) and the experimental `ORPOTrainer.tokenize_row` (build_orpo).
  tests/test_preference.py (KTO and ORPO runs).
- accelerate's `model._original_forward` (perplexity._without_autocast): eval during bf16/fp16 training runs
  without the autocast wrapper. tests/test_rundir.py (test_eval_before_after_and_ftune_eval_agree_under_bf16).
- transformers' `AttentionInterface`/`AttentionMaskInterface.register`, `set_attn_implementation`,
  `config._attn_implementation` and `integrations.sdpa_attention.repeat_kv`/`sdpa_attention_forward`
  (attention.py): per-example SDPA for packed rows. tests/test_speed.py (packed equals unpacked losses).
- bitsandbytes' `functional._convert_weight_packed_for_cpu_inverse` and `quant_state.packing_format_for_cpu`
  (methods.restore_training_layout): undo the CPU inference repacking of 4-bit weights before training.
  tests/test_methods.py (QLoRA training layout).
- `model.hf_quantizer = None; model.is_quantized = False` (models.convert_gguf): a GGUF-loaded model refuses
  `save_pretrained` otherwise. tests/test_models.py (builtin conversion).
- torch's `LRScheduler.base_lrs`/`_last_lr` and the param groups' `initial_lr` (RecipeOnResume): a learning rate
  changed with `--resume --force` replaces the checkpoint's. tests/test_promises.py
  (test_resume_force_trains_with_the_changed_learning_rate).
- `TextStreamer.on_finalized_text` overridden per instance (generate.reply): streamed text goes to a callback.
  tests/test_export.py (generate streams the same text it returns).
- `Trainer(compute_loss_func=...)` and how `training_step` scales its result (not divided by the accumulation
  steps; multiplied by the process count with `average_tokens_across_devices`) (build_classifier): the classes'
  cross-entropy summed over the step's rows. tests/test_classify.py (first loss equals torch's weighted
  cross-entropy; two processes equal one).
- `transformers.integrations.INTEGRATION_TO_CALLBACK`, `TensorBoardCallback.logging_dir` and the order of
  `callback_handler.callbacks` (route_trackers): TensorBoard writes into the run folder, and the trackers close
  their runs after ftune's final eval row. tests/test_trackers.py (each tracker read back by its own library).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

from accelerate.utils import DistributedType
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from finetune_cli import files, hardware, rundir
from finetune_cli.data import examples, formats, stream
from finetune_cli.errors import FAILED, FtuneError
from finetune_cli.evaluation import pairwise
from finetune_cli.evaluation.perplexity import corpus_nll
from finetune_cli.training import attention, launch, methods, microbatch


class FtuneTrainer(SFTTrainer):
    """TRL's SFTTrainer, running each packed micro-batch as token-budget passes (`micro_batch_tokens`), with the
    host waits for the GPU it can avoid avoided: example bounds come from the CPU (microbatch.with_edges), the
    tokens-seen count is read when it is logged or saved, and LoRA inputs skip PEFT's fp32 round trip where that
    is exact (`exact_lora_inputs`, methods.exact_without_input_casts)."""

    def __init__(self, *args, micro_batch_tokens: int | None = None, exact_lora_inputs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batch_tokens = micro_batch_tokens
        self.exact_lora_inputs = exact_lora_inputs
        self.tokens_pending = 0  # tokens seen since the last read, on the device
        if self.args.padding_free:
            self.data_collator = microbatch.with_edges(self.data_collator)

    def training_step(self, model, inputs, num_items_in_batch=None):
        from peft.helpers import disable_input_dtype_casting

        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        # Without the step's token count each pass would be its own mean; sharded engines count their own
        # backward passes: both keep the whole row.
        parts = [inputs] if num_items_in_batch is None or sharded else microbatch.split(inputs, self.micro_batch_tokens)
        total = None
        for i, part in enumerate(parts):
            part = dict(part)
            edges = part.pop(microbatch.EDGES, None)
            if edges is not None:
                attention.known(part["cu_seq_lens_q"], edges)
            last = i == len(parts) - 1  # gradients are all-reduced once, with the last pass of the micro-batch
            with nullcontext() if last else self.accelerator.no_sync(model):
                with disable_input_dtype_casting(model, active=self.exact_lora_inputs):
                    loss = super().training_step(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _track_num_input_tokens(self, inputs):
        """The count `include_num_input_tokens_seen` asks for ("all" when packed, "non_padding" padded), kept on the
        device: transformers reads it every micro-batch, a wait for the GPU each time."""
        mask = inputs.get("attention_mask")
        self.tokens_pending = self.tokens_pending + (mask.sum() if mask is not None else inputs["input_ids"].numel())

    def _read_tokens_seen(self):
        import torch

        pending, self.tokens_pending = self.tokens_pending, 0
        count = torch.as_tensor(pending, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum())

    def log(self, logs, start_time=None):
        self._read_tokens_seen()  # every rank logs (the loss is gathered there too)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self._read_tokens_seen()  # trainer_state.json holds the count a resumed run continues from
        super()._save_checkpoint(model, trial)


def build(recipe, source: str, model, tokenizer, train_examples: list[dict], out: Path, callbacks, classes=None):
    """The trainer for the recipe's objective: SFT (FtuneTrainer), a preference objective (FtuneDPOTrainer...) or
    classification (`classes`: the run's Classes). A `method.target_modules` that names no layer of the model is
    exit 2 listing the layers it has (PEFT finds out only when the adapter is added)."""
    from peft.utils.error import NoMatchingPeftModuleError

    objective = recipe.training.objective
    try:
        if objective == "classification":
            return build_classifier(recipe, source, model, tokenizer, train_examples, out, callbacks, classes)
        builder = {"dpo": build_dpo, "orpo": build_orpo, "kto": build_kto}.get(objective, build_sft)
        return builder(recipe, source, model, tokenizer, train_examples, out, callbacks)
    except NoMatchingPeftModuleError:
        named = recipe.method.target_modules
        named = named if isinstance(named, str) else ", ".join(named)
        head = classes.head if classes is not None else None
        raise FtuneError(
            f"method.target_modules: {named} names no layer of {source}; its linear layers are "
            f"{', '.join(linear_names(model, head))} (or use all-linear)"
        ) from None


def linear_names(model, head: str | None = None) -> list[str]:
    """The short names of the model's linear layers (what method.target_modules can name), a classifier's head left
    out."""
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n}
    return sorted(names - {head})


def _arguments(recipe, out: Path) -> dict:
    """The TrainingArguments every objective shares, from the recipe's training section."""
    t = recipe.training
    precision = methods.precision(t.precision)
    return dict(
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
        use_cpu=not hardware.cuda(),
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        eval_strategy="no",
        report_to=t.trackers(),
        run_name=out.resolve().name,  # the tracker's run is named as the run folder
        disable_tqdm=True,
        torch_compile=t.compile,
        use_liger_kernel=t.liger,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in each forward
    )


# training.report_to: each tracker's module and the package that provides it (ftune's extra has the tracker's name)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}


def check_trackers(recipe) -> None:
    """A tracker whose package is missing fails before the run starts, in one line, not in the trainer's setup."""
    import importlib.util

    for name in recipe.training.trackers():
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise FtuneError(
                f"training.report_to: {name} needs the {module} package: pip install {package} "
                f"(or pip install 'ftune[{name}]')"
            )
    if "mlflow" in recipe.training.trackers():
        import mlflow

        uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default
        try:
            mlflow.MlflowClient(uri)  # opens the store: MLflow 3 refuses file stores, mlflow-skinny databases
        except Exception as exc:
            raise FtuneError(
                f"training.report_to: mlflow cannot use the tracking store {uri}: {' '.join(str(exc).split())} "
                "Set MLFLOW_TRACKING_URI to a tracking server (http://...) or to file:///PATH/mlruns with "
                "MLFLOW_ALLOW_FILE_STORE=true; a database (MLflow's sqlite default) needs pip install mlflow"
            ) from None


def route_trackers(fit, out: Path) -> None:
    """TensorBoard writes into the run folder (transformers 5 has no `logging_dir`: its callback's own attribute);
    the trackers' callbacks move after ftune's, so the eval rows MetricsLog sends on train begin and end reach them
    while their runs are open (they close them in `on_train_end`). Each reports from the main process only."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, TensorBoardCallback

    trackers = tuple(INTEGRATION_TO_CALLBACK[name] for name in fit.args.report_to)
    for callback in [c for c in fit.callback_handler.callbacks if isinstance(c, trackers)]:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(out.absolute() / rundir.TENSORBOARD)
        fit.remove_callback(callback)
        fit.add_callback(callback)


def build_sft(recipe, source: str, model, tokenizer, train_examples: list[dict], out: Path, callbacks) -> FtuneTrainer:
    """The SFT trainer: our tokenized examples, TRL's collator (padded, or padding-free when
    `training.packing`), the sampler `training.group_by_length` picks, and the method's PEFT config."""

    t, method = recipe.training, recipe.method
    packing = packing_applies(recipe)
    model = methods.prepare(model, method, t.gradient_checkpointing)
    if packing:
        attention.use_for_packing(model)
    args = SFTConfig(
        **_arguments(recipe, out),
        max_length=None,  # examples are truncated by us, with counts reported
        dataset_kwargs={"skip_prepare_dataset": True},
        padding_free=packing,  # one row per micro-batch, positions restart per example: no padding computed
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # packed rows hold no padding; padded batches count their attention mask (pad may equal EOS)
        include_num_input_tokens_seen="all" if packing else "non_padding",
    )
    trainer = FtuneTrainer(
        model=model,
        args=args,
        train_dataset=train_examples.dataset()
        if isinstance(train_examples, stream.Examples)
        else examples.dataset(train_examples),
        processing_class=tokenizer,
        peft_config=methods.peft_config(method, source),
        callbacks=list(callbacks),
        micro_batch_tokens=micro_batch_tokens(recipe),
        exact_lora_inputs=methods.exact_without_input_casts(method, methods.precision(t.precision)),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class FtuneDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on pairs ftune tokenized (preference.tokenize_pair): TRL's own tokenization would score the
    template's newline after the end-of-turn token, and add an EOS to string pairs that the template already ends."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def build_dpo(recipe, source: str, model, tokenizer, train_examples: list[dict], out: Path, callbacks):
    """The DPO trainer. With an adapter the reference is the base model with the adapter switched off (no second
    copy in memory); with full fine-tuning TRL loads a frozen copy of the base."""

    t, method = recipe.training, recipe.method
    model = methods.prepare(model, method, t.gradient_checkpointing)
    args = DPOConfig(
        **_arguments(recipe, out),
        beta=t.beta,
        loss_type=list(t.loss_type),
        max_length=None,  # pairs are truncated by us, with counts reported
        include_num_input_tokens_seen="non_padding",
    )
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return _pretokenized(FtuneDPOTrainer, args, keys, model, tokenizer, train_examples, method, source, callbacks)


def build_orpo(recipe, source: str, model, tokenizer, train_examples: list[dict], out: Path, callbacks):
    """The ORPO trainer (TRL's experimental ORPOTrainer): the chosen reply's NLL plus `beta` times the odds-ratio
    loss; no reference model."""
    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class FtuneORPOTrainer(ORPOTrainer):
        """ORPOTrainer on ftune's tokenized pairs: TRL's tokenize_row would add BOS and EOS tokens of its own."""

        def tokenize_row(self, feature, model=None) -> dict:
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for key in formats.PAIR_FIELDS:
                reply = feature[f"{key}_ids"]
                row[f"{key}_input_ids"] = prompt + reply
                row[f"{key}_attention_mask"] = [1] * (len(prompt) + len(reply))
                row[f"{key}_labels"] = [-100] * len(prompt) + reply
            return row

    t, method = recipe.training, recipe.method
    model = methods.prepare(model, method, t.gradient_checkpointing)
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_examples)
    args = ORPOConfig(
        **_arguments(recipe, out),
        beta=t.beta,
        max_length=longest,  # pairs are truncated by us: TRL's own truncation never applies
        include_num_input_tokens_seen="no",
    )
    columns = {key: [e[key] for e in train_examples] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
    trainer = FtuneORPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict(columns),
        processing_class=tokenizer,
        peft_config=methods.peft_config(method, source),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


class FtuneKTOTrainer(KTOTrainer):
    """TRL's KTOTrainer on labelled replies ftune tokenized (preference.tokenize_reply); only the KL completions
    (each batch's replies rotated by one, as TRL does) are added here."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


def build_kto(recipe, source: str, model, tokenizer, train_examples: list[dict], out: Path, callbacks):
    """The KTO trainer: desirable and undesirable replies (pairs count as one of each); with an adapter the
    reference is the base with the adapter switched off, as for DPO."""

    t, method = recipe.training, recipe.method
    if t.batch_size < 2:
        raise FtuneError("training.batch_size: KTO estimates its KL term from a batch's other replies; use 2 or more")
    model = methods.prepare(model, method, t.gradient_checkpointing)
    args = KTOConfig(
        **_arguments(recipe, out),
        beta=t.beta,
        desirable_weight=t.desirable_weight,
        undesirable_weight=t.undesirable_weight,
        max_length=None,  # replies are truncated by us, with counts reported
        include_num_input_tokens_seen="non_padding",
    )
    keys = ("prompt_ids", "completion_ids", "label")
    return _pretokenized(FtuneKTOTrainer, args, keys, model, tokenizer, train_examples, method, source, callbacks)


def _pretokenized(cls, args, keys, model, tokenizer, train_examples, method, source, callbacks):
    """A TRL preference trainer over the columns `keys` of examples ftune tokenized."""
    import datasets

    trainer = cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({key: [e[key] for e in train_examples] for key in keys}),
        processing_class=tokenizer,
        peft_config=methods.peft_config(method, source),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def build_classifier(recipe, source: str, model, processor, train_examples: list[dict], out: Path, callbacks, classes):
    """The classification trainer: transformers' Trainer (TRL's trainers are for generation) on ftune's examples,
    batched by classification.inputs.Collator, with the cross-entropy of the classes (weighted with
    `training.class_weights: balanced`) summed and divided by the step's example count, so gradient accumulation
    and several processes give the mean over the whole step (`compute_loss_func`: the Trainer then neither averages
    per micro-batch nor divides by the accumulation steps)."""
    import torch
    from transformers import Trainer, TrainingArguments

    t, method = recipe.training, recipe.method
    model = methods.prepare(model, method, t.gradient_checkpointing)
    weights = torch.tensor(classes.weights, dtype=torch.float32) if classes.weights else None

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits.float()
        weight = weights.to(logits.device) if weights is not None else None
        total = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), weight=weight, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    args = TrainingArguments(
        **_arguments(recipe, out),
        remove_unused_columns=False,  # the collator reads the examples' own keys (input_ids or image, label)
        include_num_input_tokens_seen="non_padding" if classes.input == "text" else "no",
    )
    config = methods.peft_config(method, source, classifier=classes.input, head=classes.head)
    if config is not None:  # before the Trainer, which refuses a quantized model without an adapter
        from peft import get_peft_model

        model = get_peft_model(model, config)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        data_collator=classes.collate,
        processing_class=processor,
        compute_loss_func=loss,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def packing_applies(recipe) -> bool:
    """Padding-free packing, except for prompt tuning (its virtual tokens prefix each row, not each example) and
    preference objectives (TRL pads their pairs). `auto`: packed on CPU, padded batches on GPUs (see
    packing_default)."""
    t = recipe.training
    packing = hardware.packing_default() if t.packing == "auto" else t.packing
    return packing and recipe.method.name != "prompt_tuning" and t.objective == "sft"  # not classification


def micro_batch_tokens(recipe) -> int | None:
    """The token budget of each forward/backward pass over a packed micro-batch (None: the whole row)."""
    return microbatch.resolve(recipe.training.micro_batch_tokens, hardware.cuda()) if packing_applies(recipe) else None


def save_artifact(trainer, recipe, out: Path, base: str | None = None, classes=None) -> Path:
    """adapter/ (PEFT methods, with ftune.json naming base, method and model options) or model/ (full), written
    to a temporary folder and renamed into place.

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
            m = recipe.model
            record = {"base": base or m.base, "method": recipe.method.model_dump(), "model": m.model_dump()}
            if classes is not None:  # the adapter's head is for these classes, in this order
                record["classification"] = {"input": classes.input, "labels": classes.names}
            files.write_json(tmp / rundir.ADAPTER_RECORD, record)
        if final.exists():  # a save that was interrupted after its rename (never the user's: this is our run)
            shutil.rmtree(final)
        files.umask_modes(tmp)  # safetensors writes its files 0600
        tmp.rename(final)
    launch.barrier()
    return final


# what TRL's preference trainers log besides the loss (DPO, ORPO, KTO), kept in metrics.jsonl
PREFERENCE_LOGS = ("rewards/", "logps/", "kl", "nll_loss", "log_odds")


class MetricsLog(TrainerCallback):
    """One JSON line per log in `metrics_file`; token-exact eval loss and perplexity before training (`before`),
    every `eval_steps` and at the end; a loss that is not finite stops the run."""

    def __init__(self, trainer, metrics_file, eval_examples, batch_size, eval_steps, pad_token_id, before, stop):
        self.trainer, self.file, self.examples = trainer, metrics_file, eval_examples
        self.batch_size, self.eval_steps, self.pad_token_id = batch_size, eval_steps, pad_token_id
        self.before, self.stop = before, stop
        self.start = time.time()
        self.last_eval = None
        self.last_eval_step = None

    def evaluate(self, step: int) -> dict | None:
        if not self.examples:
            return None
        trainer = self.trainer
        self.last_eval = self.measure(trainer.model)
        methods.restore_training_layout(trainer.model)
        self.last_eval_step = step
        logs = self.eval_logs(self.last_eval)
        trainer.callback_handler.on_log(trainer.args, trainer.state, copy.copy(trainer.control), logs)
        return self.last_eval

    def measure(self, model) -> dict:
        """The eval result (perplexity here; pair metrics for preference objectives: preference.PairMetricsLog)."""
        return corpus_nll(model, self.examples, self.batch_size, self.pad_token_id)

    @staticmethod
    def eval_logs(result: dict) -> dict:
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}

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
                max_steps=state.max_steps,  # `ftune runs` estimates a running run's time left from it
                loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens_per_s=round(state.num_input_tokens_seen / elapsed, 1) if elapsed else None,
            )
            row.update({k: v for k, v in logs.items() if k.startswith(PREFERENCE_LOGS)})
        elif any(k.startswith("eval_") for k in logs):
            row.update({k: v for k, v in logs.items() if k.startswith("eval_")})
        else:
            return
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.time()
        if self.before and state.global_step == 0:
            self.last_eval, self.last_eval_step = self.before, 0
            logs = self.eval_logs(self.before)
            self.trainer.callback_handler.on_log(args, state, copy.copy(control), logs)

    def on_step_end(self, args, state, control, **kw):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.evaluate(state.global_step)

    def on_train_end(self, args, state, control, **kw):
        if self.last_eval_step != state.global_step and not self.stop.stopped:
            self.evaluate(state.global_step)


class PairMetricsLog(MetricsLog):
    """MetricsLog for preference objectives: eval rows hold the pair metrics (eval_accuracy, eval_margin)."""

    def measure(self, model) -> dict:
        return pairwise.pair_metrics(model, self.examples, self.batch_size, self.pad_token_id)

    @staticmethod
    def eval_logs(result: dict) -> dict:
        return {"eval_accuracy": result["accuracy"], "eval_margin": result["margin"]}


class ClassifierMetricsLog(MetricsLog):
    """MetricsLog for classifiers: eval rows hold the loss, accuracy and macro F1 (classification.predict.score);
    `classes` (names, collate) is set by the caller."""

    classes = None

    def measure(self, model) -> dict:
        from finetune_cli.classification import predict

        c = self.classes
        return predict.score(model, self.examples, c.names, c.collate, self.batch_size)[0]

    @staticmethod
    def eval_logs(result: dict) -> dict:
        return {"eval_loss": result["loss"], "eval_accuracy": result["accuracy"], "eval_macro_f1": result["macro_f1"]}


class Checkpoints(TrainerCallback):
    """Move each finished checkpoint from .staging/ into checkpoints/ in one rename; keep the newest `limit`."""

    def __init__(self, out: Path, limit: int, every_epoch: bool):
        self.out, self.limit, self.every_epoch = out, limit, every_epoch

    def on_epoch_end(self, args, state, control, **kw):
        if self.every_epoch:
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        launch.barrier()  # every rank has written its part (its RNG state) of the checkpoint
        staged = self.out / rundir.STAGING / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not staged.is_dir():
            return
        final = self.out / rundir.CHECKPOINTS / staged.name
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            self._discard(final)
        older = sorted(final.parent.glob("checkpoint-*"), key=rundir.checkpoint_step)
        # Make room first, so a kill never leaves more than `limit`; with a limit of 1 the new one goes in first,
        # so there is never none.
        room = len(older) + 1 - self.limit
        if self.limit > 1:
            for old in older[: max(room, 0)]:
                self._discard(old)
        files.umask_modes(staged)
        os.replace(staged, final)
        if self.limit == 1:
            for old in older:
                self._discard(old)

    def _discard(self, checkpoint: Path) -> None:
        """Out of checkpoints/ in one rename, then deleted: never a half-deleted checkpoint under that name."""
        gone = self.out / rundir.STAGING / f"discarded-{checkpoint.name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(checkpoint, gone)
        shutil.rmtree(gone, ignore_errors=True)


class RecipeOnResume(TrainerCallback):
    """A resumed run trains at the recipe's learning rate (`--resume --force` may have changed it): the checkpoint's
    scheduler (`base_lrs`) and optimizer (`initial_lr`, `lr`) state would otherwise keep the old one. All of
    transformers' schedules multiply the base rate, so scaling by new/old gives the new schedule at this step."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        old = getattr(lr_scheduler, "base_lrs", None)
        if state.global_step == 0 or optimizer is None or not old or all(b == args.learning_rate for b in old):
            return
        for group, base in zip(optimizer.param_groups, old):
            group["lr"] = group["lr"] * args.learning_rate / base if base else args.learning_rate
            group["initial_lr"] = args.learning_rate
        lr_scheduler.base_lrs = [args.learning_rate] * len(old)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class StopOnSignal(TrainerCallback):
    """Checkpoint and stop after the step in which `request.requested` was set (by a signal handler)."""

    def __init__(self, request):
        self.request = request
        self.stopped = False

    def on_step_end(self, args, state, control, **kw):
        if launch.world_size() > 1:  # a signal that reached one rank stops them all at the same step
            self.request.requested = launch.any_rank(self.request.requested)
        if self.request.requested:
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
