"""Batched decoding: many prompts through one model together, step by step with the KV cache, each sequence ending
at its own end-of-turn token, stop or length. `ftune serve` runs its requests through it (`Batch`).

Why not transformers' own continuous batching (`generate_batch` / `init_continuous_batching`, transformers 5)? On
CPU (transformers 5.24, SmolLM2-135M, LoRA adapter through PEFT) it gives the same greedy tokens, but sized from
memory by default it spent 80% of its time filling buffers sized for a GPU (8 prompts: 28 s against 13 s one by
one); sized by hand it was 2.5x faster. Still: it samples with one seed for all requests (OpenAI's `seed` is per
request), it cannot switch between a base's named adapters while its own thread runs, and its configuration changed
in 5.11, 5.13 and 5.17, inside the transformers range ftune supports. This decoder is plain PyTorch over the model's
forward and the dynamic cache, with the position ids and masks `model.generate` computes, so a lone sequence gets
exactly the tokens `model.generate` gives (the tests check it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Sequence:
    """One prompt's decoding: its settings, the tokens generated so far and why it ended."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # as transformers applies it (a model's generation config may set it)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end-of-turn token or a stop text) | "length" | "cancelled" | "error"
    cancelled: bool = False  # set from another thread; the sequence leaves the batch before the next step
    error: Exception | None = None  # what ended it, when finish_reason is "error"
    generator: torch.Generator | None = None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def fail(self, error: Exception) -> None:
        """End this sequence alone with `error` (it leaves the batch before the next step)."""
        self.error, self.finish_reason = error, "error"


class Batch:
    """Sequences decoding together on one model. `add` prefills new sequences (also while others are decoding: they
    join at the next step); `step` decodes one token for each. Rows are left-padded; finished rows leave the batch."""

    def __init__(self, model, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(core.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._logits_to_keep = "logits_to_keep" in params
        self._config = core.config
        self.seqs: list[Sequence] = []
        self.cache = None
        self.mask = None  # [rows, cached length + 1]: 1 for real tokens, 0 for left padding
        self.positions = None  # [rows]: the position of each row's next input token

    def __len__(self) -> int:
        return len(self.seqs)

    def can_join(self) -> bool:
        """New sequences can join a running batch when every cache layer is a plain growing one (not a sliding
        window), so padding the shorter side on the left lines the caches up."""
        if not self.seqs:
            return True
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @torch.no_grad()
    def add(self, seqs: list[Sequence]) -> list[Sequence]:
        """Prefill `seqs` (left-padded together), choose their first tokens and take them into the batch; return the
        ones that ended at once. A prefill that fails ends `seqs` alone (the running batch is not touched yet)."""
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq.prompt) :] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[i, width - len(seq.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as model.generate computes them
        cache = DynamicCache(config=self._config)
        try:
            logits = self._forward(ids, mask, positions, cache)
        except Exception as exc:  # noqa: BLE001 - e.g. a prompt the model cannot take: these requests fail alone
            for seq in seqs:
                seq.fail(exc)
            return list(seqs)
        if not self.seqs:
            self.seqs, self.cache, self.mask, self.positions = list(seqs), cache, mask, mask.sum(-1)
        else:
            self._join(seqs, cache, mask)
        return self._choose(seqs, logits)

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """Decode one token for every sequence in the batch; return the sequences that ended (and left it)."""
        ended = [s for s in self.seqs if s.finish_reason is not None or s.cancelled]
        for seq in ended:
            seq.finish("cancelled")
        self._keep([s.finish_reason is None for s in self.seqs])
        if not self.seqs:
            return ended
        ids = torch.tensor([[s.tokens[-1]] for s in self.seqs], dtype=torch.long)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.seqs), 1))], dim=-1)
        logits = self._forward(ids, self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        return ended + self._choose(list(self.seqs), logits)

    def _forward(self, ids, mask, positions, cache):
        kwargs = {self._cache_arg: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            **kwargs,
        )
        return out.logits[:, -1, :].to(dtype=torch.float32, device="cpu", copy=True)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        """Pick the next token of `seqs` from their `logits` rows; drop the sequences that ended; return them. A
        failure in one sequence's choice ends that sequence alone."""
        for i, seq in enumerate(seqs):
            try:
                token = _next_token(logits[i], seq)
            except Exception as exc:  # noqa: BLE001 - the others go on
                seq.fail(exc)
                continue
            seq.tokens.append(token)
            if token in seq.stop_ids:
                seq.finish("stop")
            elif len(seq.tokens) >= seq.max_new_tokens:
                seq.finish("length")
        self._keep([s.finish_reason is None for s in self.seqs])
        return [s for s in seqs if s.finish_reason is not None]

    def _keep(self, keep: list[bool]) -> None:
        if all(keep):
            return
        rows = [i for i, k in enumerate(keep) if k]
        self.seqs = [self.seqs[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(index.to(self.device))
        self.mask, self.positions = self.mask[index], self.positions[index]

    def _join(self, seqs, cache, mask) -> None:
        """Append prefilled rows to the running batch: the shorter side's cache and mask are padded on the left."""
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.positions = torch.cat([self.positions, mask.sum(-1)])
        self.seqs += seqs


def _pad_left(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _next_token(logits: torch.Tensor, seq: Sequence) -> int:
    if seq.repetition_penalty != 1.0:
        logits = _penalize(logits, seq)
    return int(logits.argmax()) if seq.temperature == 0 else _sample(logits, seq)


def _penalize(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor for one sequence: every token seen so far is made less likely."""
    seen = torch.tensor(seq.prompt + seq.tokens, dtype=torch.long)
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * seq.repetition_penalty, score / seq.repetition_penalty)
    return logits.scatter(0, seen, score)


def _sample(logits: torch.Tensor, seq: Sequence) -> int:
    """Temperature and nucleus (top-p) sampling with the sequence's own generator, so a seed gives the same tokens
    whichever requests share the batch (and, for a seed, the tokens `model.generate` gives after
    `torch.manual_seed(seed)`: the tests check it)."""
    if seq.generator is None:
        seq.generator = torch.Generator(device="cpu")
        if seq.seed is not None:
            seq.generator.manual_seed(seq.seed)
        else:
            seq.generator.seed()
    probs = torch.softmax(logits / seq.temperature, dim=-1)
    if seq.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= seq.top_p  # the smallest set reaching top_p stays
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=seq.generator))


def repetition_penalty(model) -> float:
    config = getattr(model, "generation_config", None)
    return float(getattr(config, "repetition_penalty", None) or 1.0)


# Settings of a generation config that `model.generate` applies and this decoder does not.
UNSUPPORTED = ("no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "suppress_tokens",
               "begin_suppress_tokens", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
               "encoder_repetition_penalty", "exponential_decay_length_penalty")  # fmt: skip


def unsupported(model) -> list[str]:
    """The generation-config settings of `model` that this decoder ignores (so its replies could differ)."""
    from transformers import GenerationConfig

    config, default = getattr(model, "generation_config", None), GenerationConfig()
    return [k for k in UNSUPPORTED if config is not None and getattr(config, k, None) != getattr(default, k, None)]
