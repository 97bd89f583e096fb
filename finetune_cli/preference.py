"""Preference data (a better and a worse reply to one prompt) for the DPO objective: reading pairs, tokenizing
them with the chat template exactly as SFT does, and the pair metrics (`accuracy`, `margin`) that training's eval
and `ftune eval` report.

A pair's scored tokens are its reply and the end-of-turn token that closes it (masking.learned_spans on the
last assistant turn): the template's trailing newline and any EOS it would add again are never scored.
"""

from __future__ import annotations

from typing import Callable

from finetune_cli.data.formats import LineError, _messages, check
from finetune_cli.data.masking import IGNORE, tokenize
from finetune_cli.errors import FtuneError

FIELDS = ("chosen", "rejected")
OBJECTIVES = ("dpo", "orpo")  # the objectives that train on preference pairs
UNLIMITED = 1 << 40


def convert(record: dict, where: str) -> dict:
    """One preference line as {"prompt": [...], "chosen": [assistant], "rejected": [assistant]}; raise LineError.

    Explicit prompt: {"prompt", "chosen", "rejected"} as strings (a user turn, assistant replies) or message lists.
    Implicit prompt: "chosen" and "rejected" are two whole conversations; their shared first messages are the
    prompt. Other fields are ignored."""
    for key in FIELDS:
        if key not in record:
            raise LineError(f"missing {key}", where, f'missing field "{key}": a preference pair needs both replies')
    if "prompt" in record:
        prompt = _part(record, "prompt", "user", where)
        chosen, rejected = _part(record, "chosen", "assistant", where), _part(record, "rejected", "assistant", where)
    else:
        whole = [_part(record, key, "assistant", where) for key in FIELDS]
        shared = 0
        while shared < min(map(len, whole)) - 1 and whole[0][shared] == whole[1][shared]:
            shared += 1
        prompt, chosen, rejected = whole[0][:shared], whole[0][shared:], whole[1][shared:]
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise LineError(
            "no prompt",
            where,
            'no prompt: give a "prompt" field, or chosen and rejected conversations that start with the same messages',
        )
    for key, reply in zip(FIELDS, (chosen, rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise LineError("wrong message order", where, f'"{key}" must be one assistant reply to the prompt')
        reply[0].pop("train", None)
    check(prompt + chosen, where)
    check(prompt + rejected, where)
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        raise LineError("chosen equals rejected", where, "chosen and rejected are the same reply; a pair must differ")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _part(record: dict, key: str, role: str, where: str) -> list[dict]:
    value = record[key]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):  # a single message object
        return _messages({key: [value]}, key, where)
    if isinstance(value, list):
        return _messages(record, key, where)
    raise LineError("wrong type", where, f'"{key}" must be a string or a list of messages')


def is_pairs(records: list[dict]) -> bool:
    return any("chosen" in r for r in records)


def check_data(objective: str, train: list[dict], evals: list[dict], path: str) -> None:
    """Preference objectives need pairs, SFT needs conversations or text: say which key to change."""
    pairs = is_pairs(train)
    if objective in OBJECTIVES and not pairs:
        raise FtuneError(
            f"{path}: training.objective is {objective}, which trains on preference pairs "
            '({"prompt", "chosen", "rejected"}); this data has none. Use training.objective: sft for it'
        )
    if objective not in OBJECTIVES and (pairs or is_pairs(evals)):
        raise FtuneError(
            f"{path}: this data holds preference pairs (chosen/rejected); "
            "set training.objective: dpo (or orpo) to train on them"
        )
    if objective in OBJECTIVES and evals and not is_pairs(evals):
        raise FtuneError(f"{path}: the eval data of a {objective} run must be preference pairs too")


def with_system(record: dict, system_prompt: str | None) -> dict:
    """data.system_prompt added to a pair's prompt when it has no system message of its own."""
    if not system_prompt or record["prompt"][0]["role"] == "system":
        return record
    return {**record, "prompt": [{"role": "system", "content": system_prompt}, *record["prompt"]]}


def _reply_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The conversation's tokens before the last reply, and the reply's scored tokens (reply + end-of-turn)."""
    out = tokenize(tokenizer, messages, UNLIMITED, "last_assistant")
    scored = [i for i, label in enumerate(out["labels"]) if label != IGNORE]
    if not scored:
        raise ValueError("the reply has no tokens after rendering")
    return out["input_ids"][: scored[0]], out["input_ids"][scored[0] : scored[-1] + 1]


def tokenize_pair(tokenizer, record: dict, max_length: int) -> tuple[dict | None, bool]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} (None when the prompt alone fills max_length) and whether a
    reply was cut to fit prompt + reply into max_length."""
    prompt_c, chosen = _reply_tokens(tokenizer, record["prompt"] + record["chosen"])
    prompt_r, rejected = _reply_tokens(tokenizer, record["prompt"] + record["rejected"])
    if prompt_c != prompt_r:  # tokens merged across the reply's start: score the replies from where they differ
        shared = next(i for i, (a, b) in enumerate(zip(prompt_c + [None], prompt_r + [None])) if a != b)
        chosen, rejected = prompt_c[shared:] + chosen, prompt_r[shared:] + rejected
        prompt_c = prompt_c[:shared]
    room = max_length - len(prompt_c)
    if room <= 0:
        return None, True
    truncated = len(chosen) > room or len(rejected) > room
    return {"prompt_ids": prompt_c, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room]}, truncated


def count(tokenizer, record: dict, max_length: int, system_prompt: str | None = None) -> dict:
    """`ftune validate`'s counts for one pair before truncation: prompt, chosen and rejected tokens, the scored
    tokens (both replies) and how many of them truncation to max_length loses."""
    record = with_system(record, system_prompt)
    whole, _ = tokenize_pair(tokenizer, record, UNLIMITED)
    kept, _ = tokenize_pair(tokenizer, record, max_length)
    learned = len(whole["chosen_ids"]) + len(whole["rejected_ids"])
    longest = len(whole["prompt_ids"]) + max(len(whole["chosen_ids"]), len(whole["rejected_ids"]))
    return {
        "tokens": longest,
        "learned": learned,
        "lost": learned - (len(kept["chosen_ids"]) + len(kept["rejected_ids"]) if kept else 0),
        "over": longest > max_length,
        "prompt": len(whole["prompt_ids"]),
        "chosen": len(whole["chosen_ids"]),
        "rejected": len(whole["rejected_ids"]),
    }


def part_stats(counts: list[dict], spread) -> dict:
    """Token spreads of prompts, chosen and rejected replies (before truncation)."""
    return {f"{part}_tokens": spread([c[part] for c in counts if part in c]) for part in ("prompt", *FIELDS)}


def tokenize_all(tokenizer, records: list[dict], max_length: int, system_prompt: str | None = None):
    """Tokenized pairs and counts (`examples`, `truncated`, `dropped`: prompt alone over max_length, tokens)."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("this tokenizer has no fast (Rust) version; ftune needs character offsets to mask the loss")
    examples, truncated, dropped = [], 0, 0
    for record in records:
        try:
            ex, cut = tokenize_pair(tokenizer, with_system(record, system_prompt), max_length)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or our span search
            raise FtuneError(f"{record['source']}: chat template cannot render this pair: {exc}") from None
        truncated += cut
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    stats = {
        "examples": len(examples),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples),
        "learned_tokens": sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples),
        "cache": "off",
    }
    return examples, stats


def reply_logps(
    model, examples: list[dict], batch_size: int = 8, pad_token_id: int = 0, on_batch: Callable[[int], None] = None
) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probabilities of each pair's scored reply tokens given its prompt."""
    import torch

    from finetune_cli.perplexity import _without_autocast

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = [(e["prompt_ids"], e[key]) for e in examples for key in ("chosen_ids", "rejected_ids")]
    sums = []
    with torch.no_grad(), _without_autocast(model):
        for start in range(0, len(rows), 2 * batch_size):
            batch = rows[start : start + 2 * batch_size]
            width = max(len(p) + len(r) for p, r in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (prompt, reply) in enumerate(batch):
                n = len(prompt) + len(reply)
                ids[row, :n] = torch.tensor(prompt + reply)
                mask[row, :n] = 1
                scored[row, len(prompt) : n] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -width:]
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token = logps.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            sums += (token.double() * scored[:, 1:].to(device)).sum(dim=1).tolist()
            if on_batch:
                on_batch(len(batch) // 2)
    if was_training:
        model.train()
    return list(zip(sums[0::2], sums[1::2]))


def pair_metrics(model, examples: list[dict], batch_size: int = 8, pad_token_id: int = 0, on_batch=None) -> dict:
    """`accuracy`: the fraction of pairs whose chosen reply is more likely than the rejected one; `margin`: the
    mean difference of their summed log-probabilities."""
    pairs = reply_logps(model, examples, batch_size, pad_token_id, on_batch)
    diffs = [c - r for c, r in pairs]
    return {
        "pairs": len(pairs),
        "accuracy": sum(d > 0 for d in diffs) / len(diffs) if diffs else float("nan"),
        "margin": sum(diffs) / len(diffs) if diffs else float("nan"),
        "chosen_logps": sum(c for c, _ in pairs) / len(pairs) if pairs else float("nan"),
        "rejected_logps": sum(r for _, r in pairs) / len(pairs) if pairs else float("nan"),
    }
