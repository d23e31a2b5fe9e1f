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
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

# "dictionary" columns are parsed as plain strings and dictionary-encoded afterwards: on Criteo
# rows PyArrow's CSV dictionary conversion is about 2x slower than parsing strings and then
# calling ``dictionary_encode`` (measured in benchmarks/prepare_speed.py's baseline)
_ARROW_TYPES: dict[str, pa.DataType] = {
    "label": pa.float64(),
    "float": pa.float64(),
    "string": pa.string(),
    "dictionary": pa.string(),
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


class HashingFile(io.RawIOBase):
    """A binary file whose bytes feed ``hasher`` as they are read (sha256 of a source file,
    computed during the one read the data needs; hashlib releases the GIL on large updates)."""

    def __init__(self, raw: IO[bytes], hasher) -> None:
        super().__init__()
        self._raw = raw
        self.hasher = hasher

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self.hasher.update(memoryview(buffer)[:n])
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_text(path: str | Path, hasher=None) -> IO[bytes]:
    """Open a text file for binary reading, transparently decompressing ``.gz``.

    With ``hasher`` (e.g. ``hashlib.sha256()``) the file's bytes as stored (compressed for
    ``.gz``) are hashed as they are read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=str(path))
    if path.is_dir():
        raise DataError("is a directory, expected a file", path=str(path))
    raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 - returned to the caller
    if hasher is not None:
        raw = io.BufferedReader(HashingFile(raw, hasher), buffer_size=1 << 20)
    if path.suffix == ".gz":
        unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
        unzipped.myfileobj = raw  # closed with the GzipFile, as when it opens the file itself
        return unzipped
    return raw


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


def _fill(handle: IO[bytes], view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the number of bytes read."""
    total = 0
    while total < len(view):
        got = handle.readinto(view[total:])  # type: ignore[attr-defined]
        if not got:
            break
        total += got
    return total


def iter_blocks(handle: IO[bytes], block_bytes: int) -> Iterator[bytes | memoryview]:
    """Yield blocks of about ``block_bytes``; every block ends with a line break.

    The last block may lack the final line break (a truncated file); it is returned as is.
    Each block is read straight into a fresh buffer (no copies of the block's bytes).
    """
    carry = b""
    while True:
        buffer = bytearray(len(carry) + block_bytes)
        buffer[: len(carry)] = carry
        view = memoryview(buffer)
        end = len(carry) + _fill(handle, view[len(carry) :])
        if end == len(carry):
            break
        cut = buffer.rfind(b"\n", 0, end)
        if cut < 0:
            carry = bytes(view[:end])
            continue
        carry = bytes(view[cut + 1 : end])
        yield view[: cut + 1]
    if carry:
        yield carry


class DelimitedReader:
    """Reads one delimited file as :class:`RawChunk` s, applying a :class:`BadRows` policy."""

    def __init__(
        self,
        path: str | Path,
        layout: TextLayout,
        bad_rows: BadRows,
        *,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        hasher=None,
        workers: int = 2,
    ) -> None:
        self.path = str(path)
        self.workers = workers
        self.layout = layout
        self.bad_rows = bad_rows
        self.block_bytes = block_bytes
        self.hasher = hasher
        self._read_names = [c for c in layout.columns if c in layout.types]
        self._arrow_types = {c: _ARROW_TYPES[layout.types[c]] for c in self._read_names}

    def __iter__(self) -> Iterator[RawChunk]:
        saw_data = False
        with open_text(self.path, self.hasher) as handle:
            header_lines = 0
            if self.layout.header:
                first = handle.readline()
                if not first:
                    raise DataError("file is empty", path=self.path)
                header_lines = 1
            lines_seen = header_lines
            for block, parsed in self._parsed_blocks(iter_blocks(handle, self.block_bytes)):
                chunk = self._finish_block(block, parsed, lines_seen + 1)
                lines_seen += parsed[1]
                if chunk is not None and len(chunk):
                    saw_data = True
                    yield chunk
        if not saw_data and self.bad_rows.total == 0:
            raise DataError("file holds no data rows", path=self.path)

    def _parsed_blocks(self, blocks: Iterator[bytes | memoryview]):
        """``(block or None, fast-path result)`` in file order. With ``workers`` > 1 the next
        blocks are parsed in a thread pool (PyArrow releases the GIL) while this one is
        consumed; at most ``workers`` blocks are in flight (memory). The block itself is only
        kept when the fast path failed (the slow path needs it)."""
        if self.workers <= 1:
            for block in blocks:
                parsed = self._fast_parse(block)
                yield (block if parsed[0] is None else None), parsed
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending: deque = deque()
            try:
                for block in blocks:
                    pending.append((block, pool.submit(self._fast_parse, block)))
                    del block
                    if len(pending) >= self.workers:
                        done, future = pending.popleft()
                        parsed = future.result()
                        yield (done if parsed[0] is None else None), parsed
                        del done
                while pending:
                    done, future = pending.popleft()
                    parsed = future.result()
                    yield (done if parsed[0] is None else None), parsed
            finally:
                for _, future in pending:
                    future.cancel()

    # -- fast path -----------------------------------------------------------------------------

    def _arrow_parse(self, block: bytes | memoryview) -> tuple[pa.Table | None, bool]:
        """Parse with PyArrow; returns (table, True) or (None, False) if any row was rejected.

        Single-threaded when blocks are parsed in parallel (PyArrow's own threads cost about
        twice the CPU time for the same block on 2 busy cores)."""
        rejected = False

        def on_invalid(_row: object) -> str:
            nonlocal rejected
            rejected = True
            return "skip"

        quote = '"' if self.layout.quoting else False
        try:
            table = pa_csv.read_csv(
                pa.BufferReader(pa.py_buffer(block)),
                read_options=pa_csv.ReadOptions(
                    column_names=list(self.layout.columns),
                    use_threads=self.workers <= 1,
                    block_size=8 << 20,
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

    def _fast_parse(self, block: bytes | memoryview) -> tuple[pa.Table | None, int]:
        """(dictionary-encoded table, or None if a row was rejected; line breaks in block)."""
        view = memoryview(block)
        breaks = view.obj.count(b"\n", 0, view.nbytes)  # type: ignore[union-attr]
        table, ok = self._arrow_parse(view)
        lines = breaks + (0 if view.nbytes and view[-1] == ord("\n") else 1)
        if not ok or table is None or table.num_rows != lines:
            # rejected rows, or rows that are not lines (a bare \r inside a line)
            return None, breaks
        return self._encode_dictionaries(table), breaks

    def _finish_block(
        self, block: bytes | memoryview, parsed: tuple[pa.Table | None, int], first_line: int
    ) -> RawChunk | None:
        table, _ = parsed
        if table is not None:
            lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
        else:
            table, lines = self._slow_parse(block, first_line)
            if table is not None:
                table = self._encode_dictionaries(table)
        if table is None or table.num_rows == 0:
            return None
        return self._check_values(RawChunk(table, lines, self.path))

    def _encode_dictionaries(self, table: pa.Table) -> pa.Table:
        for name in self._read_names:
            if self.layout.types[name] == "dictionary":
                index = table.column_names.index(name)
                # one chunk, one dictionary per block: encoding a chunked column would give
                # each chunk the dictionary of all chunks so far (Arrow's shared memo table)
                encoded = pc.dictionary_encode(table.column(index).combine_chunks())
                table = table.set_column(index, name, encoded)
        return table

    # -- slow path: locate every bad line ------------------------------------------------------

    def _slow_parse(
        self, block: bytes | memoryview, first_line: int
    ) -> tuple[pa.Table | None, np.ndarray]:
        raw_lines = bytes(block).split(b"\n")
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
        if ok and table is not None and table.num_rows != len(good):
            raise DataError(
                "a line holds a carriage return (\\r) inside it, which splits it in two",
                path=self.path,
                line=first_line,
            )
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
        kinds = {name: self.layout.types[name] for name in self._read_names}
        return check_values(chunk, kinds, self.layout.label_values, self.bad_rows)


def reject_rows(chunk: RawChunk, bad: np.ndarray, reasons: list, bad_rows: BadRows) -> RawChunk:
    """Record the rows flagged in ``bad`` and drop them.

    ``reasons`` holds ``(mask, column, reason, count key)``; a row is reported with the first
    reason whose mask flags it. Only the bad rows are visited in Python.
    """
    if not bad.any():
        return chunk
    for row in np.flatnonzero(bad):
        _, name, reason, key = next(r for r in reasons if r[0][row])
        bad_rows.add(chunk.path, int(chunk.lines[row]), name, reason, key)
    return chunk.filter(~bad)


def check_values(
    chunk: RawChunk,
    kinds: dict[str, ColumnType],
    label_values: dict[float, float],
    bad_rows: BadRows,
) -> RawChunk:
    """Vectorised value checks: labels in ``label_values``, numbers finite (empty is missing)."""
    bad = np.zeros(len(chunk), dtype=bool)
    reasons: list[tuple[np.ndarray, str, str, str]] = []
    for name, kind in kinds.items():
        if kind not in ("label", "float"):
            continue
        column = chunk.table.column(name)
        if kind == "label":
            allowed = pa.array(list(label_values), pa.float64())
            invalid = pc.invert(pc.fill_null(pc.is_in(column, value_set=allowed), False))
            reason = f"label must be one of {sorted(label_values)}"
            key = "bad_label"
        else:
            invalid = pc.fill_null(pc.invert(pc.is_finite(column)), False)
            reason, key = "NaN or infinite number", "not_finite"
        mask = invalid.to_numpy(zero_copy_only=False)
        if mask.any():
            reasons.append((mask, name, reason, key))
            bad |= mask
    return reject_rows(chunk, bad, reasons, bad_rows)


def map_labels(column: pa.ChunkedArray, label_values: dict[float, float]) -> np.ndarray:
    """Raw label column (already validated) → float32 0/1 array."""
    raw = column.to_numpy(zero_copy_only=False).astype(np.float64)
    if label_values == {0.0: 0.0, 1.0: 1.0}:
        return raw.astype(np.float32)
    out = np.empty(len(raw), dtype=np.float32)
    for source, target in label_values.items():
        out[raw == source] = target
    return out
