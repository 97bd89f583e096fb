"""What this machine has, and what the recipe's `auto` settings mean on it."""

from __future__ import annotations


def packing_default() -> bool:
    """What `training.packing: auto` means on this machine. Measured (BENCHMARKS.md): on CPU packed rows are 2-3x
    padded batches; on an H200 without flash-attn, padded batches ran 1.76x packed rows (1B Llama, LoRA)."""
    return not cuda()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()
