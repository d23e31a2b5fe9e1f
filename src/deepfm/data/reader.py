"""Streaming reader for delimited text (TSV, CSV, space-separated libFM), block by block.

Each block of ``block_bytes`` ends on a line break and is parsed by PyArrow's multi-threaded CSV
parser (the fast path). A block that PyArrow rejects (wrong column count, a bad number, non-UTF-8
bytes) is re-read line by line in Python to find every bad line with its number, column and
reason (the slow path, which only ever runs on blocks that hold a bad row). Under the ``error``
policy the first bad row stops the read with a :class:`DataError`; under ``skip`` bad rows are
left out and counted per reason. No row is ever dropped without being counted.

Line numbers are 1-based physical line numbers in the file. Quoted fields holding line breaks are
not supported (no CTR log format uses them).
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from deepfm.errors import DataError

BadRowPolicy = Literal["error", "skip"]
ColumnType = Literal["label", "float", "string", "dictionary"]

DEFAULT_BLOCK_BYTES = 32 << 20
_EXAMPLES_KEPT = 20

_ARROW_TYPES: dict[str, pa.DataType] = {
    "label": pa.float64(),
    "float": pa.float64(),
    "string": pa.string(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
}


@dataclass
class BadRows:
    """Bad-row policy and tally: ``error`` raises on the first bad row, ``skip`` counts them."""

    policy: BadRowPolicy = "error"
    by_reason: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(f"bad-row policy must be 'error' or 'skip', not {self.policy!r}")

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, path: str, line: int | None, column: str | None, reason: str, kind: str) -> None:
        """Record one bad row; raises under the ``error`` policy. ``kind`` is the count key."""
        if self.policy == "error":
            raise DataError(
                reason,
                path=path,
                line=line,
                field=column,
                hint="fix the row, or pass --bad-rows skip to skip and count such rows",
            )
        self.by_reason[kind] += 1
        if line is not None:
            self.lines.append(line)
        if len(self.examples) < _EXAMPLES_KEPT:
            self.examples.append({"path": path, "line": line, "field": column, "reason": reason})

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.by_reason), "examples": self.examples}


@dataclass
class RawChunk:
    """Parsed rows of one block: columns by name, and each row's 1-based line in ``path``."""

    table: pa.Table
    lines: np.ndarray
    path: str

    def __len__(self) -> int:
        return self.table.num_rows

    def filter(self, keep: np.ndarray) -> RawChunk:
        return RawChunk(self.table.filter(pa.array(keep)), self.lines[keep], self.path)


@dataclass(frozen=True)
class TextLayout:
    """How a delimited file is laid out.

    ``columns`` are all column names in file order; ``types`` says how to parse the columns that
    are read (others are skipped without conversion). ``header``: the first line holds the
    column names. ``label_values``: the raw labels accepted, mapped to 0/1.
    """

    delimiter: str
    columns: tuple[str, ...]
    types: dict[str, ColumnType]
    header: bool = False
    quoting: bool = False
    label_values: dict[float, float] = field(default_factory=lambda: {0.0: 0.0, 1.0: 1.0})

    @property
    def label_column(self) -> str | None:
        return next((c for c, t in self.types.items() if t == "label"), None)


def open_text(path: str | Path) -> IO[bytes]:
    """Open a text file for binary reading, transparently decompressing ``.gz``."""
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=str(path))
    if path.is_dir():
        raise DataError("is a directory, expected a file", path=str(path))
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_header(path: str | Path, delimiter: str) -> list[str]:
    """The column names on the first line of ``path``."""
    with open_text(path) as handle:
        first = handle.readline()
    if not first.strip():
        raise DataError("file is empty, expected a header line", path=str(path), line=1)
    try:
        text = first.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError("header is not valid UTF-8", path=str(path), line=1) from None
    return next(csv.reader([text], delimiter=delimiter))


def iter_blocks(handle: IO[bytes], block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(number of lines before the block, block)``; every block ends with a line break.

    The last block may lack the final line break (a truncated file); it is returned as is.
    """
    lines_before = 0
    carry = b""
    while True:
        data = handle.read(block_bytes)
        if not data:
            break
        data = carry + data
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        block, carry = data[: cut + 1], data[cut + 1 :]
        yield lines_before, block
        lines_before += block.count(b"\n")
    if carry:
        yield lines_before, carry


class DelimitedReader:
    """Reads one delimited file as :class:`RawChunk` s, applying a :class:`BadRows` policy."""

    def __init__(
        self,
        path: str | Path,
        layout: TextLayout,
        bad_rows: BadRows,
        *,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        self.path = str(path)
        self.layout = layout
        self.bad_rows = bad_rows
        self.block_bytes = block_bytes
        self._read_names = [c for c in layout.columns if c in layout.types]
        self._arrow_types = {c: _ARROW_TYPES[layout.types[c]] for c in self._read_names}

    def __iter__(self) -> Iterator[RawChunk]:
        saw_data = False
        with open_text(self.path) as handle:
            header_lines = 0
            if self.layout.header:
                first = handle.readline()
                if not first:
                    raise DataError("file is empty", path=self.path)
                header_lines = 1
            for lines_before, block in iter_blocks(handle, self.block_bytes):
                first_line = header_lines + lines_before + 1
                chunk = self._parse_block(block, first_line)
                if chunk is not None and len(chunk):
                    saw_data = True
                    yield chunk
        if not saw_data and self.bad_rows.total == 0:
            raise DataError("file holds no data rows", path=self.path)

    # -- fast path -----------------------------------------------------------------------------

    def _arrow_parse(self, block: bytes) -> tuple[pa.Table | None, bool]:
        """Parse with PyArrow; returns (table, True) or (None, False) if any row was rejected."""
        rejected = False

        def on_invalid(_row: object) -> str:
            nonlocal rejected
            rejected = True
            return "skip"

        quote = '"' if self.layout.quoting else False
        try:
            table = pa_csv.read_csv(
                io.BytesIO(block),
                read_options=pa_csv.ReadOptions(
                    column_names=list(self.layout.columns), use_threads=True, block_size=8 << 20
                ),
                parse_options=pa_csv.ParseOptions(
                    delimiter=self.layout.delimiter,
                    quote_char=quote,
                    ignore_empty_lines=False,
                    invalid_row_handler=on_invalid,
                ),
                convert_options=pa_csv.ConvertOptions(
                    column_types=self._arrow_types,
                    include_columns=self._read_names,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                    null_values=[""],
                    true_values=[],
                    false_values=[],
                ),
            )
        except pa.ArrowInvalid:
            return None, False
        return (None, False) if rejected else (table, True)

    def _parse_block(self, block: bytes, first_line: int) -> RawChunk | None:
        table, ok = self._arrow_parse(block)
        if ok:
            lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
        else:
            table, lines = self._slow_parse(block, first_line)
        if table is None or table.num_rows == 0:
            return None
        return self._check_values(RawChunk(table, lines, self.path))

    # -- slow path: locate every bad line ------------------------------------------------------

    def _slow_parse(self, block: bytes, first_line: int) -> tuple[pa.Table | None, np.ndarray]:
        raw_lines = block.split(b"\n")
        if raw_lines and raw_lines[-1] == b"":
            raw_lines.pop()
        good: list[bytes] = []
        good_numbers: list[int] = []
        for offset, raw in enumerate(raw_lines):
            number = first_line + offset
            problem = self._diagnose(raw)
            if problem is None:
                good.append(raw)
                good_numbers.append(number)
            else:
                column, reason, kind = problem
                self.bad_rows.add(self.path, number, column, reason, kind)
        if not good:
            return None, np.zeros(0, dtype=np.int64)
        table, ok = self._arrow_parse(b"\n".join(good) + b"\n")
        if not ok:
            raise DataError(
                "PyArrow rejected rows that passed line-by-line validation; "
                "please report this file",
                path=self.path,
                line=first_line,
            )
        return table, np.asarray(good_numbers, dtype=np.int64)

    def _diagnose(self, raw: bytes) -> tuple[str | None, str, str] | None:
        """(column, reason, count key) for a bad line, None for a good one."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = self._column_at(raw, exc.start)
            return column, f"non-UTF-8 bytes at byte {exc.start}", "non_utf8"
        text = text.rstrip("\r")
        if not text.strip():
            return None, "empty line", "empty_line"
        if self.layout.quoting:
            values = next(csv.reader([text], delimiter=self.layout.delimiter))
        else:
            values = text.split(self.layout.delimiter)
        expected = len(self.layout.columns)
        if len(values) != expected:
            return (
                None,
                f"expected {expected} columns, found {len(values)}",
                "wrong_column_count",
            )
        for name, value in zip(self.layout.columns, values, strict=True):
            kind = self.layout.types.get(name)
            if kind in ("label", "float") and value != "":
                try:
                    float(value)
                except ValueError:
                    return name, f"{value[:40]!r} is not a number", "bad_number"
        return None

    def _column_at(self, raw: bytes, byte_offset: int) -> str | None:
        index = raw[:byte_offset].count(self.layout.delimiter.encode())
        return self.layout.columns[index] if index < len(self.layout.columns) else None

    # -- value checks on parsed rows (vectorised) ----------------------------------------------

    def _check_values(self, chunk: RawChunk) -> RawChunk:
        bad = np.zeros(len(chunk), dtype=bool)
        reasons: list[tuple[np.ndarray, str, str, str]] = []
        for name in self._read_names:
            kind = self.layout.types[name]
            if kind not in ("label", "float"):
                continue
            column = chunk.table.column(name)
            if kind == "label":
                allowed = pa.array(list(self.layout.label_values), pa.float64())
                invalid = pc.invert(pc.fill_null(pc.is_in(column, value_set=allowed), False))
                reason = f"label must be one of {sorted(self.layout.label_values)}"
                key = "bad_label"
            else:
                invalid = pc.fill_null(pc.invert(pc.is_finite(column)), False)
                reason, key = "NaN or infinite number", "not_finite"
            mask = invalid.to_numpy(zero_copy_only=False)
            if mask.any():
                reasons.append((mask, name, reason, key))
                bad |= mask
        if not bad.any():
            return chunk
        for row in np.flatnonzero(bad):
            mask, name, reason, key = next(r for r in reasons if r[0][row])
            self.bad_rows.add(self.path, int(chunk.lines[row]), name, reason, key)
        return chunk.filter(~bad)


def map_labels(column: pa.ChunkedArray, label_values: dict[float, float]) -> np.ndarray:
    """Raw label column (already validated) → float32 0/1 array."""
    raw = column.to_numpy(zero_copy_only=False).astype(np.float64)
    if label_values == {0.0: 0.0, 1.0: 1.0}:
        return raw.astype(np.float32)
    out = np.empty(len(raw), dtype=np.float32)
    for source, target in label_values.items():
        out[raw == source] = target
    return out
