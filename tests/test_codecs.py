"""Field codecs: exact keys, vocabulary lookups, counting in bounded memory, collisions, hashing."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from deepfm.data import codecs
from deepfm.data.codecs import (
    COLLIDED,
    FIRST_VALUE,
    MISSING,
    OOV,
    KeyCounts,
    Vocabulary,
    fit_vocabulary,
    int_keys,
    merge_runs,
    string_keys,
    string_tokens,
)
from deepfm.data.featuremap import FeatureMap, FeatureMapBuilder
from deepfm.data.formats import table_chunk
from deepfm.data.schema import FieldSpec, Schema
from deepfm.serve.encoding import RecordColumns


def test_short_values_are_their_own_keys_in_value_order_and_long_ones_are_hashed():
    words = ["", "a", "a\x00", "ab", "abcdefg", "abcdefgh", "b", "zz", "é", "0", "00"]
    keys, checks = string_keys(pa.array(words))
    assert len(set(keys.tolist())) == len(words)  # exact: no two short values share a key
    order = sorted(range(len(words)), key=lambda i: words[i].encode())
    assert np.argsort(keys, kind="stable").tolist() == order  # key order is byte order
    assert checks.tolist() == [len(w.encode()) for w in words]
    long = pa.array(["abcdefghi", "abcdefghj", "x" * 100, "x" * 101])
    long_keys, long_checks = string_keys(long)
    assert len(set(long_keys.tolist())) == 4 and (long_checks > 8).all()
    # offsets of a slice are honoured
    np.testing.assert_array_equal(string_keys(long.slice(1, 2))[0], long_keys[1:3])
    # integer tokens keep their order, negative ones included
    tokens = np.array([-5, -1, 0, 3, 2**40])
    assert (int_keys(tokens)[1:] > int_keys(tokens)[:-1]).all()


def test_vocabulary_lookup_matches_a_dictionary_and_extends_without_moving_old_ids():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2**63, 50_000).astype(np.uint64))
    ids = rng.permutation(len(keys)).astype(np.int32) + FIRST_VALUE
    vocabulary = Vocabulary(keys, ids)
    known = dict(zip(keys.tolist(), ids.tolist(), strict=True))
    queries = np.concatenate(
        [
            rng.choice(keys, 5000),
            rng.integers(0, 2**63, 5000).astype(np.uint64),
            keys[:1],
            keys[-1:],
            np.array([0, 2**64 - 1], np.uint64),
        ]
    )
    expected = [known.get(k, OOV) for k in queries.tolist()]
    assert vocabulary.lookup(np.sort(queries)).tolist() == [
        known.get(k, OOV) for k in np.sort(queries).tolist()
    ]
    assert vocabulary.lookup(queries).tolist() == expected  # the fenced path, unsorted queries
    assert vocabulary.lookup(queries[:3]).tolist() == expected[:3]  # few queries: searchsorted
    new = np.array([keys[0], 7, 9, 7], np.uint64)  # one known key, two new ones (7 twice)
    grown = vocabulary.extend(new)
    assert grown.size == vocabulary.size + 2
    assert grown.lookup(keys).tolist() == ids.tolist()  # every old id kept
    assert grown.lookup(np.array([7, 9], np.uint64)).tolist() == [
        vocabulary.size,
        vocabulary.size + 1,
    ]


def test_counting_spilled_to_disk_in_a_tiny_budget_equals_counting_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(codecs, "MERGE_MIN_ROWS", 64)
    rng = np.random.default_rng(1)
    spilled = KeyCounts(budget_bytes=20 * 500, spill_dir=tmp_path / "runs")
    in_memory = KeyCounts()
    every = []
    for _ in range(40):  # 40 blocks of zipf-like keys, each block's keys sorted and unique
        block = np.minimum(rng.zipf(1.3, 2000), 5000).astype(np.uint64)
        every.append(block)
        keys, counts = np.unique(block, return_counts=True)
        checks = np.zeros(len(keys), np.uint32)
        spilled.add(keys, counts, checks)
        in_memory.add(keys, counts, checks)
    runs = spilled.finish()
    assert len(runs) > 5 and all(r.path is not None for r in runs)  # it did spill
    merged = list(merge_runs(runs, budget_bytes=20 * 300))  # many rounds
    assert len(merged) > 1
    keys = np.concatenate([m[0] for m in merged])
    counts = np.concatenate([m[1] for m in merged])
    truth_keys, truth_counts = np.unique(np.concatenate(every), return_counts=True)
    np.testing.assert_array_equal(keys, truth_keys)
    np.testing.assert_array_equal(counts, truth_counts)
    [(memory_keys, memory_counts, _)] = [r.arrays() for r in in_memory.finish()]
    np.testing.assert_array_equal(memory_keys, truth_keys)
    np.testing.assert_array_equal(memory_counts, truth_counts)
    # the vocabulary: counts >= 3, ids by decreasing count, ties by key, written as it is made
    fitted = fit_vocabulary(iter(merged), 3, work_dir=tmp_path / "kept", out_stem=tmp_path / "v")
    keep = truth_counts >= 3
    order = np.lexsort((truth_keys[keep], -truth_counts[keep]))
    expected = dict(
        zip(
            truth_keys[keep][order].tolist(),
            range(FIRST_VALUE, FIRST_VALUE + len(order)),
            strict=True,
        )
    )
    vocabulary = fitted.vocabulary
    assert isinstance(vocabulary.keys, np.memmap) and len(vocabulary) == keep.sum()
    assert dict(zip(vocabulary.keys.tolist(), vocabulary.ids.tolist(), strict=True)) == expected
    np.testing.assert_array_equal(vocabulary.fences, vocabulary.keys[:: Vocabulary.FENCE])
    assert fitted.distinct == len(truth_keys) and fitted.collisions == 0
    assert [t[0] for t in fitted.top] == truth_keys[keep][order][:20].tolist()


def _fit(schema: Schema, table: pa.Table) -> FeatureMap:
    builder = FeatureMapBuilder(schema)
    builder.update(table_chunk(table))
    return builder.build()


def test_ties_are_broken_by_value_as_before_codecs():
    values = [f"{v:08x}" for v in np.random.default_rng(2).permutation(300)] + ["x"] * 5
    fm = _fit(Schema((FieldSpec("c"),)), pa.table({"c": values}))
    codec = fm.fields[0]
    assert codec.local_id("x") == FIRST_VALUE  # the most frequent first
    ranked = sorted(v for v in values if v != "x")  # all seen once: by value
    assert [codec.local_id(v) for v in ranked] == list(range(FIRST_VALUE + 1, FIRST_VALUE + 301))


def test_a_hash_collision_is_detected_when_fitting_and_both_values_become_oov(monkeypatch):
    # a deliberately weak hash for long values: every value of one length shares its key
    def weak(padded, starts, lengths):
        keys = lengths.astype(np.uint64) * np.uint64(1_000_003)
        return keys, np.array(
            [
                hash(bytes(padded[s : s + n])) & 0xFFFF
                for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)
            ],
            np.uint32,
        )

    monkeypatch.setattr(codecs, "_long_keys", weak)
    first = ["long-value-one"] * 3 + ["other"] * 2
    second = ["long-value-two"] * 4 + ["long-value-one"]  # same length: the same weak key
    schema = Schema((FieldSpec("c"),))
    builder = FeatureMapBuilder(schema)
    builder.update(table_chunk(pa.table({"c": first})))  # the collision spans two blocks
    builder.update(table_chunk(pa.table({"c": second})))
    codec = builder.build().fields[0]
    assert codec.summary["collisions"] == 1
    assert codec.local_id("long-value-one") == OOV and codec.local_id("long-value-two") == OOV
    assert codec.local_id("other") == FIRST_VALUE  # the other values are untouched
    # within one block as well
    one_block = string_tokens(pa.array(["long-value-one", "long-value-two", "other"]))
    assert COLLIDED in one_block.checks.tolist()


def test_hashed_fields_need_no_vocabulary_and_encode_alike_in_files_and_records():
    schema = Schema(
        (FieldSpec("user", kind="hashed", buckets=50), FieldSpec("item"), FieldSpec("shop")),
        hash_buckets=20,
    )
    rng = np.random.default_rng(3)
    table = pa.table(
        {
            "user": [f"u{v}" for v in rng.integers(0, 1000, 400)],
            "item": [f"i{v}" for v in rng.integers(0, 100, 400)],  # 100 distinct > 20: hashed
            "shop": [f"s{v}" for v in rng.integers(0, 10, 400)],  # 10 distinct: a vocabulary
        }
    )
    fm = _fit(schema, table)
    user, item, shop = fm.fields
    assert (user.kind, user.size, item.kind, item.size, shop.kind) == (
        "hashed",
        52,
        "hashed",
        22,
        "vocabulary",
    )
    assert user.vocabularies() == {} and json.dumps(fm.to_dict())  # nothing to save but JSON
    encoded = fm.encode(table_chunk(table))
    local = encoded.ids - np.array([f.offset for f in fm.fields])
    assert local[:, 0].min() >= FIRST_VALUE and local[:, 0].max() < 52
    assert len(np.unique(local[:, 0])) > 30  # the values spread over the buckets
    records = [
        {"user": u, "item": i, "shop": s}
        for u, i, s in zip(*table.to_pydict().values(), strict=True)
    ]
    np.testing.assert_array_equal(RecordColumns(fm).encode(records).ids, encoded.ids)
    assert RecordColumns(fm).encode([{"user": None}]).ids[0, 0] == user.offset + MISSING


def test_feature_map_json_stays_small_whatever_the_vocabulary(tmp_path):
    values = [f"{v:08x}" for v in range(100_000)]
    fm = _fit(Schema((FieldSpec("c"),)), pa.table({"c": values}))
    path = fm.save(tmp_path)
    assert path.stat().st_size < 5_000  # the readable summary; values live in vocab/*.npy
    assert (tmp_path / "vocab" / "000.keys.npy").stat().st_size > 800_000
    loaded = FeatureMap.load(tmp_path)
    assert isinstance(loaded.fields[0].vocabulary.keys, np.memmap)
    assert loaded.fields[0].local_id("0000ffff") == fm.fields[0].local_id("0000ffff") > 1
    with pytest.raises(Exception, match="missing"):
        (tmp_path / "vocab" / "000.ids.npy").unlink()
        FeatureMap.load(tmp_path)


def test_a_vocabulary_set_looks_up_as_each_of_its_vocabularies():
    """Fields sharing keys with different ids (the tag must separate them), keys absent from
    one field but present in another (must be OOV there), empty vocabularies."""
    rng = np.random.default_rng(5)
    common = rng.integers(0, 2**63, 300).astype(np.uint64)
    vocabularies = []
    for size in (0, 40, 2000, 5):
        keys = np.unique(np.concatenate([common[: size // 2], rng.integers(0, 2**63, size)]))
        keys = keys.astype(np.uint64)[:size]
        vocabularies.append(Vocabulary(keys, rng.permutation(len(keys)).astype(np.int32) + 2))
    joint = codecs.VocabularySet(vocabularies)
    edges = np.array([0, 2**64 - 1], np.uint64)
    queries = np.concatenate([common, *(v.keys for v in vocabularies), edges])
    for f, vocabulary in enumerate(vocabularies):
        got = joint.lookup(queries, np.full(len(queries), f))
        np.testing.assert_array_equal(got, vocabulary.lookup(queries))
    mixed = rng.integers(0, len(vocabularies), len(queries))  # one call, fields interleaved
    expected = [vocabularies[f].lookup(queries[i : i + 1])[0] for i, f in enumerate(mixed)]
    np.testing.assert_array_equal(joint.lookup(queries, mixed), expected)
    assert (codecs.VocabularySet([]).lookup(queries[:3], np.zeros(3, int)) == OOV).all()


@pytest.mark.parametrize("joint_values", [1 << 22, 30])
def test_a_request_encodes_as_field_by_field_encoding(monkeypatch, joint_values):
    """The few-rows path (keys of all fields at once, one joint lookup, broadcast columns)
    gives the ids of each codec encoding its own column; with a small joint budget the larger
    vocabularies keep their own lookup; hashed fields always do."""
    from deepfm.data import featuremap

    schema = Schema(
        (
            FieldSpec("user", kind="hashed", buckets=50),
            FieldSpec("item"),
            FieldSpec("shop"),
            FieldSpec("age", kind="numeric"),
            FieldSpec("price", kind="numeric"),
            FieldSpec("tags", kind="multi", separator="|", max_len=2),
        ),
    )
    rng = np.random.default_rng(4)
    n = 600

    def table_of(rows: int) -> pa.Table:
        item = [f"item{v}" if v % 7 else None for v in rng.integers(0, 90, rows)]
        age = np.where(rng.random(rows) < 0.1, np.nan, rng.integers(0, 90, rows))
        return pa.table(
            {
                "user": [f"u{v}" for v in rng.integers(0, 1000, rows)],
                "item": pa.array(item, pa.string()),
                "shop": [f"s{v}" if v else "" for v in rng.integers(0, 12, rows)],
                "age": pa.array(age),
                "price": rng.exponential(50, rows),
                "tags": ["|".join(f"t{t}" for t in rng.integers(0, 9, 2)) for _ in range(rows)],
            }
        )

    fm = _fit(schema, table_of(n))
    monkeypatch.setattr(featuremap, "JOINT_LOOKUP_VALUES", joint_values)
    fm.prepare_row_keys()
    plan = fm._row_plan
    assert plan.own_columns[0] == 0  # hashed: no vocabulary
    assert (len(plan.own_columns) > 1) == (joint_values < 100)  # "item" (~90 values) at least
    fresh = table_of(40)  # unseen values among them
    for rows in (1, 7, 40):
        columns = {name: fresh.column(name).slice(0, rows) for name in fresh.column_names}
        columns["shop"] = columns["shop"].slice(0, 1)  # broadcast to every row
        columns["age"] = columns["age"].slice(0, 1)
        got, _ = fm.encode_columns(columns, rows)
        monkeypatch.setattr(featuremap, "ROW_KEYS_UP_TO", 0)  # each codec, its column
        expected, _ = fm.encode_columns(columns, rows)
        monkeypatch.setattr(featuremap, "ROW_KEYS_UP_TO", 4096)
        np.testing.assert_array_equal(got, expected)
