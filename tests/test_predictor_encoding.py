"""Records encoded for serving (checked, turned into columns, encoded by the codecs) equal the
training path (a file of the same values, read by the CSV reader and encoded by the same codecs)
on every kind of field, for any JSON-like value: same ids, same values, or both refuse."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfm.data.featuremap import FeatureMap, FeatureMapBuilder
from deepfm.data.formats import table_chunk
from deepfm.data.schema import FieldSpec, Schema
from deepfm.errors import DataError
from deepfm.serve.encoding import RecordColumns, bag_text, number_of, text_of

SCHEMA = Schema(
    fields=(
        FieldSpec("cat", min_count=2),
        FieldSpec("num", kind="numeric"),
        FieldSpec("val", kind="numeric", numeric="value"),
        FieldSpec("bag", kind="multi", separator="|", max_len=3),
        FieldSpec("mean_bag", kind="multi", separator=",", pooling="mean", max_len=2),
    ),
    label=None,
)
TOKENS = ["a", "b", "c", "7", "12", "true", "x y"]


def fitted_map() -> FeatureMap:
    rng = np.random.default_rng(0)
    n = 300

    def bag(sep: str) -> list[str | None]:
        return [
            sep.join(rng.choice(TOKENS, rng.integers(0, 4))) if rng.random() > 0.1 else None
            for _ in range(n)
        ]

    table = pa.table(
        {
            "cat": pa.array([str(v) for v in rng.choice([*TOKENS, "rare"], n)]),
            "num": pa.array(np.round(rng.exponential(20, n)) - 1),
            "val": pa.array(rng.normal(3.0, 2.0, n)),
            "bag": pa.array(bag("|"), pa.string()),
            "mean_bag": pa.array(bag(","), pa.string()),
        }
    )
    builder = FeatureMapBuilder(SCHEMA)
    builder.update(table_chunk(table))
    return builder.build()


FEATURE_MAP = fitted_map()
ENCODER = RecordColumns(FEATURE_MAP)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 10**6),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-50, 1e6).map(round).map(float),
    st.sampled_from([*TOKENS, "", " ", "a|b", "b,c", "|", "1e3", "nan", "-4"]),
    st.text(max_size=6),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=5),
    st.dictionaries(st.text(max_size=2), scalars, max_size=2),
)
records = st.lists(
    st.dictionaries(st.sampled_from(SCHEMA.names), values, max_size=5), min_size=1, max_size=8
)


def reference(rows: list[dict]):
    """The records written as a CSV file (each value as its text, as a client would export it)
    and encoded by the training path: the reader, then FeatureMap.encode."""
    columns = {}
    for spec in SCHEMA.fields:
        raw = [row.get(spec.name) for row in rows]
        try:
            if spec.kind == "numeric":
                column = pa.array([number_of(v) for v in raw], pa.float64())
            elif spec.kind == "multi":
                column = pa.array([bag_text(v, spec.separator) for v in raw], pa.string())
            else:
                column = pa.array([text_of(v) for v in raw], pa.string())
        except ValueError as exc:
            raise DataError(str(exc)) from None
        columns[spec.name] = column
    with np.errstate(all="ignore"):
        return FEATURE_MAP.encode(table_chunk(pa.table(columns)))


def assert_same(rows: list[dict], got_fn) -> None:
    try:
        expected = reference(rows)
        # a value field standardised past float32 is inf in the training path; serving refuses
        refused = expected.values is not None and not np.isfinite(expected.values).all()
    except DataError:
        refused = True
    if refused:
        with pytest.raises(DataError):
            got_fn()
        return
    got = got_fn()
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.values, expected.values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_encoder_equals_feature_map_encode(rows):
    assert_same(rows, lambda: ENCODER.encode(rows))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records, st.dictionaries(st.sampled_from(SCHEMA.names), values, max_size=5))
def test_shared_values_equal_merged_records(rows, shared):
    merged = [{**shared, **row} for row in rows]
    assert_same(merged, lambda: ENCODER.encode(rows, shared))


def test_known_values_hit_their_ids_and_bags_pool():
    [row] = ENCODER.encode([{"cat": "a", "bag": ["a", "zzz", "b", "c"], "mean_bag": "a,b"}]).ids
    info = {f.name: f for f in FEATURE_MAP.fields}
    cat = info["cat"]
    assert row[0] == cat.offset + cat.local_id("a") and cat.local_id("a") >= 2
    bag = info["bag"]
    # the first 3 items fill the 3 slots; an unseen item is the field's OOV (local id 0)
    a, b = bag.offset + bag.local_id("a"), bag.offset + bag.local_id("b")
    assert list(row[3:6]) == [a, bag.offset, b] and min(a, b) >= bag.offset + 2
    values = ENCODER.encode([{"mean_bag": "a,b", "bag": None}]).values[0]
    np.testing.assert_array_equal(values[6:8], [0.5, 0.5])  # mean pooling over two items
    np.testing.assert_array_equal(values[3:6], [1.0, 0.0, 0.0])  # an empty bag: one missing id


def test_errors_name_the_record_and_field():
    with pytest.raises(DataError, match=r"records\[1\], field 'val': NaN or infinite"):
        ENCODER.encode([{"val": 1.0}, {"val": float("inf")}])
    with pytest.raises(DataError, match=r"records\[0\], field 'bag': a bag holds values"):
        ENCODER.encode([{"bag": [["a"]]}])
    with pytest.raises(DataError, match=r"user/context, field 'cat'"):
        ENCODER.encode([{}], {"cat": {"x": 1}})


#: the real samples of the formats other than Criteo's (whose rows conftest generates)
REAL_SAMPLES = {
    "avazu": ("avazu", "avazu_train_sample.csv"),
    "frappe": ("frappe", "frappe.validation.libfm"),
    "ipinyou": ("ipinyou", "train.fm.txt"),
    "movielens-100k": ("movielens_100k",),
}


@pytest.mark.parametrize("fmt", ["criteo", "criteo-csv", *sorted(REAL_SAMPLES)])
def test_records_encode_as_files_do_on_a_sample_of_every_format(fmt, generated_criteo):
    """Each sample read from its file and encoded (the training path) equals its rows sent as
    JSON-like records through the serving layer, id for id and value for value."""
    from conftest import shared_file
    from deepfm.data.formats import get_format
    from deepfm.data.reader import BadRows

    data_format = get_format(fmt)
    if fmt.startswith("criteo"):
        path = generated_criteo.train if fmt == "criteo" else generated_criteo.csv
    else:
        path = shared_file(*REAL_SAMPLES[fmt])
    chunks = list(data_format.read([str(path)], BadRows()))
    builder = FeatureMapBuilder(data_format.schema)
    for chunk in chunks:
        builder.update(chunk)
    feature_map = builder.build()
    encoder = RecordColumns(feature_map)
    for chunk in chunks:
        expected = feature_map.encode(chunk)
        columns = {name: chunk.table.column(name).to_pylist() for name in encoder.names}
        records = [
            dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
        ]
        got = encoder.encode(records)
        np.testing.assert_array_equal(got.ids, expected.ids)
        if expected.values is not None:
            np.testing.assert_array_equal(got.values, expected.values)


# -- the value memo: what it returns is what the codecs give, whatever was seen before ---------

FLAT_SCHEMA = Schema(
    fields=(
        FieldSpec("cat", min_count=2),
        FieldSpec("num", kind="numeric"),
        FieldSpec("val", kind="numeric", numeric="value"),
        FieldSpec("hash", kind="hashed", buckets=97),
    ),
    label=None,
)


def flat_map() -> FeatureMap:
    """A feature map of single-slot fields only (bags keep the codecs' path)."""
    rng = np.random.default_rng(1)
    n = 300
    table = pa.table(
        {
            "cat": pa.array([str(v) for v in rng.choice([*TOKENS, "1", "0", "rare"], n)]),
            "num": pa.array(np.round(rng.exponential(20, n)) - 1),
            "val": pa.array(rng.normal(3.0, 2.0, n)),
            "hash": pa.array([str(v) for v in rng.choice(TOKENS, n)]),
        }
    )
    builder = FeatureMapBuilder(FLAT_SCHEMA)
    builder.update(table_chunk(table))
    return builder.build()


FLAT_MAP = flat_map()
# one memo kept across every example below, small enough to be emptied often: stale or
# colliding entries from earlier examples would show as a difference
MEMO_ENCODER = RecordColumns(FLAT_MAP, memo_values=64)
PLAIN_ENCODER = RecordColumns(FLAT_MAP, memo_values=0)
flat_records = st.lists(
    st.dictionaries(st.sampled_from(FLAT_SCHEMA.names), scalars, max_size=4), min_size=1, max_size=8
)


# records that all carry the same fields (a ranking's candidates): remembered whole
uniform_records = st.sets(st.sampled_from(FLAT_SCHEMA.names), min_size=2).flatmap(
    lambda keys: st.lists(
        st.fixed_dictionaries({key: scalars for key in sorted(keys)}), min_size=1, max_size=8
    )
)


def _outcome(encode):
    try:
        got = encode()
    except DataError as exc:
        return str(exc)
    return got.ids.tolist(), None if got.values is None else got.values.tolist()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(flat_records, uniform_records),
    st.dictionaries(st.sampled_from(FLAT_SCHEMA.names), scalars, max_size=4),
    st.integers(1, 3),
)
def test_memo_encodes_as_the_codecs_do(rows, shared, repeats):
    assert MEMO_ENCODER._memo is not None and PLAIN_ENCODER._memo is None
    expected = _outcome(lambda: PLAIN_ENCODER.encode(rows, shared))
    for _ in range(repeats):  # the first call fills the memo, the next ones read it
        assert _outcome(lambda: MEMO_ENCODER.encode(rows, shared)) == expected
        keys = MEMO_ENCODER.check_keys(rows, "records")  # the keys a strict caller has
        assert keys == set().union(*rows)
        with_keys = functools.partial(MEMO_ENCODER.encode, rows, shared, keys=keys)
        assert _outcome(with_keys) == expected


def test_memo_keeps_true_apart_from_one_in_categorical_fields():
    encoder = RecordColumns(FLAT_MAP)
    cat = {f.name: f for f in FLAT_MAP.fields}["cat"]
    one, true = cat.offset + cat.local_id("1"), cat.offset + cat.local_id("true")
    assert one != true  # both in the vocabulary: a shared entry would give a wrong id
    for value, expected in ((1, one), (True, true), (1.0, one), ("1", one), (True, true)):
        assert encoder.encode([{"cat": value}]).ids[0, 0] == expected, value
        # and as part of whole records remembered (two fields carried)
        rows = encoder.encode([{"cat": value, "hash": "a"}] * 2).ids
        assert (rows[:, 0] == expected).all(), value
    num = {f.name: f for f in FLAT_MAP.fields}["num"]
    # numeric fields read True as 1: one entry serves both
    assert encoder.encode([{"num": True}]).ids[0, 1] == encoder.encode([{"num": 1}]).ids[0, 1]
    assert encoder.encode([{"num": 1}]).ids[0, 1] >= num.offset


def test_memo_refuses_bad_values_with_their_place_after_good_ones():
    encoder = RecordColumns(FLAT_MAP)
    encoder.encode([{"val": 1.0, "cat": "a"}] * 3)  # remembered
    with pytest.raises(DataError, match=r"candidates\[2\], field 'val': NaN or infinite"):
        encoder.encode([{"val": 1.0}, {"val": 1.0}, {"val": float("nan")}], where="candidates")
    with pytest.raises(DataError, match=r"records\[1\], field 'cat': expected a string"):
        encoder.encode([{"cat": "a"}, {"cat": ["a"]}])
    with pytest.raises(DataError, match=r"user/context, field 'val': number too large"):
        encoder.encode([{"cat": "a"}, {"cat": "b"}], {"val": 1e300})


def test_memo_stays_within_its_bound():
    limit = 40  # 10 per field
    encoder = RecordColumns(FLAT_MAP, memo_values=limit)
    for start in range(0, 200, 7):
        rows = [
            {"cat": f"v{i}", "num": i, "val": i / 7, "hash": f"h{i}"}
            for i in range(start, start + 7)
        ]
        encoder.encode(rows)
        memo = encoder._memo
        assert all(len(ids) <= limit // 4 for ids in memo.ids)
        assert all(len(v) <= limit // 4 for v in memo.values)
        # whole records: at most two sets of fields, each within an eighth of the limit
        assert len(memo._rows) <= 2
        assert all(len(rows._state[0]) <= limit // 8 for rows in memo._rows.values())
        encoder.encode([{"cat": f"v{start}", "num": start}])  # another set of fields
    # and the values read back are still the codecs'
    rows = [{"cat": "a", "num": 3, "val": 0.5, "hash": "x"}] * 2
    assert _outcome(lambda: encoder.encode(rows)) == _outcome(lambda: PLAIN_ENCODER.encode(rows))
