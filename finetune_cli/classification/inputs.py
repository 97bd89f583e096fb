"""What a classifier reads: texts tokenized (truncated to max_length, no chat template: the head reads the text's
last token) or images opened and processed by the model's image processor, one batch at a time."""

from __future__ import annotations

import io


def modality(records: list[dict]) -> str:
    """ "image" when the rows hold images, else "text"."""
    return "image" if records and "image" in records[0] else "text"


def check_one_modality(records: list[dict], where: str) -> None:
    from finetune_cli.errors import FtuneError

    kinds = {"image" if "image" in r else "text" for r in records}
    if len(kinds) > 1:
        raise FtuneError(f"{where}: rows hold both text and images; a classifier reads one or the other")


def tokenize(tokenizer, records: list[dict], names: list[str], max_length: int) -> tuple[list[dict], dict]:
    """Examples {"input_ids", "label"} (label: the class id, or -1 for a row without one) and their counts."""
    ids = {n: i for i, n in enumerate(names)}
    texts = [r["text"] for r in records]
    encoded = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"] if texts else []
    examples, truncated, tokens = [], 0, 0
    for record, input_ids in zip(records, encoded):
        if len(input_ids) > max_length:
            truncated += 1
            input_ids = input_ids[:max_length]
        tokens += len(input_ids)
        examples.append({"input_ids": input_ids, "label": ids.get(record.get("label"), -1)})
    stats = {"examples": len(examples), "tokens": tokens, "truncated": truncated, "dropped": 0}
    return examples, stats


def image_examples(records: list[dict], names: list[str]) -> tuple[list[dict], dict]:
    """Examples {"image", "label"}: images are opened batch by batch when the model reads them."""
    ids = {n: i for i, n in enumerate(names)}
    examples = [{"image": r["image"], "label": ids.get(r.get("label"), -1)} for r in records]
    return examples, {"examples": len(examples), "truncated": 0, "dropped": 0}


def open_image(image):
    """A PIL image in RGB from a path or a table cell's bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return opened.convert("RGB")


class Collator:
    """Batches for the classifier: token ids padded with the tokenizer's pad token (an attention mask marks the
    text), or pixel values from the image processor; labels as `labels` (rows without one: -1)."""

    def __init__(self, processor, image: bool):
        self.processor, self.image = processor, image

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        if self.image:
            batch = self.processor(images=[open_image(row["image"]) for row in rows], return_tensors="pt")
            return {"pixel_values": batch["pixel_values"], "labels": labels}
        batch = self.processor.pad({"input_ids": [row["input_ids"] for row in rows]}, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
