"""Replies from a base model, a run (base + adapter) or a merged folder, with the training chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from finetune_cli import models
from finetune_cli.data.masking import end_of_turn_ids, render
from finetune_cli.errors import FtuneError


def load_target(target: str):
    """(model, tokenizer) for a run directory, an adapter folder, a model folder or a base model name."""
    path = Path(target)
    artifact = path / "adapter" if (path / "adapter").is_dir() else path
    if (path / "model" / "config.json").is_file() and not (path / "adapter").is_dir():
        artifact = path / "model"
    if (artifact / "adapter_config.json").is_file():
        from peft import PeftModel

        from finetune_cli.export import adapter_base

        base = adapter_base(artifact)
        tokenizer = models.load_tokenizer(str(artifact))
        model = PeftModel.from_pretrained(models.load_model(models.resolve(base)), str(artifact))
        return model, tokenizer
    if path.is_dir() and not (artifact / "config.json").is_file():
        raise FtuneError(f"{target}: neither a run directory, an adapter folder nor a model folder")
    source = str(artifact) if artifact != path else models.resolve(target)
    return models.load_model(source), models.load_tokenizer(source)


def reply(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The assistant's reply to `messages`; `on_text` receives the text as it is generated."""
    import torch
    from transformers import TextStreamer

    prompt = render(tokenizer, messages, add_generation_prompt=True)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
        if seed is not None:
            torch.manual_seed(seed)
    else:  # greedy: sampling settings in the model's generation config do not apply
        kwargs.update(temperature=None, top_p=None, top_k=None)
    streamer = None
    if on_text is not None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: on_text(text)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_of_turn_ids(tokenizer),
            streamer=streamer,
            **kwargs,
        )
    if was_training:
        model.train()
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
