"""The feature map: one fitted codec per field, laid out in one global id space.

Each field's codec (:mod:`deepfm.data.codecs`) owns ``size`` consecutive rows of the global
embedding table starting at its ``offset``, and ``slots`` columns of an encoded row. The map is
fitted on training rows only (:class:`FeatureMapBuilder`, counting in bounded memory) and saved as
a small readable ``feature_map.json`` (fields, kinds, sizes, the most frequent values) plus the
binary vocabularies under ``vocab/`` (memory-mapped when loaded), so serving encodes exactly as
training did.

Local ids inside a field: ``0`` = OOV (a value unseen in training, or seen fewer than
``min_count`` times), ``1`` = missing (empty cell, empty bag), ``2..`` = the vocabulary in order of
decreasing training count (ties by key: by value for values of at most 8 bytes).

Numeric fields with ``numeric: bucket`` become integer tokens before the vocabulary: ``int(x)``
for ``x <= 2`` and ``3 + floor(ln(x)^2)`` (natural logarithm) for ``x > 2``: the Criteo-competition
practice ``floor(ln(x)^2)``, shifted by 3 so that large values never share a token with the small
integers kept as they are. Fields with ``numeric: value`` keep one feature whose value is the
number standardised with the training mean and standard deviation.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.common import read_json
from deepfm.data.codecs import (
    FIRST_VALUE,
    MISSING,
    OOV,
    BagCodec,
    BucketCodec,
    Codec,
    FieldStats,
    StandardCodec,
    Vocabulary,
    VocabularyCodec,
    VocabularySet,
    bucketize,
    codec_from_dict,
    field_tokens,
    fit_codec,
    int_keys,
    numbers_of,
    string_keys,
    string_offsets,
)
from deepfm.data.encoded import EncodedArrays
from deepfm.data.reader import RawChunk
from deepfm.data.schema import FieldSpec, Schema
from deepfm.errors import ConfigError, DataError

__all__ = [
    "FIRST_VALUE",
    "MISSING",
    "OOV",
    "FeatureMap",
    "FeatureMapBuilder",
    "bucketize",
]

FORMAT_VERSION = 2
#: inputs up to this many rows are keyed row by row across fields (see ``encode_columns``)
ROW_KEYS_UP_TO = 4096
FEATURE_MAP_FILE = "feature_map.json"
VOCABULARY_DIR = "vocab"


class FeatureMapBuilder:
    """Counts values over training rows, chunk by chunk, then fits a :class:`FeatureMap`.

    ``budget_bytes`` bounds the memory of each field's pending counts; past it they are sorted
    into runs, written to ``spill_dir`` when given (the streaming store) or merged in memory."""

    def __init__(
        self,
        schema: Schema,
        *,
        budget_bytes: int | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        self.schema = schema
        self.rows = 0
        self.spill_dir = spill_dir
        self.stats = {
            spec.name: FieldStats.create(
                spec, budget_bytes, None if spill_dir is None else spill_dir / f"{i:03d}"
            )
            for i, spec in enumerate(schema.fields)
        }

    def update(self, chunk: RawChunk, train_mask: np.ndarray | None = None) -> None:
        """Count the rows of ``chunk`` selected by ``train_mask`` (all rows when None)."""
        table = chunk.table
        self.rows += table.num_rows if train_mask is None else int(np.count_nonzero(train_mask))
        for spec in self.schema.fields:
            if spec.name not in table.column_names:
                raise DataError(f"input lacks the field {spec.name!r}", path=chunk.path)
            tokens = field_tokens(spec, table.column(spec.name), keep_values=True)
            self.stats[spec.name].add(tokens, train_mask)
            self.stats[spec.name].note_names(tokens)

    def build(self, vocabulary_dir: Path | None = None) -> FeatureMap:
        """Fit every field's codec; with ``vocabulary_dir`` the counting work files go there."""
        if self.rows == 0:
            raise DataError("no training rows to fit the feature map on")
        codecs = []
        for i, spec in enumerate(self.schema.fields):
            work = None if vocabulary_dir is None else vocabulary_dir / f"work-{i:03d}"
            codec = fit_codec(
                self.stats[spec.name],
                self.schema.min_count_of(spec),
                hash_buckets=self.schema.hash_buckets,
                work_dir=work,
            )
            codecs.append(codec)
        return FeatureMap.laid_out(self.schema, codecs, fitted_rows=self.rows)


class FeatureMap:
    """Fitted codecs of every field; encodes raw columns into :class:`EncodedArrays`."""

    def __init__(self, schema: Schema, fields: list[Codec], fitted_rows: int = 0) -> None:
        self.schema = schema
        self.fields = fields
        self.fitted_rows = fitted_rows
        self._slot = np.cumsum([0, *(f.slots for f in fields)]).tolist()
        self._names = [f.name for f in fields]

    @classmethod
    def laid_out(cls, schema: Schema, codecs: list[Codec], fitted_rows: int = 0) -> FeatureMap:
        """A map of ``codecs`` in order, each field's ids after the previous field's."""
        offset = 0
        for codec in codecs:
            codec.offset = offset
            offset += codec.size
        return cls(schema, codecs, fitted_rows)

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
        return self._slot[-1]

    @functools.cached_property
    def needs_values(self) -> bool:
        """Whether encoded samples carry values (a value field or a padded bag exists)."""
        return any(f.needs_values for f in self.fields)

    def field_sizes(self) -> list[int]:
        return [f.size for f in self.fields]

    def field(self, name: str) -> Codec:
        for codec in self.fields:
            if codec.name == name:
                return codec
        raise KeyError(name)

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, chunk: RawChunk) -> EncodedArrays:
        """Encode one chunk, field by field (each field vectorised). Unknown values map to OOV,
        empty ones to missing."""
        table = chunk.table
        for codec in self.fields:
            if codec.name not in table.column_names:
                raise DataError(f"input lacks the field {codec.name!r}", path=chunk.path)
        ids, values = self.encode_columns(
            {codec.name: table.column(codec.name) for codec in self.fields}, table.num_rows
        )
        labels = None
        if "label" in table.column_names:
            labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.float32)
        return EncodedArrays(ids, values, labels, chunk.lines)

    def encode_columns(
        self, columns: dict[str, pa.Array | pa.ChunkedArray], rows: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``ids [rows, slots]`` int32 and ``values`` float32 (None if not needed) of raw
        ``columns`` by field name; a column of length 1 is broadcast to every row. Fields
        without a column are left at id 0 and value 1 (a caller encoding a few fields).

        Up to ``ROW_KEYS_UP_TO`` rows (a request), the values of all string fields are keyed in
        one pass and those of all bucketised fields in another, each row's key looked up as it
        is (no per-field distinct values: their cost is per call, not per value); larger
        inputs go field by field through the distinct values. Both apply each codec's
        ``ids_of_keys``."""
        partial = len(columns) < len(self.fields)
        ids = (np.zeros if partial else np.empty)((rows, self.num_slots), dtype=np.int32)
        values = np.ones((rows, self.num_slots), dtype=np.float32) if self.needs_values else None
        keyed = self._encode_row_keys(columns, ids) if rows <= ROW_KEYS_UP_TO else set()
        for codec, name, slot in zip(self.fields, self._names, self._slot, strict=False):
            if name in keyed or name not in columns:
                continue
            field_ids, field_values = codec.encode(columns[codec.name])
            ids[:, slot : slot + codec.slots] = field_ids
            if field_values is not None:
                values[:, slot : slot + codec.slots] = field_values  # type: ignore[index]
        return ids, values

    @functools.cached_property
    def _row_plan(self) -> _RowPlan:
        return _RowPlan(self)

    def prepare_row_keys(self) -> None:
        """Build what encoding a request needs (the joint vocabulary lookup) now rather than on
        the first request: a server calls this while loading."""
        _ = self._row_plan

    def _encode_row_keys(self, columns: dict, ids: np.ndarray) -> set[str]:
        """Encode the single-slot keyed fields of a few rows (see ``encode_columns``) in a few
        passes; returns the names of the fields done.

        The values of all string fields are keyed in one pass, those of all bucketised fields
        in another; the keys of every field with a vocabulary are then looked up in one pass
        (:class:`VocabularySet`), the others (hashed fields, very large vocabularies) by their
        codec's ``ids_of_keys``."""
        plan = self._row_plan
        rows = len(ids)
        given = [j for j, name in enumerate(plan.names) if name in columns]
        strings = [j for j in given if j < len(plan.strings)]
        numbers = [j for j in given if j >= len(plan.strings)]
        keys, missing, lengths = [], [], []
        if strings:
            parts = [_plain_strings(columns[plan.names[j]]) for j in strings]
            joined = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
            if joined.null_count:  # (each Arrow compute call costs ~10 µs: a request's share)
                joined = pc.fill_null(joined, "")
            keys.append(string_keys(joined)[0])
            offsets, _ = string_offsets(joined)
            missing.append(offsets[1:] == offsets[:-1])  # "" (and null): the field's missing id
            lengths += [len(p) for p in parts]
        if numbers:
            parts = [numbers_of(columns[plan.names[j]]) for j in numbers]
            x = np.concatenate(parts)
            nan = np.isnan(x)
            keys.append(int_keys(bucketize(np.where(nan, 0.0, x))))
            missing.append(nan)
            lengths += [len(p) for p in parts]
        if not keys:
            return set()
        # every column holds a value per row, or one value broadcast to every row: its values
        # are looked up once, then spread over the rows
        done = np.array(strings + numbers)  # the plan's columns given, in key order
        flat_keys, flat_missing = np.concatenate(keys), np.concatenate(missing)
        counts = np.array(lengths)
        column = np.repeat(done, counts)
        starts = np.cumsum(counts) - counts
        local = np.empty(len(flat_keys), np.int32)
        if plan.all_joint:
            local[:] = plan.joint.lookup(flat_keys, plan.joint_field[column])
        else:
            joint = plan.joint_field[column] >= 0
            local[joint] = plan.joint.lookup(flat_keys[joint], plan.joint_field[column[joint]])
            for k, j in enumerate(done.tolist()):
                if j in plan.own_columns:
                    part = slice(starts[k], starts[k] + counts[k])
                    local[part] = plan.codecs[j].ids_of_keys(flat_keys[part])
        flat_ids = np.where(flat_missing, np.int32(MISSING), local) + plan.offsets[column]
        ids[:, plan.slots[done]] = flat_ids[starts + np.arange(rows)[:, None] * (counts > 1)]
        return {plan.names[j] for j in done.tolist()}

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The readable part: schema, layout and each field's summary (vocabularies by size and
        sha256; their arrays are saved beside the JSON)."""
        fields = []
        for i, codec in enumerate(self.fields):
            entry = codec.to_dict()
            if "vocabulary" in entry:
                entry["vocabulary"]["file"] = f"{VOCABULARY_DIR}/{i:03d}"
            fields.append(entry)
        return {
            "format_version": FORMAT_VERSION,
            "schema": self.schema.to_dict(),
            "fitted_rows": self.fitted_rows,
            "num_features": self.num_features,
            "fields": fields,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def digest(self) -> str:
        """sha256 of the canonical JSON (which holds each vocabulary's sha256): two maps encode
        identically iff their digests match."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save_vocabularies(self, directory: str | Path) -> None:
        """Write the binary vocabularies under ``directory/vocab/``."""
        for i, codec in enumerate(self.fields):
            stem = Path(directory) / VOCABULARY_DIR / f"{i:03d}"
            for vocabulary in codec.vocabularies().values():
                vocabulary.save(stem)
            carried = getattr(codec, "carried", None)
            if carried is not None:
                carried.save(stem)

    def save(self, directory: str | Path) -> Path:
        """Write ``feature_map.json`` and the vocabularies into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_vocabularies(directory)
        path = directory / FEATURE_MAP_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: str | Path | None = None) -> FeatureMap:
        """The map of ``to_dict``; its vocabularies are memory-mapped from ``directory``."""
        version = data.get("format_version")
        if version == 1:
            return _from_format_1(data)
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"feature map format {version} is not supported (this version reads formats 1 "
                f"and {FORMAT_VERSION}): prepare the store or train the model again"
            )
        schema = Schema.from_dict(data["schema"])
        codecs = []
        for entry in data["fields"]:
            stem = None
            if "vocabulary" in entry:
                if directory is None:
                    raise ConfigError("this feature map's vocabularies live beside its JSON")
                stem = Path(directory) / entry["vocabulary"]["file"]
            codecs.append(codec_from_dict(entry, stem))
        return cls(schema, codecs, fitted_rows=int(data.get("fitted_rows", 0)))

    @classmethod
    def load(cls, path: str | Path) -> FeatureMap:
        """Load ``feature_map.json`` (or a directory holding it) and map its vocabularies."""
        path = Path(path)
        if path.is_dir():
            path = path / FEATURE_MAP_FILE
        data = read_json(path, "the feature map")
        try:
            return cls.from_dict(data, path.parent)
        except (OSError, LookupError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"feature map {path} is damaged: {exc!r}") from None


def _plain_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one plain string array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column if pa.types.is_string(column.type) else column.cast(pa.string())


def _from_format_1(data: dict[str, Any]) -> FeatureMap:
    """A feature map written before codecs (vocabularies as JSON lists, ids by list position):
    the same ids, as binary vocabularies in memory. Two listed values with one key (a 64-bit
    collision between long values) both become OOV, counted in the field's ``collisions``."""
    schema = Schema.from_dict(data["schema"])
    codecs: list[Codec] = []
    for entry in data["fields"]:
        spec = FieldSpec(**entry["spec"])
        offset = int(entry["offset"])
        if spec.is_value:
            mean, std = float(entry.get("mean", 0.0)), float(entry.get("std", 1.0))
            codecs.append(StandardCodec(spec, offset, mean, std))
            continue
        kind = "int" if spec.kind == "numeric" else "string"
        vocabulary, collisions = Vocabulary.from_values(entry["vocab"], kind)
        summary = {"collisions": collisions} if collisions else {}
        if spec.kind == "multi":
            codecs.append(BagCodec(spec, offset, vocabulary, summary, int(entry["slots"])))
        elif spec.kind == "numeric":
            codecs.append(BucketCodec(spec, offset, vocabulary, summary))
        else:
            codecs.append(VocabularyCodec(spec, offset, vocabulary, summary))
    return FeatureMap(schema, codecs, fitted_rows=int(data.get("fitted_rows", 0)))


#: vocabulary values (all fields together) that the joint lookup of requests holds in memory, 14
#: bytes each: fields are added smallest first; larger ones keep their own (memory-mapped) lookup
JOINT_LOOKUP_VALUES = 1 << 22


class _RowPlan:
    """What encoding a few rows needs, worked out once per feature map: the single-slot keyed
    fields in key order (string fields, then bucketised ones), their slots and offsets, and the
    joint vocabulary lookup of those with a vocabulary (see ``FeatureMap._encode_row_keys``)."""

    def __init__(self, feature_map: FeatureMap) -> None:
        slot_of = dict(zip((c.name for c in feature_map.fields), feature_map._slot, strict=False))
        keyed = [c for c in feature_map.fields if c.slots == 1]
        self.strings = [c for c in keyed if c.key_kind == "string"]
        self.numbers = [c for c in keyed if c.key_kind == "int"]
        self.codecs: list[Codec] = [*self.strings, *self.numbers]
        self.names = [c.name for c in self.codecs]
        self.slots = np.array([slot_of[c.name] for c in self.codecs], dtype=np.int64)
        self.offsets = np.array([c.offset for c in self.codecs], dtype=np.int32)
        with_vocabulary = sorted(
            (len(c.vocabulary), j)
            for j, c in enumerate(self.codecs)
            if isinstance(c, VocabularyCodec)
        )
        joint, total = [], 0
        for size, j in with_vocabulary:
            if total + size > JOINT_LOOKUP_VALUES:
                break
            joint.append(j)
            total += size
        joint.sort()
        #: each column's field in the joint lookup (-1: looked up by its codec)
        self.joint_field = np.full(len(self.codecs), -1, dtype=np.int64)
        self.joint_field[joint] = np.arange(len(joint))
        self.joint = VocabularySet([self.codecs[j].vocabulary for j in joint])  # type: ignore[attr-defined]
        self.own_columns = [j for j in range(len(self.codecs)) if self.joint_field[j] < 0]
        self.all_joint = not self.own_columns
