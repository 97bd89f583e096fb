"""Merging a LoRA/QLoRA adapter into its base model, always in full precision, written atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from finetune_cli import models
from finetune_cli.data.masking import end_of_turn_ids
from finetune_cli.errors import FtuneError


def find_adapter(source: str | Path) -> Path:
    """SOURCE is a run directory or an adapter folder; return the adapter folder."""
    src = Path(source)
    if not src.exists():
        raise FtuneError(f"{src}: no such run directory or adapter folder")
    adapter = src / "adapter" if (src / "adapter").is_dir() else src
    if not (adapter / "adapter_config.json").is_file():
        if (src / "model" / "config.json").is_file():
            raise FtuneError(f"{src} is a full fine-tuning run: {src / 'model'} is already a complete model")
        raise FtuneError(f"{src}: no adapter here (no adapter_config.json); give a run directory or an adapter folder")
    return adapter


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on: ftune's record, else PEFT's own."""
    record = adapter / "ftune.json"
    if record.is_file():
        return json.loads(record.read_text())["base"]
    return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""


def merge(
    source: str,
    output: str,
    base: str | None = None,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> dict:
    """Fold the adapter into a full-precision copy of its base and save a plain transformers model folder."""
    adapter = find_adapter(source)
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise FtuneError(
            f"{adapter}: a {config.get('peft_type', 'non-LoRA').lower()} adapter cannot be merged: it adds virtual "
            "tokens in front of the input rather than changing weights. Use the adapter folder itself with "
            "peft.PeftModel.from_pretrained(base, adapter)"
        )
    out = Path(output)
    if out.exists() and not overwrite:
        raise FtuneError(f"--output: {out} exists; pass --overwrite or choose another folder")
    base_name = base or adapter_base(adapter)
    if not base_name:
        raise FtuneError(f"{adapter}: the adapter does not record its base model; pass --base")
    source_path = models.resolve(base_name)
    tokenizer = models.load_tokenizer(str(adapter), require_template=False)
    # Full precision (or the asked dtype) for every method: a QLoRA adapter is never merged into 4-bit weights.
    model = models.load_model(source_path, dtype)
    _check_shapes(model, adapter, base_name)

    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    eos = end_of_turn_ids(tokenizer)
    merged.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.config.name_or_path = str(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(adapter, base_name, dtype), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(out), "base": base_name, "adapter": str(adapter), "dtype": dtype, "eos_token_id": eos}


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


def _model_card(adapter: Path, base_name: str, dtype: str) -> str:
    record = adapter / "ftune.json"
    method = json.loads(record.read_text())["method"] if record.is_file() else {"name": "lora"}
    run = adapter.parent
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
    if (run / "recipe.yaml").is_file():
        lines += ["", "## Recipe", "", "```yaml", (run / "recipe.yaml").read_text().rstrip(), "```"]
    if (run / "eval.json").is_file():
        results = json.loads((run / "eval.json").read_text())["results"]
        lines += ["", "## Evaluation (ftune eval)", "", "| model | scored tokens | perplexity |", "|---|---|---|"]
        lines += [f"| {name} | {r['tokens']} | {r['perplexity']:.4f} |" for name, r in results.items()]
    return "\n".join(lines) + "\n"
