"""What each method makes trainable: the PEFT config for a recipe's `method` section."""

from __future__ import annotations

from finetune_cli.recipe import MethodSection


def peft_config(method: MethodSection):
    from peft import LoraConfig

    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        task_type="CAUSAL_LM",
    )


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
