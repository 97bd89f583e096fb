"""Records kept on disk, not as Python objects: a source of any size is read in bounded memory.

`jsonl.parse` appends each record to a `Store`: one pickled blob per record, end to end in an anonymous temporary
file (unlinked as soon as it is made, so nothing is left behind even after a kill), and an int64 array of where
each ends. A `Records` is a read-only sequence over stores: a view as an array of row codes (store, row), so
held-out splits, weights and mixing are index arrays (`take`, `repeat`, `concat`), never lists of dicts. Rows
are decoded as they are read, consecutive ones in one `pread`; forked workers read the same file through the
descriptor they inherit. Pickle rather than JSON or Arrow: records are nested dicts of any shape (conversations,
pairs, image bytes, int or str labels) that must come back exactly as they went in, and the file is private to
this process (mode 0600, no name), written and read by it and its forks only, never kept.

Bad rows are `Errors`: the first LIMIT of each kind and exact counts of all, so a file that is all errors costs
no more memory than a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

CHUNK = 1024  # records decoded at a time when iterating
ROW_BITS = 40  # a row code: store number << ROW_BITS | row
LIMIT = 100  # errors kept of each kind (validate shows 20); the counts are of all


class Store:
    """An append-only file of pickled records; `done()` ends writing."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="ftune-records-")
        self._ends = array("q")
        self._keys = array("q")  # a hash of each record's "source", to find repeated rows without decoding
        self._digests = array("q")  # two int64 a record: `digest`, for the tokenized cache's key
        self._size = 0
        self.ends = self.keys = self.digests = None

    def append(self, record: dict) -> None:
        blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.write(blob)
        self._size += len(blob)
        self._ends.append(self._size)
        self._keys.append(hash(record.get("source")))
        self._digests.frombytes(digest(record))

    def done(self) -> Store:
        self._file.flush()
        self.ends = np.frombuffer(self._ends, dtype=np.int64)
        self.keys = np.frombuffer(self._keys, dtype=np.int64)
        self.digests = np.frombuffer(self._digests, dtype=np.int64).reshape(-1, 2)
        return self

    def __len__(self) -> int:
        return len(self._ends)

    def span(self, start: int, stop: int) -> tuple[int, bytes]:
        """(offset of row `start`, the bytes of rows start..stop-1)."""
        a = int(self.ends[start - 1]) if start else 0
        b = int(self.ends[stop - 1])
        data = os.pread(self._file.fileno(), b - a, a)
        while len(data) < b - a:  # pread may return less than asked for
            data += os.pread(self._file.fileno(), b - a - len(data), a + len(data))
        return a, data

    def rows(self, start: int, stop: int) -> list:
        base, data = self.span(start, stop)
        view, out, a = memoryview(data), [], base
        for b in self.ends[start:stop].tolist():
            out.append(pickle.loads(view[a - base : b - base]))
            a = b
        return out


def digest(record: dict) -> bytes:
    """16 bytes of what tokenizing a record depends on (its conversation or text), computed as it is stored."""
    content = json.dumps(record.get("messages", record.get("text")), sort_keys=True).encode()
    return hashlib.blake2b(content, digest_size=16).digest()


class Records(Sequence):
    """A read-only sequence of records on disk; slices, `take`, `repeat` and `+` are views, not copies."""

    def __init__(self, stores: tuple[Store, ...] = (), codes: np.ndarray | None = None):
        self._stores = stores
        self._codes = codes  # None: every row of the one store, in order

    @classmethod
    def from_list(cls, records: Iterable[dict]) -> Records:
        store = Store()
        for r in records:
            store.append(r)
        return cls((store.done(),))

    @classmethod
    def concat(cls, items: Iterable[Records]) -> Records:
        stores: list[Store] = []
        parts = []
        for item in items:
            item = as_records(item)
            number = {id(s): i for i, s in enumerate(stores)}
            remap = []
            for s in item._stores:
                if id(s) not in number:
                    number[id(s)] = len(stores)
                    stores.append(s)
                remap.append(number[id(s)])
            codes = item.codes()
            if remap != list(range(len(remap))):
                table = np.array(remap, dtype=np.int64) << ROW_BITS
                codes = table[codes >> ROW_BITS] | (codes & ((1 << ROW_BITS) - 1))
            parts.append(codes)
        if len(stores) == 1 and len(parts) == 1 and parts[0] is not None and _whole(parts[0], len(stores[0])):
            return cls(tuple(stores))
        return cls(tuple(stores), np.concatenate([np.zeros(0, np.int64), *parts]))

    def codes(self) -> np.ndarray:
        """Each record's (store << ROW_BITS | row)."""
        if self._codes is None:
            return np.arange(len(self), dtype=np.int64)
        return self._codes

    def __len__(self) -> int:
        if self._codes is None:
            return len(self._stores[0]) if self._stores else 0  # Records(): none
        return len(self._codes)

    def _codes_of(self, start: int, stop: int) -> np.ndarray:
        if self._codes is None:
            return np.arange(start, min(stop, len(self)), dtype=np.int64)
        return self._codes[start:stop]

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return Records(self._stores, self._codes_of(start, max(start, stop)))
            return self.take(np.arange(start, stop, step))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._decode(self._codes_of(i, i + 1))[0]

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self), CHUNK):
            yield from self._decode(self._codes_of(start, start + CHUNK))

    def _decode(self, codes: np.ndarray) -> list:
        """The records of some codes: a run of consecutive rows of one store is read in one call."""
        out = []
        if not len(codes):
            return out
        stores, rows = codes >> ROW_BITS, codes & ((1 << ROW_BITS) - 1)
        breaks = np.flatnonzero((np.diff(stores) != 0) | (np.diff(rows) != 1)) + 1
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(codes)]):
            out += self._stores[int(stores[a])].rows(int(rows[a]), int(rows[a]) + b - a)
        return out

    def take(self, index) -> Records:
        """The records at these positions (a numpy array or a list of ints), in that order."""
        index = np.asarray(index, dtype=np.int64)
        if self._codes is None:
            return Records(self._stores, index.copy())
        return Records(self._stores, self._codes[index])

    def repeat(self, times: int) -> Records:
        """All records `times` over, as `list * times`."""
        return Records(self._stores, np.tile(self.codes(), max(0, times)))

    def keys(self) -> np.ndarray:
        """A hash of each record's "source" (file and line): equal for the same row read through any view."""
        codes = self.codes()
        rows = codes & ((1 << ROW_BITS) - 1)
        if len(self._stores) == 1:
            return self._stores[0].keys[rows]
        out = np.zeros(len(codes), np.int64)
        for i, s in enumerate(self._stores):
            mine = (codes >> ROW_BITS) == i
            out[mine] = s.keys[rows[mine]]
        return out

    def digests(self) -> np.ndarray:
        """Each record's `digest`, as rows of two int64, in this view's order."""
        codes = self.codes()
        rows = codes & ((1 << ROW_BITS) - 1)
        if len(self._stores) == 1:
            return self._stores[0].digests[rows]
        out = np.zeros((len(codes), 2), np.int64)
        for i, s in enumerate(self._stores):
            mine = (codes >> ROW_BITS) == i
            out[mine] = s.digests[rows[mine]]
        return out

    def unique(self) -> Records:
        """Each row once (by source), in order of first appearance: weights repeat rows, eval_split moves them."""
        _, first = np.unique(self.keys(), return_index=True)
        return self.take(np.sort(first))

    def where(self, keep) -> Records:
        """The records for which `keep(record)` is true, in order (one pass)."""
        return self.take(np.fromiter((bool(keep(r)) for r in self), dtype=bool, count=len(self)).nonzero()[0])

    def __add__(self, other) -> Records:
        return Records.concat([self, other])

    def __radd__(self, other) -> Records:
        return Records.concat([other, self])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Records({len(self)} records)"

    def __reduce__(self):  # sent to another process: as the records themselves (small sets only do this)
        return Records.from_list, (list(self),)


def _whole(codes: np.ndarray, n: int) -> bool:
    return len(codes) == n and (n == 0 or (codes[0] == 0 and bool(np.all(np.diff(codes) == 1))))


def as_records(records) -> Records:
    """Records as they are; a list (a caller's own reader, a test) written to a store."""
    return records if isinstance(records, Records) else Records.from_list(records)


class Errors(list):
    """Bad rows: the first LIMIT of each kind, in order; `counts` and `total` count every one appended."""

    def __init__(self, items: Iterable = ()):
        super().__init__()
        self.counts: Counter = Counter()
        self.extend(items)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def append(self, error) -> None:
        if self.counts[error.kind] < LIMIT:  # kept = min(LIMIT, counted) for each kind
            super().append(error)
        self.counts[error.kind] += 1

    def extend(self, items: Iterable) -> None:
        kept = Counter()
        for e in items:
            self.append(e)
            kept[e.kind] += 1
        if isinstance(items, Errors):  # and those it counted without keeping
            for kind, n in items.counts.items():
                self.counts[kind] += n - kept[kind]

    def __iadd__(self, items):
        self.extend(items)
        return self
