"""The feature map: per-field vocabularies fitted on training rows, and the encoder they define.

Local ids inside a field: ``0`` = OOV (a value unseen in training, or seen fewer than
``min_count`` times), ``1`` = missing (empty cell, empty bag), ``2..`` = the vocabulary in order of
decreasing training count (ties by value, so fitting is deterministic). Global id = field
offset + local id: one embedding table serves every field (the paper's ``V``).

Numeric fields with ``numeric: bucket`` are turned into integer tokens before the vocabulary:
``int(x)`` for ``x <= 2`` and ``3 + floor(ln(x)^2)`` (natural logarithm) for ``x > 2``. This is
the Criteo-competition practice ``floor(ln(x)^2)``, shifted by 3 so that large values never share
a token with the small integers kept as they are. Fields with ``numeric: value`` keep one feature
whose value is the number standardised with the training mean and standard deviation.

The map is saved as JSON beside the model, so serving encodes exactly as training did.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.data.encoded import EncodedArrays
from deepfm.data.reader import RawChunk
from deepfm.data.schema import MAX_BAG_LENGTH, FieldSpec, Schema
from deepfm.errors import ConfigError, DataError

OOV = 0
MISSING = 1
FIRST_VALUE = 2
FORMAT_VERSION = 1
_COMPACT_AT = 2_000_000


def bucketize(x: np.ndarray) -> np.ndarray:
    """Criteo bucketing of finite numbers: ``int(x)`` if ``x <= 2`` else ``3 + floor(ln(x)^2)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        large = 3.0 + np.floor(np.log(np.where(x > 2, x, 3.0)) ** 2)
    return np.where(x > 2, large, np.trunc(x)).astype(np.int64)


def _plain(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def _bag_lists(column: pa.ChunkedArray, separator: str) -> pa.ListArray:
    """A string column of bags ``"a|b|c"`` as a list array; empty or null cells become ``[]``."""
    strings = pc.fill_null(column.combine_chunks().cast(pa.string()), "")
    lists = pc.split_pattern(strings, pattern=separator)
    flat = pc.list_flatten(lists)
    keep = pc.not_equal(flat, "")
    if pc.all(keep).as_py() is not False:
        return lists
    # drop empty items ("a||b", a trailing separator) without a per-row loop
    offsets = lists.offsets.to_numpy()
    kept = np.concatenate([[0], np.cumsum(keep.to_numpy(zero_copy_only=False))])
    return pa.ListArray.from_arrays(pa.array(kept[offsets]), flat.filter(keep))


@dataclass
class _Counts:
    """Streaming value counts of one field (values as an Arrow array, counts int64)."""

    values: list[pa.Array] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    pending: int = 0

    def add(self, values: pa.Array, counts: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.values.append(values)
        self.counts.append(counts.astype(np.int64))
        self.pending += len(values)
        if self.pending > _COMPACT_AT:
            self.compact()

    def add_tokens(self, tokens: pa.Array) -> None:
        """Count an array of raw tokens (no nulls)."""
        if len(tokens) == 0:
            return
        counted = pc.value_counts(tokens)
        self.add(counted.field("values"), counted.field("counts").to_numpy())

    def compact(self) -> tuple[pa.Array, np.ndarray]:
        if not self.values:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        table = pa.table(
            {"v": pa.concat_arrays(self.values), "c": pa.array(np.concatenate(self.counts))}
        )
        if len(self.values) > 1:
            table = table.group_by("v").aggregate([("c", "sum")]).rename_columns(["v", "c"])
        values, counts = table.column("v").combine_chunks(), table.column("c").to_numpy()
        self.values, self.counts, self.pending = [values], [counts], len(values)
        return values, counts


@dataclass
class FieldInfo:
    """A fitted field: its spec, where its ids start, its vocabulary and statistics."""

    spec: FieldSpec
    offset: int
    vocab: list  # tokens (str for categorical/multi, int for bucketised numerics)
    slots: int = 1
    mean: float = 0.0
    std: float = 1.0
    truncated_bags: int = 0
    _lookup: pa.Array | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return FIRST_VALUE + len(self.vocab)

    @property
    def name(self) -> str:
        return self.spec.name

    def lookup_array(self) -> pa.Array:
        if self._lookup is None:
            kind = pa.int64() if self.spec.kind == "numeric" else pa.string()
            self._lookup = pa.array(self.vocab, type=kind)
        return self._lookup

    def local_ids(self, tokens: pa.Array) -> np.ndarray:
        """Local ids of non-null tokens (unknown → OOV)."""
        found = pc.index_in(tokens, value_set=self.lookup_array())
        return pc.fill_null(pc.add(found, FIRST_VALUE), OOV).to_numpy().astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec.__dict__,
            "offset": self.offset,
            "size": self.size,
            "slots": self.slots,
            "vocab": self.vocab,
        }
        if self.spec.is_value:
            out.update(mean=self.mean, std=self.std)
        if self.truncated_bags:
            out["truncated_bags"] = self.truncated_bags
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FieldInfo:
        return cls(
            spec=FieldSpec(**data["spec"]),
            offset=int(data["offset"]),
            vocab=list(data["vocab"]),
            slots=int(data.get("slots", 1)),
            mean=float(data.get("mean", 0.0)),
            std=float(data.get("std", 1.0)),
            truncated_bags=int(data.get("truncated_bags", 0)),
        )


class FeatureMapBuilder:
    """Counts values over training rows, chunk by chunk, then fits a :class:`FeatureMap`."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.rows = 0
        self._counts = {spec.name: _Counts() for spec in schema.fields}
        self._moments = {spec.name: np.zeros(3) for spec in schema.fields if spec.is_value}
        self._longest = dict.fromkeys(schema.names, 0)

    def update(self, chunk: RawChunk, train_mask: np.ndarray | None = None) -> None:
        """Count the rows of ``chunk`` selected by ``train_mask`` (all rows when None)."""
        table = chunk.table if train_mask is None else chunk.table.filter(pa.array(train_mask))
        self.rows += table.num_rows
        for spec in self.schema.fields:
            column = table.column(spec.name)
            counts = self._counts[spec.name]
            if spec.kind == "categorical":
                for part in _plain(column):
                    if isinstance(part.type, pa.DictionaryType):
                        indices = part.indices.drop_null().to_numpy()
                        bins = np.bincount(indices, minlength=len(part.dictionary))
                        used = np.flatnonzero(bins)
                        counts.add(part.dictionary.take(pa.array(used)), bins[used])
                    else:
                        counts.add_tokens(part.cast(pa.string()).drop_null())
            elif spec.kind == "multi":
                lists = _bag_lists(column, spec.separator)
                lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
                if len(lengths):
                    self._longest[spec.name] = max(self._longest[spec.name], int(lengths.max()))
                counts.add_tokens(pc.list_flatten(lists))
            else:
                x = column.to_numpy(zero_copy_only=False).astype(np.float64)
                x = x[~np.isnan(x)]
                if spec.is_value:
                    self._moments[spec.name] += [len(x), x.sum(), np.square(x).sum()]
                else:
                    counts.add_tokens(pa.array(bucketize(x)))

    def merge_counts(
        self,
        name: str,
        values: pa.Array,
        counts: np.ndarray,
        *,
        longest_bag: int = 0,
        moments: tuple[float, float, float] | None = None,
    ) -> None:
        """Add statistics of field ``name`` counted elsewhere (the streaming store counts
        provisional ids): distinct ``values`` with their training ``counts``, the longest bag,
        and ``(n, sum, sum of squares)`` of a value field. ``rows`` is set by the caller."""
        self._counts[name].add(values, np.asarray(counts))
        self._longest[name] = max(self._longest[name], int(longest_bag))
        if moments is not None:
            self._moments[name] += np.asarray(moments, dtype=np.float64)

    def build(self) -> FeatureMap:
        if self.rows == 0:
            raise DataError("no training rows to fit the feature map on")
        infos: list[FieldInfo] = []
        offset = 0
        for spec in self.schema.fields:
            min_count = self.schema.min_count_of(spec)
            info = FieldInfo(spec=spec, offset=offset, vocab=[])
            if spec.is_value:
                n, total, squares = self._moments[spec.name]
                info.vocab = ["<value>"]
                if n > 0:
                    info.mean = total / n
                    info.std = float(np.sqrt(max(squares / n - info.mean**2, 0.0))) or 1.0
            else:
                values, counts = self._counts[spec.name].compact()
                keep = counts >= min_count
                values, counts = values.filter(pa.array(keep)), counts[keep]
                order = pc.sort_indices(
                    pa.table({"c": counts, "v": values}),
                    sort_keys=[("c", "descending"), ("v", "ascending")],
                )
                info.vocab = values.take(order).to_pylist()
            if spec.kind == "multi":
                longest = max(self._longest[spec.name], 1)
                info.slots = spec.max_len or min(longest, MAX_BAG_LENGTH)
            infos.append(info)
            offset += info.size
        return FeatureMap(self.schema, infos, fitted_rows=self.rows)


class FeatureMap:
    """Fitted vocabularies of every field; encodes raw chunks into :class:`EncodedArrays`."""

    def __init__(self, schema: Schema, fields: list[FieldInfo], fitted_rows: int = 0) -> None:
        self.schema = schema
        self.fields = fields
        self.fitted_rows = fitted_rows

    # -- layout --------------------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        """Rows of the global embedding table."""
        last = self.fields[-1]
        return last.offset + last.size

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def field_slots(self) -> list[int]:
        return [f.slots for f in self.fields]

    @property
    def num_slots(self) -> int:
        return sum(self.field_slots)

    @property
    def needs_values(self) -> bool:
        """Whether encoded samples carry values (a value field or a padded bag exists)."""
        return any(f.spec.is_value or f.spec.kind == "multi" for f in self.fields)

    def field_sizes(self) -> list[int]:
        return [f.size for f in self.fields]

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, chunk: RawChunk) -> EncodedArrays:
        """Encode one chunk (vectorised per field). Unknown values map to OOV, empty to missing."""
        table = chunk.table
        n = table.num_rows
        ids = np.empty((n, self.num_slots), dtype=np.int32)
        values = np.ones((n, self.num_slots), dtype=np.float32) if self.needs_values else None
        slot = 0
        for info in self.fields:
            if info.name not in table.column_names:
                raise DataError(f"input lacks the field {info.name!r}", path=chunk.path)
            column = table.column(info.name)
            kind = info.spec.kind
            if kind == "multi":
                bag_ids, bag_values = self._encode_bag(info, column)
                ids[:, slot : slot + info.slots] = bag_ids + info.offset
                values[:, slot : slot + info.slots] = bag_values
            elif info.spec.is_value:
                x = column.to_numpy(zero_copy_only=False).astype(np.float64)
                missing = np.isnan(x)
                ids[:, slot] = info.offset + np.where(missing, MISSING, FIRST_VALUE)
                values[:, slot] = np.where(missing, 0.0, (x - info.mean) / info.std)
            elif kind == "numeric":
                x = column.to_numpy(zero_copy_only=False).astype(np.float64)
                missing = np.isnan(x)
                local = info.local_ids(pa.array(bucketize(np.where(missing, 0.0, x))))
                ids[:, slot] = info.offset + np.where(missing, MISSING, local)
            else:
                ids[:, slot] = info.offset + self._encode_categorical(info, column)
            slot += info.slots
        labels = None
        if "label" in table.column_names:
            labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.float32)
        return EncodedArrays(ids, values, labels, chunk.lines)

    @staticmethod
    def _encode_categorical(info: FieldInfo, column: pa.ChunkedArray) -> np.ndarray:
        parts = []
        for part in _plain(column):
            if isinstance(part.type, pa.DictionaryType):
                # look up each distinct value once, then gather by the row's dictionary index
                dictionary_ids = info.local_ids(part.dictionary.cast(pa.string()))
                indices = part.indices.to_numpy(zero_copy_only=False)
                null = np.asarray(part.is_null())
                local = dictionary_ids[np.where(null, 0, indices).astype(np.int64)]
                parts.append(np.where(null, MISSING, local))
            else:
                strings = part.cast(pa.string())
                null = np.asarray(strings.is_null())
                local = info.local_ids(pc.fill_null(strings, ""))
                parts.append(np.where(null, MISSING, local))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)

    @staticmethod
    def _encode_bag(info: FieldInfo, column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        lists = _bag_lists(column, info.spec.separator)
        n, width = len(lists), info.slots
        offsets = lists.offsets.to_numpy().astype(np.int64)
        lengths = np.diff(offsets)
        local = info.local_ids(pc.list_flatten(lists))
        row = np.repeat(np.arange(n), lengths)
        position = np.arange(len(local)) - offsets[:-1][row]
        keep = position < width
        ids = np.full((n, width), MISSING, dtype=np.int32)
        ids[row[keep], position[keep]] = local[keep]
        kept = np.minimum(lengths, width)
        filled = np.arange(width)[None, :] < kept[:, None]
        weight = 1.0 / np.maximum(kept, 1) if info.spec.pooling == "mean" else np.ones(n)
        values = np.where(filled, weight[:, None], 0.0).astype(np.float32)
        values[kept == 0, 0] = 1.0  # an empty bag is one "missing" feature
        return ids, values

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "schema": self.schema.to_dict(),
            "fitted_rows": self.fitted_rows,
            "num_features": self.num_features,
            "fields": [f.to_dict() for f in self.fields],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def digest(self) -> str:
        """sha256 of the canonical JSON: two maps encode identically iff their digests match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureMap:
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"feature map format {data.get('format_version')} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        schema = Schema.from_dict(data["schema"])
        fields = [FieldInfo.from_dict(f) for f in data["fields"]]
        return cls(schema, fields, fitted_rows=int(data.get("fitted_rows", 0)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FeatureMap:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"feature map {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"feature map {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)
