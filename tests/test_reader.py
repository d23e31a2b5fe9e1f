"""Malformed input: each case stops with file, line and field, or is skipped and counted."""

from pathlib import Path

import pytest

from conftest import criteo_line, shared_file
from deepfm.data.formats import get_format
from deepfm.data.reader import BadRows
from deepfm.errors import DataError

GOOD = criteo_line(0) + criteo_line(1)


def read(path: Path, policy="error", block_bytes=1 << 20):
    bad = BadRows(policy)
    chunks = list(get_format("criteo").read([path], bad, block_bytes=block_bytes))
    return chunks, bad


def write(tmp_path: Path, text: bytes | str) -> Path:
    path = tmp_path / "data.txt"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


CASES = {
    "wrong_column_count": (
        GOOD + "\t".join(["0"] * 38) + "\n" + criteo_line(0),
        3,
        None,
        "expected 40 columns, found 38",
    ),
    "bad_number": (
        GOOD + criteo_line(1, ints=["1", "2", "3", "4", "abc"] + ["0"] * 8),
        3,
        "I5",
        "'abc' is not a number",
    ),
    "non_utf8": (
        GOOD.encode() + criteo_line(0, cats=["ff\xfe"] + ["0"] * 25).encode("latin-1"),
        3,
        "C1",
        "non-UTF-8",
    ),
    "not_finite": (
        criteo_line(0, ints=["nan"] + ["0"] * 12) + GOOD,
        1,
        "I1",
        "NaN or infinite",
    ),
    "infinite": (
        GOOD + criteo_line(0, ints=["0", "inf"] + ["0"] * 11),
        3,
        "I2",
        "NaN or infinite",
    ),
    "truncated_last_line": (
        GOOD + criteo_line(0)[:30],
        3,
        None,
        "expected 40 columns",
    ),
    "bad_label": (
        GOOD + criteo_line(3),
        3,
        "label",
        "label must be one of",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_policy_names_file_line_and_field(tmp_path, case):
    text, line, field, reason = CASES[case]
    path = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        read(path)
    error = info.value
    assert error.path == str(path) and error.line == line and error.field == field
    assert reason in str(error)
    assert f"{path}:{line}" in str(error)


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_policy_counts_the_bad_row_and_keeps_the_rest(tmp_path, case):
    text, line, _, _ = CASES[case]
    path = write(tmp_path, text)
    chunks, bad = read(path, "skip")
    rows = sum(len(c) for c in chunks)
    total_lines = (text if isinstance(text, bytes) else text.encode()).count(b"\n") + (
        0 if (text if isinstance(text, str) else text.decode("latin-1")).endswith("\n") else 1
    )
    assert bad.total == 1 and rows == total_lines - 1
    assert bad.lines == [line]
    kept = [int(x) for c in chunks for x in c.lines]
    assert line not in kept and len(kept) == rows


def test_bad_rows_across_small_blocks_keep_their_line_numbers(tmp_path):
    lines = [criteo_line(i % 2) for i in range(500)]
    lines[123] = "broken\n"
    lines[401] = criteo_line(0, ints=["x"] + ["0"] * 12)
    chunks, bad = read(write(tmp_path, "".join(lines)), "skip", block_bytes=4096)
    assert len(chunks) > 5
    assert sorted(bad.lines) == [124, 402]
    assert bad.by_reason == {"wrong_column_count": 1, "bad_number": 1}
    kept = [int(x) for c in chunks for x in c.lines]
    assert kept == [n for n in range(1, 501) if n not in (124, 402)]


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read(write(tmp_path, ""))
    with pytest.raises(DataError, match="does not exist"):
        read(tmp_path / "nope.txt")
    header_only = tmp_path / "header.csv"
    header_only.write_text(
        "label,"
        + ",".join(f"I{i}" for i in range(1, 14))
        + ","
        + ",".join(f"C{i}" for i in range(1, 27))
        + "\n"
    )
    with pytest.raises(DataError, match="no data rows"):
        list(get_format("criteo-csv").read([header_only], BadRows()))


def test_unlabeled_criteo_test_file_is_read_without_label(tmp_path):
    path = write(tmp_path, criteo_line(None) * 3)
    chunks, _ = read(path)
    assert "label" not in chunks[0].table.column_names and len(chunks[0]) == 3


def test_real_criteo_sample_reads_every_row(real_criteo_train):
    chunks, bad = read(real_criteo_train)
    assert sum(len(c) for c in chunks) == 11212 and bad.total == 0
    chunks, _ = read(shared_file("criteo", "criteo_test_unlabeled.txt"))
    assert sum(len(c) for c in chunks) == 9999
    csv_path = shared_file("criteo", "criteo_sample_deepctr.txt")
    csv = list(get_format("criteo-csv").read([csv_path], BadRows()))
    assert sum(len(c) for c in csv) == 200
    labels = csv[0].table.column("label").to_numpy()
    assert labels.sum() == 49
