"""Predictor: records encode as the file reader encodes them, scores equal the trainer's, rank
orders by CTR and CTR × bid, bad values are refused with their place, on generated Criteo rows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import CRITEO_ROWS
from deepfm.data.formats import get_format
from deepfm.data.pipeline import encode_files
from deepfm.data.reader import BadRows
from deepfm.errors import ConfigError, DataError
from deepfm.serve.bundle import load_bundle
from deepfm.serve.predictor import Predictor
from deepfm.train.trainer import Batches, predict_proba
from serve_helpers import criteo_bundle, criteo_records, split_for_rank


@pytest.fixture(scope="module")
def criteo(generated_criteo):
    path = generated_criteo.train
    bundle = criteo_bundle(str(path))
    return path, bundle, Predictor.load(bundle)


def test_records_encode_exactly_as_the_file_reader(criteo):
    path, _, predictor = criteo
    reference = encode_files(predictor.feature_map, get_format("criteo"), [path], BadRows())
    encoded = predictor.encode(criteo_records(path))
    assert encoded.values is None and reference.values is None
    np.testing.assert_array_equal(encoded.ids, reference.ids)
    # the Arrow path (a table) gives the same ids too
    import pyarrow as pa

    table = pa.Table.from_pylist(criteo_records(path, 500))
    np.testing.assert_array_equal(predictor.encode(table).ids, reference.ids[:500])


def test_predict_proba_equals_the_trainer_on_the_same_rows(criteo):
    path, bundle, predictor = criteo
    reference = encode_files(predictor.feature_map, get_format("criteo"), [path], BadRows())
    expected = predict_proba(load_bundle(bundle).model, Batches(reference))
    got = predictor.predict_proba(criteo_records(path))
    assert got.shape == (CRITEO_ROWS,) and got.dtype == np.float64
    # one forward pass over the same rows each; the two sigmoids differ only in float rounding
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert got.std() > 1e-3  # a trained model, not a constant


def test_unseen_and_missing_values_map_to_oov_and_missing(criteo):
    _, _, predictor = criteo
    fm = predictor.feature_map
    c1 = next(f for f in fm.fields if f.name == "C1")
    i1 = next(f for f in fm.fields if f.name == "I1")
    slot_c1 = [f.name for f in fm.fields].index("C1")
    slot_i1 = [f.name for f in fm.fields].index("I1")
    encoded = predictor.encode(
        [{"C1": "never-seen", "I1": 10**9}, {"C1": None, "I1": None}, {"C1": "", "I1": ""}, {}]
    )
    assert encoded.ids[0, slot_c1] == c1.offset + 0  # OOV
    assert encoded.ids[0, slot_i1] == i1.offset + 0  # a bucket never seen in training
    for row in (1, 2, 3):
        assert encoded.ids[row, slot_c1] == c1.offset + 1  # missing
        assert encoded.ids[row, slot_i1] == i1.offset + 1
    # a number sent as a string, or an integral float, encodes as the number
    a, b, c = predictor.encode([{"I5": "1382"}, {"I5": 1382.0}, {"I5": 1382}]).ids
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b, c)


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"I1": float("nan")}, "I1", "NaN or infinite"),
        ({"I2": float("inf")}, "I2", "NaN or infinite"),
        ({"I3": "abc"}, "I3", "is not a number"),
        ({"I4": {"a": 1}}, "I4", "expected a number, got an object"),
        ({"I5": 10**400}, "I5", "out of range"),
        ({"C1": [1, 2]}, "C1", "got a list"),
        ({"C2": float("-inf")}, "C2", "NaN or infinite"),
        ({"C3": 10**5000}, "C3", "digits"),
    ],
)
def test_bad_values_name_the_record_and_field(criteo, record, field, reason):
    _, _, predictor = criteo
    with pytest.raises(DataError, match=reason) as caught:
        predictor.predict_proba([{}, {}, record])
    assert "records[2]" in str(caught.value) and f"'{field}'" in str(caught.value)


def test_strict_refuses_unknown_keys_lenient_ignores_them(criteo):
    _, _, predictor = criteo
    lenient = predictor.predict_proba([{"C1": "68fd1e64", "C99": "x"}])
    assert lenient == pytest.approx(predictor.predict_proba([{"C1": "68fd1e64"}]), abs=0)
    with pytest.raises(DataError, match=r"records\[0\], field 'C99': not a field"):
        predictor.predict_proba([{"C1": "68fd1e64", "C99": "x"}], strict=True)
    with pytest.raises(DataError, match="expected an object"):
        predictor.predict_proba([{"C1": "a"}, ["C1", "a"]])  # type: ignore[list-item]


def test_rank_orders_by_ctr_and_by_ctr_times_bid(criteo):
    path, _, predictor = criteo
    rows = criteo_records(path, 300)[100:200]
    user, context, candidates = split_for_rank(rows)
    merged = [{**user, **context, **c} for c in candidates]
    ctr = predictor.predict_proba(merged)
    items = predictor.rank(user, context, candidates, top=100)
    assert [i["index"] for i in items] == np.argsort(-ctr, kind="stable").tolist()
    np.testing.assert_allclose([i["ctr"] for i in items], np.sort(ctr)[::-1], rtol=0, atol=1e-12)
    assert [i["score"] for i in items] == [i["ctr"] for i in items]
    top = predictor.rank(user, context, candidates, top=7)
    assert top == items[:7]
    # by CTR x bid: the order of ctr * bid, a different order than by CTR alone
    rng = np.random.default_rng(0)
    bids = rng.uniform(0.1, 5.0, len(candidates))
    with_bids = [{**c, "bid": float(b)} for c, b in zip(candidates, bids, strict=True)]
    by_bid = predictor.rank(user, context, with_bids, top=100, by="ctr_bid", strict=True)
    assert [i["index"] for i in by_bid] == np.argsort(-(ctr * bids), kind="stable").tolist()
    assert [i["index"] for i in by_bid] != [i["index"] for i in items]
    for item in by_bid:
        assert item["score"] == pytest.approx(item["ctr"] * bids[item["index"]], rel=1e-12)


def test_rank_candidate_fields_override_user_and_context(criteo):
    path, _, predictor = criteo
    rows = criteo_records(path, 3)
    user = {"C1": rows[0]["C1"], "I1": 5}
    candidates = [{"C1": rows[1]["C1"]}, {"C1": None}, {}]
    ctr = [i["ctr"] for i in sorted(predictor.rank(user, {}, candidates), key=lambda i: i["index"])]
    expected = predictor.predict_proba(
        [{"C1": rows[1]["C1"], "I1": 5}, {"C1": None, "I1": 5}, {"C1": rows[0]["C1"], "I1": 5}]
    )
    np.testing.assert_allclose(ctr, expected, rtol=0, atol=1e-12)


def test_rank_ties_keep_candidate_order_and_edge_cases(criteo):
    _, _, predictor = criteo
    same = [{"C1": "x"}] * 5
    assert [i["index"] for i in predictor.rank({}, {}, same, top=10)] == [0, 1, 2, 3, 4]
    assert predictor.rank({}, {}, [], top=3) == []
    with pytest.raises(DataError, match=r"candidates\[1\], field 'bid': ranking by ctr_bid"):
        predictor.rank({}, {}, [{"bid": 1}, {}], by="ctr_bid")
    for bad in (-1, float("nan"), "cheap", True):
        with pytest.raises(DataError, match="bid"):
            predictor.rank({}, {}, [{"bid": bad}], by="ctr_bid")
    with pytest.raises(DataError, match="rank by"):
        predictor.rank({}, {}, same, by="price")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"user, field 'C99'"):
        predictor.rank({"C99": 1}, {}, same, strict=True)
    with pytest.raises(DataError, match="user/context, field 'I1'"):
        predictor.rank({"I1": "many"}, {}, same)


def test_runtime_is_checked(criteo):
    _, bundle, _ = criteo
    with pytest.raises(ConfigError, match="runtime"):
        Predictor.load(bundle, runtime="tensorflow")  # type: ignore[arg-type]


def test_info_names_what_is_served(criteo):
    _, bundle, predictor = criteo
    info = predictor.info
    manifest = load_bundle(bundle).info
    assert info["model"] == "deepfm" and info["runtime"] == "torch"
    assert info["feature_map_sha256"] == manifest["feature_map_sha256"]
    assert info["created"] == manifest["created"]
    assert set(info["metrics"]) >= {"valid", "test"} and "history" not in info["metrics"]
    assert math.isfinite(info["metrics"]["test"]["auc"])
