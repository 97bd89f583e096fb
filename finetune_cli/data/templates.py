"""Builtin Jinja chat templates, by name, for base models whose tokenizer has none or to replace its own.

Each takes `messages` with the roles system/user/assistant, honours `add_generation_prompt`, closes every
assistant turn with its end-of-turn marker (learned with the reply), and is prefix-stable: the rendering of
`messages[:k]` with the generation prompt is a prefix of the rendering of all messages, which
`finetune_cli.data.masking` relies on to find the learned spans.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli.errors import FtuneError

# Every tag trims the whitespace around it, so the layout below renders nothing of its own.

# ChatML, as in Qwen2.5 and SmolLM2, without their default system prompt.
CHATML = r"""
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# Llama 3 / 3.1 Instruct (meta-llama/Meta-Llama-3-8B-Instruct), with <|begin_of_text|> written literally.
LLAMA3 = r"""
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
    {{- message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""

# Mistral Instruct (mistralai/Mistral-7B-Instruct-v0.1/v0.2): <s>[INST] user [/INST] reply</s>, the system text
# prepended to the first user message. The prompt already ends where the reply starts: no generation prompt.
MISTRAL = r"""
{%- if not eos_token -%}
    {{- raise_exception('the mistral chat template needs the tokenizer to have an eos_token') -}}
{%- endif -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {%- set prefix = system + '\n\n' if loop.first and system else '' -%}
        {{- '[INST] ' + prefix + message['content'] + ' [/INST]' -}}
    {%- else -%}
        {{- ' ' + message['content'] + eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""

# Gemma (google/gemma-3-*-it): no system role; as Gemma 3's own template does, its text opens the first user turn.
GEMMA = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- set prefix = system + '\n\n' if loop.first and system else '' -%}
    {{- '<start_of_turn>' + role + '\n' + prefix + message['content'] | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

# Zephyr (HuggingFaceH4/zephyr-7b-beta): <|role|>\ncontent</s>\n for each message.
ZEPHYR = r"""
{%- if not eos_token -%}
    {{- raise_exception('the zephyr chat template needs the tokenizer to have an eos_token') -}}
{%- endif -%}
{%- for message in messages -%}
    {{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
{%- endif -%}
"""

# Alpaca (tatsu-lab/stanford_alpaca): ### Instruction: / ### Response:, the system text (if any, no default) first.
ALPACA = r"""
{%- if not eos_token -%}
    {{- raise_exception('the alpaca chat template needs the tokenizer to have an eos_token') -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- message['content'] + '\n\n' -}}
    {%- elif message['role'] == 'user' -%}
        {{- '### Instruction:\n' + message['content'] + '\n\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '### Response:\n' + message['content'] + eos_token + '\n\n' -}}
    {%- else -%}
        {{- raise_exception('the alpaca chat template has no role ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '### Response:\n' -}}
{%- endif -%}
"""

TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "zephyr": ZEPHYR,
    "alpaca": ALPACA,
}
NAMES: tuple[str, ...] = tuple(TEMPLATES)
_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def end_of_turn(name: str) -> str | None:
    """The marker a builtin template writes after each assistant turn; None means the tokenizer's eos_token."""
    if name not in TEMPLATES:
        raise KeyError(name)
    return _END_OF_TURN.get(name)


def resolve(spec: str) -> str:
    """The template text for a builtin name or a path to a template file (conventionally .jinja)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise FtuneError(
        f"model.chat_template: '{spec}' is neither a builtin template ({', '.join(NAMES)}) nor an existing .jinja file"
    )


def apply(tokenizer, spec: str) -> None:
    """Give `tokenizer` the template `spec`. A builtin whose end-of-turn marker is not one token of this
    vocabulary is refused: the model could not learn (nor generation detect) where a reply ends."""
    tokenizer.chat_template = resolve(spec)
    marker = end_of_turn(spec) if spec in TEMPLATES else None
    if marker and len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
        eos = [n for n in NAMES if end_of_turn(n) is None]
        raise FtuneError(
            f"model.chat_template: '{spec}' ends each turn with {marker}, which is not one token in this "
            f"model's vocabulary; use {', '.join(eos)} (they end turns with the model's EOS "
            f"{tokenizer.eos_token}) or a .jinja template written for this model"
        )
