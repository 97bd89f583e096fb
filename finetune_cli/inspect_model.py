"""`ftune inspect MODEL`: what a model is and what it needs, read from its config and tokenizer only.

No weights are loaded: the parameter count comes from building the model on the meta device
(`accelerate.init_empty_weights()` + `AutoModelForCausalLM.from_config`), where tensors have shapes
but no storage. Tied weights (e.g. `lm_head` sharing the input embeddings) are counted once.
"""

from __future__ import annotations

import math

from finetune_cli.errors import FtuneError

SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]

# bitsandbytes NF4 (the qlora default, double quantization on): 4 bits per weight, plus one 8-bit
# absmax per block of 64 weights, plus one fp32 constant per 256 such blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_SCALE_BYTES = 4  # LLM.int8: one fp32 scale per output row of each quantized linear layer


def inspect(model: str) -> dict:
    """Describe `model` (builtin name, local folder, hub id or .gguf) without loading its weights."""
    from transformers import AutoConfig

    from finetune_cli import models
    from finetune_cli.data import masking

    source = models.resolve(model)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear line
        raise models.load_error(source, exc) from None
    tokenizer = models.load_tokenizer(source, require_template=False)
    counts = count_parameters(config, model)

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    architectures = getattr(config, "architectures", None) or []
    template = bool(getattr(tokenizer, "chat_template", None))
    sample = error = None
    if template:
        try:
            sample = masking.render(tokenizer, SAMPLE_MESSAGES)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or a Jinja error
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    eot = masking.end_of_turn_ids(tokenizer)
    return {
        "model": model,
        "path": source,
        "architecture": architectures[0] if architectures else config.model_type,
        "model_type": config.model_type,
        "parameters": counts["parameters"],
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "context_length": getattr(text, "max_position_embeddings", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tokenizer_size": len(tokenizer),
        "dtype": _dtype_name(getattr(config, "dtype", None)),
        "special_tokens": {name: _special(tokenizer, name) for name in ("bos", "eos", "pad", "unk")},
        "end_of_turn": [{"token": tokenizer.convert_ids_to_tokens(i), "id": i} for i in eot],
        "pad_is_eos": tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id,
        "chat_template": template,
        "template_sample": sample,
        "template_error": error,
        "memory": memory(counts["parameters"], counts["quantizable"], counts["quantizable_rows"]),
    }


def count_parameters(config, name: str | None = None) -> dict:
    """Count parameters of the model `config` describes, built on the meta device (no memory, no weights).

    Returns `parameters` (all, tied weights once), `quantizable` (weights of the linear layers inside
    the decoder layers, i.e. those bitsandbytes quantizes) and `quantizable_rows` (their output rows).
    """
    import accelerate
    import torch.nn as nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with accelerate.init_empty_weights():
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - unsupported architecture, custom code, bad config values
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FtuneError(f"model '{name or config.model_type}': cannot build it as a causal LM: {first}") from None
    # init_empty_weights re-registers each parameter on the meta device, which unties shared ones: tie again.
    try:
        meta.tie_weights()
    except Exception:  # noqa: BLE001 - a model without tying support has nothing to tie
        pass
    total = sum(p.numel() for p in meta.parameters())  # parameters() yields a shared tensor once

    seen: set[int] = set()
    quantizable = rows = 0
    for layers in meta.modules():
        if not isinstance(layers, nn.ModuleList):
            continue
        for module in layers.modules():
            if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                quantizable += module.weight.numel()
                rows += module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]
    return {"parameters": total, "quantizable": quantizable, "quantizable_rows": rows}


def memory(parameters: int, quantizable: int = 0, quantizable_rows: int = 0) -> dict:
    """Bytes the weights take in each dtype: weights only, no activations, KV cache, gradients or optimizer.

    float32/bfloat16/float16 are 4/2/2 bytes per parameter. int8 and nf4 follow bitsandbytes, which
    quantizes only the linear layers inside the decoder layers (`quantizable` weights) and keeps
    embeddings, `lm_head`, norms and biases in 16 bits (2 bytes each):
    - int8 (LLM.int8): 1 byte per quantized weight plus one fp32 scale per output row.
    - nf4: 0.5 byte per quantized weight plus the block constants of double quantization
      (about 0.016 byte per weight), so about 0.516 byte per weight.
    Approximate: ignores block padding and small buffers (e.g. rotary frequencies).
    """
    rest = parameters - quantizable
    return {
        "float32": 4 * parameters,
        "bfloat16": 2 * parameters,
        "float16": 2 * parameters,
        "int8": quantizable + INT8_SCALE_BYTES * quantizable_rows + 2 * rest,
        "nf4": math.ceil(NF4_BYTES_PER_PARAM * quantizable) + 2 * rest,
    }


def _special(tokenizer, name: str) -> dict:
    return {"token": getattr(tokenizer, f"{name}_token", None), "id": getattr(tokenizer, f"{name}_token_id", None)}


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")
