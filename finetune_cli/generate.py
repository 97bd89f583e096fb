"""Sampling a reply from a model with the same chat template as training."""

from __future__ import annotations

from finetune_cli.data.masking import render


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 64) -> str:
    """Greedy reply to `messages` (the conversation before the assistant's turn)."""
    import torch

    prompt = render(tokenizer, messages, add_generation_prompt=True)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    if was_training:
        model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
