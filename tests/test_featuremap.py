import json

import numpy as np
import pyarrow as pa
import pytest

from deepfm.data.featuremap import (
    FIRST_VALUE,
    MISSING,
    OOV,
    FeatureMap,
    FeatureMapBuilder,
    bucketize,
)
from deepfm.data.formats import table_chunk
from deepfm.data.schema import FieldSpec, Schema


def chunk(**columns):
    return table_chunk(pa.table(columns))


SCHEMA = Schema(
    fields=(
        FieldSpec("color", min_count=2),
        FieldSpec("count", kind="numeric"),
        FieldSpec("price", kind="numeric", numeric="value"),
        FieldSpec("tags", kind="multi", separator="|", pooling="mean"),
    ),
    min_count=1,
)


def fitted(train_mask=None):
    data = chunk(
        color=["red", "red", "blue", "green", None, "teal"],
        count=pa.array([0.0, 1.0, 5.0, None, 100.0, 2.0]),
        price=pa.array([1.0, 3.0, None, 5.0, 7.0, 9.0]),
        tags=["a|b", "a", "", None, "b|c|a", "z"],
    )
    builder = FeatureMapBuilder(SCHEMA)
    builder.update(data, train_mask)
    return builder.build(), data


def local(feature_map, column, encoded_ids, field_index):
    info = feature_map.fields[field_index]
    return encoded_ids[:, column] - info.offset


def test_rare_and_unseen_values_map_to_oov_and_empty_to_missing():
    fm, _ = fitted()
    color = fm.fields[0]
    # blue, green, teal seen once < min_count 2
    assert len(color.vocabulary) == 1 and color.local_id("red") == FIRST_VALUE
    encoded = fm.encode(
        chunk(
            color=["red", "blue", "never-seen", None],
            count=pa.array([1.0] * 4),
            price=pa.array([1.0] * 4),
            tags=["a"] * 4,
        )
    )
    assert list(local(fm, 0, encoded.ids, 0)) == [FIRST_VALUE, OOV, OOV, MISSING]


def test_fitted_on_training_rows_only():
    train = np.array([True, True, True, False, False, False])
    fm, data = fitted(train)
    assert fm.fitted_rows == 3
    tags = fm.fields[3]
    assert tags.local_id("c") == OOV and tags.local_id("z") == OOV  # only in rows 4 and 5
    assert len(tags.vocabulary) == 2 and {tags.local_id("a"), tags.local_id("b")} == {2, 3}
    encoded = fm.encode(data)
    # teal is only in a non-training row: OOV even though it occurs once, like blue
    assert local(fm, 0, encoded.ids, 0)[5] == OOV


def test_numeric_buckets_and_values():
    assert list(bucketize(np.array([-1.0, 0.0, 1.5, 2.0, 3.0, 100.0]))) == [
        -1,
        0,
        1,
        2,
        3 + int(np.floor(np.log(3.0) ** 2)),
        3 + int(np.floor(np.log(100.0) ** 2)),
    ]
    fm, data = fitted()
    encoded = fm.encode(data)
    price = fm.fields[2]
    mean, std = np.mean([1, 3, 5, 7, 9]), np.std([1, 3, 5, 7, 9])
    assert price.mean == pytest.approx(mean) and price.std == pytest.approx(std)
    slot = 2
    assert encoded.values[0, slot] == pytest.approx((1 - mean) / std)
    assert encoded.ids[2, slot] - price.offset == MISSING and encoded.values[2, slot] == 0
    count_missing = encoded.ids[3, 1] - fm.fields[1].offset
    assert count_missing == MISSING


def test_bags_are_padded_and_mean_pooled():
    fm, data = fitted()
    tags = fm.fields[3]
    assert tags.slots == 3  # the longest training bag
    encoded = fm.encode(data)
    start = 3
    ids = encoded.ids[:, start : start + 3] - tags.offset
    values = encoded.values[:, start : start + 3]
    assert list(ids[0]) == [tags.local_id("a"), tags.local_id("b"), MISSING]
    assert tags.local_id("a") == FIRST_VALUE  # a: 3 times, b: twice
    np.testing.assert_allclose(values[0], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(values[4], [1 / 3] * 3)
    # empty and null bags are a single "missing" feature
    for row in (2, 3):
        assert ids[row, 0] == MISSING and list(values[row]) == [1.0, 0.0, 0.0]


def test_saved_and_loaded_map_encodes_identically(tmp_path):
    fm, data = fitted()
    fm.save(tmp_path)
    again = FeatureMap.load(tmp_path)
    assert json.loads(again.to_json()) == json.loads(fm.to_json())
    assert again.digest() == fm.digest()
    a, b = fm.encode(data), again.encode(data)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert fm.num_features == sum(f.size for f in fm.fields)
