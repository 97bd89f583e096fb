"""The classifier: a base model loaded with transformers' sequence- or image-classification head (a fresh head of
one output per class, seeded), its processor (tokenizer or image processor), and telling a classifier from a
causal language model."""

from __future__ import annotations

import json
from pathlib import Path

from finetune_cli.errors import FtuneError

HEADS = ("score", "classifier")  # the head's name in transformers' *ForSequenceClassification / *ForImageClassification


def architecture_task(source: str) -> str | None:
    """ "text" or "image" when the model folder or hub id is a classifier (its config's architectures), else None."""
    try:
        architectures = json.loads(Path(_config_file(source)).read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    for name in architectures:
        if str(name).endswith("ForSequenceClassification"):
            return "text"
        if str(name).endswith("ForImageClassification"):
            return "image"
    return None


def _config_file(source: str) -> str | None:
    """A model's config.json: in its folder, or a hub id's from the Hugging Face cache (downloaded when missing,
    as loading the model would)."""
    local = Path(source) / "config.json"
    if local.is_file() or Path(source).is_dir():
        return str(local)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(source, "config.json")
    except Exception:  # noqa: BLE001 - not a hub id, or unreachable: loading the model will say so
        return None


def labels_of(source: str) -> list[str]:
    """A classifier folder's class names in id order (its config's id2label)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    return [config.id2label[i] for i in range(config.num_labels)]


def load_processor(source: str, image: bool, trust_remote_code: bool = False):
    """The tokenizer (a pad token set: the head reads each row's last non-pad token) or the image processor."""
    from finetune_cli import models

    if not image:
        return models.load_tokenizer(source, None, trust_remote_code, require_template=False)
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one clear line
        raise FtuneError(
            f"{source}: no image processor (preprocessor_config.json) to read images with "
            f"({str(exc).splitlines()[0][:120]}); image rows need an image model"
        ) from None


def load(
    source: str,
    names: list[str],
    image: bool,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantization=None,
    pad_token_id: int | None = None,
    seed: int | None = None,
):
    """The base model with a classification head for `names`. A model that already is a classifier of these
    classes keeps its head (a merged or fully fine-tuned one); otherwise the head is new, initialized from `seed`."""
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from finetune_cli import models

    cls = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    kwargs = {"quantization_config": quantization} if quantization is not None else {}
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    if seed is not None:
        torch.manual_seed(seed)  # the new head's initial weights
    try:
        model = cls.from_pretrained(
            source,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True,  # an image model's own head (1000 ImageNet classes) is replaced
            dtype=models.torch_dtype(dtype),
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            kind = "image" if image else "sequence"
            raise FtuneError(
                f"{source}: transformers has no {kind}-classification head for this architecture "
                f"({str(exc).splitlines()[0][:160]})"
            ) from None
        raise models.load_error(source, exc) from None
    except Exception as exc:  # noqa: BLE001
        raise models.load_error(source, exc) from None
    return model


def head_name(model) -> str:
    """The classification head's module name (score, classifier)."""
    for name in HEADS:
        if getattr(model, name, None) is not None:
            return name
    raise FtuneError(f"{type(model).__name__}: no classification head named {' or '.join(HEADS)}")


def load_target(found, dtype: str | None = None, check_base=None):
    """(model, processor) for an opened classifier target (rundir.Target with a task): a model folder as saved,
    or the base with a head for the adapter's classes and the adapter (LoRA layers and the trained head) on it;
    `check_base(base)` runs before the adapter is added (merge-adapter's shape check)."""
    from finetune_cli import models

    image = found.task == "image"
    processor = load_processor(found.tokenizer, image, found.trust_remote_code)
    dtype = dtype or found.dtype
    if found.adapter is None:
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

        cls = AutoModelForImageClassification if image else AutoModelForSequenceClassification
        try:
            model = cls.from_pretrained(
                found.weights, dtype=models.torch_dtype(dtype), trust_remote_code=found.trust_remote_code
            )
        except Exception as exc:  # noqa: BLE001
            raise models.load_error(found.weights, exc) from None
        return model, processor
    from peft import PeftModel

    pad = getattr(processor, "pad_token_id", None)
    base = load(found.weights, found.labels, image, dtype, found.trust_remote_code, pad_token_id=pad)
    if check_base is not None:
        check_base(base)
    return PeftModel.from_pretrained(base, str(found.adapter)), processor
