"""Streaming preparation: raw files → encoded store, in bounded memory, on both cores.

The input is parsed once:

1. **Provisional pass.** Blocks of the file are parsed by PyArrow in two worker threads (it
   releases the GIL) and checked by a reader thread (bad rows: stop or skip-and-count), while the
   main thread gives every value a *provisional id*, its rank of first appearance in its field
   (0 = missing): each block's distinct values are hashed (vectorised) and looked up in a growing
   open-addressing table (:class:`KeyTable`). Provisional rows are appended (by a writer thread)
   to temporary files: one per split for a random split (by the seeded hash of the row's
   ordinal, exactly :func:`deepfm.data.splits.assign`), one in file order for a sequential split,
   whose boundaries need the total and are fixed after the pass from the exact count of good rows
   (:func:`~deepfm.data.splits.sequential_bounds`, no separate line count).
2. **Counting** on the training rows only: ``bincount`` of their provisional ids. The vocabulary
   is then fitted by :class:`~deepfm.data.featuremap.FeatureMapBuilder` itself, fed with these
   counts, so both paths apply the same rules (min count, order, bag length, moments).
3. **Encoding pass.** Provisional ids become final feature ids through one lookup table per field,
   piece by piece, in two threads writing at disjoint offsets of the final arrays.

Memory holds the blocks in flight (two parsing, one checked, one encoded), the distinct values
of every field (hash table, strings, counts) and one encoding piece per thread: it grows with the
vocabularies, not with the number of rows. The store is identical to what the in-memory path
(``train --data``) encodes: the same feature map, ids, values, labels and splits.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm import __version__
from deepfm.data.featuremap import (
    FIRST_VALUE,
    MISSING,
    FeatureMap,
    FeatureMapBuilder,
    FieldInfo,
    _bag_lists,
    bucketize,
)
from deepfm.data.formats import DataFormat
from deepfm.data.reader import BadRows, RawChunk
from deepfm.data.schema import MAX_BAG_LENGTH, FieldSpec, Schema
from deepfm.data.splits import TEST, TRAIN, VALID, SplitSpec, assign, sequential_bounds
from deepfm.data.store import (
    ARRAYS,
    SPLITS,
    STORE_FORMAT,
    STORE_VERSION,
    StoreWriter,
    array_file,
)
from deepfm.data.threads import Background
from deepfm.errors import ConfigError, DataError

_WORK = "_work"
#: bytes parsed per block: two blocks parse while one is checked and one encoded; 16 MiB keeps
#: that under ~300 MB for Criteo rows at the same speed as 32 MiB (measured)
PREPARE_BLOCK_BYTES = 16 << 20
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# -- distinct values and their provisional ids ---------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (a bijection of uint64), vectorised."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def string_keys(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit key, byte length) of every string of ``values`` (non-null), vectorised.

    Strings are read 8 bytes at a time; for strings of at most 8 bytes the key is a bijection
    of the bytes for a given length, so equal (key, length) means equal strings. Longer
    strings can collide (probability ~n²/2⁶⁵) and are compared by the caller.
    """
    if pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type):
        offset_type = np.int64
    else:
        offset_type = np.int32
    n = len(values)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[values.offset : values.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.zeros(0, np.uint8) if buffers[2] is None else np.frombuffer(buffers[2], np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    width = int(lengths[0])
    h = lengths.astype(np.uint64) * _GOLDEN
    if 0 < width <= 8 and (lengths == width).all():
        # fast path (hashes, ids, codes): equal lengths, so the bytes are one [n, width] block
        block = np.zeros((n, 8), np.uint8)
        block[:, :width] = data[offsets[0] : offsets[0] + n * width].reshape(n, width)
        return _mix(_mix(h ^ block.view(np.uint64).ravel()) + _GOLDEN), lengths
    padded = np.concatenate([data[: offsets[-1]], np.zeros(8, np.uint8)])
    words = (lengths + 7) // 8
    lane = np.arange(8)
    for k in range(int(words.max())):
        active = np.flatnonzero(words > k)
        remaining = lengths[active] - 8 * k
        chunk = padded[(starts[active] + 8 * k)[:, None] + lane]  # [m, 8] bytes
        chunk[lane[None, :] >= remaining[:, None]] = 0  # bytes of the next string
        word = chunk.view(np.uint64).ravel()
        h[active] = _mix(h[active] ^ word) + np.uint64((k + 1) * int(_GOLDEN) % 2**64)
    return _mix(h), lengths


class KeyTable:
    """uint64 key → id (1, 2, ... in order of insertion), an open-addressing hash table whose
    probes run for all pending keys at once (vectorised), one slot further per round.

    Slots hold ids only (int32, 0 = empty; load ≤ 1/2); each id's key is kept in a dense array,
    so a distinct value costs 8 bytes of key plus 8 to 16 bytes of slots.
    """

    _FIB = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, bits: int = 12) -> None:
        self.bits = bits
        self.slots = np.zeros(1 << bits, np.int32)
        self._owner = np.full(1 << bits, -1, np.int32)  # scratch: who claims a free slot
        self._keys = np.zeros(1 << 10, np.uint64)  # key of id i at [i]; [0] unused
        self.count = 0

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * self._FIB) >> np.uint64(64 - self.bits)).astype(np.int64)

    def _grow(self, extra: int) -> None:
        if 2 * (self.count + extra) > len(self.slots):
            while 2 * (self.count + extra) > (1 << self.bits):
                self.bits += 1
            self.slots = np.zeros(1 << self.bits, np.int32)
            self._owner = np.full(1 << self.bits, -1, np.int32)
            ids = np.arange(1, self.count + 1, dtype=np.int32)
            self._place(self._keys[1 : self.count + 1], ids)
        if self.count + extra + 1 > len(self._keys):
            keys = np.zeros(max(2 * len(self._keys), self.count + extra + 1), np.uint64)
            keys[: len(self._keys)] = self._keys
            self._keys = keys

    def _place(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Put distinct, absent keys with their ids into free slots."""
        mask = (1 << self.bits) - 1
        slot = self._home(keys)
        while len(ids):
            free = self.slots[slot] == 0
            candidates = np.flatnonzero(free)
            self.slots[slot[candidates]] = ids[candidates]  # the last writer of a slot wins
            won = np.zeros(len(ids), bool)
            won[candidates] = self.slots[slot[candidates]] == ids[candidates]
            keys, ids, slot = keys[~won], ids[~won], (slot[~won] + 1) & mask

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Id of each key, 0 where absent."""
        mask = (1 << self.bits) - 1
        out = np.zeros(len(keys), np.int32)
        pending, slot = np.arange(len(keys)), self._home(keys)
        while len(pending):
            ids = self.slots[slot]
            hit = (ids != 0) & (self._keys[ids] == keys)
            out[pending[hit]] = ids[hit]
            go_on = (ids != 0) & ~hit
            pending, slot, keys = pending[go_on], (slot[go_on] + 1) & mask, keys[go_on]
        return out

    def get_or_insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id of each key, positions of the keys that were inserted, in id order). Absent keys
        get the next ids; equal keys in one call share one id."""
        self._grow(len(keys))
        mask = (1 << self.bits) - 1
        out = np.zeros(len(keys), np.int32)
        inserted: list[np.ndarray] = []
        pending, slot, pending_keys = np.arange(len(keys)), self._home(keys), keys
        while len(pending):
            ids = self.slots[slot]
            hit = (ids != 0) & (self._keys[ids] == pending_keys)
            out[pending[hit]] = ids[hit]
            free = np.flatnonzero(ids == 0)
            if len(free):
                # claim free slots: one winner per slot (the last writer), who gets a new id;
                # a loser with the winner's key is a duplicate and shares its id
                claimed = slot[free]
                self._owner[claimed] = free
                winners = free[self._owner[claimed] == free]
                self._owner[claimed] = -1
                new_ids = np.arange(self.count + 1, self.count + 1 + len(winners), dtype=np.int32)
                self.slots[slot[winners]] = new_ids
                self._keys[new_ids] = pending_keys[winners]
                self.count += len(winners)
                out[pending[winners]] = new_ids
                inserted.append(pending[winners])
                ids = self.slots[slot]
                hit |= (self._keys[ids] == pending_keys) & (ids != 0)
                out[pending[hit]] = ids[hit]
            go_on = ~hit
            pending, slot = pending[go_on], (slot[go_on] + 1) & mask
            pending_keys = pending_keys[go_on]
        positions = np.concatenate(inserted) if inserted else np.zeros(0, np.int64)
        return out, positions

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes + self._owner.nbytes + self._keys.nbytes


class DistinctValues:
    """Distinct values of one field: provisional id = 1 + rank of insertion (as first met).

    Values are found by a 64-bit key in a :class:`KeyTable`. Equal keys of strings of at most
    8 bytes with equal lengths are equal strings; longer strings are compared with the stored
    string, so a hash collision can never merge two values (it stops with an error instead;
    its probability is below n²/2⁶⁵, ~3e-6 for 10M long values). Integer tokens (bucketised
    numbers) are their own keys.
    """

    def __init__(self, name: str, kind: Literal["string", "int"]) -> None:
        self.name = name
        self.kind = kind
        self._table = KeyTable()
        # byte length per provisional id, clipped at 255: only lengths <= 8 are compared
        self._lengths = np.zeros(1, np.uint8)
        self._chunks: list[pa.Array] = []
        self._values: pa.Array = pa.array([], pa.string() if kind == "string" else pa.int64())
        self._stored = 0  # values in _values (the rest are in _chunks)
        self.size = 0

    def ids_of(self, values: pa.Array) -> np.ndarray:
        """Provisional ids (int32) of non-null ``values``; unseen values get new ids."""
        if self.kind == "int":
            keys = values.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
            lengths = None
        else:
            if not pa.types.is_string(values.type):
                values = values.cast(pa.string())
            keys, lengths = string_keys(values)
        out, inserted = self._table.get_or_insert(keys)
        if len(inserted):
            taken = values.take(pa.array(inserted))
            self._chunks.append(taken.cast(self._values.type))
            if lengths is not None:
                clipped = np.minimum(lengths[inserted], 255).astype(np.uint8)
                self._lengths = np.concatenate([self._lengths, clipped])
            self.size += len(inserted)
        if lengths is not None:
            self._check(values, lengths, out)
        return out

    def _check(self, values: pa.Array, lengths: np.ndarray, ids: np.ndarray) -> None:
        """Equal keys must be equal strings (exact; see the class docs)."""
        same = (self._lengths[ids] == np.minimum(lengths, 255)).all()
        long = np.flatnonzero(lengths > 8)
        if same and len(long):
            stored = self.values.take(pa.array(ids[long] - 1))
            same = pc.all(pc.equal(values.take(pa.array(long)), stored)).as_py() is not False
        if not same:
            raise DataError(
                "two distinct values share a 64-bit hash (a collision, probability below "
                "1e-5 for 10M distinct values); please report this input",
                field=self.name,
            )

    @property
    def values(self) -> pa.Array:
        """Every distinct value; ``values[i]`` has provisional id ``i + 1``."""
        if self._chunks:
            self._values = pa.concat_arrays([self._values, *self._chunks])
            self._chunks = []
        return self._values

    @property
    def nbytes(self) -> int:
        chunks = sum(c.nbytes for c in self._chunks)
        return self._table.nbytes + self._lengths.nbytes + self._values.nbytes + chunks


# -- field layout of the provisional rows ---------------------------------------------------------


@dataclass
class _Field:
    spec: FieldSpec
    role: Literal["scalar", "value", "multi"]
    column: int  # column within its role's provisional array
    distinct: DistinctValues | None


def _fields(schema: Schema) -> list[_Field]:
    out: list[_Field] = []
    counters = {"scalar": 0, "value": 0, "multi": 0}
    for spec in schema.fields:
        if spec.is_value:
            role: Literal["scalar", "value", "multi"] = "value"
        elif spec.kind == "multi":
            role = "multi"
        else:
            role = "scalar"
        kind: Literal["string", "int"] = "int" if spec.kind == "numeric" else "string"
        distinct = None if role == "value" else DistinctValues(spec.name, kind)
        out.append(_Field(spec, role, counters[role], distinct))
        counters[role] += 1
    return out


def _categorical_ids(distinct: DistinctValues, column: pa.ChunkedArray) -> np.ndarray:
    parts = []
    for part in column.chunks:
        if not pa.types.is_dictionary(part.type):
            part = pc.dictionary_encode(part)
        lookup = np.append(distinct.ids_of(part.dictionary), np.int32(0))  # index -1 → missing
        parts.append(lookup[pc.fill_null(part.indices, -1).to_numpy()])
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _bucket_ids(distinct: DistinctValues, column: pa.ChunkedArray) -> np.ndarray:
    """Provisional ids of a bucketised numeric column: the buckets of its distinct numbers."""
    parts = []
    for part in column.chunks:
        encoded = pc.dictionary_encode(part.cast(pa.float64()))
        x = encoded.dictionary.to_numpy(zero_copy_only=False)
        nan = np.isnan(x)  # NaN is missing, as in the feature map
        ids = np.where(nan, 0, distinct.ids_of(pa.array(bucketize(np.where(nan, 0.0, x)))))
        lookup = np.append(ids.astype(np.int32), np.int32(0))  # index -1 (null) → missing
        parts.append(lookup[pc.fill_null(encoded.indices, -1).to_numpy()])
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _bag_ids(distinct: DistinctValues, column: pa.ChunkedArray, separator: str):
    """(item provisional ids int32 [items], lengths int32 [rows]) of a multi-valued column."""
    lists = _bag_lists(column, separator)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int32)
    flat = pc.list_flatten(lists)
    if len(flat) == 0:
        return np.zeros(0, np.int32), lengths
    encoded = pc.dictionary_encode(flat)
    return distinct.ids_of(encoded.dictionary)[encoded.indices.to_numpy()], lengths


# -- helpers ----------------------------------------------------------------------------------


def _item_positions(lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in the flat item array of the bags of ``rows`` (bags of ``lengths``)."""
    lengths = lengths.astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    selected = lengths[rows]
    first = np.repeat(starts[rows] - (np.cumsum(selected) - selected), selected)
    return first + np.arange(int(selected.sum()))


def _read(path: Path, dtype: str, start: int, count: int) -> np.ndarray:
    """``count`` elements of a raw array file from element ``start``."""
    if count == 0:
        return np.zeros(0, dtype)
    out = np.fromfile(path, dtype=dtype, count=count, offset=start * np.dtype(dtype).itemsize)
    if len(out) != count:
        raise DataError("a temporary store file is shorter than expected", path=str(path))
    return out


# -- the preparation ---------------------------------------------------------------------------


@dataclass
class _Piece:
    """The rows of one input chunk that went to one segment.

    Provisional ids, raw values and bag lengths are stored column-major per piece
    (``[columns, rows]``: each field is contiguous, so filling and counting never stride);
    labels, lines, ordinals and bag items are plain 1-D files.
    """

    rows: int
    first_row: int  # rows of the segment before this piece
    first_items: list[int]  # bag items of the segment before this piece, per multi field


@dataclass
class _Segment:
    """Provisional rows of one destination, in the order they were read."""

    name: str
    rows: int = 0
    items: list[int] = field(default_factory=list)  # bag items written, per multi field
    pieces: list[_Piece] = field(default_factory=list)

    def blocks(self, start: int, stop: int) -> Iterator[tuple[_Piece, int, int]]:
        """``(piece, a, b)``: rows ``[a, b)`` of each piece overlapping rows ``[start, stop)``."""
        for piece in self.pieces:
            a = max(start - piece.first_row, 0)
            b = min(stop - piece.first_row, piece.rows)
            if a < b:
                yield piece, a, b


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    path: Path


class _Preparer:
    def __init__(
        self,
        schema: Schema,
        writer: StoreWriter,
        split: SplitSpec,
        valid_fraction: float,
        seed: int,
    ) -> None:
        self.schema = schema
        self.writer = writer
        self.split = split
        self.valid_fraction = valid_fraction
        self.seed = seed
        self.fields = _fields(schema)
        self.scalar = [f for f in self.fields if f.role == "scalar"]
        self.value = [f for f in self.fields if f.role == "value"]
        self.multi = [f for f in self.fields if f.role == "multi"]
        names = ["all"] if split.kind == "sequential" else list(SPLITS)
        self.segments = {n: _Segment(n, items=[0] * len(self.multi)) for n in names}
        self.rows = 0
        self.labeled: bool | None = None
        self.rows_by_source: dict[str, int] = {}

    # -- pass 1 ------------------------------------------------------------------------------

    def work(self, segment: str, name: str) -> Path:
        return self.writer.path(f"{_WORK}/{segment}/{name}")

    def add(self, chunk: RawChunk) -> None:
        table = chunk.table
        n = table.num_rows
        if n == 0:
            return
        for f in self.fields:
            if f.spec.name not in table.column_names:
                raise DataError(f"input lacks the field {f.spec.name!r}", path=chunk.path)
        labeled = "label" in table.column_names
        if self.labeled is None:
            self.labeled = labeled
        elif self.labeled != labeled:
            raise ConfigError(
                f"{chunk.path}: some input files have a label column and others do not; "
                "prepare labeled and unlabeled files separately"
            )
        self.rows_by_source[chunk.path] = self.rows_by_source.get(chunk.path, 0) + n
        columns: dict[str, np.ndarray] = {
            "prov": np.empty((len(self.scalar), n), np.int32),
            "raw": np.empty((len(self.value), n), np.float64),
            "bag_lengths": np.empty((len(self.multi), n), np.int32),
        }
        for f in self.scalar:
            assert f.distinct is not None
            column = table.column(f.spec.name)
            bucket = f.spec.kind == "numeric"
            ids = (_bucket_ids if bucket else _categorical_ids)(f.distinct, column)
            columns["prov"][f.column] = ids
        for f in self.value:
            column = table.column(f.spec.name)
            columns["raw"][f.column] = column.to_numpy(zero_copy_only=False).astype(np.float64)
        items = []
        for f in self.multi:
            assert f.distinct is not None
            column = table.column(f.spec.name)
            bag_items, columns["bag_lengths"][f.column] = _bag_ids(
                f.distinct, column, f.spec.separator
            )
            items.append(bag_items)
        rows: dict[str, np.ndarray] = {
            "lines": chunk.lines,
            "ordinals": np.arange(self.rows, self.rows + n, dtype=np.int64),
        }
        if labeled:
            labels = table.column("label").to_numpy(zero_copy_only=False)
            rows["labels"] = labels.astype(np.float32)
        self.rows += n
        if self.split.kind == "sequential":
            self._write("all", columns, rows, items, None)
            return
        codes = assign(
            self.split, rows["ordinals"], valid_fraction=self.valid_fraction, seed=self.seed
        )
        sizes = np.bincount(codes, minlength=3)
        if sizes.max() == n:  # the whole chunk goes to one split
            self._write(SPLITS[int(codes[0])], columns, rows, items, None)
            return
        # one stable gather by split instead of one boolean scan per split
        order = np.argsort(codes, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for code in (TRAIN, VALID, TEST):
            if sizes[code]:
                selected = order[bounds[code] : bounds[code + 1]]
                self._write(SPLITS[code], columns, rows, items, selected)

    def _write(
        self,
        segment_name: str,
        columns: dict[str, np.ndarray],
        rows: dict[str, np.ndarray],
        items: list[np.ndarray],
        selected: np.ndarray | None,
    ) -> None:
        """Append the chunk's ``selected`` rows (all when None, else increasing positions)."""
        segment = self.segments[segment_name]
        count = columns["prov"].shape[1] if selected is None else len(selected)
        segment.pieces.append(_Piece(count, segment.rows, list(segment.items)))
        for name, array in columns.items():
            if array.shape[0]:
                chosen = array if selected is None else array[:, selected]
                self.writer.append(f"{_WORK}/{segment_name}/{name}", chosen)
        for name, array in rows.items():
            chosen = array if selected is None else array[selected]
            self.writer.append(f"{_WORK}/{segment_name}/{name}", chosen)
        for k, bag_items in enumerate(items):
            if selected is not None:
                bag_items = bag_items[_item_positions(columns["bag_lengths"][k], selected)]
            self.writer.append(f"{_WORK}/{segment_name}/bag_items_{k}", bag_items)
            segment.items[k] += len(bag_items)
        segment.rows += count

    # -- reading provisional pieces --------------------------------------------------------------

    def piece_columns(self, segment: str, name: str, piece: _Piece) -> np.ndarray:
        """``[columns, rows]`` block of a piece's ``prov``, ``raw`` or ``bag_lengths``."""
        width = {"prov": len(self.scalar), "raw": len(self.value), "bag_lengths": len(self.multi)}
        dtype = "<f8" if name == "raw" else "<i4"
        w = width[name]
        block = _read(self.work(segment, name), dtype, w * piece.first_row, w * piece.rows)
        return block.reshape(w, piece.rows)

    def piece_items(self, segment: str, k: int, piece: _Piece, lengths: np.ndarray, a: int, b: int):
        """Bag items of rows ``[a, b)`` of ``piece`` for multi field ``k``."""
        first = piece.first_items[k] + int(lengths[:a].sum())
        return _read(self.work(segment, f"bag_items_{k}"), "<i4", first, int(lengths[a:b].sum()))

    # -- split boundaries ------------------------------------------------------------------------

    def sources(self) -> dict[str, list[tuple[str, int, int]]]:
        """Each final split as ranges ``(segment, start, stop)`` of provisional rows."""
        if self.split.kind == "sequential":
            valid_start, cut = sequential_bounds(self.split, self.rows, self.valid_fraction)
            return {
                "train": [("all", 0, valid_start)],
                "valid": [("all", valid_start, cut)],
                "test": [("all", cut, self.rows)],
            }
        return {name: [(name, 0, self.segments[name].rows)] for name in SPLITS}

    # -- counting on training rows ---------------------------------------------------------------

    def fit(self) -> tuple[FeatureMap, dict[str, Any]]:
        """Count the training rows' provisional ids, fit the feature map (as the in-memory
        builder does: it *is* the builder, fed with these counts)."""
        self.writer.close_files()
        counts = {id(f): np.zeros(f.distinct.size + 1, np.int64) for f in self.scalar + self.multi}
        moments = {id(f): np.zeros(3) for f in self.value}
        longest = [0] * len(self.multi)
        # histogram of bag lengths (clipped): truncated bags are counted once slots are known
        top = [max(MAX_BAG_LENGTH, f.spec.max_len) + 1 for f in self.multi]
        histogram = [np.zeros(t + 1, np.int64) for t in top]
        train_rows = 0
        for segment, start, stop in self.sources()["train"]:
            for piece, a, b in self.segments[segment].blocks(start, stop):
                train_rows += b - a
                if self.scalar:
                    prov = self.piece_columns(segment, "prov", piece)
                    for f in self.scalar:
                        c = counts[id(f)]
                        c += np.bincount(prov[f.column, a:b], minlength=len(c))
                if self.value:
                    raw = self.piece_columns(segment, "raw", piece)
                    for f in self.value:
                        x = raw[f.column, a:b]
                        x = x[~np.isnan(x)]
                        moments[id(f)] += [len(x), x.sum(), np.square(x).sum()]
                if self.multi:
                    lengths = self.piece_columns(segment, "bag_lengths", piece)
                    for f in self.multi:
                        k = f.column
                        longest[k] = max(longest[k], int(lengths[k, a:b].max()))
                        clipped = np.minimum(lengths[k, a:b], top[k])
                        histogram[k] += np.bincount(clipped, minlength=top[k] + 1)
                        items = self.piece_items(segment, k, piece, lengths[k], a, b)
                        c = counts[id(f)]
                        c += np.bincount(items, minlength=len(c))
        if train_rows == 0:
            raise DataError("no training rows to fit the feature map on")
        builder = FeatureMapBuilder(self.schema)
        builder.rows = train_rows
        for f in self.fields:
            if f.role == "value":
                empty = pa.array([], pa.string())
                builder.merge_counts(f.spec.name, empty, np.zeros(0), moments=moments[id(f)])
                continue
            assert f.distinct is not None
            c = counts[id(f)][1:]  # provisional id 0 is "missing", never a value
            seen = np.flatnonzero(c)
            builder.merge_counts(
                f.spec.name,
                f.distinct.values.take(pa.array(seen)),
                c[seen],
                longest_bag=longest[f.column] if f.role == "multi" else 0,
            )
        feature_map = builder.build()
        infos = {info.name: info for info in feature_map.fields}
        truncated = {}
        for f in self.multi:
            slots = infos[f.spec.name].slots
            truncated[f.spec.name] = int(histogram[f.column][slots + 1 :].sum())
        return feature_map, {"truncated_bags": truncated}

    def lookups(self, feature_map: FeatureMap) -> dict[int, np.ndarray]:
        """Per scalar or bag field: provisional id → global feature id (int32)."""
        infos = {info.name: info for info in feature_map.fields}
        out = {}
        for f in self.scalar + self.multi:
            info: FieldInfo = infos[f.spec.name]
            assert f.distinct is not None
            table = np.empty(f.distinct.size + 1, np.int32)
            table[0] = info.offset + MISSING
            if f.distinct.size:
                table[1:] = info.offset + info.local_ids(f.distinct.values)
            out[id(f)] = table
        return out


class _Encoder:
    """Pass 2: provisional rows → final arrays of one split, written at block offsets."""

    def __init__(self, preparer: _Preparer, feature_map: FeatureMap) -> None:
        self.p = preparer
        self.fm = feature_map
        self.lookup = preparer.lookups(feature_map)
        self.infos = {info.name: info for info in feature_map.fields}
        self.slot_of: dict[str, int] = {}
        slot = 0
        for info in feature_map.fields:
            self.slot_of[info.name] = slot
            slot += info.slots

    def encode_block(self, segment: str, piece: _Piece, a: int, b: int) -> dict[str, np.ndarray]:
        p, fm = self.p, self.fm
        n = b - a
        ids = np.empty((n, fm.num_slots), np.int32)
        values = np.ones((n, fm.num_slots), np.float32) if fm.needs_values else None
        if p.scalar:
            prov = p.piece_columns(segment, "prov", piece)
            for f in p.scalar:
                ids[:, self.slot_of[f.spec.name]] = self.lookup[id(f)][prov[f.column, a:b]]
        if p.value:
            raw = p.piece_columns(segment, "raw", piece)
            assert values is not None
            for f in p.value:
                info, slot = self.infos[f.spec.name], self.slot_of[f.spec.name]
                x = raw[f.column, a:b]
                missing = np.isnan(x)
                ids[:, slot] = info.offset + np.where(missing, MISSING, FIRST_VALUE)
                values[:, slot] = np.where(missing, 0.0, (x - info.mean) / info.std)
        if p.multi:
            lengths = p.piece_columns(segment, "bag_lengths", piece)
            for f in p.multi:
                k = f.column
                items = p.piece_items(segment, k, piece, lengths[k], a, b)
                self._bag(f, self.lookup[id(f)][items], lengths[k, a:b], ids, values)
        out = {"ids": ids}
        if values is not None:
            out["values"] = values
        first, last = piece.first_row + a, piece.first_row + b
        if p.labeled:
            out["labels"] = _read(p.work(segment, "labels"), "<f4", first, last - first)
        out["lines"] = _read(p.work(segment, "lines"), "<i8", first, last - first)
        out["ordinals"] = _read(p.work(segment, "ordinals"), "<i8", first, last - first)
        return out

    def _bag(self, f: _Field, local: np.ndarray, lengths: np.ndarray, ids, values) -> None:
        """Fixed-width bag slots, as :meth:`FeatureMap._encode_bag` lays them out."""
        info, slot = self.infos[f.spec.name], self.slot_of[f.spec.name]
        lengths = lengths.astype(np.int64)
        n, width = len(lengths), info.slots
        starts = np.cumsum(lengths) - lengths
        row = np.repeat(np.arange(n), lengths)
        position = np.arange(len(local)) - starts[row]
        keep = position < width
        block = np.full((n, width), info.offset + MISSING, dtype=np.int32)
        block[row[keep], position[keep]] = local[keep]
        ids[:, slot : slot + width] = block
        kept = np.minimum(lengths, width)
        filled = np.arange(width)[None, :] < kept[:, None]
        weight = 1.0 / np.maximum(kept, 1) if info.spec.pooling == "mean" else np.ones(n)
        bag_values = np.where(filled, weight[:, None], 0.0).astype(np.float32)
        bag_values[kept == 0, 0] = 1.0  # an empty bag is one "missing" feature
        values[:, slot : slot + width] = bag_values

    def write_split(self, split: str, workers: int) -> dict[str, dict]:
        """Encode the split's pieces in ``workers`` threads, each writing at its rows' offset."""
        p, fm = self.p, self.fm
        blocks = []
        rows = 0
        for segment, start, stop in p.sources()[split]:
            for piece, a, b in p.segments[segment].blocks(start, stop):
                blocks.append((segment, piece, a, b, rows))
                rows += b - a
        shapes = {"ids": [rows, fm.num_slots], "lines": [rows], "ordinals": [rows]}
        if fm.needs_values:
            shapes["values"] = [rows, fm.num_slots]
        if p.labeled:
            shapes["labels"] = [rows]
        meta: dict[str, dict] = {}
        fds: dict[str, int] = {}
        try:
            for name, shape in shapes.items():
                relative = array_file(split, name)
                target = p.writer.path(relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                dtype = ARRAYS[name][1]
                fds[name] = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fds[name], int(np.prod(shape)) * np.dtype(dtype).itemsize)
                meta[name] = {"file": relative, "dtype": dtype, "shape": shape}

            def run(block) -> None:
                segment, piece, a, b, first = block
                for name, array in self.encode_block(segment, piece, a, b).items():
                    row_bytes = array.itemsize * (array.shape[1] if array.ndim == 2 else 1)
                    os.pwrite(fds[name], np.ascontiguousarray(array).data, first * row_bytes)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(run, blocks):
                    pass
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        return meta


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@contextmanager
def _large_buffers_from_mmap() -> Iterator[None]:
    """While preparing, glibc serves buffers of 1 MiB and more with mmap. After a large free glibc
    raises its mmap threshold (up to 32 MiB) and later block-sized buffers come from the heap,
    which fragments: peak RSS crept by ~50 MB between 1M and 10M rows.

    Afterwards the thresholds are set to glibc's dynamic upper bounds (mmap 32 MiB, trim 64 MiB),
    the state a long-running process reaches by itself: left at 1 MiB, a training run in the
    same process (``compare --criteo``, the benchmarks) mapped and zero-filled fresh pages for
    its activations at every step (33k instead of 48k samples/s, BENCHMARKS.md).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to do
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)


@_large_buffers_from_mmap()
def prepare_store(
    data_format: DataFormat,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    split: SplitSpec,
    valid_fraction: float = 0.1,
    seed: int = 0,
    min_count: int | None = None,
    bad_rows: BadRows | None = None,
    overwrite: bool = False,
    block_bytes: int = PREPARE_BLOCK_BYTES,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Prepare ``paths`` (read with ``data_format``) into the store ``out``; see module docs."""
    started = time.perf_counter()
    bad_rows = bad_rows or BadRows()
    schema = data_format.schema.with_options(min_count)
    workers = workers or min(2, os.cpu_count() or 1)
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"the validation fraction must be in [0, 1), got {valid_fraction}")
    say = progress or (lambda _text: None)
    digests: dict[str, str] = {}
    read_options: dict[str, Any] = {"digests": digests}
    read_options["block_bytes"] = block_bytes
    with StoreWriter(out, overwrite=overwrite) as writer:
        preparer = _Preparer(schema, writer, split, valid_fraction, seed)
        chunks = data_format.read(paths, bad_rows, **read_options)
        for chunk in Background(chunks, depth=1):
            preparer.add(chunk)
        if preparer.rows == 0:
            raise DataError("the input holds no usable rows", path=str(paths[0]) if paths else None)
        pa.default_memory_pool().release_unused()  # the parse buffers: peak memory, not rows
        parsed = time.perf_counter()
        say(f"read {preparer.rows:,} rows in {parsed - started:.1f} s; fitting the feature map")
        feature_map, stats = preparer.fit()
        encoder = _Encoder(preparer, feature_map)
        arrays = {s: encoder.write_split(s, workers) for s in SPLITS}
        writer.remove(_WORK)
        seconds = time.perf_counter() - started
        rows = {s: arrays[s]["ids"]["shape"][0] for s in SPLITS}
        manifest = _manifest(
            data_format, schema, paths, preparer, feature_map, stats, arrays, rows, bad_rows,
            digests, split, valid_fraction, seed, seconds, parsed - started,
        )  # fmt: skip
        path = writer.commit(manifest)
    return PrepareResult(manifest, path)


def _manifest(
    data_format, schema, paths, preparer, feature_map, stats, arrays, rows, bad_rows,
    digests, split, valid_fraction, seed, seconds, read_seconds,
) -> dict[str, Any]:  # fmt: skip
    sources = []
    for path in data_format.source_files(paths):
        key = str(path)
        sources.append(
            {
                "path": str(Path(path).resolve()),
                "bytes": Path(path).stat().st_size,
                "sha256": digests.get(key) or data_format.file_sha256(path),
                "rows": preparer.rows_by_source.get(key, 0),
            }
        )
    bad = bad_rows.to_dict()
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "deepfm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_format": data_format.name,
        "labeled": bool(preparer.labeled),
        "sources": sources,
        "split": {
            "spec": str(split),
            "valid_fraction": valid_fraction,
            "seed": seed,
            "rule": (
                "sequential: by ordinal among good rows, first share train (its last "
                "valid_fraction validates), rest test"
                if split.kind == "sequential"
                else "by a seeded hash of the row's ordinal among good rows (splits.assign)"
            ),
        },
        "rows": {**rows, "total": preparer.rows, "bad": bad_rows.total},
        "bad_rows": bad,
        "num_features": feature_map.num_features,
        "num_slots": feature_map.num_slots,
        "field_cardinalities": {info.name: info.size for info in feature_map.fields},
        # distinct values met in all rows (vocabulary candidates, before min_count)
        "distinct_values": {
            f.spec.name: f.distinct.size for f in preparer.fields if f.distinct is not None
        },
        "truncated_bags": stats["truncated_bags"],
        "arrays": arrays,
        "seconds": round(seconds, 3),
        "read_seconds": round(read_seconds, 3),
        "rows_per_s": round(preparer.rows / seconds) if seconds > 0 else None,
        "feature_map": feature_map.to_dict(),
    }


def print_summary(manifest: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    rows = manifest["rows"]
    print(
        f"rows: train {rows['train']:,}  valid {rows['valid']:,}  test {rows['test']:,}  "
        f"(total {rows['total']:,}, bad {rows['bad']:,})",
        file=out,
    )
    if manifest["bad_rows"]["by_reason"]:
        reasons = ", ".join(
            f"{k} {v:,}" for k, v in sorted(manifest["bad_rows"]["by_reason"].items())
        )
        print(f"bad rows by reason: {reasons}", file=out)
    print(
        f"features: {manifest['num_features']:,} in {len(manifest['field_cardinalities'])} fields; "
        f"rows_per_s: {manifest['rows_per_s']:,} ({manifest['seconds']:.1f} s)",
        file=out,
    )
