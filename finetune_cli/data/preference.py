"""Preference data for the DPO, ORPO and KTO objectives: pairs (a better and a worse reply to one prompt) and
KTO's unpaired replies labelled desirable or not; tokenizing them with the chat template exactly as SFT does, and
the pair metrics (`accuracy`, `margin`) that training's eval and `ftune eval` report.

A pair's scored tokens are its reply and the end-of-turn token that closes it (masking.learned_spans on the
last assistant turn): the template's trailing newline and any EOS it would add again are never scored.
"""

from __future__ import annotations

from typing import Callable

from finetune_cli.data.formats import LineError, _messages, check
from finetune_cli.data.masking import IGNORE, tokenize
from finetune_cli.errors import FtuneError

FIELDS = ("chosen", "rejected")
OBJECTIVES = ("dpo", "orpo", "kto")  # the objectives that train on preference data
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


def convert_unpaired(record: dict, where: str) -> dict:
    """One KTO line {"prompt", "completion", "label": true|false} as {"prompt": [...], "completion": [assistant],
    "label": bool}; raise LineError. Other fields are ignored."""
    for key in ("prompt", "completion"):
        if key not in record:
            raise LineError(
                f"missing {key}", where, f'missing field "{key}": a KTO line needs prompt, completion, label'
            )
    if not isinstance(record.get("label"), bool):
        raise LineError("wrong type", where, '"label" must be true (a desirable reply) or false (an undesirable one)')
    prompt, completion = _part(record, "prompt", "user", where), _part(record, "completion", "assistant", where)
    if not any(m["content"].strip() for m in prompt):
        raise LineError("no prompt", where, 'no prompt: "prompt" is empty')
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise LineError("wrong message order", where, '"completion" must be one assistant reply to the prompt')
    completion[0].pop("train", None)
    check(prompt + completion, where)
    return {"prompt": prompt, "completion": completion, "label": record["label"]}


def is_pairs(records: list[dict]) -> bool:
    return any("chosen" in r for r in records)


def is_preference(records: list[dict]) -> bool:
    return any("chosen" in r or "label" in r for r in records)


def check_data(objective: str, train: list[dict], evals: list[dict], path: str) -> None:
    """Preference objectives need their data (pairs; KTO also labelled replies), SFT needs conversations or text,
    and the eval data of a preference run is pairs (scored by accuracy and margin): say which key to change."""
    if objective not in OBJECTIVES:
        if is_preference(train + evals):
            raise FtuneError(
                f"{path}: this data holds preference pairs or labelled replies; "
                "set training.objective: dpo, orpo or kto to train on them"
            )
        return
    kinds = "preference pairs or labelled replies" if objective == "kto" else "preference pairs"
    wrong = [r for r in train if not ("chosen" in r or (objective == "kto" and "label" in r))]
    if wrong:
        raise FtuneError(
            f"{wrong[0]['source']}: training.objective is {objective}, which trains on {kinds} "
            '({"prompt", "chosen", "rejected"}'
            + (', or {"prompt", "completion", "label"}' * (objective == "kto"))
            + "); this line is not one. Use training.objective: sft for such data"
        )
    if evals and not all("chosen" in r for r in evals):
        raise FtuneError(
            f"{path}: the eval data of a {objective} run must be preference pairs (scored by accuracy and margin)"
        )


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


def tokenize_reply(tokenizer, prompt: list[dict], reply: list[dict], max_length: int) -> tuple[dict | None, bool]:
    """KTO's {"prompt_ids", "completion_ids"} (None when the prompt alone fills max_length) and whether it was cut."""
    prompt_ids, completion = _reply_tokens(tokenizer, prompt + reply)
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None, True
    return {"prompt_ids": prompt_ids, "completion_ids": completion[:room]}, len(completion) > room


def unpair(record: dict) -> list[dict]:
    """KTO's view of a record: a labelled reply as it is; a pair as its chosen (desirable) and rejected replies."""
    if "label" in record:
        return [record]
    return [
        {"prompt": record["prompt"], "completion": record["chosen"], "label": True},
        {"prompt": record["prompt"], "completion": record["rejected"], "label": False},
    ]


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
    if "label" in record:  # a KTO line: one reply
        whole, _ = tokenize_reply(tokenizer, record["prompt"], record["completion"], UNLIMITED)
        kept, _ = tokenize_reply(tokenizer, record["prompt"], record["completion"], max_length)
        longest = len(whole["prompt_ids"]) + len(whole["completion_ids"])
        learned = len(whole["completion_ids"])
        return {
            "tokens": longest,
            "learned": learned,
            "lost": learned - (len(kept["completion_ids"]) if kept else 0),
            "over": longest > max_length,
            "prompt": len(whole["prompt_ids"]),
            "completion": learned,
        }
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
    parts = [p for p in ("prompt", *FIELDS, "completion") if any(p in c for c in counts)]
    return {f"{part}_tokens": spread([c[part] for c in counts if part in c]) for part in parts}


def tokenize_all(
    tokenizer, records: list[dict], max_length: int, system_prompt: str | None = None, unpaired: bool = False
):
    """Tokenized pairs, or with `unpaired` KTO's labelled replies, and counts (`examples`, `truncated`,
    `dropped`: the prompt alone over max_length, tokens, `learned_tokens`: the scored ones)."""
    if not getattr(tokenizer, "is_fast", False):
        raise FtuneError("this tokenizer has no fast (Rust) version; ftune needs character offsets to mask the loss")
    examples, truncated, dropped = [], 0, 0
    for record in records:
        try:
            record = with_system(record, system_prompt)
            if unpaired:
                made = []
                for one in unpair(record):
                    ex, cut = tokenize_reply(tokenizer, one["prompt"], one["completion"], max_length)
                    made.append((ex and {**ex, "label": one["label"]}, cut))
            else:
                made = [tokenize_pair(tokenizer, record, max_length)]
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception or our span search
            raise FtuneError(f"{record['source']}: chat template cannot render this example: {exc}") from None
        for ex, cut in made:
            truncated += cut
            if ex is None:
                dropped += 1
            else:
                examples.append(ex)
    replies = ("completion_ids",) if unpaired else ("chosen_ids", "rejected_ids")
    stats = {
        "examples": len(examples),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": sum(len(e["prompt_ids"]) * len(replies) + sum(len(e[k]) for k in replies) for e in examples),
        "learned_tokens": sum(sum(len(e[k]) for k in replies) for e in examples),
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
