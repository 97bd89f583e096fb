"""What each method makes trainable: quantization and PEFT configs, and what a run saves."""

from __future__ import annotations

import os

from finetune_cli.errors import FtuneError


def quantization_config(method, dtype_name: str, shardable: bool = False, keep: list[str] | None = None):
    """bitsandbytes settings for qlora (None for other methods); compute dtype follows the model's.

    `shardable` (FSDP, ZeRO-3): 4-bit weights are stored in the compute dtype so they can be flattened and
    sharded like the other parameters. `keep`: modules left in full precision (a classifier's head, trained in
    full)."""
    if method.name != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(keep)} if keep else {}
    if method.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    compute = dtype_name if method.compute_dtype == "auto" else method.compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute),
        **({"bnb_4bit_quant_storage": getattr(torch, compute)} if shardable else {}),
        **skip,
    )


def peft_config(method, tokenizer_source: str, classifier: str | None = None, head: str | None = None):
    """The PEFT config for lora, qlora and prompt_tuning; None for full fine-tuning.

    `classifier` ("text" or "image"): the model has a classification head (`head`), trained in full beside the
    adapter (modules_to_save) and never given LoRA layers. PEFT's SEQ_CLS task does both for text models; image
    models have no PEFT task, so the head is named (the PEFT guide's ViT recipe)."""
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit

    if method.name in ("lora", "qlora"):
        task = {None: {"task_type": "CAUSAL_LM"}, "text": {"task_type": "SEQ_CLS"}, "image": {}}[classifier]
        save = method.modules_to_save
        if classifier == "image":
            save = [head, *(m for m in save or [] if m != head)]
            task["exclude_modules"] = [head]
        return LoraConfig(
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            use_dora=method.use_dora,
            use_rslora=method.use_rslora,
            modules_to_save=save,
            **task,
        )
    if method.name == "prompt_tuning":
        if method.init_text:
            return PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=method.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=method.init_text,
                tokenizer_name_or_path=tokenizer_source,
            )
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens)
    return None


def prepare(model, method, gradient_checkpointing: bool):
    """QLoRA: make the k-bit model trainable (norms in fp32, input grads) before the adapter is added."""
    if method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        restore_training_layout(model)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def restore_training_layout(model) -> None:
    """Undo bitsandbytes' CPU inference packing of 4-bit weights before training continues.

    On CPUs with AVX512-BF16, the first no-grad forward of a 4-bit layer in eval mode (our baseline eval,
    sample generation, eval every eval_steps) repacks its weights in place for a CPU kernel; its training
    path then learns far slower (measured: loss 0.91 -> 0.85 in 3 steps instead of 0.91 -> 0.11)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def check_device(method, precision: str, optimizer: str, liger: bool = False) -> None:
    """Refuse, before any model loads, what this machine cannot do. Imports torch only when the answer
    depends on the hardware (`ftune validate` of a plain recipe stays torch-free)."""
    hardware_dependent = precision in ("fp16", "bf16") or "8bit" in optimizer or optimizer.startswith("paged")
    if not (hardware_dependent or liger or (method.name == "qlora" and method.bits == 8)):
        return
    import torch

    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise FtuneError("training.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise FtuneError("training.precision: this GPU has no bf16; use fp16 or fp32")
    if ("8bit" in optimizer or optimizer.startswith("paged")) and not cuda:
        raise FtuneError(f"training.optimizer: {optimizer} needs a CUDA GPU; use adamw_torch on CPU")
    if method.name == "qlora" and method.bits == 8 and not cuda:
        raise FtuneError("method.bits: 8-bit loading needs a CUDA GPU; use bits: 4 on CPU")
    if liger:
        import importlib.util

        if not cuda:
            raise FtuneError("training.liger: Liger kernels are Triton kernels for CUDA GPUs; set it to false on CPU")
        if importlib.util.find_spec("liger_kernel") is None:
            raise FtuneError("training.liger: liger-kernel is not installed; pip install liger-kernel, or set false")


def precision(setting: str) -> str:
    """The training precision `auto` stands for: bf16 on GPUs that have it and on CPUs with native bf16
    matmuls (AMX or AVX512-BF16), where autocast is faster; fp32 elsewhere (emulated bf16 is slower)."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo. FTUNE_CPU_BF16=1 or 0 overrides it, so the test suite can run
    `precision: auto` both ways on any CPU (bf16 is emulated, slowly but correctly, without native support)."""
    forced = os.environ.get("FTUNE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def exact_without_input_casts(method, precision_name: str) -> bool:
    """Whether PEFT's cast of every LoRA input to the adapter's dtype (fp32) and back can be skipped in training
    (peft.helpers.disable_input_dtype_casting): under bf16/fp16 autocast the adapter's matmuls run in the autocast
    dtype either way, so the fp32 copy is an exact round trip that costs only memory traffic. Not with dropout (it
    would act on the other dtype), nor without autocast (a bf16 input would meet fp32 weights)."""
    return method.name in ("lora", "qlora") and precision_name in ("bf16", "fp16") and method.dropout == 0
