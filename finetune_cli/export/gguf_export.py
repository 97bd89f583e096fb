"""`ftune export --format gguf`: a run or model written as one GGUF file (llama.cpp, Ollama,
LM Studio), a Modelfile and a README, then read back and checked. Everything bad is refused before the model is
loaded.

gguf_writer writes the file, gguf_vocab its vocabulary, gguf_check reads it back and compares its predictions
with the source model's, gguf_ollama writes the Modelfile and the README.
"""

from __future__ import annotations

import gc
import re
import resource
import time
from pathlib import Path

from finetune_cli import files, rundir
from finetune_cli.errors import FtuneError
from finetune_cli.export.gguf_check import _check_file, _check_runtime, _log_probs, _probe_ids
from finetune_cli.export.gguf_ollama import _readme, _system_prompt, modelfile, template_family
from finetune_cli.export.gguf_vocab import _end_of_turn, _vocab
from finetune_cli.export.gguf_writer import ARCHS, QUANTS, _write
from finetune_cli.results import ExportResult


def export(target: str, out: str, quant: str = "q8_0", overwrite: bool = False, check: bool = True) -> ExportResult:
    """Write TARGET as DIR/<name>-<quant>.gguf with a Modelfile and a README; check it unless `check` is False."""
    quant = _check_quant(quant)
    folder = Path(out).expanduser()
    found = rundir.open_target(target)
    found.refuse_classifier("llama.cpp and GGUF have no label head; export it with merge-adapter for transformers")
    if found.adapter is not None:
        from finetune_cli.rundir import check_lora

        check_lora(found.adapter)
    config = _check_config(found)
    rundir.check_output(folder, "gguf", overwrite, "--output")
    from finetune_cli import models

    tokenizer = models.load_tokenizer(found.tokenizer, None, found.trust_remote_code, require_template=False)
    vocab = _vocab(tokenizer, config.vocab_size, target)  # refuses SentencePiece and unknown pre-tokenizers

    started = time.perf_counter()
    from finetune_cli.export.merge import merged_model

    # float32: the adapter is merged and every tensor converted from full precision, as llama.cpp's converter does
    model, tokenizer = merged_model(found, "float32")
    name = _safe_name(found)
    filename = f"{name}-{quant}.gguf"
    family, default_system = template_family(tokenizer)
    eot = _end_of_turn(tokenizer)
    probe = _probe_ids(tokenizer) if check else None
    expected = _log_probs(model, probe) if check else None
    with files.temporary_folder(folder) as tmp:
        plan = _write(tmp / filename, model, config, tokenizer, vocab, quant, name, found, eot)
        del model
        gc.collect()
        size = (tmp / filename).stat().st_size
        _check_file(tmp / filename, plan, config, tokenizer, eot)
        system = _system_prompt(found) or default_system
        files.write_text(tmp / "Modelfile", modelfile(filename, tokenizer, family, eot, system))
        result_check = None
        if check:
            result_check = _check_runtime(tmp, filename, tokenizer, probe, expected, quant)
        files.write_text(tmp / "README.md", _readme(found, filename, quant, family, result_check, config))
        rundir.check_output(folder, "gguf", overwrite, "--output")  # again: something may have appeared meanwhile
        rundir.replace_folder(tmp, folder, "gguf", [p.name for p in tmp.iterdir()])
    return ExportResult(
        output=str(folder),
        file=str(folder / filename),
        format="gguf",
        quant=quant,
        architecture=config.model_type,
        base=found.base or found.weights,
        method=(found.method or {}).get("name") if found.adapter is not None else None,
        template=family,
        end_of_turn=[tokenizer.convert_ids_to_tokens(i) for i in eot],
        tensors=len(plan),
        size_bytes=size,
        seconds=round(time.perf_counter() - started, 2),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        check=result_check,
    )


def _check_quant(quant: str) -> str:
    q = quant.lower()
    if q in QUANTS:
        return q
    if re.fullmatch(r"(q[2-6]_k(_[sml])?|iq\w+|tq\w+)", q):
        raise FtuneError(
            f"--quant: {quant} is a K-quant (or i-quant), which only llama.cpp's C code can compute; export "
            f"f16 or q8_0 and run llama.cpp's `llama-quantize FILE.gguf OUT.gguf {quant.upper()}`"
        )
    raise FtuneError(f"--quant: {quant!r}; expected one of {', '.join(QUANTS)}")


def _check_config(found: rundir.Target):
    """The model's config: a supported architecture with plain rope, refused before any weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(found.weights, trust_remote_code=found.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loading failure is one line naming the model
        raise FtuneError(f"{found.weights}: cannot read the model's config ({exc})") from None
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise FtuneError(
            f"{found.name}: architecture '{kind}' cannot be exported to GGUF by ftune; supported: "
            f"{', '.join(ARCHS)} (for others use llama.cpp's convert_hf_to_gguf.py on a merged folder)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise FtuneError(
            f"{found.name}: rope scaling '{rope_type}' is not exported by ftune yet (default, linear, llama3); "
            "use llama.cpp's convert_hf_to_gguf.py on a merged folder (ftune merge-adapter)"
        )
    return config


def _safe_name(found: rundir.Target) -> str:
    source = found.run_dir or Path(found.name)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(source)).name).strip("-.") or "model"
