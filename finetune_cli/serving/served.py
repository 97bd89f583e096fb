"""What `ftune serve` serves: each TARGET opened as `ftune generate` opens it (`rundir.open_target`),
adapters of one base loaded once as PEFT named adapters (the base served too, adapters disabled), and
the model names of the API.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune_cli.data.masking import end_of_turn_ids
from finetune_cli.errors import FtuneError
from finetune_cli.inference import batching


@dataclass(eq=False)
class Served:
    """One model name of the API: a model (shared by a base and its adapters), the adapter to enable (None: none,
    with the adapters of a shared base disabled) and the tokenizer with its chat template (`decoder`: a copy of it
    for the worker thread, so decoding never waits for a long prompt's encoding)."""

    name: str
    model: object
    adapter: str | None
    tokenizer: object
    decoder: object
    stop_ids: frozenset[int]
    context: int
    created: int = field(default_factory=lambda: int(time.time()))


def parse_target(spec: str) -> tuple[str, str]:
    """`NAME=PATH_OR_NAME` or `PATH_OR_NAME`: (name, what to open). NAME defaults to the folder or model name."""
    name, sep, rest = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        if not rest:
            raise FtuneError(f"TARGET {spec!r}: nothing after '='; give NAME=PATH_OR_NAME")
        return name, rest
    return default_name(spec), spec


def default_name(source: str) -> str:
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return path.resolve().name if path.exists() else path.name
    return source  # a builtin name or a hub id (org/model), as given


def open_targets(specs: list[str]) -> list[tuple[str, object]]:
    """(name, rundir.Target) for each TARGET, checked before any weights load."""
    from finetune_cli import rundir

    if not specs:
        raise FtuneError("give at least one TARGET: a run directory, adapter folder, model folder or model name")
    named, seen = [parse_target(spec) for spec in specs], {}
    for spec, (name, source) in zip(specs, named):
        if name in seen:
            raise FtuneError(f"two targets are named {name!r} ({seen[name]}, {spec}); name them: NAME={source}")
        seen[name] = spec
    opened = []
    for spec, (name, source) in zip(specs, named):
        target = rundir.open_target(source)
        target.refuse_classifier("the chat and completions API generate text, and a classifier has a label head")
        if target.adapter is not None and _prompt_learning(target.adapter):
            raise FtuneError(
                f"{spec}: a {target.method.get('name', 'prompt tuning')} adapter cannot be served yet (only LoRA "
                f"adapters, full runs and model folders); use `ftune generate {source}`"
            )
        opened.append((name, target))
    return opened


def _prompt_learning(adapter: Path) -> bool:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("peft_type", "")).upper() in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def load(specs: list[str], log=lambda msg: None) -> dict[str, Served]:
    """Load every TARGET once: adapters of one base (same weights, dtype and trust_remote_code) share it."""
    from finetune_cli import models, rundir

    opened = open_targets(specs)
    groups: dict[tuple, list] = {}
    for name, target in opened:
        groups.setdefault((target.weights, target.dtype, target.trust_remote_code), []).append((name, target))
    served: dict[str, Served] = {}
    for (weights, dtype, trust), members in groups.items():
        adapters = [(n, t) for n, t in members if t.adapter is not None]
        plain = [(n, t) for n, t in members if t.adapter is None]
        log(f"loading {weights}" + (f" with adapters {', '.join(n for n, _ in adapters)}" if adapters else ""))
        model = models.load_model(weights, dtype, trust)
        if adapters:
            model = _with_adapters(model, adapters)
            if not plain:  # the base itself, under its own name, with the adapters disabled
                base = adapters[0][1].base or weights
                plain = [(default_name(base), rundir.Target(base, "model", weights, weights, trust_remote_code=trust))]
        model.eval()
        for name, target in adapters + plain:
            if name in served:
                raise FtuneError(
                    f"the base of {', '.join(n for n, _ in adapters)} would be served as {name!r}, which another "
                    f"TARGET is named; name that one differently (NAME=...)"
                )
            tokenizer = models.load_tokenizer(target.tokenizer, None, target.trust_remote_code, require_template=False)
            served[name] = Served(
                name=name,
                model=model,
                adapter=name if target.adapter is not None else None,
                tokenizer=tokenizer,
                decoder=copy.deepcopy(tokenizer),
                stop_ids=frozenset(end_of_turn_ids(tokenizer)),
                context=_context(model, tokenizer),
            )
        ignored = batching.unsupported(model)
        if ignored:
            log(f"warning: {weights}: the server does not apply generation_config's {', '.join(ignored)}")
    return served


def _with_adapters(model, adapters):
    from peft import PeftModel

    (first, target), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(model, str(target.adapter), adapter_name=first)
    for name, target in rest:
        model.load_adapter(str(target.adapter), adapter_name=name)
    return model


def _context(model, tokenizer) -> int:
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not context:
        limit = getattr(tokenizer, "model_max_length", 0)
        context = limit if 0 < limit < 10**8 else 2048
    return int(context)
