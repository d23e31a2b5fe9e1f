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
from deepfm.data.reader import BadRows, RawChunk
from deepfm.data.schema import Schema
from deepfm.data.splits import TEST, TRAIN, VALID, SplitSpec, assign
from deepfm.errors import DataError


@dataclass
class Dataset:
    """Encoded splits and the feature map fitted on the training rows."""

    feature_map: FeatureMap
    train: EncodedArrays
    valid: EncodedArrays
    test: EncodedArrays | None
    bad_rows: BadRows = field(default_factory=BadRows)

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
) -> Dataset:
    """Split the rows of ``chunks`` (in order), fit on the training rows, encode every split."""
    chunks = list(chunks)
    total = sum(len(c) for c in chunks)
    if total == 0:
        raise DataError("the input holds no usable rows")
    codes, start = [], 0
    builder = FeatureMapBuilder(schema)
    for chunk in chunks:
        ordinals = np.arange(start, start + len(chunk))
        code = assign(split, ordinals, total=total, valid_fraction=valid_fraction, seed=seed)
        builder.update(chunk, code == TRAIN)
        codes.append(code)
        start += len(chunk)
    feature_map = builder.build()
    encoded = [feature_map.encode(c) for c in chunks]
    parts: dict[int, list[EncodedArrays]] = {TRAIN: [], VALID: [], TEST: []}
    for enc, code in zip(encoded, codes, strict=True):
        for which in parts:
            keep = code == which
            if keep.any():
                parts[which].append(enc.take(keep))

    def joined(which: int) -> EncodedArrays:
        return EncodedArrays.concat(parts[which], feature_map.num_slots, feature_map.needs_values)

    return Dataset(
        feature_map,
        joined(TRAIN),
        joined(VALID),
        joined(TEST) if split.kind != "none" else None,
        bad_rows or BadRows(),
    )


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
) -> Dataset:
    """Read ``paths`` with ``data_format`` and build a :class:`Dataset`.

    With ``test_paths`` the test split is those files (encoded with the fitted map) and
    ``split`` should be ``none``.
    """
    bad_rows = bad_rows or BadRows()
    schema = data_format.schema.with_options(min_count, hash_buckets)
    dataset = build_dataset(
        data_format.read(paths, bad_rows),
        schema,
        split=split,
        valid_fraction=valid_fraction,
        seed=seed,
        bad_rows=bad_rows,
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
