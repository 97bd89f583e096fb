"""Token-budget micro-batches for padding-free packed rows.

A packed micro-batch is one row holding `batch_size` examples end to end. Its activations grow with the row's
length, so a row of long examples can peak far above what one example needs. Under a budget, the row is run
as several forward/backward passes over sub-rows of whole consecutive examples, each at most `budget` tokens
(an example longer than the budget runs alone). The loss of each pass is normalised by the optimizer step's
learned-token count (`num_items_in_batch`), so the gradients sum to exactly those of the whole row: the same
examples, the same step, less memory.
"""

from __future__ import annotations

_ROW_KEYS = ("input_ids", "labels", "position_ids", "seq_idx")  # (1, tokens) tensors, cut along the row
_BOUND_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")
_MAX_KEYS = ("max_length_q", "max_length_k")
EDGES = "ftune_edges"  # the row's example bounds as Python ints, added on the CPU by with_edges


def with_edges(collate):
    """The padding-free collator, adding each row's example bounds as a list of ints (EDGES): read here, on the
    CPU where the collator built them, they cost nothing; read from a GPU tensor they wait for the GPU."""

    def collate_with_edges(examples):
        batch = collate(examples)
        if "cu_seq_lens_q" in batch:
            batch[EDGES] = batch["cu_seq_lens_q"].tolist()
        return batch

    return collate_with_edges


def resolve(setting, cuda: bool) -> int | None:
    """`training.micro_batch_tokens` resolved: "auto" is 512 tokens on CPU (measured: no slower than whole rows
    there, a fraction of the memory) and the whole row on GPUs (large rows keep a GPU busy)."""
    if setting != "auto":
        return setting
    return None if cuda else 512


def groups(bounds: list[int], budget: int) -> list[tuple[int, int]]:
    """Greedy runs of consecutive examples whose tokens fit the budget, as (first, end) indices into `bounds`
    (the row's cumulative example starts, ending with its length); an example over the budget runs alone."""
    runs, first = [], 0
    for k in range(1, len(bounds) - 1):
        if bounds[k + 1] - bounds[first] > budget:  # adding example k would overflow: cut before it
            runs.append((first, k))
            first = k
    runs.append((first, len(bounds) - 1))
    return runs


def split(inputs: dict, budget: int | None) -> list[dict]:
    """The sub-rows of a padding-free batch (with its EDGES) under `budget` tokens; anything else (padded batches,
    no budget, a row that fits, keys we do not know how to cut) comes back whole, as a one-item list."""
    bounds, edges = inputs.get("cu_seq_lens_q"), inputs.get(EDGES)
    if budget is None or edges is None or set(inputs) - {*_ROW_KEYS, *_BOUND_KEYS, *_MAX_KEYS, EDGES}:
        return [inputs]
    if inputs["input_ids"].shape[0] != 1 or inputs["input_ids"].shape[1] <= budget:
        return [inputs]
    parts = []
    for first, last in groups(edges, budget):
        a, b = edges[first], edges[last]
        part = {k: inputs[k][:, a:b] for k in _ROW_KEYS if k in inputs}
        if "seq_idx" in part:
            part["seq_idx"] = part["seq_idx"] - first
        cut = bounds[first : last + 1] - a  # on the tensor's device: no wait
        part[EDGES] = [e - a for e in edges[first : last + 1]]
        for k in _BOUND_KEYS:
            if k in inputs:
                part[k] = cut
        for k in _MAX_KEYS:
            if k in inputs:
                part[k] = max(e - d for d, e in zip(part[EDGES], part[EDGES][1:]))
        parts.append(part)
    return parts
