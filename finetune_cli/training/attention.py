"""Attention for padding-free packed rows without flash-attn: PyTorch's own SDPA kernel run once per packed
example (causal, no mask), so a row of examples costs the sum of their squared lengths, not the square of the
row's length, and no (row x row) block mask is built. Anything else (padded batches, generation with a cache)
goes to transformers' SDPA unchanged."""

from __future__ import annotations

NAME = "ftune_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if (
        bounds is None
        or query.shape[0] != 1
        or query.shape[2] != key.shape[2]
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    import torch
    import torch.nn.functional as F

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    edges = _edges(bounds)
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling, is_causal=True
        )
        for a, b in zip(edges, edges[1:])
        if b > a
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_last: tuple = (None, [])  # the bounds tensor of the forward in progress and its values


def _edges(bounds) -> list[int]:
    """The example boundaries as Python ints: those the trainer gave for this tensor (`known`, from the CPU), else
    read once per forward: every layer gets the same tensor, and each read of a GPU tensor waits for the GPU (22
    waits a forward of a 22-layer model instead of 1). The tensor itself is kept, so an identity match can never
    be a new tensor at a reused address."""
    if _last[0] is not bounds:
        known(bounds, _to_list(bounds))
    return _last[1]


def known(bounds, edges: list[int]) -> None:
    """The values of the bounds tensor the next forward gets, as the collator computed them on the CPU."""
    global _last
    _last = (bounds, edges)


def _to_list(bounds) -> list[int]:
    return bounds.tolist()


def use_for_packing(model) -> None:
    """Switch a model on SDPA (or eager) attention to the per-example kernel; models on flash-attn keep it (it
    handles packed rows itself), and so do models that cannot switch implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return
    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches (eval) keep SDPA's masks
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError):
        pass


def restore(model) -> None:
    """Back to SDPA before saving, so the written config names an implementation every reader knows."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
