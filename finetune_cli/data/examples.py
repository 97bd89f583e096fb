"""Tokenized examples kept flat: in each part (one per chunk of records tokenized together), every example's token
ids end to end in one int32 array, the labels in another, and where each example starts. A list of Python ints
costs about 36 bytes a token, this 8. Parts are never copied into one: the tokenized cache writes them as the
record batches of an Arrow file, reading it memory-maps them, and the trainer's dataset is a table over the same
buffers. An `Examples` reads like the list of `{"input_ids", "labels"}` dicts it replaces.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

STATS = b"ftune.stats"


class Examples(Sequence):
    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        """One part: `offsets[i]:offsets[i + 1]` is example i's span of `ids` and `labels`."""
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ends: list[int] = []  # examples up to the end of each part
        self._add(ids, labels, offsets)

    def _add(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> None:
        first, last = int(offsets[0]), int(offsets[-1])
        if first:
            offsets = offsets - first
        if len(offsets) > 1:
            self.parts.append((ids[first:last], labels[first:last], offsets))
            self.ends.append((self.ends[-1] if self.ends else 0) + len(offsets) - 1)

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
    def concat(cls, items: list[Examples]) -> Examples:
        """The examples of all, in order, sharing their arrays (nothing is copied)."""
        out = cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))
        for item in items:
            for part in item.parts:
                out._add(*part)
        return out

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        p = bisect.bisect_right(self.ends, i)
        ids, labels, offsets = self.parts[p]
        j = i - (self.ends[p - 1] if p else 0)
        a, b = offsets[j], offsets[j + 1]
        return {"input_ids": ids[a:b].tolist(), "labels": labels[a:b].tolist()}

    def __eq__(self, other) -> bool:
        if isinstance(other, Examples):
            mine, theirs = self.flat(), other.flat()
            return all(np.array_equal(a, b) for a, b in zip(mine, theirs))
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __add__(self, other) -> Examples:
        return Examples.concat([self, Examples.from_list(other)])

    def __radd__(self, other) -> Examples:
        return Examples.concat([Examples.from_list(other), self])

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {self.tokens()} tokens)"

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, labels, offsets) of all parts in one copy each: for comparisons, not for big sets."""
        starts = np.cumsum([0] + [len(ids) for ids, _, _ in self.parts])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [o[1:] + s for (_, _, o), s in zip(self.parts, starts)])
        ids = np.concatenate([np.zeros(0, np.int32)] + [ids for ids, _, _ in self.parts])
        return ids, np.concatenate([np.zeros(0, np.int32)] + [lab for _, lab, _ in self.parts]), offsets

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.int64)] + [np.diff(o) for _, _, o in self.parts])

    def tokens(self) -> int:
        return sum(len(ids) for ids, _, _ in self.parts)

    def learned(self, ignore: int = -100) -> int:
        return sum(int(np.count_nonzero(labels != ignore)) for _, labels, _ in self.parts)

    def batches(self) -> list:
        """A record batch of two list columns per part, over the same buffers."""
        import pyarrow as pa

        out = []
        for ids, labels, offsets in self.parts:
            columns = [pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)) for values in (ids, labels)]
            out.append(pa.record_batch(columns, names=["input_ids", "labels"]))
        return out

    def table(self):
        """The examples as an Arrow table of two list columns, a record batch per part, over the same buffers."""
        import pyarrow as pa

        return pa.Table.from_batches(self.batches(), schema=schema())


def schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.large_list(pa.int32())), ("labels", pa.large_list(pa.int32()))])


class Writer:
    """Examples written to an Arrow IPC file part by part as they are tokenized (none is kept in memory); the
    stats, known at the end, go in the custom metadata of a last, empty batch. `load` reads it."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, schema())

    def write(self, examples: Examples) -> None:
        for batch in examples.batches():
            self._writer.write_batch(batch)

    def close(self, stats: dict | None = None) -> None:
        """Finish the file (with `stats`), or with none only close it: an unfinished file is for deleting."""
        import pyarrow as pa

        try:
            if stats is not None:
                empty = pa.record_batch([pa.array([], t.type) for t in schema()], schema=schema())
                self._writer.write_batch(empty, custom_metadata={STATS: json.dumps(stats).encode()})
                self._writer.close()
        finally:
            self._sink.close()


def dataset(examples):
    """The trainer's `datasets.Dataset` of input_ids and labels, on the examples' own arrays."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    # Without a fingerprint datasets makes one by pickling the whole table: for 60M tokens 29 s and 2.2 GB more
    # memory. Nothing here is cached by fingerprint (no map), so a random one, as datasets gives unhashable data.
    table = InMemoryTable(Examples.from_list(examples).table())
    return datasets.Dataset(table, fingerprint=generate_random_fingerprint())


def save(path: Path, examples: Examples, stats: dict) -> None:
    """Write the examples and their stats as an Arrow IPC file, a record batch per part (the caller renames it)."""
    import pyarrow as pa

    table = examples.table()
    table = table.replace_schema_metadata({STATS: json.dumps(stats).encode()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def load(path: Path) -> tuple[Examples, dict]:
    """Examples memory-mapped from a file `save` wrote: pages are read as they are used, nothing is copied."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    table = reader.read_all()
    if table.schema.metadata and STATS in table.schema.metadata:  # `save`
        stats = json.loads(table.schema.metadata[STATS])
    else:  # `Writer`: in its last batch
        stats = json.loads(reader.get_batch_with_custom_metadata(reader.num_record_batches - 1)[1][STATS])
    out = Examples.concat([])
    for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks):
        offsets = ids.offsets.to_numpy()
        if not np.array_equal(offsets, labels.offsets.to_numpy()):
            raise ValueError("input_ids and labels differ in length")
        out._add(ids.values.to_numpy(), labels.values.to_numpy(), offsets)
    return out, stats
