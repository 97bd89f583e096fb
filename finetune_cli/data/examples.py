"""Tokenized examples kept flat: every example's token ids end to end in one int32 array, the labels in another,
and where each example starts. A list of Python ints costs about 36 bytes a token, this 8; the tokenized cache
is the same arrays in an Arrow file, memory-mapped when read, and the trainer's dataset is built on them
without a copy. An `Examples` reads like the list of `{"input_ids", "labels"}` dicts it replaces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STATS = b"ftune.stats"


class Examples(Sequence):
    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        """`offsets[i]:offsets[i + 1]` is example i's span of `ids` and `labels`."""
        first, last = int(offsets[0]), int(offsets[-1])
        if first:
            ids, labels, offsets = ids[first:last], labels[first:last], offsets - first
        self.ids, self.labels, self.offsets = ids, labels, offsets

    @classmethod
    def from_list(cls, examples) -> Examples:
        if isinstance(examples, Examples):
            return examples
        lengths = [len(e["input_ids"]) for e in examples]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for e in examples for t in e["input_ids"]), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for e in examples for t in e["labels"]), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, labels, offsets)

    @classmethod
    def concat(cls, parts: list[Examples]) -> Examples:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        ids = np.concatenate([p.ids[: p.offsets[-1]] for p in parts])
        return cls(ids, np.concatenate([p.labels[: p.offsets[-1]] for p in parts]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.ids[a:b].tolist(), "labels": self.labels[a:b].tolist()}

    def __eq__(self, other) -> bool:
        if isinstance(other, Examples):
            end = self.offsets[-1]
            return (
                np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.ids[:end], other.ids[: other.offsets[-1]])
                and np.array_equal(self.labels[:end], other.labels[: other.offsets[-1]])
            )
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __add__(self, other) -> Examples:
        return Examples.concat([self, Examples.from_list(other)])

    def __radd__(self, other) -> Examples:
        return Examples.concat([Examples.from_list(other), self])

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {len(self.ids)} tokens)"

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def table(self):
        """The examples as an Arrow table of two list columns over the same buffers (no copy)."""
        import pyarrow as pa

        end, offsets = int(self.offsets[-1]), pa.array(self.offsets)
        ids = pa.LargeListArray.from_arrays(offsets, pa.array(self.ids[:end]))
        labels = pa.LargeListArray.from_arrays(offsets, pa.array(self.labels[:end]))
        return pa.table({"input_ids": ids, "labels": labels})


def dataset(examples):
    """The trainer's `datasets.Dataset` of input_ids and labels, on the examples' own arrays."""
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(Examples.from_list(examples).table()))


def save(path: Path, examples: Examples, stats: dict) -> None:
    """Write the examples and their stats as an Arrow IPC file (the caller renames it into place)."""
    import pyarrow as pa

    table = examples.table()
    table = table.replace_schema_metadata({STATS: json.dumps(stats).encode()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def load(path: Path) -> tuple[Examples, dict]:
    """Examples memory-mapped from a file `save` wrote: pages are read as they are used, nothing is copied."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    stats = json.loads(table.schema.metadata[STATS])
    ids, labels = (table.column(name).combine_chunks() for name in ("input_ids", "labels"))
    offsets = ids.offsets.to_numpy()
    if not np.array_equal(offsets, labels.offsets.to_numpy()):
        raise ValueError("input_ids and labels differ in length")
    return Examples(ids.values.to_numpy(), labels.values.to_numpy(), offsets), stats
