"""The streaming store: identical to the in-memory path, splits proven, atomic, validated."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import CRITEO_ROWS, CRITEO_TEST_ROWS, REPO, criteo_line, shared_file
from deepfm.cli import main
from deepfm.data import prepare
from deepfm.data.formats import DataFormat, get_format, table_chunk
from deepfm.data.pipeline import load_dataset
from deepfm.data.prepare import prepare_store
from deepfm.data.reader import BadRows
from deepfm.data.schema import FieldSpec, Schema
from deepfm.data.splits import SplitSpec
from deepfm.data.store import SPLITS, Store, is_store
from deepfm.errors import ConfigError, DataError

#: a sample of each format: Criteo's generated (conftest), the others' real (../shared/data)
REAL = {
    "avazu": ("avazu", "avazu_train_sample.csv"),
    "frappe": ("frappe", "frappe.validation.libfm"),
    "ipinyou": ("ipinyou", "train.fm.txt"),
    "movielens-100k": ("movielens_100k",),
}


def prepared(tmp_path: Path, fmt: str, paths, split="random:0.9", **options):
    return prepare_store(
        get_format(fmt),
        [str(p) for p in paths],
        tmp_path / "store",
        split=SplitSpec.parse(split),
        valid_fraction=0.1,
        seed=3,
        **options,
    )


def assert_same(store: Store, dataset) -> None:
    assert store.feature_map.to_dict() == dataset.feature_map.to_dict()
    for split in SPLITS:
        a, b = store.split(split), getattr(dataset, split)
        assert isinstance(a.ids, np.memmap) or len(a) == 0
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.lines, b.lines)
        if b.values is None:
            assert a.values is None
        else:
            np.testing.assert_array_equal(a.values, b.values)


def sample_of(fmt: str, generated) -> Path:
    if fmt == "criteo":
        return generated.train
    return generated.csv if fmt == "criteo-csv" else shared_file(*REAL[fmt])


@pytest.mark.parametrize("split", ["random:0.9", "sequential:6/7"])
@pytest.mark.parametrize("fmt", ["criteo", "criteo-csv", *sorted(REAL)])
def test_store_encodes_every_format_exactly_as_the_in_memory_path(
    tmp_path, fmt, split, generated_criteo
):
    path = sample_of(fmt, generated_criteo)
    result = prepared(tmp_path, fmt, [path], split)
    dataset = load_dataset(
        get_format(fmt), [str(path)], split=SplitSpec.parse(split), valid_fraction=0.1, seed=3
    )
    store = Store.open(result.path)
    assert_same(store, dataset)
    rows = result.manifest["rows"]
    assert rows["train"] + rows["valid"] + rows["test"] == rows["total"] > 0
    assert rows["bad"] == 0 and result.manifest["rows_per_s"] > 0


def test_manifest_records_sources_cardinalities_and_counts(tmp_path, criteo_train):
    manifest = prepared(tmp_path, "criteo", [criteo_train]).manifest
    on_disk = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert on_disk == manifest
    (source,) = manifest["sources"]
    assert source["sha256"] == hashlib.sha256(criteo_train.read_bytes()).hexdigest()
    assert source["rows"] == CRITEO_ROWS and source["bytes"] == criteo_train.stat().st_size
    sizes = manifest["field_cardinalities"]
    assert list(sizes) == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert sum(sizes.values()) == manifest["num_features"]
    assert manifest["split"]["spec"] == "random:9/10" and manifest["labeled"] is True
    store = Store.open(tmp_path / "store")
    assert store.split("train").ids.dtype == np.int32 and store.split("train").values is None


def test_random_split_is_disjoint_complete_and_seeded(tmp_path, criteo_train):
    store = Store.open(prepared(tmp_path, "criteo", [criteo_train]).path)
    ordinals = [store.ordinals(s) for s in SPLITS]
    joined = np.concatenate(ordinals)
    # complete: every input row once; disjoint: no ordinal twice
    np.testing.assert_array_equal(np.sort(joined), np.arange(11212))
    for part in ordinals:  # each split keeps file order
        assert np.all(np.diff(part) > 0)
    # 1,112 test rows of 11,212: Bernoulli(0.1) std 32 rows, so ±160 is 5 sigma
    assert abs(len(ordinals[2]) - 1121) < 160
    again = prepare_store(
        get_format("criteo"),
        [str(criteo_train)],
        tmp_path / "other",
        split=SplitSpec.parse("random:0.9"),
        seed=4,
    )
    other = Store.open(again.path).ordinals("test")
    assert len(np.intersect1d(other, ordinals[2])) < 0.3 * len(other)


def test_sequential_split_puts_every_test_row_after_every_training_row(tmp_path, criteo_train):
    store = Store.open(prepared(tmp_path, "criteo", [criteo_train], "sequential:6/7").path)
    train, valid, test = (store.ordinals(s) for s in SPLITS)
    assert train.max() < valid.min() and valid.max() < test.min()
    cut = 11212 * 6 // 7
    assert len(test) == 11212 - cut and len(train) + len(valid) == cut
    np.testing.assert_array_equal(np.concatenate([train, valid, test]), np.arange(11212))
    lines = np.concatenate([store.split(s).lines for s in SPLITS])
    assert np.all(np.diff(lines) > 0)  # file order


def test_sequential_split_with_skipped_rows_counts_good_rows_only(tmp_path):
    lines = [criteo_line(i % 2) for i in range(70)]
    lines[10] = "broken\n"
    path = tmp_path / "data.txt"
    path.write_text("".join(lines))
    result = prepared(tmp_path, "criteo", [path], "sequential:6/7", bad_rows=BadRows("skip"))
    rows = result.manifest["rows"]
    assert rows["total"] == 69 and rows["bad"] == 1 and rows["test"] == 69 - 69 * 6 // 7
    assert result.manifest["bad_rows"]["by_reason"] == {"wrong_column_count": 1}
    store = Store.open(result.path)
    assert 11 not in np.concatenate([store.split(s).lines for s in SPLITS])


def test_existing_store_needs_overwrite_and_other_directories_are_refused(tmp_path, criteo_train):
    prepared(tmp_path, "criteo", [criteo_train])
    with pytest.raises(ConfigError, match="--overwrite"):
        prepared(tmp_path, "criteo", [criteo_train])
    prepared(tmp_path, "criteo", [criteo_train], "sequential:6/7", overwrite=True)
    assert Store.open(tmp_path / "store").manifest["split"]["spec"] == "sequential:6/7"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a store"):
        prepare_store(
            get_format("criteo"),
            [str(criteo_train)],
            tmp_path / "mine",
            split=SplitSpec.parse("none"),
            overwrite=True,
        )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "store"]  # no partial left


class _FailingFormat(DataFormat):
    """Yields real chunks, then fails (a crash in the middle of a prepare)."""

    name = "failing"

    def read_file(self, path, bad_rows, *, block_bytes, digests=None):
        table = pa.table({"x": pa.array(["a", "b"] * 50), "label": pa.array([0.0, 1.0] * 50)})
        yield table_chunk(table, str(path))
        raise DataError("disk went away", path=str(path))


def test_a_failed_prepare_leaves_nothing_that_looks_like_a_store(tmp_path):
    fmt = _FailingFormat(Schema((FieldSpec("x"),)))
    with pytest.raises(DataError, match="disk went away"):
        prepare_store(fmt, ["in"], tmp_path / "store", split=SplitSpec.parse("none"))
    assert list(tmp_path.iterdir()) == []


KILLED = textwrap.dedent(
    """
    import sys, time, pyarrow as pa
    from deepfm.data.formats import DataFormat, table_chunk
    from deepfm.data.prepare import prepare_store
    from deepfm.data.reader import Block
    from deepfm.data.schema import FieldSpec, Schema
    from deepfm.data.splits import SplitSpec

    class Stalling(DataFormat):
        name = "stalling"
        def blocks(self, path, *, block_bytes, hasher=None):
            for number in range(3):
                yield Block(str(path), number, first_line=1 + 10000 * number)
        def read_block(self, block, bad_rows, *, block_bytes):
            if block.number == 2:
                open(sys.argv[2], "w").close()  # the store's files are being written: kill me
                time.sleep(60)
            table = pa.table({"x": ["a", "b"] * 5000, "label": [0.0, 1.0] * 5000})
            return table_chunk(table, block.path, block.first_line), 0

    prepare_store(Stalling(Schema((FieldSpec("x"),))), ["in"], sys.argv[1],
                  split=SplitSpec.parse("random:0.9"))
    """
)


def written(folder: Path) -> bool:
    return any(p.is_file() and p.stat().st_size for p in folder.glob(".store.partial-*/**/*"))


def test_kill_9_mid_prepare_leaves_no_store_and_the_rerun_cleans_up(tmp_path, criteo_train):
    store, ready = tmp_path / "store", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(store), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and written(tmp_path)):  # killed while writing its files
            assert child.poll() is None and time.monotonic() < deadline, "child never got ready"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not store.exists() and not is_store(store)
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".store.partial-")]
    assert len(partial) == 1
    with pytest.raises(DataError, match="interrupted prepare"):
        Store.open(store)
    prepared(tmp_path, "criteo", [criteo_train])
    assert is_store(store)
    assert not any(p.name.startswith(".store.partial-") for p in tmp_path.iterdir())


def test_a_damaged_store_is_refused(tmp_path, criteo_train):
    path = prepared(tmp_path, "criteo", [criteo_train]).path
    ids = path / "train" / "ids.i32"
    ids.write_bytes(ids.read_bytes()[:-4])
    with pytest.raises(DataError, match="damaged"):
        Store.open(path)
    with pytest.raises(DataError, match="not a store"):
        Store.open(tmp_path)


def test_unlabeled_input_makes_an_unlabeled_store(tmp_path, criteo_test_unlabeled):
    result = prepared(tmp_path, "criteo", [criteo_test_unlabeled], "none")
    store = Store.open(result.path)
    assert not store.labeled and store.split("train").labels is None
    assert result.manifest["rows"]["train"] + result.manifest["rows"]["valid"] == CRITEO_TEST_ROWS
    assert not (result.path / "train" / "labels.f32").exists()


def test_mixing_labeled_and_unlabeled_files_is_refused(
    tmp_path, criteo_train, criteo_test_unlabeled
):
    with pytest.raises(ConfigError, match="label column"):
        prepared(tmp_path, "criteo", [criteo_train, criteo_test_unlabeled])


def test_several_input_files_keep_their_own_line_numbers(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(criteo_line(i % 2) for i in range(30)))
    b.write_text("".join(criteo_line(i % 2) for i in range(20)))
    result = prepared(tmp_path, "criteo", [a, b], "sequential:4/5")
    store = Store.open(result.path)
    lines = np.concatenate([store.split(s).lines for s in SPLITS])
    np.testing.assert_array_equal(lines, np.r_[1:31, 1:21])
    assert [s["rows"] for s in result.manifest["sources"]] == [30, 20]


BAGS = Schema(
    (
        FieldSpec("tags", kind="multi", separator="|", pooling="mean", max_len=2),
        FieldSpec("price", kind="numeric", numeric="value"),
        FieldSpec("shop"),
    ),
    min_count=1,
)


def test_bags_value_fields_and_truncation_match_the_in_memory_encoder(tmp_path):
    path = tmp_path / "data.csv"
    rows = ["label,tags,price,shop"]
    rng = np.random.default_rng(0)
    for i in range(3000):
        tags = "|".join(f"t{t}" for t in rng.integers(0, 40, rng.integers(0, 5)))
        price = "" if i % 17 == 0 else f"{rng.normal(5, 2):.3f}"
        rows.append(f"{i % 2},{tags},{price},s{rng.integers(0, 30)}")
    path.write_text("\n".join(rows) + "\n")
    fmt = get_format("csv", BAGS)
    for split in ("random:0.8", "sequential:3/4"):
        spec = SplitSpec.parse(split)
        result = prepare_store(
            fmt, [str(path)], tmp_path / split.replace(":", "_").replace("/", "_"), split=spec
        )
        dataset = load_dataset(fmt, [str(path)], split=spec)
        store = Store.open(result.path)
        assert store.feature_map.num_slots == 4 and store.feature_map.needs_values
        assert_same(store, dataset)
        # bags longer than max_len 2 among the training rows are counted
        assert result.manifest["truncated_bags"]["tags"] > 0


def test_cli_prepare_then_train_from_store_then_predict_unlabeled(
    tmp_path, capsys, criteo_train, criteo_test_unlabeled
):
    store, bundle = tmp_path / "store", tmp_path / "bundle"
    assert main(["prepare", "--input", str(criteo_train), "--out", str(store), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "rows_per_s" in printed
    assert main(["prepare", "--input", str(criteo_train), "--out", str(store)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    fast = ["--epochs", "1", "--hidden", "16", "--quiet", "--batch-size", "512"]
    assert main(["train", "--store", str(store), "--out", str(bundle), *fast]) == 0
    metrics = json.loads((bundle / "metrics.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())
    assert metrics["rows"]["train"] == manifest["rows"]["train"]
    assert 0.5 < metrics["test"]["auc"] <= 1
    assert main(["train", "--store", str(store), "--data", "x", "--out", "b", *fast]) == 2
    assert "cannot be combined with --store" in capsys.readouterr().err
    out = tmp_path / "p.txt"
    assert (
        main(
            [
                "predict",
                "--model",
                str(bundle),
                "--data",
                str(criteo_test_unlabeled),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    p = np.loadtxt(out)
    assert len(p) == CRITEO_TEST_ROWS and np.all((p > 0) & (p < 1))


def test_prepare_command_starts_without_torch(tmp_path, criteo_csv):
    code = (
        "import sys; from deepfm.cli import main; "
        f"rc = main(['prepare', '--format', 'criteo-csv', '--input', {str(criteo_csv)!r}, "
        f"'--out', {str(tmp_path / 's')!r}, '--quiet']); "
        "assert 'torch' not in sys.modules, 'prepare imported torch'; sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _generated(path: Path, rows: int, seed: int = 0) -> Path:
    """Criteo-format rows from benchmarks/make_criteo.py, with the long tail."""
    from make_criteo import write_criteo  # conftest puts benchmarks/ on the path

    write_criteo(path, rows, seed=seed, vocab_cap=2000, tail_share=0.9)
    return path


def _same_stores(a: Path, b: Path) -> None:
    left, right = Store.open(a), Store.open(b)
    assert json.loads(left.feature_map.to_json()) == json.loads(right.feature_map.to_json())
    for split in SPLITS:
        x, y = left.split(split), right.split(split)
        for name in ("ids", "values", "labels", "lines"):
            first, second = getattr(x, name), getattr(y, name)
            assert (first is None) == (second is None)
            if first is not None:
                np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_two_workers_and_small_blocks_make_the_same_store_as_one(tmp_path, monkeypatch, start):
    # `deepfm prepare` forks its workers; a caller that imported torch (as this test process
    # has) gets spawned ones: both must give the one-worker store
    monkeypatch.setattr(prepare, "_start_method", lambda: start)
    data = _generated(tmp_path / "data.txt", 20_000)
    fmt = get_format("criteo")
    common = {"split": SplitSpec.parse("random:0.9"), "seed": 3, "min_count": 1}
    one = prepare_store(fmt, [str(data)], tmp_path / "one", workers=1, **common)
    two = prepare_store(
        fmt, [str(data)], tmp_path / "two", workers=2, block_bytes=1 << 20, memory_mb=16, **common
    )
    assert two.manifest["workers"] == 2 and one.manifest["workers"] == 1
    _same_stores(one.path, two.path)
    assert sum(one.manifest["distinct_values"].values()) > 50_000  # the long tail is there
    lines = np.concatenate([Store.open(two.path).split(s).lines for s in SPLITS])
    np.testing.assert_array_equal(np.sort(lines), np.arange(1, 20_001))
    assert not any(two.path.rglob("_work*"))  # every work file removed


def test_the_prepare_command_forks_its_workers_and_a_torch_caller_spawns_them():
    code = "import deepfm.data.prepare as p; print(p._start_method())"
    run = [sys.executable, "-c"]
    assert subprocess.run([*run, code], capture_output=True, text=True).stdout.strip() == "fork"
    code = "import torch; " + code
    assert subprocess.run([*run, code], capture_output=True, text=True).stdout.strip() == "spawn"


def test_bad_rows_in_later_blocks_are_named_by_their_file_line(tmp_path):
    data = _generated(tmp_path / "data.txt", 12_000)
    lines = data.read_text().splitlines(keepends=True)
    lines[9_876] = "1\tnot-a-number" + "\t" * 38 + "\n"  # line 9,877, in the third MiB
    data.write_text("".join(lines))
    fmt = get_format("criteo")
    small = {"split": SplitSpec.parse("random:0.9"), "block_bytes": 1 << 20}
    with pytest.raises(DataError, match=r"data.txt:9877, field 'I1'"):
        prepare_store(fmt, [str(data)], tmp_path / "s", workers=2, **small)
    result = prepare_store(
        fmt, [str(data)], tmp_path / "s", workers=2, bad_rows=BadRows("skip"), **small
    )
    assert result.manifest["bad_rows"]["examples"][0]["line"] == 9877
    assert result.manifest["rows"]["total"] == 11_999


def test_globs_gzip_and_zstd_inputs_make_the_same_store_as_plain_files(tmp_path):
    import gzip

    import pyarrow as pa

    data = _generated(tmp_path / "day_0.txt", 3_000)
    text = data.read_bytes()
    (tmp_path / "day_1.txt.gz").write_bytes(gzip.compress(text))
    with pa.output_stream(str(tmp_path / "day_2.txt.zst"), compression="zstd") as sink:
        sink.write(text)
    fmt = get_format("criteo")
    split = {"split": SplitSpec.parse("sequential:6/7")}
    plain = prepare_store(fmt, [str(data)] * 3, tmp_path / "plain", **split)
    globbed = prepare_store(
        fmt,
        [str(tmp_path / "day_*")],
        tmp_path / "globbed",
        workers=2,
        block_bytes=1 << 18,
        **split,
    )
    _same_stores(plain.path, globbed.path)
    sources = globbed.manifest["sources"]
    assert [Path(s["path"]).name for s in sources] == ["day_0.txt", "day_1.txt.gz", "day_2.txt.zst"]
    assert (
        sources[1]["sha256"] == hashlib.sha256((tmp_path / "day_1.txt.gz").read_bytes()).hexdigest()
    )
    with pytest.raises(DataError, match="no file matches"):
        prepare_store(fmt, [str(tmp_path / "nothing_*")], tmp_path / "x", **split)
    (tmp_path / "broken.txt.zst").write_bytes((tmp_path / "day_2.txt.zst").read_bytes()[:-50])
    with pytest.raises(DataError, match="truncated or damaged"):
        prepare_store(fmt, [str(tmp_path / "broken.txt.zst")], tmp_path / "y", **split)


def test_a_sharded_store_gives_each_rank_its_own_files(tmp_path):
    from deepfm.data.store import Shard, ShardedArray

    data = _generated(tmp_path / "data.txt", 5_000)
    fmt = get_format("criteo")
    common = {"split": SplitSpec.parse("random:0.9"), "seed": 1}
    whole = prepare_store(fmt, [str(data)], tmp_path / "whole", **common)
    sharded = prepare_store(fmt, [str(data)], tmp_path / "sharded", shards=4, **common)
    _same_stores(whole.path, sharded.path)
    store = Store.open(sharded.path)
    files = store.manifest["arrays"]["train"]["ids"]["files"]
    assert len(files) == 4 and store.manifest["shards"] == 4
    everything = store.split("train").ids
    assert isinstance(everything, ShardedArray) and len(everything) == store.rows("train")
    for rank in range(2):  # 2 ranks of 4 shards: each maps its two files only
        part = store.split("train", Shard(rank, 2)).ids
        assert isinstance(part, ShardedArray)
        assert [Path(p.filename).name for p in part.parts] == [
            Path(f).name for f in files[2 * rank : 2 * rank + 2]
        ]
        start, stop = Shard(rank, 2).bounds(store.rows("train"))
        np.testing.assert_array_equal(np.asarray(part), np.asarray(everything)[start:stop])
    rank = store.split("train", Shard(3, 4)).ids  # one shard: a plain memory map
    assert isinstance(rank, np.memmap) and Path(rank.filename).name == Path(files[3]).name
    order = np.random.default_rng(0).permutation(len(everything))[:100]
    np.testing.assert_array_equal(everything[order], np.asarray(everything)[order])


def test_training_reads_a_sharded_store(tmp_path):
    data = _generated(tmp_path / "data.txt", 3_000)
    store = tmp_path / "store"
    assert (
        main(
            [
                "prepare",
                "--input",
                str(data),
                "--out",
                str(store),
                "--shards",
                "3",
                "--quiet",
                "--min-count",
                "2",
            ]
        )
        == 0
    )
    fast = ["--epochs", "1", "--hidden", "8", "--quiet", "--batch-size", "256", "--threads", "1"]
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "b"), *fast]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["rows"]["train"] == Store.open(store).rows("train")


def test_hashing_an_input_stops_when_its_preparation_gives_up(tmp_path):
    import threading

    from deepfm.common import file_sha256

    path = tmp_path / "input.txt"
    path.write_bytes(b"x" * 1000)
    stop = threading.Event()
    assert file_sha256(path, stop) == hashlib.sha256(b"x" * 1000).hexdigest()
    stop.set()  # a later phase failed: the digest is not needed, the file is not read on
    assert file_sha256(path, stop) == ""
