"""Preference data for the DPO, ORPO and KTO objectives, tokenized with the chat template
exactly as SFT is: pairs (a better and a worse reply to one prompt) and KTO's unpaired replies labelled
desirable or not, their checks and counts. The shapes of their lines are `formats`; their metrics
`evaluation.pairwise`.

A pair's scored tokens are its reply and the end-of-turn token that closes it (masking.learned_spans on the
last assistant turn): the template's trailing newline and any EOS it would add again are never scored.
"""

from __future__ import annotations

from finetune_cli.data import formats
from finetune_cli.data.masking import IGNORE, tokenize
from finetune_cli.errors import FtuneError

OBJECTIVES = ("dpo", "orpo", "kto")  # the objectives that train on preference data
UNLIMITED = 1 << 40


def is_pairs(records: list[dict]) -> bool:
    return any("chosen" in r for r in records)


def is_preference(records: list[dict]) -> bool:
    return any("chosen" in r or is_reply(r) for r in records)


def is_reply(record: dict) -> bool:
    """A KTO line: a reply labelled desirable or not (a classification row has a label but no completion)."""
    return "label" in record and "completion" in record


def check_data(objective: str, train: list[dict], evals: list[dict], path: str) -> None:
    """Preference objectives need their data (pairs; KTO also labelled replies), SFT needs conversations or text,
    and the eval data of a preference run is pairs (scored by accuracy and margin): say which key to change."""
    if objective == "classification":
        return  # training.classifier.check_data
    if objective not in OBJECTIVES:
        if is_preference(train + evals):
            raise FtuneError(
                f"{path}: this data holds preference pairs or labelled replies; "
                "set training.objective: dpo, orpo or kto to train on them"
            )
        return
    kinds = "preference pairs or labelled replies" if objective == "kto" else "preference pairs"
    wrong = [r for r in train if not ("chosen" in r or (objective == "kto" and is_reply(r)))]
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
    parts = [p for p in ("prompt", *formats.PAIR_FIELDS, "completion") if any(p in c for c in counts)]
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
