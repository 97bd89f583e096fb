"""What is written beside the GGUF file: the Ollama Modelfile (the Go template equivalent of the
chat template, its stop token and system prompt) and the README.
"""

from __future__ import annotations

from finetune_cli import rundir

# Ollama (Go text/template) equivalents of ftune's builtin templates, for conversations that end with a user turn
# (Ollama appends the model's reply). Ollama gives a Messages template every message, system ones included, and
# `.System`, the system messages joined; a Modelfile's SYSTEM becomes the first message when a request has none.
# {{ $.BOS }} and {{ $.EOS }} are replaced by the tokenizer's own tokens when the Modelfile is written.
_FIRST_TURN_SYSTEM = "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}"  # system text opens turn one


OLLAMA_TEMPLATES = {
    "chatml": (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|>{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": (
        '{{ $.BOS }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}[INST] '
        + _FIRST_TURN_SYSTEM
        + '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }} {{ .Content }}{{ $.EOS }}{{ end }}{{ end }}'
    ),
    "gemma": (
        '{{ $.BOS }}{{ range $i, $_ := .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
        + _FIRST_TURN_SYSTEM
        + '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
        "<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    ),
    "zephyr": "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{{ $.EOS }}\n{{ end }}<|assistant|>\n",
    "alpaca": (
        '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        "{{ else }}### Response:\n{{ .Content }}{{ $.EOS }}\n\n{{ end }}{{ end }}### Response:\n"
    ),
}


_PROBES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}],
]


def template_family(tokenizer) -> tuple[str | None, str | None]:
    """(family, default system prompt): the builtin template family whose rendering equals the tokenizer's chat
    template on conversations with and without a system message, where a template that writes a system turn of
    its own when there is none (SmolLM2's) counts as the family with that default; (None, None) if none does."""
    from finetune_cli.data import templates
    from finetune_cli.data.masking import render

    current = tokenizer.chat_template
    if not current:
        return None, None
    try:
        wanted = [render(tokenizer, m, add_generation_prompt=True) for m in _PROBES]
    except Exception:  # noqa: BLE001 - a template that cannot render these has no known equivalent
        return None, None
    mark = "\x00SYSTEM\x00"
    for family in OLLAMA_TEMPLATES:
        tokenizer.chat_template = templates.TEMPLATES[family]
        try:
            bare = _PROBES[2]
            before, _, after = render(tokenizer, [{"role": "system", "content": mark}, *bare], True).partition(mark)
            default = None
            alone = wanted[2]
            if render(tokenizer, bare, True) != alone and alone.startswith(before) and alone.endswith(after):
                default = alone[len(before) : len(alone) - len(after)] or None
            system = [{"role": "system", "content": default}] if default else []
            got = [render(tokenizer, m if m[0]["role"] == "system" else system + m, True) for m in _PROBES]
        except Exception:  # noqa: BLE001
            got = None
        finally:
            tokenizer.chat_template = current
        if got == wanted:
            return family, default
    return None, None


def ollama_template(family: str, eos: str, add_bos: bool, bos: str | None) -> str:
    """The Ollama TEMPLATE for a family; a literal BOS is left to the runtime when the GGUF says to add one."""
    text = OLLAMA_TEMPLATES[family].replace("{{ $.EOS }}", eos).replace("{{ $.BOS }}", bos or "")
    if add_bos and bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def modelfile(filename: str, tokenizer, family: str | None, eot: list[int], system: str | None) -> str:
    """Ollama's Modelfile: the file, its TEMPLATE where ftune knows an equivalent, one stop per end-of-turn token,
    and the system prompt: the recipe's, else the one the chat template writes when a conversation has none."""
    lines = [f"FROM ./{filename}", ""]
    if family is not None:
        ids = tokenizer("a")["input_ids"]
        add_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
        template = ollama_template(family, tokenizer.eos_token, add_bos, tokenizer.bos_token)
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += ["# No TEMPLATE: this chat template has no known Ollama equivalent; Ollama uses the GGUF's own.", ""]
    for tid in eot:
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(tid)}"')
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def _system_prompt(found: rundir.Target) -> str | None:
    recipe = found.recipe
    return getattr(getattr(recipe, "data", None), "system_prompt", None) if recipe is not None else None


def _readme(found: rundir.Target, filename: str, quant: str, family, check, config) -> str:
    import json

    base = found.base or found.weights
    lines = [
        f"# {filename}",
        "",
        f"GGUF ({quant}) of {'a ' + found.method.get('name', 'lora') + ' fine-tune of ' if found.adapter else ''}"
        f"`{base}` ({config.model_type}), written by `ftune export --format gguf` from `{found.name}`"
        f"{' (adapter merged in float32 first)' if found.adapter else ''}.",
        "",
        "## Run it",
        "",
        "```bash",
        f"llama-cli -m {filename} -cnv          # llama.cpp: chat with the model's own chat template",
        f"llama-server -m {filename} --jinja    # llama.cpp: OpenAI-compatible server",
        "ollama create my-model -f Modelfile && ollama run my-model",
        "```",
        "",
        f"LM Studio: put `{filename}` under its models folder (`~/.lmstudio/models/ftune/<name>/`) or use "
        "`lms import " + filename + "`; it reads the chat template and stop token from the file.",
        "",
        "The file carries the chat template training used (`tokenizer.chat_template`) and its end-of-turn token "
        "(`tokenizer.ggml.eot_token_id`), so chat modes stop after a reply.",
    ]
    if family is None:
        lines += ["", "The Modelfile has no TEMPLATE (no known Ollama equivalent): Ollama uses the GGUF's own."]
    if check is not None:
        lines += [
            "",
            "## Check",
            "",
            f"Read back with transformers' GGUF loader and compared with the source model on {check.positions} "
            f"tokens of probe text: tokenization identical: {check.tokens_equal}; mean KL divergence of the "
            f"next-token distributions {check.kl:.6f} (at most {check.kl_threshold}); same top token at "
            f"{check.agreement:.4f} of {check.confident_positions} confident positions (at least "
            f"{check.agreement_threshold}).",
        ]
    if found.adapter is not None and found.method:
        lines += ["", "## Method", "", "```json", json.dumps(found.method, indent=2), "```"]
    run = found.run_dir
    if run is not None and (run / rundir.RECIPE).is_file():
        lines += ["", "## Recipe", "", "```yaml", (run / rundir.RECIPE).read_text(encoding="utf-8").rstrip(), "```"]
    lines += rundir.evaluation_markdown(run)
    return "\n".join(lines) + "\n"
