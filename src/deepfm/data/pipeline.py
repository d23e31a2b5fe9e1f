"""In-memory preparation for files that fit in memory: read → split → fit feature map → encode.

Large files go through the streaming store (``deepfm prepare``) instead; both share the reader,
the split rules and the feature map, so they encode identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import FeatureMap, FeatureMapBuilder
from deepfm.data.formats import DataFormat
from deepfm.data.growth import DEFAULT_DECAY, Growth, grow_feature_map
from deepfm.data.reader import BadRows, RawChunk
from deepfm.data.schema import Schema
from deepfm.data.splits import TEST, TRAIN, VALID, SplitSpec, assign, time_codes
from deepfm.errors import DataError


@dataclass
class Dataset:
    """Encoded splits and the feature map fitted on the training rows."""

    feature_map: FeatureMap
    train: EncodedArrays
    valid: EncodedArrays
    test: EncodedArrays | None
    bad_rows: BadRows = field(default_factory=BadRows)
    #: a warm start's growth of the parent's feature map (None: the map was fitted here)
    growth: Growth | None = None
    #: the first and last value of the time column (time splits)
    time_range: tuple[str, str] | None = None

    def rows(self) -> dict[str, int]:
        out = {"train": len(self.train), "valid": len(self.valid)}
        out["test"] = len(self.test) if self.test is not None else 0
        out["bad"] = self.bad_rows.total
        return out


def build_dataset(
    chunks: Iterable[RawChunk],
    schema: Schema,
    *,
    split: SplitSpec,
    valid_fraction: float = 0.1,
    seed: int = 0,
    bad_rows: BadRows | None = None,
    base: FeatureMap | None = None,
    decay: float = DEFAULT_DECAY,
) -> Dataset:
    """Split the rows of ``chunks`` (in order; by time for a time split), fit on the training
    rows, encode every split. With ``base`` (a warm start) the map is ``base`` grown with the
    training rows (:func:`~deepfm.data.growth.grow_feature_map`, ``decay``), and no rows at all
    are allowed (nothing changes)."""
    chunks = list(chunks)
    total = sum(len(c) for c in chunks)
    if total == 0 and base is None:
        raise DataError("the input holds no usable rows")
    codes = _split_codes(chunks, split, total, valid_fraction, seed)
    builder = FeatureMapBuilder(schema if base is None else base.schema)
    for chunk, code in zip(chunks, codes.per_chunk, strict=True):
        builder.update(chunk, code == TRAIN)
    growth = None
    if base is None:
        feature_map = builder.build()
    else:
        growth = grow_feature_map(base, builder, decay=decay)
        feature_map = growth.feature_map
    encoded = EncodedArrays.concat(
        [feature_map.encode(c) for c in chunks], feature_map.num_slots, feature_map.needs_values
    )

    def part(which: int) -> EncodedArrays:
        return encoded.take(codes.order[codes.all[codes.order] == which])

    return Dataset(
        feature_map,
        part(TRAIN),
        part(VALID),
        part(TEST) if split.kind != "none" else None,
        bad_rows or BadRows(),
        growth,
        codes.time_range,
    )


@dataclass
class _Codes:
    all: np.ndarray  # split code of every row
    per_chunk: list[np.ndarray]
    order: np.ndarray  # the rows in split order (time order for a time split)
    time_range: tuple[str, str] | None = None


def _split_codes(
    chunks: list[RawChunk], split: SplitSpec, total: int, valid_fraction: float, seed: int
) -> _Codes:
    if split.kind == "time":
        missing = [c.path for c in chunks if split.column not in c.table.column_names]
        if missing:
            raise DataError(f"no time column {split.column!r} for --split {split}", path=missing[0])
        times = (
            np.concatenate(
                [c.table.column(split.column).to_numpy(zero_copy_only=False) for c in chunks]
            )
            if chunks
            else np.zeros(0, object)
        )
        codes, order = time_codes(times, valid_fraction)
        time_range = (str(times[order[0]]), str(times[order[-1]])) if total else None
    else:
        codes = assign(
            split, np.arange(total), total=total, valid_fraction=valid_fraction, seed=seed
        )
        order, time_range = np.arange(total), None
    bounds = np.cumsum([0, *(len(c) for c in chunks)])
    per_chunk = np.split(codes, bounds[1:-1]) if chunks else []
    return _Codes(codes, per_chunk, order, time_range)


def load_dataset(
    data_format: DataFormat,
    paths: Sequence[str | Path],
    *,
    split: SplitSpec,
    valid_fraction: float = 0.1,
    seed: int = 0,
    bad_rows: BadRows | None = None,
    min_count: int | None = None,
    hash_buckets: int | None = None,
    test_paths: Sequence[str | Path] | None = None,
    base: FeatureMap | None = None,
    decay: float = DEFAULT_DECAY,
) -> Dataset:
    """Read ``paths`` with ``data_format`` and build a :class:`Dataset`.

    With ``test_paths`` the test split is those files (encoded with the fitted map) and
    ``split`` should be ``none``. ``base``, ``decay``: a warm start's (:func:`build_dataset`).
    A time split reads its column beside the fields.
    """
    bad_rows = bad_rows or BadRows()
    schema = data_format.schema.with_options(min_count, hash_buckets)
    if split.kind == "time":
        data_format.keep_columns([split.column])
    dataset = build_dataset(
        data_format.read(paths, bad_rows),
        schema,
        split=split,
        valid_fraction=valid_fraction,
        seed=seed,
        bad_rows=bad_rows,
        base=base,
        decay=decay,
    )
    if test_paths:
        dataset.test = encode_files(dataset.feature_map, data_format, test_paths, bad_rows)
    return dataset


def encode_files(
    feature_map: FeatureMap,
    data_format: DataFormat,
    paths: Sequence[str | Path],
    bad_rows: BadRows,
) -> EncodedArrays:
    """Encode files with an already fitted feature map (unseen values → OOV), rows in order."""
    parts = [feature_map.encode(c) for c in data_format.read(paths, bad_rows)]
    return EncodedArrays.concat(parts, feature_map.num_slots, feature_map.needs_values)
