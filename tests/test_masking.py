"""Loss masks checked against an independent computation: each template's pieces tokenized by the tokenizer alone."""

import copy
import json
from collections import Counter

import pytest

from finetune_cli.data.masking import IGNORE, tokenize, tokenize_all
from finetune_cli.errors import FtuneError

LLAMA3 = (
    "{{- '<|begin_of_text|>' }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- '<s>' }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system %}"
    "{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + '</s>' }}{%- endif %}{%- endfor %}"
)
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def conversation(system: bool, turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Name a colour number {t}."})
        msgs.append({"role": "assistant", "content": f"Colour {t} is blue, of course."})
    return msgs


def expected(tok, pieces):
    """From hand-built (text, learned) pieces: the ids of the whole text, and the text of each learned run."""
    ids = tok("".join(text for text, _ in pieces), add_special_tokens=False)["input_ids"]
    runs, previous = [], False
    for text, learned in pieces:
        if learned:
            runs[-1:] = [runs[-1] + text] if previous else runs[-1:] + [text]
        previous = learned
    return ids, runs


def learned_runs(tok, ids, labels):
    """Decode each contiguous run of learned labels."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def chatml_pieces(msgs):
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": SMOL_DEFAULT_SYSTEM}] + msgs
    pieces = []
    for m in msgs:
        pieces.append(("<|im_start|>", False))
        if m["role"] == "assistant":
            pieces += [("assistant\n", False), (m["content"], True), ("<|im_end|>", True), ("\n", False)]
        else:
            pieces += [(f"{m['role']}\n{m['content']}", False), ("<|im_end|>", False), ("\n", False)]
    return pieces


def llama3_pieces(msgs):
    pieces = [("<|begin_of_text|>", False)]
    for m in msgs:
        learned = m["role"] == "assistant"
        pieces += [("<|start_header_id|>", False), (m["role"], False), ("<|end_header_id|>", False), ("\n\n", False)]
        pieces += [(m["content"], learned), ("<|eot_id|>", learned)]
    return pieces


def mistral_pieces(msgs):
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    rest = msgs[1:] if system else msgs
    pieces = [("<s>", False)]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            text = f"{system}\n\n{m['content']}" if i == 0 and system else m["content"]
            pieces.append((f"[INST] {text} [/INST]", False))
        else:
            pieces += [(" " + m["content"], True), ("</s>", True)]
    return pieces


@pytest.fixture(scope="module")
def templated(tokenizer):
    """Copies of the SmolLM2 tokenizer with other template styles and their special tokens."""
    out = {"chatml": tokenizer}
    for name, template, specials in (
        ("llama3", LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        ("mistral", MISTRAL, ["<s>", "</s>"]),
    ):
        tok = copy.deepcopy(tokenizer)
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        out[name] = tok
    return out


BUILDERS = {"chatml": chatml_pieces, "llama3": llama3_pieces, "mistral": mistral_pieces}


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("turns", [1, 3])
def test_mask_matches_independent_tokenization(templated, style, system, turns):
    tok = templated[style]
    msgs = conversation(system, turns)
    ex = tokenize(tok, msgs, max_length=4096)
    want_ids, want_runs = expected(tok, BUILDERS[style](msgs))
    assert ex["input_ids"] == want_ids  # the template renders what the hand-built text says
    assert learned_runs(tok, ex["input_ids"], ex["labels"]) == want_runs  # exactly each reply + its end of turn
    # the end-of-turn token closes every assistant turn and is learned each time
    eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}[style]
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(label == eot_id for label in ex["labels"]) == turns


@pytest.mark.parametrize("packing", [True, False])
def test_end_of_turn_learned_when_it_is_the_pad_token(tiny_recipe, tokenizer, packing):
    """SmolLM2's pad token is <|im_end|>. The batches of one epoch, as the trainer that `ftune train` builds hands
    them to the model (its collator, padded or packed), learn exactly each reply and the <|im_end|> that closes
    it, from the data as written; padding (the same token id) is never learned."""
    from transformers import TrainerCallback

    from finetune_cli import recipe as recipes
    from finetune_cli.training import train

    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    class Batches(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            self.batches = list(train_dataloader)

    seen = Batches()
    overrides = ["training.max_steps=1", "data.eval=", f"training.packing={str(packing).lower()}"]
    train.run(recipes.load(tiny_recipe, overrides), callbacks=[seen], samples=0)

    learned, padding = [], 0
    for batch in seen.batches:
        if packing:  # one row; each example's positions start again at 0
            assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
            ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            rows = [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
        else:
            rows = []
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                n = int(mask.sum())
                assert mask[:n].all() and (ids[n:] == tokenizer.pad_token_id).all()  # padded on the right
                assert (labels[n:] == IGNORE).all()  # padding is never learned
                padding += len(ids) - n
                rows.append((ids[:n], labels[:n]))
        for ids, labels in rows:
            learned.append(tuple(learned_runs(tokenizer, ids.tolist(), labels.tolist())))
    data = [json.loads(line) for line in (tiny_recipe.parent / "train.jsonl").read_text().splitlines()]
    expected = [
        tuple(m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant") for record in data
    ]
    assert Counter(learned) == Counter(expected)  # the whole epoch, each reply and its end of turn
    assert packing or padding > 0  # the padded batches did pad (with <|im_end|>), so the check above means something


def test_last_assistant_and_all(tokenizer):
    msgs = conversation(True, 2)
    ids_all = tokenize(tokenizer, msgs, 4096, "all")
    assert ids_all["labels"] == ids_all["input_ids"]
    last = tokenize(tokenizer, msgs, 4096, "last_assistant")
    both = tokenize(tokenizer, msgs, 4096, "assistant")
    learned_last = [i for i, lab in enumerate(last["labels"]) if lab != IGNORE]
    learned_both = [i for i, lab in enumerate(both["labels"]) if lab != IGNORE]
    assert set(learned_last) < set(learned_both)
    assert tokenizer.decode([last["input_ids"][i] for i in learned_last]) == "Colour 1 is blue, of course.<|im_end|>"


def test_truncation_counts_and_drops(tokenizer):
    convs = [{"source": f"f:{i}", "messages": conversation(True, 3)} for i in range(3)]
    examples, stats = tokenize_all(tokenizer, convs, 40, "assistant")
    assert stats["truncated"] == 3
    assert all(len(e["input_ids"]) == 40 for e in examples)
    examples, stats = tokenize_all(tokenizer, convs, 10, "assistant")  # only the system prompt fits
    assert stats["dropped"] == 3 and examples == []


def test_template_error_names_the_line(templated):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(FtuneError, match=r"data.jsonl:7: chat template cannot render.*alternate"):
        tokenize_all(templated["mistral"], [{"source": "data.jsonl:7", "messages": bad}], 100, "assistant")


GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_system_message_folded_for_templates_without_system_role(tokenizer):
    """Gemma's template raises on a system message; it is folded into the first user turn instead."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA
    msgs = conversation(True, 2)
    ex = tokenize(tok, msgs, max_length=4096)
    pieces = [(tok.bos_token, False)]
    first_user = True
    for m in msgs[1:]:
        if m["role"] == "user":
            text = f"Be brief.\n\n{m['content']}" if first_user else m["content"]
            first_user = False
            pieces += [("<start_of_turn>", False), (f"user\n{text}", False), ("<end_of_turn>", False), ("\n", False)]
        else:
            pieces += [("<start_of_turn>", False), ("model\n", False), (m["content"], True)]
            pieces += [("<end_of_turn>", True), ("\n", False)]
    want_ids, want_runs = expected(tok, pieces)
    assert ex["input_ids"] == want_ids
    assert learned_runs(tok, ex["input_ids"], ex["labels"]) == want_runs
