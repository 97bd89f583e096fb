"""Merging a LoRA/QLoRA adapter into its base model, always in full precision, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_cli import files, models, rundir
from finetune_cli.data.masking import end_of_turn_ids
from finetune_cli.errors import FtuneError


def merge(
    source: str,
    output: str,
    base: str | None = None,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> dict:
    """Fold the adapter into a full-precision copy of its base and save a plain transformers model folder."""
    _check_shard_size(max_shard_size)
    path = Path(source).expanduser()
    if not path.exists():
        raise FtuneError(f"{source}: no such run directory or adapter folder")
    if path.is_dir() and not rundir.is_run(path) and not (path / "adapter_config.json").exists():
        if not (path / rundir.RUN_JSON).exists() and not (path / rundir.RECIPE).exists():
            raise FtuneError(f"{source}: no adapter here (no adapter_config.json); give a run or an adapter folder")
    found = rundir.open_target(source, base)
    if found.adapter is None:
        if found.run_dir is not None:
            raise FtuneError(f"{source} is a full fine-tuning run: {found.weights} is already a complete model")
        raise FtuneError(
            f"{source}: no adapter here (no adapter_config.json); give a run directory or an adapter folder"
        )
    adapter = found.adapter
    rundir.check_lora(adapter)
    out = Path(output).expanduser()
    rundir.check_output(out, "merge", overwrite, "--output")
    base_name = found.base
    merged, tokenizer = merged_model(found, dtype)
    eos = None
    if not found.task:  # a classifier generates nothing: no stop tokens to carry
        eos = end_of_turn_ids(tokenizer)
        merged.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.name_or_path = str(out)

    with files.temporary_folder(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(found, dtype), encoding="utf-8")
        rundir.check_output(out, "merge", overwrite, "--output")  # again: something may have appeared meanwhile
        rundir.replace_folder(tmp, out, "merge", [p.name for p in tmp.iterdir()])
    result = {"output": str(out), "base": base_name, "adapter": str(adapter), "dtype": dtype, "eos_token_id": eos}
    if found.task:
        result["labels"] = found.labels
    return result


def merged_model(found: rundir.Target, dtype: str = "float32"):
    """(model, tokenizer) for an opened target, any LoRA adapter folded into its base loaded at `dtype` (full
    precision by default: never merged into 4-bit weights); the tokenizer carries the template training used."""
    if found.task:  # a classifier: its head (trained in full beside the adapter) replaces the base's
        return _merged_classifier(found, dtype)
    tokenizer = models.load_tokenizer(found.tokenizer, None, found.trust_remote_code, require_template=False)
    model = models.load_model(found.weights, dtype, found.trust_remote_code)
    if found.adapter is None:
        return model, tokenizer
    _check_shapes(model, found.adapter, found.base)

    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(found.adapter)).merge_and_unload(), tokenizer


def _merged_classifier(found: rundir.Target, dtype: str):
    from finetune_cli.classification import model as classifier

    model, processor = classifier.load_target(found, dtype, lambda base: _check_shapes(base, found.adapter, found.base))
    return (model.merge_and_unload() if found.adapter is not None else model), processor


def _check_shard_size(size: str) -> None:
    """--max-shard-size is read before the slow merge, not after it."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(size) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise FtuneError(f"--max-shard-size: {size!r} is not a size; write it like 2GB, 500MB or 1GiB") from None


def _check_shapes(model, adapter: Path, base_name: str) -> None:
    """Refuse, before writing anything, an adapter whose modules or shapes the base does not have."""
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FtuneError(f"{adapter}: adapter_model.safetensors is missing")
    modules = dict(model.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.removeprefix("base_model.model.").split(".lora_")[0]
            module = modules.get(name)
            shape = f.get_slice(key).get_shape()
            if module is None or not hasattr(module, "weight"):
                raise FtuneError(f"adapter does not fit base '{base_name}': it has no module {name}")
            out_features, in_features = module.weight.shape
            fits = shape[1] == in_features if ".lora_A." in key else shape[0] == out_features
            if not fits:
                raise FtuneError(
                    f"adapter does not fit base '{base_name}': {name} is {out_features}x{in_features} in the base, "
                    f"the adapter's {key.split('.')[-2]} is {shape[0]}x{shape[1]}"
                )


def _model_card(found: rundir.Target, dtype: str) -> str:
    adapter, base_name, method = found.adapter, found.base, found.method or {"name": "lora"}
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base_name}",
        "tags: [ftune, merged]",
        "---",
        "",
        f"# Merged {method['name']} fine-tune of {base_name}",
        "",
        f"Made by `ftune merge-adapter`: the adapter `{adapter}` folded into the {dtype} base "
        f"{'(de-quantized: never merged into 4-bit weights) ' if method['name'] == 'qlora' else ''}weights.",
        "",
        "## Method",
        "",
        "```json",
        json.dumps(method, indent=2),
        "```",
    ]
    run = found.run_dir
    if run is not None and (run / rundir.RECIPE).is_file():
        lines += ["", "## Recipe", "", "```yaml", (run / rundir.RECIPE).read_text(encoding="utf-8").rstrip(), "```"]
    lines += rundir.evaluation_markdown(run)
    return "\n".join(lines) + "\n"
