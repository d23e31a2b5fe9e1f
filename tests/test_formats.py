"""Every named format on its real sample, and bad input through `deepfm prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import criteo_line, shared_file
from deepfm.cli import main
from deepfm.data.featuremap import FIRST_VALUE
from deepfm.data.formats import format_names, get_format, parse_yymmddhh
from deepfm.data.pipeline import load_dataset
from deepfm.data.prepare import prepare_store
from deepfm.data.reader import BadRows
from deepfm.data.schema import Schema, load_schema
from deepfm.data.splits import SplitSpec
from deepfm.data.store import SPLITS, Store
from deepfm.errors import ConfigError, DataError


def read_all(fmt, paths, policy="error", **options):
    bad = BadRows(policy)
    chunks = list(get_format(fmt, **options).read([str(p) for p in paths], bad))
    table = pa.concat_tables([c.table.combine_chunks() for c in chunks]) if chunks else None
    lines = np.concatenate([c.lines for c in chunks]) if chunks else np.zeros(0)
    return table, lines, bad


def values(table: pa.Table, name: str) -> list:
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column.to_pylist()


def test_every_format_is_registered():
    expected = {"criteo", "criteo-csv", "avazu", "frappe", "ipinyou", "movielens-100k", "csv"}
    expected.add("appmarket")  # the simulated market's CSV logs (deepfm market-csv)
    assert set(format_names()) == expected | {"parquet"}


# -- real samples ---------------------------------------------------------------------------


def test_avazu_drops_id_and_derives_hour_of_day_and_weekday():
    table, lines, bad = read_all("avazu", [shared_file("avazu", "avazu_train_sample.csv")])
    assert table.num_rows == 7499 and bad.total == 0
    assert "id" not in table.column_names and "hour" not in table.column_names
    assert int(pc.sum(table.column("label")).as_py()) == 1276
    # every row is 2014-10-21 00:xx (SOURCE.md), a Tuesday
    assert set(values(table, "hour_of_day")) == {"00"}
    assert set(values(table, "weekday")) == {"Tue"}
    assert values(table, "site_id")[0] == "1fbe01fe" and lines[0] == 2  # line 1 is the header


def test_yymmddhh_parsing_checks_calendar_dates():
    valid, hours, weekdays = parse_yymmddhh(
        pa.array(["14102100", "14102923", "16022912", "15022912", "14130100", "1410210", "x"])
    )
    assert valid.tolist() == [True, True, True, False, False, False, False]
    assert hours.to_pylist()[:3] == ["00", "23", "12"]
    assert weekdays.to_pylist()[:3] == ["Tue", "Wed", "Mon"]  # 2016-02-29 was a Monday


def test_frappe_reads_ten_one_hot_fields_with_minus_one_labels():
    table, _, bad = read_all("frappe", [shared_file("frappe", "frappe.validation.libfm")])
    assert table.num_rows == 57722 and bad.total == 0
    assert int(pc.sum(table.column("label")).as_py()) == 19063
    names = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather"]
    assert table.column_names[:10] == [*names, "country", "city"]
    assert [values(table, n)[0] for n in ("user", "item", "city")] == ["266", "1244", "5149"]


def test_ipinyou_decodes_indices_with_the_feature_dictionary():
    table, _, bad = read_all("ipinyou", [shared_file("ipinyou", "train.fm.txt")])
    assert table.num_rows == 26773 and bad.total == 0
    assert int(pc.sum(table.column("label")).as_py()) == 255
    first = {n: values(table, n)[0] for n in ("weekday", "hour", "useragent", "IP", "region")}
    assert first == {
        "weekday": "2",
        "hour": "18",
        "useragent": "android_safari",
        "IP": "60.22.69.*",
        "region": "40",
    }
    assert get_format("ipinyou").source_files([shared_file("ipinyou", "train.fm.txt")])[
        -1
    ].name == ("featindex.fm.txt")


def test_movielens_joins_users_and_items_with_genres_as_a_bag(tmp_path):
    table, _, bad = read_all("movielens-100k", [shared_file("movielens_100k")])
    assert table.num_rows == 75000 and bad.total == 0
    assert int(pc.sum(table.column("label")).as_py()) == 41565  # ratings >= 4
    row = {n: values(table, n)[0] for n in table.column_names}
    # u.data line 1: user 186, item 302 (L.A. Confidential, 1997: Crime|Film-Noir|Mystery|Thriller)
    assert row == {
        "user_id": "186",
        "item_id": "302",
        "age": "39",
        "gender": "F",
        "occupation": "executive",
        "zip": "00000",
        "release_year": "1997",
        "genres": "Crime|Film-Noir|Mystery|Thriller",
        "label": 0.0,
    }
    store = prepare_store(
        get_format("movielens-100k"),
        [str(shared_file("movielens_100k"))],
        tmp_path / "ml",
        split=SplitSpec.parse("random:0.9"),
    )
    fm = Store.open(store.path).feature_map
    genres = next(f for f in fm.fields if f.name == "genres")
    assert genres.spec.kind == "multi" and genres.slots == 6  # the most genres of one movie
    assert genres.local_id("Drama") >= FIRST_VALUE and fm.needs_values


def test_movielens_ratings_option_and_bad_joins(tmp_path):
    source = shared_file("movielens_100k")
    for name in ("u.user", "u.item"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "ua.base").write_text(
        "1\t1\t5\t881250949\n99999\t1\t4\t1\n2\t1\t6\t1\n2\t3\t2\t1\n"
    )
    table, lines, bad = read_all("movielens-100k", [tmp_path], "skip", ratings="ua.base")
    assert table.num_rows == 2 and lines.tolist() == [1, 4]
    assert bad.by_reason == {"unknown_user": 1, "bad_label": 1}
    (tmp_path / "ub.base").write_text("1\t1\t5\t881250949\n99999\t1\t4\t1\n")
    with pytest.raises(DataError, match=r"user not in u\.user") as info:
        read_all("movielens-100k", [tmp_path], ratings="ub.base")
    assert info.value.line == 2 and info.value.field == "user_id"
    with pytest.raises(DataError, match="does not exist"):
        read_all("movielens-100k", [tmp_path])  # no u.data there
    with pytest.raises(ConfigError, match="--ratings does not apply"):
        get_format("criteo", ratings="x")


# -- malformed one-hot rows --------------------------------------------------------------------


def test_frappe_and_ipinyou_bad_features_are_located(tmp_path):
    frappe = tmp_path / "f.libfm"
    good = "1 " + " ".join(f"{i}:1" for i in range(10)) + "\n"
    frappe.write_text(good + "-1 " + " ".join(["3:2"] + [f"{i}:1" for i in range(9)]) + "\n")
    with pytest.raises(DataError, match="one-hot") as info:
        read_all("frappe", [frappe])
    assert (info.value.line, info.value.field) == (2, "f0")
    frappe.write_text(good + "0 " + " ".join(f"{i}:1" for i in range(10)) + "\n")
    _, _, bad = read_all("frappe", [frappe], "skip")
    assert bad.by_reason == {"bad_label": 1}

    source = shared_file("ipinyou", "train.fm.txt")
    rows = source.read_text().splitlines()[:3]
    swapped = rows[2].split(" ")
    swapped[1], swapped[2] = swapped[2], swapped[1]  # hour's index at the weekday position
    data = tmp_path / "train.fm.txt"
    data.write_text("\n".join([rows[0], rows[1] + " ", " ".join(swapped)]) + "\n")
    with pytest.raises(ConfigError, match="feature dictionary"):
        read_all("ipinyou", [data])
    dictionary = source.parent / "featindex.fm.txt"
    _, lines, bad = read_all("ipinyou", [data], "skip", featindex=str(dictionary))
    assert lines.tolist() == [1] and bad.by_reason == {"wrong_column_count": 1,
                                                        "unknown_feature": 1}  # fmt: skip
    assert bad.examples[1]["field"] == "f0" and bad.examples[1]["line"] == 3


# -- generic CSV and Parquet with a YAML schema -------------------------------------------------

SCHEMA_YAML = """
label: click
min_count: 1
fields:
  - {name: shop, kind: categorical}
  - {name: visits, kind: numeric}
  - {name: price, kind: numeric, numeric: value}
  - {name: tags, kind: multi, separator: "|", pooling: mean}
ignore: [id]
"""


def generic_table(rows: int = 400) -> pa.Table:
    rng = np.random.default_rng(0)
    tags = ["|".join(f"t{t}" for t in rng.integers(0, 9, rng.integers(0, 4))) for _ in range(rows)]
    return pa.table(
        {
            "id": np.arange(rows),
            "click": rng.integers(0, 2, rows),
            "shop": [f"s{x}" for x in rng.integers(0, 20, rows)],
            "visits": rng.integers(0, 50, rows).astype(float),
            "price": np.round(rng.normal(10, 3, rows), 3),
            "tags": tags,
        }
    )


def test_csv_and_parquet_with_the_same_schema_encode_identically(tmp_path):
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(SCHEMA_YAML)
    schema = load_schema(schema_path)
    table = generic_table()
    csv_path, parquet_path = tmp_path / "d.csv", tmp_path / "d.parquet"
    lines = ["id,click,shop,visits,price,tags"] + [
        ",".join(str(v) for v in row.values()) for row in table.to_pylist()
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    as_lists = table.set_column(
        5, "tags", pc.split_pattern(table.column("tags"), "|").cast(pa.list_(pa.string()))
    )
    as_lists = as_lists.set_column(
        5, "tags", pc.if_else(pc.equal(table.column("tags"), ""), None, as_lists.column("tags"))
    )
    pq.write_table(as_lists, parquet_path, row_group_size=150)
    split = SplitSpec.parse("random:0.8")
    a = load_dataset(get_format("csv", schema), [csv_path], split=split)
    b = load_dataset(get_format("parquet", schema), [parquet_path], split=split)
    assert a.feature_map.to_dict() == b.feature_map.to_dict()
    for name in SPLITS:
        np.testing.assert_array_equal(getattr(a, name).ids, getattr(b, name).ids)
        np.testing.assert_array_equal(getattr(a, name).values, getattr(b, name).values)
    store = prepare_store(
        get_format("parquet", schema), [parquet_path], tmp_path / "s", split=split
    )
    assert Store.open(store.path).feature_map.to_dict() == a.feature_map.to_dict()
    assert store.manifest["sources"][0]["rows"] == 400


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_schema_naming_a_missing_column_is_refused(tmp_path, fmt):
    schema = Schema.from_dict({"label": "click", "fields": [{"name": "shop"}, {"name": "nowhere"}]})
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        path.write_text("click,shop\n1,a\n")
    else:
        pq.write_table(pa.table({"click": [1], "shop": ["a"]}), path)
    with pytest.raises(DataError, match="nowhere") as info:
        list(get_format(fmt, schema).read([str(path)], BadRows()))
    assert info.value.path == str(path)
    with pytest.raises(ConfigError, match="needs a schema"):
        get_format(fmt)


def test_parquet_bad_values_are_rows_with_their_row_number(tmp_path):
    schema = load_schema_text(tmp_path, SCHEMA_YAML)
    table = generic_table(10)
    price = table.column("price").to_numpy().copy()
    price[3] = np.nan
    click = table.column("click").to_numpy().copy()
    click[7] = 2
    table = table.set_column(4, "price", pa.array(price)).set_column(1, "click", pa.array(click))
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match="NaN or infinite") as info:
        list(get_format("parquet", schema).read([str(path)], BadRows()))
    assert (info.value.line, info.value.field) == (4, "price")
    bad = BadRows("skip")
    rows = sum(len(c) for c in get_format("parquet", schema).read([str(path)], bad))
    assert rows == 8 and bad.by_reason == {"not_finite": 1, "bad_label": 1}
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="Parquet"):
        list(get_format("parquet", schema).read([str(tmp_path / "x.parquet")], BadRows()))


def load_schema_text(tmp_path: Path, text: str):
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    return load_schema(path)


# -- bad input through `deepfm prepare` ---------------------------------------------------------

GOOD = criteo_line(0) + criteo_line(1)
BAD_INPUT = {
    "truncated_last_line": (GOOD + criteo_line(0)[:30], 3, None, "expected 40 columns"),
    "wrong_column_count": (GOOD + "0\t1\t2\n" + GOOD, 3, None, "expected 40 columns, found 3"),
    "bad_number": (GOOD + criteo_line(1, ints=["x1"] + ["0"] * 12), 3, "I1", "is not a number"),
    "not_finite": (criteo_line(0, ints=["0", "inf"] + ["0"] * 11) + GOOD, 1, "I2", "NaN or inf"),
    "nan": (GOOD + criteo_line(0, ints=["0"] * 12 + ["nan"]), 3, "I13", "NaN or infinite"),
    "non_utf8": (
        GOOD.encode()
        + criteo_line(0, cats=["0"] * 3 + ["\xff\xfe"] + ["0"] * 22).encode("latin-1"),
        3,
        "C4",
        "non-UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_prepare_stops_with_file_line_field_or_skips_and_counts(tmp_path, capsys, case):
    text, line, field, reason = BAD_INPUT[case]
    path = tmp_path / "data.txt"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    store = tmp_path / "store"
    args = ["prepare", "--input", str(path), "--out", str(store), "--quiet", "--split", "none"]
    assert main(args) == 2
    error = capsys.readouterr().err
    where = f"{path}:{line}" + (f", field '{field}'" if field else "")
    assert where in error and reason in error and "--bad-rows skip" in error
    assert not store.exists()
    assert main([*args, "--bad-rows", "skip", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    kind = "not_finite" if case == "nan" else case
    kind = "wrong_column_count" if case == "truncated_last_line" else kind
    assert summary["bad_rows"]["by_reason"] == {kind: 1}
    assert summary["bad_rows"]["examples"][0]["line"] == line
    manifest = json.loads((store / "manifest.json").read_text())
    lines_text = text if isinstance(text, str) else text.decode("latin-1")
    good = lines_text.count("\n") + (0 if lines_text.endswith("\n") else 1) - 1
    assert manifest["rows"]["total"] == good and manifest["rows"]["bad"] == 1
    assert main([*args[:-2], "--bad-rows", "skip", "--overwrite"]) == 0
    assert "bad rows by reason: " + kind in capsys.readouterr().out


def test_prepare_refuses_empty_files_and_missing_inputs(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = ["--out", str(tmp_path / "s"), "--quiet"]
    assert main(["prepare", "--input", str(empty), *out]) == 2
    assert "empty" in capsys.readouterr().err
    header = tmp_path / "h.csv"
    header.write_text("label," + ",".join(f"I{i}" for i in range(1, 14)) + ","
                      + ",".join(f"C{i}" for i in range(1, 27)) + "\n")  # fmt: skip
    assert main(["prepare", "--format", "criteo-csv", "--input", str(header), *out]) == 2
    assert "no data rows" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path / "nope.txt"), *out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
