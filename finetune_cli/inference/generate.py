"""Decoding with transformers' `generate`: a reply to messages, rendered with the chat
template training used, stopping at its end-of-turn token (`reply`: `ftune generate`/`chat`, training's sample
answers); many prompts at once (`replies`: `ftune eval --generate`), sorted by length, left padded, each row
ending at the end-of-turn token and decoded exactly as `reply` decodes, so greedy batched answers equal
one-at-a-time answers (a test holds them equal); and the checks of sampling flags.
"""

from __future__ import annotations

import math
from typing import Callable

from finetune_cli.data.masking import end_of_turn_ids, render
from finetune_cli.errors import FtuneError

MIN_TEMPERATURE = 1e-5  # below it, logits / temperature can overflow: sampling's limit there is greedy decoding
SEEDS = (-(2**63), 2**63 - 1)  # a seed is an int64, as in OpenAI's API (torch takes these)


def check_sampling(do_sample: bool, temperature: float | None, top_p: float | None, seed: int | None = None) -> None:
    """Sampling flags are checked before any model is loaded."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise FtuneError(f"--temperature: {temperature} must be a number >= 0")
    if do_sample and temperature is not None and temperature < MIN_TEMPERATURE:
        raise FtuneError(
            f"--temperature {temperature} with --do-sample: sampling needs a temperature >= {MIN_TEMPERATURE} "
            "(or use --greedy)"
        )
    if top_p is not None and not (0 < top_p <= 1):
        raise FtuneError(f"--top-p: {top_p} must be in (0, 1]")
    if seed is not None and not SEEDS[0] <= seed <= SEEDS[1]:
        raise FtuneError(f"--seed: {seed} must be an integer from -2^63 to 2^63-1")


def sampling_kwargs(do_sample: bool, temperature: float | None, top_p: float | None, seed: int | None) -> dict:
    """`model.generate` keyword arguments for the sampling flags (seeding torch when sampling with a seed)."""
    if not do_sample:  # greedy: sampling settings in the model's generation config do not apply
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    return {"do_sample": True, **{k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None}}


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
    kwargs = sampling_kwargs(do_sample, temperature, top_p, seed)
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


def replies(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[list[str], int]:
    """(replies in the order of `prompts`, generated tokens): batches of similar length, left padded."""
    import torch

    encoded = [
        tokenizer(render(tokenizer, p, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    eot = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]
    kwargs = sampling_kwargs(do_sample, temperature, top_p, seed)
    device = next(model.parameters()).device
    replies: list[str] = [""] * len(encoded)
    generated = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eot,
                **kwargs,
            )
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in eot), None)
            new = new if end is None else new[: end + 1]  # up to its end-of-turn token, as one-at-a-time stops
            generated += len(new)
            replies[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
        progress(len(rows))
    if was_training:
        model.train()
    return replies, generated
