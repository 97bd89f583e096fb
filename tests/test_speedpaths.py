"""The training step's waits for the device (host syncs: `.item()`, `.tolist()`, `bool`/`int`/`float` of a
tensor), counted on CPU, where each would be a GPU wait: none of ftune's inside the model's forward (only
transformers' own mask code), and none in the step beyond TRL's own metrics (compute_loss's entropy, accuracy and
token count). Plus PEFT's LoRA input casts skipped only where that leaves losses and gradients bit-identical."""

import sys

import pytest
import torch

from finetune_cli.training import methods
from tests import test_speed
from tests.test_speed import trainer_for

setup = test_speed.setup  # the module fixture: examples of one to four exchanges

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def record_syncs(monkeypatch, trainer) -> dict:
    """Every sync made during the trainer's micro-batch steps and token counting, as (file, function) of its
    caller, split into those inside the model's forward and the rest."""
    seen = {"forward": [], "step": [], "passes": 0}
    where = []  # the innermost region being recorded

    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, **kwargs):
            if where:
                caller = sys._getframe(1).f_code
                seen[where[-1]].append((caller.co_filename.rsplit("site-packages/", 1)[-1], caller.co_name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    def region(label, function):
        def recorded(*args, **kwargs):
            where.append(label)
            try:
                return function(*args, **kwargs)
            finally:
                where.pop()

        return recorded

    model = trainer.model

    def enter(*args):
        where.append("forward")
        seen["passes"] += 1

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(lambda *args: where.pop() and None)
    monkeypatch.setattr(trainer, "training_step", region("step", trainer.training_step))
    monkeypatch.setattr(trainer, "_track_num_input_tokens", region("step", trainer._track_num_input_tokens))
    return seen


# transformers' own mask code, which a plain transformers/TRL script runs too: packed rows are detected from the
# position ids, padded batches check whether the causal mask can be skipped
TRANSFORMERS_MASKS = {
    ("transformers/masking_utils.py", "find_packed_sequence_indices"),
    ("transformers/masking_utils.py", "_ignore_causal_mask_sdpa"),
}


@pytest.mark.parametrize("packing", [True, False])
def test_no_host_syncs_of_ours_in_the_training_step(setup, tiny_model_dir, tmp_path, monkeypatch, packing):
    """A whole epoch (3 optimizer steps of 2 micro-batches; packed rows cut into 64-token passes): no sync of ftune's
    inside any forward (the packed attention's bounds come from the collator), and every other sync of the step
    is TRL's metrics code (SFTTrainer.compute_loss, 5 a pass): no bounds read by the micro-batch split, no tokens
    count read each micro-batch. The tokens seen still equal the epoch's tokens, counted from the examples.
    Before: 76 syncs a step packed (28 ours), 16 padded (2 ours)."""
    trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=packing, micro_batch_tokens=64, logging_steps=100)
    seen = record_syncs(monkeypatch, trainer)
    trainer.train()
    assert trainer.state.global_step == 3 and seen["passes"] >= 6
    assert set(seen["forward"]) <= TRANSFORMERS_MASKS
    assert set(seen["step"]) == {("trl/trainer/sft_trainer.py", "compute_loss")}
    assert len(seen["step"]) == 5 * seen["passes"]
    assert trainer.state.num_input_tokens_seen == sum(len(e["input_ids"]) for e in setup[2])


def lora_step(trainer, batch, exact: bool):
    """Loss, LoRA gradients and the dtype the first LoRA layer's input arrives in, for one training step."""
    trainer.exact_lora_inputs = exact
    dtypes = []
    first = next(m for name, m in trainer.model.named_modules() if name.endswith("lora_A.default"))
    hook = first.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    trainer.model.zero_grad()
    n = (batch["labels"][:, 1:] != -100).sum()
    with trainer.accelerator.autocast():  # as train() runs it (its prepared model's forward)
        loss = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n)
    hook.remove()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, dtypes[0]


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_inputs_skip_the_fp32_cast_only_where_exact(setup, tiny_model_dir, tmp_path, monkeypatch, bf16):
    """On a bf16 base (PEFT keeps the adapter in fp32) under bf16 autocast with dropout 0, LoRA layers take their
    bf16 input as it is instead of an fp32 copy, and the loss and every LoRA gradient are bit-identical to PEFT's
    casting path. In fp32, or with dropout, the cast stays."""
    from finetune_cli import models

    monkeypatch.setenv("FTUNE_CPU_BF16", "1" if bf16 else "0")
    load = models.load_model
    dtype = torch.bfloat16 if bf16 else torch.float32
    monkeypatch.setattr(models, "load_model", lambda *a, **k: load(*a, **k).to(dtype))
    torch.manual_seed(0)
    trainer = trainer_for(setup, tiny_model_dir, tmp_path, packing=True, precision="auto")
    assert trainer.exact_lora_inputs == bf16
    with torch.no_grad():  # LoRA B starts at zero: give it values so every gradient is non-trivial
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    loss, grads, cast = lora_step(trainer, batch, exact=False)  # PEFT's own path
    loss2, grads2, kept = lora_step(trainer, batch, exact=True)
    assert cast == torch.float32 and kept == dtype
    assert torch.equal(loss2, loss)
    for k in grads:
        assert grads[k].abs().sum() > 0, k
        assert torch.equal(grads2[k], grads[k]), k


def test_lora_input_casts_stay_with_dropout_or_without_autocast():
    from finetune_cli.recipe import Recipe

    def method(**m):
        return Recipe.model_validate({"data": {"train": "t.jsonl"}, "method": {"name": "lora", **m}}).method

    assert methods.exact_without_input_casts(method(), "bf16")
    assert methods.exact_without_input_casts(method(name="qlora"), "fp16")
    assert not methods.exact_without_input_casts(method(dropout=0.05), "bf16")
    assert not methods.exact_without_input_casts(method(), "fp32")
    assert not methods.exact_without_input_casts(method(name="full"), "bf16")
