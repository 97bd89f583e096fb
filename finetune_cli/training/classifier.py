"""Training's classification steps (training.objective: classification): the rows checked and their classes
resolved in preflight, tokenized or listed as images, the model loaded with its head, and the log lines."""

from __future__ import annotations

from finetune_cli.classification import inputs, labels
from finetune_cli.errors import FtuneError


def is_row(record: dict) -> bool:
    return "label" in record and "completion" not in record


def check_data(objective: str, train: list[dict], evals: list[dict], where: str) -> None:
    """Classification rows train a classifier and nothing else; say which key to change either way."""
    if objective == "classification":
        other = next((r for r in train + evals if not is_row(r)), None)
        if other is not None:
            raise FtuneError(
                f'{other["source"]}: training.objective classification reads rows {{"text", "label"}} (or '
                f'"image", "label"); this row is in {other["format"]} format (map other field names with '
                "data.columns)"
            )
        return
    row = next((r for r in train + evals if is_row(r)), None)
    if row is not None:
        raise FtuneError(
            f"{row['source']}: this row is a classification row (text or image with a label); set "
            "training.objective: classification to train a classifier, or data.format: text to train on the text"
        )


def classes(recipe, train: list[dict], evals: list[dict], where: str) -> labels.Classes:
    """The run's classes (data.labels, else sorted from training), checked against every row."""
    inputs.check_one_modality(train + evals, where)
    names = labels.resolve(recipe.data.labels, train, evals, where)
    count = labels.counts(train, names)
    weights = labels.balanced_weights(count) if recipe.training.class_weights == "balanced" else None
    kind = inputs.modality(train)
    if kind == "image":
        check_images(train + evals)
    return labels.Classes(names=names, input=kind, weights=weights, counts=count)


def check_images(records: list[dict]) -> None:
    """Every image file is whole (PIL's verify: read and checked, not decoded): a bad one is named before
    training starts, not at the step that meets it."""
    import io

    from PIL import Image, UnidentifiedImageError

    for r in records:
        image = r["image"]
        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                opened.verify()  # the whole file read and checked (a truncated PNG fails), not decoded
        except (OSError, UnidentifiedImageError) as exc:
            raise FtuneError(f"{r['source']}: the image cannot be read ({exc}); fix or remove the row") from None


def tokenize(recipe, plan) -> None:
    """plan's train and eval examples: token ids (text) or image references, each with its class id."""
    c, d = plan.classes, recipe.data
    if c.input == "image":
        plan.train_examples, plan.stats["train"] = inputs.image_examples(plan.train, c.names)
        if plan.eval:
            plan.eval_examples, plan.stats["eval"] = inputs.image_examples(plan.eval, c.names)
    else:
        plan.train_examples, plan.stats["train"] = inputs.tokenize(plan.tokenizer, plan.train, c.names, d.max_length)
        if plan.eval:
            plan.eval_examples, plan.stats["eval"] = inputs.tokenize(plan.tokenizer, plan.eval, c.names, d.max_length)
    plan.stats["train"]["labels"] = c.counts
    plan.stats["train"]["imbalance"] = labels.imbalance(c.counts)
    if plan.eval:
        plan.stats["eval"]["labels"] = labels.counts(plan.eval, c.names)
    c.collate = inputs.Collator(plan.tokenizer, c.input == "image")
    plan.train = []


def load_model(recipe, plan, strategy: str):
    """The base (or a full run's model) with a new head for the run's classes, seeded by training.seed."""
    from finetune_cli import models
    from finetune_cli.classification import model as classifier
    from finetune_cli.training import launch, methods

    m, c = recipe.model, plan.classes
    dtype = str(models.torch_dtype(m.dtype)).removeprefix("torch.")
    keep = list(classifier.HEADS)  # QLoRA: the head stays in full precision, trained in full
    quantization = methods.quantization_config(recipe.method, dtype, strategy in launch.SHARDED, keep=keep)
    pad = getattr(plan.tokenizer, "pad_token_id", None)
    model = classifier.load(
        plan.source, c.names, c.input == "image", m.dtype, m.trust_remote_code, quantization, pad, recipe.training.seed
    )
    c.head = classifier.head_name(model)
    return model


def describe(plan, log) -> None:
    c = plan.classes
    train, evals = plan.stats["train"], plan.stats.get("eval", {})
    counts = ", ".join(f"{n} {k}" for n, k in c.counts.items())
    weights = f"; balanced class weights {', '.join(f'{w:.2f}' for w in c.weights)}" if c.weights else ""
    log(
        f"classes {len(c.names)} ({c.input}): {counts} (largest/smallest {train['imbalance']}){weights}; "
        f"{train['examples']} train, {evals.get('examples', 0)} eval"
        + (f"; {train['truncated']} truncated" if train.get("truncated") else "")
    )
