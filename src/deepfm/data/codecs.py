"""Field codecs: how one raw column becomes feature ids and values, fitted from counts.

Every path that encodes (``deepfm prepare``, in-memory ``train --data``, the predictor, the HTTP
server, ONNX inputs) goes through the codecs of this module, in two vectorised steps:

1. :meth:`Codec.tokens`: the raw column (an Arrow array, or Python values turned into one) as its
   *distinct keys* (sorted ``uint64``) and each row's index into them (``-1`` = missing);
2. :meth:`Codec.encode_tokens`: keys → local ids (a vectorised lookup in a sorted array), then
   one gather by the row indices → global ids ``[rows, slots]`` (and values).

Local ids inside a field: ``0`` = OOV (unseen, or rarer than ``min_count``), ``1`` = missing,
``2..`` = the vocabulary by decreasing training count, ties by key (below). Global id = the
field's offset + local id: one embedding table serves every field (the paper's ``V``).

**Keys.** A value of at most 8 bytes (UTF-8) is its own key: its bytes as a big-endian integer,
with the length in the low byte when shorter than 8 (``pack``). The key order is then the byte
order of the values, so ties broken by key are ties broken by value, as before codecs, for every
value of at most 8 bytes (Criteo's and Avazu's hex ids, indices, bucket tokens). A longer value's
key is a 64-bit hash. Integer tokens (bucketised numbers) are their own keys (sign bit flipped).
Each key comes with a 32-bit *check* (the length of a packed value, a second hash of a long one),
so two distinct values with one key (a hash collision, probability about n²/2⁶⁵ for n long
values) are detected when counting: such a key is left out of the vocabulary and both values map
to OOV, counted as ``collisions`` in the field's summary. A value that was never counted and
shares a key with a vocabulary value gets that value's id (probability about V/2⁶⁴ per value).

**Vocabularies** are two arrays, sorted keys and their local ids (12 bytes per value), with every
16th key kept as a *fence* so that a lookup searches a small array first. They are saved as
``.npy`` files and memory-mapped when loaded: opening a vocabulary of 50M values reads nothing.

**Counting** goes through :class:`KeyCounts`: blocks add ``(key, count, check)`` rows, sorted and
reduced in memory up to a byte budget, spilled to disk as sorted *runs* past it; the runs are
merged in key order (:func:`merge_runs`) and the vocabulary is assigned from the merged stream in
two streaming passes (:func:`fit_vocabulary`), so memory is set by the budget, not by the number of
distinct values.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.data.schema import MAX_BAG_LENGTH, FieldSpec
from deepfm.errors import ConfigError

OOV = 0
MISSING = 1
FIRST_VALUE = 2
#: values shown per field in the readable summary
TOP_VALUES = 20
#: the check of a key that two distinct values share
COLLIDED = np.uint32(0xFFFFFFFF)
#: rows read from each run per merge round, at least (the budget sets it above this)
MERGE_MIN_ROWS = 4096
#: counts of values below the min count kept per field for warm starts (the most frequent):
#: 16 bytes each, 4 MB a field at most
CARRIED_CAP = 1 << 18
_SIGN = np.uint64(1 << 63)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SECOND = np.uint64(0xC2B2AE3D27D4EB4F)


# -- keys ----------------------------------------------------------------------------------------


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, a bijection of uint64 (vectorised)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def string_offsets(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n + 1], data bytes) of a string array."""
    large = pa.types.is_large_string(values.type)
    buffers = values.buffers()
    n = len(values)
    offsets = np.frombuffer(buffers[1], np.int64 if large else np.int32)
    offsets = offsets[values.offset : values.offset + n + 1].astype(np.int64)
    data = np.zeros(0, np.uint8) if buffers[2] is None else np.frombuffer(buffers[2], np.uint8)
    return offsets, data


def string_keys(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(key uint64, check uint32) of each string of ``values`` (no nulls), vectorised.

    Values of at most 8 bytes are packed (see the module docs), longer ones hashed 8 bytes at a
    time with two independent 64-bit mixes (key and check)."""
    n = len(values)
    keys = np.zeros(n, np.uint64)
    checks = np.zeros(n, np.uint32)
    if n == 0:
        return keys, checks
    offsets, data = string_offsets(values)
    starts, lengths = offsets[:-1], np.diff(offsets)
    width = int(lengths[0])
    if width <= 8 and (lengths == width).all():
        # the usual case (hex ids, codes): one [n, width] block of bytes, no gather
        block = np.zeros((n, 8), np.uint8)
        block[:, :width] = data[offsets[0] : offsets[0] + n * width].reshape(n, width)
        keys = block.view(">u8").ravel().astype(np.uint64)
        if width < 8:
            keys |= np.uint64(width)
        checks[:] = width
        return keys, checks
    padded = np.concatenate([data[: offsets[-1]], np.zeros(8, np.uint8)])
    lane = np.arange(8)
    short = np.flatnonzero(lengths <= 8)
    if len(short):
        chunk = padded[starts[short][:, None] + lane]
        chunk[lane[None, :] >= lengths[short][:, None]] = 0
        packed = chunk.view(">u8").ravel().astype(np.uint64)
        keys[short] = packed | np.where(lengths[short] < 8, lengths[short], 0).astype(np.uint64)
        checks[short] = lengths[short]
    long = np.flatnonzero(lengths > 8)
    if len(long):
        keys[long], checks[long] = _long_keys(padded, starts[long], lengths[long])
    return keys, checks


def _long_keys(padded: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Two 64-bit hashes of byte strings longer than 8 bytes: (key, check)."""
    lane = np.arange(8)
    h = lengths.astype(np.uint64) * _GOLDEN
    g = lengths.astype(np.uint64) ^ _SECOND
    words = (lengths + 7) // 8
    with np.errstate(over="ignore"):
        for k in range(int(words.max())):
            active = np.flatnonzero(words > k)
            chunk = padded[(starts[active] + 8 * k)[:, None] + lane]
            chunk[lane[None, :] >= (lengths[active] - 8 * k)[:, None]] = 0  # the next value's
            word = chunk.view(np.uint64).ravel()
            h[active] = mix64(h[active] ^ word) + np.uint64(k + 1) * _GOLDEN
            g[active] = mix64(g[active] + word * _SECOND) ^ np.uint64(k + 7)
    check = (mix64(g) >> np.uint64(32)).astype(np.uint32)
    return mix64(h), np.minimum(check, COLLIDED - np.uint32(1))


def int_keys(tokens: np.ndarray) -> np.ndarray:
    """Keys of int64 tokens: the bits with the sign flipped, so key order is number order."""
    return np.asarray(tokens, np.int64).view(np.uint64) ^ _SIGN


def describe_key(key: int, check: int, kind: str) -> str | int:
    """A readable value for a key: the value itself when the key holds it (a packed string, an
    integer token), else ``#`` and the key in hex."""
    if kind == "int":
        bits = int(key) ^ (1 << 63)
        return bits - (1 << 64) if bits >= 1 << 63 else bits
    if check <= 8:
        raw = int(key).to_bytes(8, "big")[: check if check < 8 else 8]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return f"#{int(key):016x}"


# -- tokens: a column as distinct keys + row indices --------------------------------------------


@dataclass
class Tokens:
    """One column of raw values, ready to be counted or looked up.

    ``keys`` uint64 ``[distinct]`` sorted and unique, with their ``checks`` uint32; ``index``
    int32 ``[rows]`` (``[items]`` for a bag): position of each value in ``keys``, ``-1`` for a
    missing value; ``lengths`` int32 ``[rows]``: items per bag; ``numbers`` float64 ``[rows]``:
    the number of a value field (NaN = missing); ``values``: the raw values aligned with
    ``keys`` (only when asked for, to name the most frequent values).
    """

    keys: np.ndarray
    checks: np.ndarray
    index: np.ndarray
    lengths: np.ndarray | None = None
    numbers: np.ndarray | None = None
    values: pa.Array | None = None

    @property
    def rows(self) -> int:
        if self.numbers is not None:
            return len(self.numbers)
        return len(self.lengths) if self.lengths is not None else len(self.index)


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _merge_equal_keys(keys: np.ndarray, checks: np.ndarray):
    """(sorted distinct keys, their checks, one position of each in ``keys``, each entry's
    index int32 into them). A key whose entries' checks differ gets the check ``COLLIDED``.

    Like ``np.unique(keys, return_index=True, return_inverse=True)`` but with an unstable sort
    (~40% less time: np.unique's first positions need a stable one): any entry of a key may
    stand for it, as its check is either shared by all its entries or ``COLLIDED``."""
    order = np.argsort(keys)
    ordered = keys[order]
    starts = np.empty(len(keys), bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    inverse = np.empty(len(keys), np.int32)
    inverse[order] = np.cumsum(starts, dtype=np.int32) - 1
    first = order[starts]
    unique_checks = checks[first]
    differ = checks != unique_checks[inverse]
    if differ.any():
        unique_checks[inverse[differ]] = COLLIDED
    return ordered[starts], unique_checks, first, inverse


def _distinct(
    keys: np.ndarray,
    checks: np.ndarray,
    row_index: np.ndarray,
    dictionary: pa.Array | None,
) -> Tokens:
    """Tokens from per-entry keys of a dictionary and each row's entry (``-1`` = missing)."""
    unique, unique_checks, first, inverse = _merge_equal_keys(keys, checks)
    inverse = np.append(inverse, np.int32(-1))  # row entry -1 → missing
    index = inverse[row_index]
    values = None if dictionary is None else dictionary.take(pa.array(first))
    return Tokens(unique, unique_checks, index, values=values)


def _as_strings(parts: list[pa.Array]) -> pa.Array:
    parts = [p if pa.types.is_string(p.type) else p.cast(pa.string()) for p in parts]
    return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)


def _many_distinct(strings: pa.Array, sample: int = 2048) -> bool:
    """Whether most values of a sample of the column's head are distinct."""
    head = strings.slice(0, sample).drop_null()
    if len(head) < 64:
        return False
    return len(np.unique(string_keys(head)[0])) > len(head) // 2


def _row_tokens(strings: pa.Array, keep_values: bool) -> Tokens:
    """Tokens of plain strings keyed row by row, then sorted (for columns of many distinct
    values, where a hash table over the strings costs ~10x more: 81 ms against 8 for 65k rows
    of 65k distinct Criteo ids)."""
    valid = np.asarray(strings.is_valid())
    present = strings if valid.all() else strings.filter(pa.array(valid))
    keys, checks = string_keys(present)  # contiguous values: the fixed-width path applies
    offsets, _ = string_offsets(present)
    rows = np.flatnonzero(valid)
    nonempty = np.diff(offsets) > 0
    if not nonempty.all():  # an empty string is missing, as a null is
        rows, keys, checks = rows[nonempty], keys[nonempty], checks[nonempty]
        present = present.filter(pa.array(nonempty))
    unique, unique_checks, first, inverse = _merge_equal_keys(keys, checks)
    index = np.full(len(strings), -1, np.int32)
    index[rows] = inverse
    values = None
    if keep_values and (unique_checks > 8).any():  # only long values need their text kept
        values = present.take(pa.array(first))
    return Tokens(unique, unique_checks, index, values=values)


def string_tokens(column: pa.Array | pa.ChunkedArray, keep_values: bool = False) -> Tokens:
    """Tokens of a column of strings (plain or dictionary-encoded; other types are cast to
    strings). Null and empty values are missing. Plain strings of many distinct values are
    keyed row by row (:func:`_row_tokens`), others per distinct value."""
    parts = _chunks(column)
    if parts and not any(pa.types.is_dictionary(p.type) for p in parts):
        strings = _as_strings(parts)
        if _many_distinct(strings):
            return _row_tokens(strings, keep_values)
        parts = [strings]
    dictionaries, indices, base = [], [], 0
    for part in parts:
        if not pa.types.is_dictionary(part.type):
            if not pa.types.is_string(part.type) and not pa.types.is_large_string(part.type):
                part = part.cast(pa.string())
            part = pc.dictionary_encode(part)
        dictionary = part.dictionary
        if not pa.types.is_string(dictionary.type) and not pa.types.is_large_string(
            dictionary.type
        ):
            dictionary = dictionary.cast(pa.string())
        # int64 first: indices may be unsigned (polars' categoricals), where -1 does not fit
        indices_64 = part.indices.cast(pa.int64())
        entry = pc.fill_null(indices_64, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        indices.append(np.where(entry >= 0, entry + base, -1))
        dictionaries.append(dictionary)
        base += len(dictionary)
    if not dictionaries:
        return Tokens(np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.int32))
    dictionary = dictionaries[0] if len(dictionaries) == 1 else pa.concat_arrays(dictionaries)
    row_entry = np.concatenate(indices) if len(indices) > 1 else indices[0]
    # empty values are missing: renumber the non-empty dictionary entries
    lengths = pc.binary_length(dictionary).to_numpy(zero_copy_only=False)
    empty = (lengths == 0) | np.asarray(dictionary.is_null())
    if empty.any():
        keep = ~empty
        renumber = np.where(keep, np.cumsum(keep) - 1, -1)
        dictionary = dictionary.filter(pa.array(keep))
        row_entry = np.append(renumber, -1)[row_entry]
    keys, checks = string_keys(dictionary)
    return _distinct(keys, checks, row_entry, dictionary if keep_values else None)


def bucketize(x: np.ndarray) -> np.ndarray:
    """Criteo bucketing of finite numbers: ``int(x)`` if ``x <= 2`` else ``3 + floor(ln(x)^2)``."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        large = 3.0 + np.floor(np.log(np.where(x > 2, x, 3.0)) ** 2)
        return np.where(x > 2, large, np.trunc(x)).astype(np.int64)


def numbers_of(column: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """A numeric column as float64 with NaN for null."""
    if isinstance(column, np.ndarray):
        return column.astype(np.float64, copy=False)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_float64(column.type):
        column = column.cast(pa.float64())
    return column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def bucket_tokens(column: pa.Array | pa.ChunkedArray | np.ndarray) -> Tokens:
    """Tokens of a bucketised numeric column: the buckets of its distinct numbers."""
    if isinstance(column, np.ndarray):
        column = pa.array(column, pa.float64(), from_pandas=False)
    parts = [p if pa.types.is_float64(p.type) else p.cast(pa.float64()) for p in _chunks(column)]
    column = pa.chunked_array(parts, pa.float64())
    encoded = pc.dictionary_encode(column.combine_chunks())
    x = encoded.dictionary.to_numpy(zero_copy_only=False)
    entry = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    nan = np.isnan(x)
    if nan.any():  # NaN is missing, as a null is
        entry = np.where(np.append(nan, False)[entry], -1, entry)
    keys = int_keys(bucketize(np.where(nan, 0.0, x)))
    return _distinct(keys, np.zeros(len(keys), np.uint32), entry, None)


def bag_lists(column: pa.Array | pa.ChunkedArray, separator: str) -> pa.ListArray:
    """A column of bags as a list array of strings: a string column ``"a|b|c"`` is split on
    ``separator``, a list column (an in-memory table's) taken as it is, its items as text.
    Empty or null cells become ``[]``; empty or null items (``"a||b"``, a trailing separator)
    are dropped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        items = pc.list_flatten(column)  # the items of the non-null lists, in order
        if pa.types.is_dictionary(items.type):
            items = items.dictionary_decode()
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        lists = pa.ListArray.from_arrays(offsets, pc.fill_null(items.cast(pa.string()), ""))
    else:
        strings = pc.fill_null(column.cast(pa.string()), "")
        lists = pc.split_pattern(strings, pattern=separator)
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(flat, "")
    if pc.all(keep).as_py() is not False:
        return lists
    offsets = lists.offsets.to_numpy()
    kept = np.concatenate([[0], np.cumsum(keep.to_numpy(zero_copy_only=False))])
    return pa.ListArray.from_arrays(pa.array(kept[offsets]), flat.filter(keep))


def bag_tokens(column: pa.Array | pa.ChunkedArray, separator: str, keep_values=False) -> Tokens:
    """Tokens of a multi-valued column: one index per bag item, ``lengths`` per row."""
    lists = bag_lists(column, separator)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int32)
    tokens = string_tokens(pc.list_flatten(lists), keep_values)
    tokens.lengths = lengths
    return tokens


# -- vocabularies ------------------------------------------------------------------------------


class Vocabulary:
    """Sorted value keys (uint64) and their local ids (int32), looked up vectorised.

    ``lookup`` searches the fences (every ``FENCE``-th key, a small array) and then compares a
    window of ``FENCE`` keys: about 3x faster than ``np.searchsorted`` over 10M keys.
    """

    FENCE = 16

    def __init__(
        self,
        keys: np.ndarray,
        ids: np.ndarray,
        fences: np.ndarray | None = None,
        size: int | None = None,
    ) -> None:
        assert len(keys) == len(ids)
        self.keys = keys
        self.ids = ids
        self.fences = np.asarray(keys[:: self.FENCE]) if fences is None else fences
        # local ids: OOV, missing and one per value (more than the keys only where an old
        # feature map's colliding values were left out)
        self.size = FIRST_VALUE + len(keys) if size is None else size
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls) -> Vocabulary:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.int32))

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Local id (int32) of each key; OOV where the key is not in the vocabulary."""
        n = len(self.keys)
        if n == 0 or len(keys) == 0:
            return np.full(len(keys), OOV, np.int32)
        if n <= 4 * self.FENCE or len(keys) * 64 < n:
            position = np.searchsorted(self.keys, keys)
        else:
            segment = np.maximum(np.searchsorted(self.fences, keys, side="right") - 1, 0)
            low = segment * self.FENCE
            window = np.minimum(low[:, None] + np.arange(self.FENCE), n - 1)
            position = low + (self.keys[window] < keys[:, None]).sum(axis=1)
        position = np.minimum(position, n - 1)
        found = self.keys[position] == keys
        return np.where(found, self.ids[position], OOV).astype(np.int32)

    def extend(self, keys: np.ndarray) -> Vocabulary:
        """A vocabulary with ``keys`` (in the order given, e.g. by decreasing count) appended:
        new keys get the next local ids, known keys and every old id stay as they are (warm
        starts: the old embedding rows keep their values)."""
        keys = np.asarray(keys, np.uint64)
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # distinct, first occurrence order
        new = keys[self.lookup(keys) == OOV]
        ids = np.arange(self.size, self.size + len(new), dtype=np.int32)
        all_keys = np.concatenate([np.asarray(self.keys), new])
        all_ids = np.concatenate([np.asarray(self.ids), ids])
        order = np.argsort(all_keys, kind="stable")
        return Vocabulary(all_keys[order], all_ids[order])

    def digest(self) -> str:
        """sha256 of the keys and ids. A memory-mapped vocabulary is read with file reads (its
        pages would otherwise stay resident in this process)."""
        if self._digest is None:
            hasher = hashlib.sha256()
            step = 1 << 22
            for array in (self.keys, self.ids):
                for start in range(0, len(array), step):
                    count = min(step, len(array) - start)
                    if isinstance(array, np.memmap):
                        offset = array.offset + start * array.itemsize
                        piece = np.fromfile(array.filename, array.dtype, count, offset=offset)
                    else:
                        piece = np.ascontiguousarray(array[start : start + count])
                    hasher.update(piece.data)
            self._digest = hasher.hexdigest()
        return self._digest

    _PARTS: ClassVar[tuple[str, ...]] = ("keys", "ids", "fences")

    def save(self, stem: Path) -> None:
        """Write ``stem.keys.npy``, ``stem.ids.npy`` and ``stem.fences.npy``."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        for part in self._PARTS:
            target = stem.with_name(f"{stem.name}.{part}.npy")
            array = getattr(self, part)
            if isinstance(array, np.memmap) and Path(array.filename or "") == target.resolve():
                continue  # already there (a store's vocabulary reused in place)
            _save_npy(target, array)

    @classmethod
    def load(cls, stem: Path, size: int | None = None) -> Vocabulary:
        """Memory-map the three arrays written by :meth:`save` (nothing is read yet)."""
        arrays = []
        for part in cls._PARTS:
            path = stem.with_name(f"{stem.name}.{part}.npy")
            try:
                arrays.append(np.load(path, mmap_mode="r"))
            except FileNotFoundError:
                raise ConfigError(f"vocabulary file {path} is missing") from None
            except ValueError as exc:
                raise ConfigError(f"vocabulary file {path} is damaged: {exc}") from None
        keys, ids, fences = arrays
        if len(keys) != len(ids) or keys.dtype != np.uint64 or ids.dtype != np.int32:
            raise ConfigError(f"vocabulary {stem} is damaged: keys and ids do not match")
        return cls(keys, ids, fences, size)

    @classmethod
    def from_values(cls, values: Sequence, kind: str) -> tuple[Vocabulary, int]:
        """A vocabulary of ``values`` in id order (local id = ``FIRST_VALUE`` + position), and
        the number of colliding keys left out (old feature maps listed their values)."""
        if kind == "int":
            keys = int_keys(np.asarray(values, np.int64))
            checks = np.zeros(len(keys), np.uint32)
        else:
            keys, checks = string_keys(pa.array(list(values), pa.string()))
        ids = np.arange(FIRST_VALUE, FIRST_VALUE + len(keys), dtype=np.int32)
        order = np.argsort(keys, kind="stable")
        keys, ids, checks = keys[order], ids[order], checks[order]
        repeated = np.zeros(len(keys), bool)
        if len(keys) > 1:
            same = keys[1:] == keys[:-1]
            repeated[1:] |= same
            repeated[:-1] |= same
        vocabulary = cls(keys[~repeated], ids[~repeated], size=FIRST_VALUE + len(keys))
        return vocabulary, int(np.count_nonzero(repeated))


class VocabularySet:
    """Several fields' vocabularies looked up in one pass (a request's few rows of many fields,
    where one ``Vocabulary.lookup`` per field costs more in calls than in work).

    Every key is tagged with its field (``key ^ salt[field]``) and the tagged keys of all the
    vocabularies are sorted into one array, beside each entry's field and local id. A query
    matches an entry when both its tagged key and its field are equal, which means its key is
    equal: the ids are exactly each vocabulary's own :meth:`Vocabulary.lookup`. Salts are drawn
    (seeded) until no two entries share a tagged key. Costs 14 bytes per value, in memory.
    """

    def __init__(self, vocabularies: Sequence[Vocabulary]) -> None:
        sizes = np.array([len(v) for v in vocabularies], dtype=np.int64)
        keys = np.concatenate([np.zeros(0, np.uint64), *(np.asarray(v.keys) for v in vocabularies)])
        ids = np.concatenate([np.zeros(0, np.int32), *(np.asarray(v.ids) for v in vocabularies)])
        field_of = np.repeat(np.arange(len(vocabularies), dtype=np.uint16), sizes)
        rng = np.random.default_rng(0)
        while True:  # a repeated tagged key has probability ~n²/2⁶⁵ per draw
            salts = rng.integers(0, 2**63, len(vocabularies), dtype=np.int64).astype(np.uint64)
            tagged = keys ^ salts[field_of]
            order = np.argsort(tagged)
            tagged = tagged[order]
            if not (tagged[1:] == tagged[:-1]).any():
                break
        self.salts = salts
        self.tagged = tagged
        self.fields = field_of[order]
        self.ids = ids[order]

    def lookup(self, keys: np.ndarray, fields: np.ndarray) -> np.ndarray:
        """Local id (int32) of each key ``[n]`` in the vocabulary its ``fields`` entry ``[n]``
        names (a position in the list given); OOV where it is not there."""
        if len(self.tagged) == 0:
            return np.full(keys.shape, OOV, np.int32)
        tagged = keys ^ self.salts[fields]
        order = np.argsort(tagged)  # sorted queries search ~2x faster (each narrows the next)
        position = np.empty(len(tagged), np.int64)
        position[order] = np.searchsorted(self.tagged, tagged[order])
        position = np.minimum(position, len(self.tagged) - 1)
        found = (self.tagged[position] == tagged) & (self.fields[position] == fields)
        return np.where(found, self.ids[position], np.int32(OOV))


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` in slices (a memory map is never read whole)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    step = 1 << 22
    for start in range(0, len(array), step):
        out[start : start + step] = array[start : start + step]
    out.flush()
    del out


# -- counting in bounded memory ----------------------------------------------------------------


class Run:
    """A sorted run of ``(key, count, check)`` rows: in memory, or a file holding the three
    columns one after the other (``keys`` uint64, ``counts`` int64, ``checks`` uint32), read
    window by window (never mapped whole: a merge streams through it)."""

    BYTES = 20

    def __init__(self, keys=None, counts=None, checks=None, path: Path | None = None) -> None:
        self.path = path
        if path is not None:
            self.rows = path.stat().st_size // self.BYTES
        else:
            self.rows = len(keys)
            self._arrays = (keys, counts.astype(np.int64, copy=False), checks)

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` as three arrays."""
        if self.path is None:
            keys, counts, checks = self._arrays
            return keys[start:stop], counts[start:stop], checks[start:stop]
        count, n = stop - start, self.rows
        keys = np.fromfile(self.path, np.uint64, count, offset=8 * start)
        counts = np.fromfile(self.path, np.int64, count, offset=8 * n + 8 * start)
        checks = np.fromfile(self.path, np.uint32, count, offset=16 * n + 4 * start)
        return keys, counts, checks

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.read(0, self.rows)

    @classmethod
    def write(cls, path: Path, keys, counts, checks) -> Run:
        with open(path, "wb") as handle:
            for array in (keys, counts.astype(np.int64), checks):
                handle.write(np.ascontiguousarray(array).data)
        return cls(path=path)


def reduce_sorted(keys, counts, checks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the counts of equal keys (``keys`` sorted); a key whose checks differ is COLLIDED."""
    if len(keys) < 2:
        return keys, counts, checks
    new = np.concatenate([[True], keys[1:] != keys[:-1]])
    if new.all():
        return keys, counts, checks
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    group_checks = checks[starts]
    differ = np.bitwise_or.reduceat((checks != group_checks[group]).astype(np.uint8), starts)
    group_checks = np.where(differ.astype(bool), COLLIDED, group_checks)
    return keys[starts], np.add.reduceat(counts, starts), group_checks


def _sorted_union(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Rows of sorted pieces as one sorted, reduced piece."""
    if len(pieces) == 1:
        return reduce_sorted(*pieces[0])
    keys = np.concatenate([p[0] for p in pieces])
    order = np.argsort(keys, kind="stable")  # timsort: the pieces are sorted runs already
    counts = np.concatenate([p[1] for p in pieces])[order]
    checks = np.concatenate([p[2] for p in pieces])[order]
    return reduce_sorted(keys[order], counts, checks)


class KeyCounts:
    """``(key, count, check)`` counts of one field, added block by block (each block sorted by
    key, as :class:`Tokens` are). Past ``budget_bytes`` the pending blocks are merged into one
    sorted run, written to ``spill_dir`` if given (else kept in memory, merged with the others)."""

    def __init__(self, budget_bytes: int | None = None, spill_dir: Path | None = None) -> None:
        self.budget = budget_bytes
        self.spill_dir = spill_dir
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_bytes = 0
        self.runs: list[Run] = []

    def add(self, keys: np.ndarray, counts: np.ndarray, checks: np.ndarray) -> None:
        if len(keys) == 0:
            return
        self.pending.append((keys, counts.astype(np.int64, copy=False), checks))
        self.pending_bytes += Run.BYTES * len(keys)
        if self.budget is not None and self.pending_bytes > self.budget:
            self.flush()

    def flush(self) -> None:
        """Merge the pending blocks into one run (spilled, or merged in memory)."""
        if not self.pending:
            return
        pieces = self.pending
        if self.spill_dir is None:
            pieces = [*(r.arrays() for r in self.runs), *pieces]
            self.runs = []
        keys, counts, checks = _sorted_union(pieces)
        self.pending, self.pending_bytes = [], 0
        if self.spill_dir is None:
            self.runs.append(Run(keys, counts, checks))
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"run-{os.getpid()}-{secrets.token_hex(6)}.bin"
            self.runs.append(Run.write(path, keys, counts, checks))

    def finish(self) -> list[Run]:
        self.flush()
        return self.runs


def merge_runs(
    runs: Sequence[Run], budget_bytes: int = 256 << 20
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The rows of sorted ``runs`` merged in key order, equal keys reduced, in chunks: each
    round reads a window of every run (together about ``budget_bytes`` with the sort's copies),
    and takes the rows up to the smallest last key among the runs that go on (all rows of every
    run up to that key are then in the round)."""
    runs = [r for r in runs if len(r)]
    share = budget_bytes // (4 * Run.BYTES * max(len(runs), 1))
    chunk_rows = int(np.clip(share, MERGE_MIN_ROWS, 1 << 21))
    position = [0] * len(runs)
    while True:
        live = [i for i, r in enumerate(runs) if position[i] < len(r)]
        if not live:
            return
        windows = {}
        for i in live:
            stop = min(position[i] + chunk_rows, len(runs[i]))
            windows[i] = (stop, runs[i].read(position[i], stop))
        going_on = [w[0][-1] for i, (stop, w) in windows.items() if stop < len(runs[i])]
        bound = min(going_on) if going_on else None
        pieces = []
        for i, (_, (keys, counts, checks)) in windows.items():
            take = len(keys) if bound is None else int(np.searchsorted(keys, bound, side="right"))
            if take:
                pieces.append((keys[:take], counts[:take], checks[:take]))
            position[i] += take
        if pieces:
            yield _sorted_union(pieces)


@dataclass
class FittedVocabulary:
    vocabulary: Vocabulary
    distinct: int  # distinct keys counted (before min count)
    collisions: int  # keys shared by distinct values, left out
    top: list[tuple[int, int, int]]  # (key, count, check) of the most frequent values
    carried: CarriedCounts | None = None  # counts of the values below the min count


class NpyWriter:
    """A 1-D ``.npy`` file of known length written by appending (file writes, not a mapping:
    the pages go to the page cache, not to this process's memory)."""

    def __init__(self, path: Path, dtype, rows: int) -> None:
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": (rows,),
        }
        np.lib.format.write_array_header_1_0(self.handle, header)

    def write(self, array: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(array).data)

    def close(self) -> None:
        self.handle.close()


def fit_vocabulary(
    merged: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
    min_count: int,
    *,
    work_dir: Path | None = None,
    out_stem: Path | None = None,
    top: int = TOP_VALUES,
    carried_cap: int = 0,
) -> FittedVocabulary:
    """Vocabulary of the merged counts: keys counted at least ``min_count`` times (and not
    collided), local ids by decreasing count, ties by key.

    ``carried_cap``: the counts of at most that many keys below the min count (the most
    frequent) are kept as :class:`CarriedCounts` (warm starts count them again, see there);
    with ``out_stem`` they are written beside the vocabulary.

    Pass 1 keeps the qualifying rows (in files under ``work_dir`` if given, else in memory) and
    counts how many keys have each count; pass 2 gives each key ``FIRST_VALUE`` + (keys with a
    larger count) + (keys with its count and a smaller key), in key order, chunk by chunk. With
    ``out_stem`` the vocabulary is written there as it is made (and returned memory-mapped).
    """
    kept: list[Run] = []
    distinct = collisions = 0
    classes: dict[int, int] = {}
    below = CarriedCounts.empty()
    for keys, counts, checks in merged:
        distinct += len(keys)
        collided = checks == COLLIDED
        collisions += int(np.count_nonzero(collided))
        keep = (counts >= min_count) & ~collided
        if carried_cap:
            rest = ~keep & ~collided
            below = below.union(
                CarriedCounts(keys[rest], counts[rest].astype(np.float32), checks[rest]),
                cap=carried_cap,
            )
        piece = (keys[keep], counts[keep], checks[keep])
        if not len(piece[0]):
            continue
        values, sizes = np.unique(piece[1], return_counts=True)
        for value, size in zip(values.tolist(), sizes.tolist(), strict=True):
            classes[value] = classes.get(value, 0) + size
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
            kept.append(Run.write(work_dir / f"kept-{len(kept):06d}.bin", *piece))
        else:
            kept.append(Run(*piece))
    rows = sum(len(r) for r in kept)
    # ids: the count classes in decreasing order, each a contiguous range
    values = np.array(sorted(classes), dtype=np.int64)  # increasing
    sizes = np.array([classes[v] for v in values.tolist()], dtype=np.int64)
    above = np.cumsum(sizes[::-1])[::-1] - sizes  # keys with a larger count than each class
    used = np.zeros(len(values), np.int64)
    fences = -(-rows // Vocabulary.FENCE)
    writers: list[NpyWriter] = []
    if out_stem is not None:
        out_stem.parent.mkdir(parents=True, exist_ok=True)
        for part, dtype, n in (
            ("keys", np.uint64, rows),
            ("ids", np.int32, rows),
            ("fences", np.uint64, fences),
        ):
            writers.append(NpyWriter(out_stem.with_name(f"{out_stem.name}.{part}.npy"), dtype, n))
    out_keys: list[np.ndarray] = []
    out_ids: list[np.ndarray] = []
    best: list[tuple[int, int, int, int]] = []
    written = 0
    for run in kept:
        keys, counts, checks = run.arrays()
        cls = np.searchsorted(values, counts)
        order = np.argsort(cls, kind="stable")
        sorted_cls = cls[order]
        first = np.searchsorted(sorted_cls, sorted_cls, side="left")
        rank = np.empty(len(keys), np.int64)
        rank[order] = np.arange(len(keys)) - first
        ids = (FIRST_VALUE + above[cls] + used[cls] + rank).astype(np.int32)
        used += np.bincount(cls, minlength=len(values))
        if writers:
            writers[0].write(keys)
            writers[1].write(ids)
            writers[2].write(keys[-written % Vocabulary.FENCE :: Vocabulary.FENCE])
        else:
            out_keys.append(keys)
            out_ids.append(ids)
        written += len(keys)
        head = np.flatnonzero(ids < FIRST_VALUE + top)
        best.extend((int(ids[i]), int(keys[i]), int(counts[i]), int(checks[i])) for i in head)
        if run.path is not None:
            run.path.unlink()
    for writer in writers:
        writer.close()
    if out_stem is not None:
        vocabulary = Vocabulary.load(out_stem)
    elif out_keys:
        vocabulary = Vocabulary(np.concatenate(out_keys), np.concatenate(out_ids))
    else:
        vocabulary = Vocabulary.empty()
    best.sort()
    carried = below if carried_cap else None
    if carried is not None and out_stem is not None:
        carried.save(out_stem)
    return FittedVocabulary(
        vocabulary,
        distinct,
        collisions,
        [(key, count, check) for _, key, count, check in best],
        carried,
    )


class CarriedCounts:
    """Counts of values *not* in a vocabulary, carried from one fit or update to the next, so
    that a value seen a few times every day eventually passes the min count (warm starts,
    :mod:`deepfm.data.growth`). Sorted ``keys`` uint64, ``counts`` float32 (decayed counts are
    fractional), ``checks`` uint32; saved beside the vocabulary as ``<stem>.carried.*.npy``."""

    PARTS: ClassVar[tuple[str, ...]] = ("keys", "counts", "checks")

    def __init__(self, keys: np.ndarray, counts: np.ndarray, checks: np.ndarray) -> None:
        self.keys = np.asarray(keys, np.uint64)
        self.counts = np.asarray(counts, np.float32)
        self.checks = np.asarray(checks, np.uint32)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls) -> CarriedCounts:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.float32), np.zeros(0, np.uint32))

    def union(self, other: CarriedCounts, cap: int | None = None) -> CarriedCounts:
        """Counts of both summed by key (a key whose checks differ is ``COLLIDED``); with
        ``cap``, only the ``cap`` largest counts are kept (ties: the smaller key)."""
        keys, counts, checks = _sorted_union(
            [(self.keys, self.counts, self.checks), (other.keys, other.counts, other.checks)]
        )
        if cap is not None and len(keys) > cap:
            order = np.lexsort((keys, -counts))[:cap]
            order.sort()  # keys stay sorted
            keys, counts, checks = keys[order], counts[order], checks[order]
        return CarriedCounts(keys, counts, checks)

    def take(self, mask: np.ndarray) -> CarriedCounts:
        return CarriedCounts(self.keys[mask], self.counts[mask], self.checks[mask])

    def save(self, stem: Path) -> None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        for part in self.PARTS:
            _save_npy(stem.with_name(f"{stem.name}.carried.{part}.npy"), getattr(self, part))

    @classmethod
    def load(cls, stem: Path) -> CarriedCounts | None:
        """The counts saved beside the vocabulary ``stem``, or None when there are none (a
        bundle or store written before warm starts)."""
        paths = [stem.with_name(f"{stem.name}.carried.{part}.npy") for part in cls.PARTS]
        if not paths[0].exists():
            return None
        try:
            arrays = [np.load(path) for path in paths]
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"carried counts beside {stem} are damaged: {exc}") from None
        if len({len(a) for a in arrays}) != 1:
            raise ConfigError(f"carried counts beside {stem} are damaged: lengths differ")
        return cls(*arrays)


# -- statistics of the training rows -----------------------------------------------------------


@dataclass
class FieldStats:
    """Training statistics of one field, added block by block: value counts (bounded memory),
    bag lengths, moments of a value field, and the raw text of frequent long values (their keys
    are hashes: the summary names them from here)."""

    spec: FieldSpec
    counts: KeyCounts | None = None
    moments: np.ndarray = field(default_factory=lambda: np.zeros(3))
    bag_lengths: np.ndarray | None = None  # histogram, clipped at its last bin
    names: dict[int, tuple[int, str]] = field(default_factory=dict)  # key → (count, text)
    rows: int = 0

    NAMES_KEPT: ClassVar[int] = 256

    @classmethod
    def create(cls, spec: FieldSpec, budget_bytes=None, spill_dir=None) -> FieldStats:
        stats = cls(spec)
        if spec.kind in ("categorical", "multi") or (spec.kind == "numeric" and not spec.is_value):
            stats.counts = KeyCounts(budget_bytes, spill_dir)
        if spec.kind == "multi":
            stats.bag_lengths = np.zeros(max(MAX_BAG_LENGTH, spec.max_len) + 2, np.int64)
        return stats

    def add(self, tokens: Tokens, rows: np.ndarray | None = None) -> None:
        """Count the values of the rows selected by the boolean mask ``rows`` (all if None)."""
        self.rows += tokens.rows if rows is None else int(np.count_nonzero(rows))
        if self.spec.is_value:
            x = tokens.numbers if rows is None else tokens.numbers[rows]
            x = x[~np.isnan(x)]
            self.moments += [len(x), x.sum(), np.square(x).sum()]
            return
        index = tokens.index
        if tokens.lengths is not None:
            lengths = tokens.lengths if rows is None else tokens.lengths[rows]
            top = len(self.bag_lengths) - 1
            self.bag_lengths += np.bincount(np.minimum(lengths, top), minlength=top + 1)
            if rows is not None:
                index = index[np.repeat(rows, tokens.lengths)]
        elif rows is not None:
            index = index[rows]
        if self.counts is None:
            return
        counts = np.bincount(index[index >= 0], minlength=len(tokens.keys))
        seen = np.flatnonzero(counts)
        self.counts.add(tokens.keys[seen], counts[seen], tokens.checks[seen])

    def note_names(self, tokens: Tokens) -> None:
        """Remember the raw text of the block's most frequent long values (``tokens.values``
        must be there): the summary's top values are named from here. Bounded: the names with
        the largest block counts summed so far are kept."""
        if tokens.values is None or self.counts is None:
            return
        named = (tokens.checks > 8) & (tokens.checks != COLLIDED)
        if not named.any():
            return
        counts = np.bincount(tokens.index[tokens.index >= 0], minlength=len(tokens.keys))
        long = np.flatnonzero((counts > 0) & named)
        if len(long) > self.NAMES_KEPT:
            long = long[np.argpartition(-counts[long], self.NAMES_KEPT)[: self.NAMES_KEPT]]
        texts = tokens.values.take(pa.array(long)).to_pylist()
        for key, count, text in zip(
            tokens.keys[long].tolist(), counts[long].tolist(), texts, strict=True
        ):
            seen, _ = self.names.get(key, (0, text))
            self.names[key] = (seen + count, text)
        if len(self.names) > 4 * self.NAMES_KEPT:
            best = sorted(self.names.items(), key=lambda item: -item[1][0])[: self.NAMES_KEPT]
            self.names = dict(best)

    def absorb(self, other: FieldStats) -> None:
        """Add the statistics of ``other`` (counted elsewhere, e.g. in a worker)."""
        self.rows += other.rows
        self.moments += other.moments
        if self.bag_lengths is not None and other.bag_lengths is not None:
            self.bag_lengths += other.bag_lengths
        if self.counts is not None and other.counts is not None:
            self.counts.flush()
            self.counts.runs.extend(other.counts.finish())
            if self.counts.spill_dir is None and len(self.counts.runs) > 1:
                merged = _sorted_union([r.arrays() for r in self.counts.runs])
                self.counts.runs = [Run(*merged)]
        for key, (count, text) in other.names.items():
            seen, _ = self.names.get(key, (0, text))
            self.names[key] = (seen + count, text)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.counts is not None:
            assert not self.counts.pending, "flush before sending"
            state["counts"] = (
                self.counts.budget,
                self.counts.spill_dir,
                [r.path if r.path is not None else r.arrays() for r in self.counts.runs],
            )
        return state

    def __setstate__(self, state: dict) -> None:
        counts = state.pop("counts")
        self.__dict__.update(state)
        self.counts = None
        if counts is not None:
            budget, spill_dir, runs = counts
            self.counts = KeyCounts(budget, spill_dir)
            self.counts.runs = [Run(path=r) if isinstance(r, Path) else Run(*r) for r in runs]


# -- codecs -------------------------------------------------------------------------------------


@dataclass
class Codec:
    """A fitted field: its spec, where its ids start in the global table, its size and slots."""

    spec: FieldSpec
    offset: int = 0

    kind: ClassVar[str] = ""
    needs_values: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def size(self) -> int:
        """Local ids: rows of the global table this field owns."""
        raise NotImplementedError

    @property
    def slots(self) -> int:
        return 1

    def tokens(self, column: pa.Array | pa.ChunkedArray, keep_values: bool = False) -> Tokens:
        raise NotImplementedError

    #: how a value becomes a key: "string", "int" (bucketised numbers), or "" (no keys)
    key_kind: ClassVar[str] = ""

    def ids_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Local id (int32) of each value key: the rule of this codec."""
        raise NotImplementedError

    def local_ids(self, tokens: Tokens) -> np.ndarray:
        """Local id (int32) of each distinct key of ``tokens``."""
        return self.ids_of_keys(tokens.keys)

    def encode_tokens(self, tokens: Tokens) -> tuple[np.ndarray, np.ndarray | None]:
        """Global ids int32 ``[rows, slots]`` and values float32 ``[rows, slots]`` (None when
        every value is 1)."""
        local = np.append(self.local_ids(tokens), np.int32(MISSING))  # index -1 → missing
        ids = local[tokens.index] + np.int32(self.offset)
        return ids.reshape(-1, 1), None

    def encode(self, column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.encode_tokens(self.tokens(column))

    def local_id(self, value: Any) -> int:
        """The local id of one raw value (for inspection; encoding goes by columns)."""
        ids, _ = self.encode(pa.array([value]))
        return int(ids[0, 0]) - self.offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": asdict(self.spec),
            "offset": self.offset,
            "size": self.size,
            "slots": self.slots,
        }

    def vocabularies(self) -> dict[str, Vocabulary]:
        """Binary parts to save beside the JSON."""
        return {}


@dataclass
class VocabularyCodec(Codec):
    """A categorical field: each distinct value its id (``kind: vocabulary``)."""

    vocabulary: Vocabulary = field(default_factory=lambda: Vocabulary.empty())
    summary: dict[str, Any] = field(default_factory=dict)
    #: counts of values below the min count, for warm starts (not part of the encoding)
    carried: CarriedCounts | None = field(default=None, kw_only=True, repr=False)

    kind: ClassVar[str] = "vocabulary"

    @property
    def size(self) -> int:
        return self.vocabulary.size

    def tokens(self, column, keep_values=False) -> Tokens:
        return string_tokens(column, keep_values)

    key_kind: ClassVar[str] = "string"

    def ids_of_keys(self, keys: np.ndarray) -> np.ndarray:
        return self.vocabulary.lookup(keys)

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            **self.summary,
            "vocabulary": {"values": len(self.vocabulary), "sha256": self.vocabulary.digest()},
        }

    def vocabularies(self) -> dict[str, Vocabulary]:
        return {"vocabulary": self.vocabulary}


@dataclass
class BucketCodec(VocabularyCodec):
    """A numeric field bucketised into ids (``numeric: bucket``, the Criteo practice):
    ``int(x)`` for ``x <= 2`` and ``3 + floor(ln(x)^2)`` above, then a vocabulary of buckets."""

    kind: ClassVar[str] = "bucket"
    key_kind: ClassVar[str] = "int"

    def tokens(self, column, keep_values=False) -> Tokens:
        return bucket_tokens(column)


@dataclass
class BagCodec(VocabularyCodec):
    """A multi-valued field: ``slots`` ids per row (the bag, truncated, padded with the missing
    id), each with the value 1 (sum pooling) or 1/len (mean pooling); an empty bag is one
    missing feature."""

    bag_slots: int = 1

    kind: ClassVar[str] = "bag"
    key_kind: ClassVar[str] = ""  # a bag has several values per row: encoded by columns
    needs_values: ClassVar[bool] = True

    @property
    def slots(self) -> int:
        return self.bag_slots

    def tokens(self, column, keep_values=False) -> Tokens:
        return bag_tokens(column, self.spec.separator, keep_values)

    def encode_tokens(self, tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
        assert tokens.lengths is not None
        lengths = tokens.lengths.astype(np.int64)
        n, width = len(lengths), self.slots
        local = np.append(self.local_ids(tokens), np.int32(MISSING))[tokens.index]
        starts = np.cumsum(lengths) - lengths
        row = np.repeat(np.arange(n), lengths)
        position = np.arange(len(local)) - starts[row]
        keep = position < width
        ids = np.full((n, width), MISSING, dtype=np.int32)
        ids[row[keep], position[keep]] = local[keep]
        kept = np.minimum(lengths, width)
        filled = np.arange(width)[None, :] < kept[:, None]
        weight = 1.0 / np.maximum(kept, 1) if self.spec.pooling == "mean" else np.ones(n)
        values = np.where(filled, weight[:, None], 0.0).astype(np.float32)
        values[kept == 0, 0] = 1.0  # an empty bag is one "missing" feature
        return ids + np.int32(self.offset), values


@dataclass
class StandardCodec(Codec):
    """A numeric field kept as a value (``numeric: value``): one feature whose value is the
    number standardised with the training mean and standard deviation (0 when missing)."""

    mean: float = 0.0
    std: float = 1.0

    kind: ClassVar[str] = "standard"
    needs_values: ClassVar[bool] = True

    @property
    def size(self) -> int:
        return FIRST_VALUE + 1

    def tokens(self, column, keep_values=False) -> Tokens:
        empty = np.zeros(0, np.uint64)
        return Tokens(
            empty, np.zeros(0, np.uint32), np.zeros(0, np.int32), numbers=numbers_of(column)
        )

    def encode_tokens(self, tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
        x = tokens.numbers
        missing = np.isnan(x)
        ids = self.offset + np.where(missing, MISSING, FIRST_VALUE).astype(np.int32)
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.where(missing, 0.0, (x - self.mean) / self.std).astype(np.float32)
        return ids.reshape(-1, 1), values.reshape(-1, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "mean": self.mean, "std": self.std}


@dataclass
class HashedCodec(Codec):
    """A categorical field without a vocabulary (the hashing trick): a value's id is
    ``FIRST_VALUE + mix(key) mod buckets``. Unbounded id spaces cost ``buckets`` rows; distinct
    values that share a bucket share an embedding (about n²/(2·buckets) pairs for n values)."""

    buckets: int = 1
    summary: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "hashed"

    @property
    def size(self) -> int:
        return FIRST_VALUE + self.buckets

    def tokens(self, column, keep_values=False) -> Tokens:
        return string_tokens(column, keep_values)

    key_kind: ClassVar[str] = "string"

    def ids_of_keys(self, keys: np.ndarray) -> np.ndarray:
        bucket = mix64(keys ^ _GOLDEN) % np.uint64(self.buckets)
        return (bucket + np.uint64(FIRST_VALUE)).astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.summary, "buckets": self.buckets}


CODECS: dict[str, type[Codec]] = {
    c.kind: c for c in (VocabularyCodec, BucketCodec, BagCodec, StandardCodec, HashedCodec)
}


def codec_from_dict(data: dict[str, Any], vocabulary_stem: Path | None) -> Codec:
    """A codec from its JSON (``to_dict``) and, for vocabulary kinds, its saved arrays."""
    kind = data.get("kind")
    if kind not in CODECS:
        raise ConfigError(f"field {data.get('name')!r}: unknown codec kind {kind!r}")
    spec = FieldSpec(**data["spec"])
    offset = int(data["offset"])
    summary_keys = ("distinct", "collisions", "top", "min_count", "truncated_bags")
    summary = {k: v for k, v in data.items() if k in summary_keys}
    if kind == "standard":
        return StandardCodec(spec, offset, float(data["mean"]), float(data["std"]))
    if kind == "hashed":
        return HashedCodec(spec, offset, int(data["buckets"]), summary)
    assert vocabulary_stem is not None
    vocabulary = Vocabulary.load(vocabulary_stem, int(data["size"]))
    # the sha256 recorded when the vocabulary was written (the files themselves are checked by
    # the bundle's hashes); not read again, which would map every page of it into this process
    vocabulary._digest = data["vocabulary"].get("sha256")
    expected = data["vocabulary"]["values"]
    if len(vocabulary) != expected:
        raise ConfigError(
            f"field {spec.name!r}: vocabulary {vocabulary_stem} holds {len(vocabulary)} values, "
            f"the feature map says {expected}"
        )
    cls = CODECS[kind]
    carried = CarriedCounts.load(vocabulary_stem)
    if cls is BagCodec:
        return BagCodec(spec, offset, vocabulary, summary, int(data["slots"]), carried=carried)
    return cls(spec, offset, vocabulary, summary, carried=carried)


def field_tokens(spec: FieldSpec, column, keep_values: bool = False) -> Tokens:
    """Tokens of a raw column for a field of ``spec`` (before any codec is fitted: the codecs'
    own ``tokens`` call the same functions)."""
    if spec.kind == "numeric":
        if spec.is_value:
            return StandardCodec(spec).tokens(column)
        return bucket_tokens(column)
    if spec.kind == "multi":
        return bag_tokens(column, spec.separator, keep_values)
    return string_tokens(column, keep_values)


# -- fitting --------------------------------------------------------------------------------------


def fit_codec(
    stats: FieldStats,
    min_count: int,
    *,
    hash_buckets: int | None = None,
    work_dir: Path | None = None,
    out_stem: Path | None = None,
    budget_bytes: int = 256 << 20,
    carried_cap: int = CARRIED_CAP,
) -> Codec:
    """The codec of one field from its training statistics (offset 0; the feature map places it).

    ``hash_buckets``: a categorical field with more distinct training values than this is
    hashed into that many buckets instead of getting a vocabulary. ``carried_cap``: how many
    counts of values below the min count are kept for warm starts (:class:`CarriedCounts`)."""
    spec = stats.spec
    if spec.kind == "hashed":
        return HashedCodec(spec, buckets=spec.buckets)
    if spec.is_value:
        n, total, squares = stats.moments
        mean, std = 0.0, 1.0
        if n > 0:
            mean = float(total / n)
            std = float(np.sqrt(max(squares / n - mean**2, 0.0))) or 1.0
        return StandardCodec(spec, mean=mean, std=std)
    assert stats.counts is not None
    runs = stats.counts.finish()
    merged = merge_runs(runs, budget_bytes)
    fitted = fit_vocabulary(
        merged, min_count, work_dir=work_dir, out_stem=out_stem, carried_cap=carried_cap
    )
    for run in runs:
        if run.path is not None:
            run.path.unlink(missing_ok=True)
    kind = "int" if spec.kind == "numeric" else "string"
    top = [
        [stats.names[key][1] if key in stats.names else describe_key(key, check, kind), count]
        for key, count, check in fitted.top
    ]
    summary = {
        "distinct": fitted.distinct,
        "collisions": fitted.collisions,
        "min_count": min_count,
        "top": top,
    }
    if spec.kind == "categorical" and hash_buckets and fitted.distinct > hash_buckets:
        hashed = FieldSpec(spec.name, "hashed", buckets=hash_buckets)
        return HashedCodec(hashed, buckets=hash_buckets, summary={"distinct": fitted.distinct})
    if spec.kind == "multi":
        histogram = stats.bag_lengths
        longest = int(np.flatnonzero(histogram)[-1]) if histogram.any() else 0
        slots = spec.max_len or min(max(longest, 1), MAX_BAG_LENGTH)
        summary["truncated_bags"] = int(histogram[slots + 1 :].sum())
        return BagCodec(spec, 0, fitted.vocabulary, summary, slots, carried=fitted.carried)
    cls = BucketCodec if spec.kind == "numeric" else VocabularyCodec
    return cls(spec, 0, fitted.vocabulary, summary, carried=fitted.carried)
