"""Streaming reader for delimited text (TSV, CSV, space-separated libFM), block by block.

Each block of ``block_bytes`` ends on a line break and is parsed by PyArrow's multi-threaded CSV
parser (the fast path). A block that PyArrow rejects (wrong column count, a bad number, non-UTF-8
bytes) is re-read line by line in Python to find every bad line with its number, column and
reason (the slow path, which only ever runs on blocks that hold a bad row). Under the ``error``
policy the first bad row stops the read with a :class:`DataError`; under ``skip`` bad rows are
left out and counted per reason. No row is ever dropped without being counted.

Line numbers are 1-based physical line numbers in the file. Quoted fields holding line breaks are
not supported (no CTR log format uses them).

A file is cut into :class:`Block` s that parse on their own, in any process: byte ranges of a
plain file (each block owns the lines that start in its range) or the bytes of a compressed file
(``.gz``, ``.zst``), which is read as one stream. A block is parsed with its lines numbered from
1 and its bad rows collected; whoever reads the blocks in order shifts both to the file's line
numbers (:meth:`BadRows.replay`), so messages name the right line whichever process parsed it.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections import Counter, deque
from collections.abc import Iterable, Iterator
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
#: no row of any CTR log is this long; a longer "line" means a binary file or a device
MAX_LINE_BYTES = 64 << 20
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
    #: a block's tally: every bad row kept as ``(path, line, column, reason, kind)``, neither
    #: raised nor counted, for :meth:`replay` in file order
    entries: list[tuple] | None = None

    @classmethod
    def collecting(cls) -> BadRows:
        return cls("skip", entries=[])

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(f"bad-row policy must be 'error' or 'skip', not {self.policy!r}")

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, path: str, line: int | None, column: str | None, reason: str, kind: str) -> None:
        """Record one bad row; raises under the ``error`` policy. ``kind`` is the count key."""
        if self.entries is not None:
            self.entries.append((path, line, column, reason, kind))
            return
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

    def replay(self, entries: list[tuple], line_shift: int) -> None:
        """Record a block's collected bad rows, their lines shifted by ``line_shift``."""
        for path, line, column, reason, kind in entries:
            self.add(path, None if line is None else line + line_shift, column, reason, kind)

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.by_reason), "examples": self.examples}


@dataclass(frozen=True)
class Block:
    """A part of an input file that parses on its own: the lines that start in the byte range
    ``[start, stop)`` of a plain file, or ``data`` (bytes of a compressed file, read in order).
    ``first_line``: the file line of its first line, when known before the blocks before it
    are parsed."""

    path: str
    number: int
    start: int = 0
    stop: int = 0
    data: bytes | None = None
    first_line: int | None = None


def _finish_line(handle: IO[bytes], path: str | Path) -> bytes:
    """The bytes up to and including the next line break (or the end of the file); a line
    longer than :data:`MAX_LINE_BYTES` is refused (a binary file, not rows of text)."""
    out = bytearray()
    while True:
        piece = handle.read(1 << 16)
        if not piece:
            return bytes(out)
        cut = piece.find(b"\n")
        if cut >= 0:
            out += piece[: cut + 1]
            return bytes(out)
        out += piece
        if len(out) > MAX_LINE_BYTES:
            raise DataError(_too_long(), path=str(path))


def read_range(
    path: str | Path, start: int, stop: int, *, line_start: bool = False
) -> bytearray | bytes:
    """The lines of a plain file that start at a byte in ``[start, stop)``: a line under way at
    ``start`` belongs to the range before (unless ``line_start``: ``start`` is the first data
    byte, after a header or a byte-order mark), the last line is read to its end."""
    try:
        return _read_range(path, start, stop, line_start)
    except OSError as exc:
        raise read_error(path, exc) from None


def _read_range(path: str | Path, start: int, stop: int, line_start: bool) -> bytearray | bytes:
    with open(path, "rb") as handle:
        begin = start
        if start > 0 and not line_start:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                begin = start + len(_finish_line(handle, path))
        if begin >= stop:
            return b""
        handle.seek(begin)
        data = bytearray(stop - begin)
        data = data[: handle.readinto(data)]
        if data and not data.endswith(b"\n"):
            data += _finish_line(handle, path)  # in place, no copy of the block
        return data


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


class _ArrowRaw(io.RawIOBase):
    """A PyArrow input stream (zstd) as a Python raw file (buffered for ``readline``)."""

    def __init__(self, stream, path: str) -> None:
        super().__init__()
        self._stream, self._path = stream, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            return self._stream.readinto(buffer)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise DataError(
                f"the compressed file is truncated or damaged ({exc})", path=self._path
            ) from None

    def close(self) -> None:
        self._stream.close()
        super().close()


COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


def is_compressed(path: str | Path) -> bool:
    return Path(path).suffix in COMPRESSED_SUFFIXES


UTF8_BOM = b"\xef\xbb\xbf"
#: what reading a file can raise besides DataError: I/O errors, and from ``.gz`` a file that
#: is not gzip (BadGzipFile, an OSError), cut short (EOFError) or corrupt (zlib.error)
READ_ERRORS = (OSError, EOFError, zlib.error)


def read_error(path: str | Path, exc: BaseException) -> DataError:
    """A read failure as a DataError naming the file."""
    if isinstance(exc, EOFError):
        reason = f"the compressed file ends early (truncated?): {exc}"
    elif isinstance(exc, gzip.BadGzipFile | zlib.error):
        reason = f"not a valid gzip file: {exc}"
    else:
        reason = f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"
    return DataError(reason, path=str(path))


class CheckedFile:
    """A binary file whose read errors surface as :class:`DataError` naming the file."""

    def __init__(self, handle: IO[bytes], path: str | Path) -> None:
        self._handle, self._path = handle, path

    def _call(self, name: str, *args):
        try:
            return getattr(self._handle, name)(*args)
        except READ_ERRORS as exc:
            raise read_error(self._path, exc) from None

    def read(self, *args) -> bytes:
        return self._call("read", *args)

    def readinto(self, buffer) -> int:
        return self._call("readinto", buffer)

    def readline(self, *args) -> bytes:
        return self._call("readline", *args)

    def peek(self, *args) -> bytes:
        return self._call("peek", *args)

    def tell(self) -> int:
        return self._call("tell")

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> CheckedFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_text(path: str | Path, hasher=None) -> IO[bytes]:
    """Open a text file for binary reading, transparently decompressing ``.gz`` and ``.zst``
    and skipping a UTF-8 byte-order mark. Read errors (a truncated or fake ``.gz`` or
    ``.zst``, no permission) are :class:`DataError` s naming the file.

    With ``hasher`` (e.g. ``hashlib.sha256()``) the file's bytes as stored (compressed for
    ``.gz``) are hashed as they are read.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=str(path))
    if path.is_dir():
        raise DataError("is a directory, expected a file", path=str(path))
    try:
        raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 - returned to the caller
    except OSError as exc:
        raise read_error(path, exc) from None
    if hasher is not None:
        raw = io.BufferedReader(HashingFile(raw, hasher), buffer_size=1 << 20)
    handle = raw
    if path.suffix == ".gz":
        handle = gzip.GzipFile(fileobj=raw, mode="rb")
        handle.myfileobj = raw  # closed with the GzipFile, as when it opens the file itself
    elif path.suffix in (".zst", ".zstd"):
        stream = pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")
        handle = io.BufferedReader(_ArrowRaw(stream, str(path)), buffer_size=1 << 20)
    checked = CheckedFile(handle, path)
    try:
        if checked.peek(len(UTF8_BOM))[: len(UTF8_BOM)] == UTF8_BOM:
            checked.read(len(UTF8_BOM))  # Excel and Notepad start UTF-8 files with one
    except DataError:
        checked.close()
        raise
    return checked  # type: ignore[return-value]


def read_header(path: str | Path, delimiter: str) -> list[str]:
    """The column names on the first line of ``path``."""
    with open_text(path) as handle:  # a byte-order mark is skipped
        first = first_line(handle, path)
    if not first.strip():
        raise DataError("file is empty, expected a header line", path=str(path), line=1)
    try:
        text = first.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError("header is not valid UTF-8", path=str(path), line=1) from None
    return next(csv.reader([text], delimiter=delimiter))


def _has_blank_line(view: memoryview) -> bool:
    """Whether the block holds an empty line (``\n`` or ``\r\n`` alone)."""
    data, size = view.obj, view.nbytes  # blocks start at offset 0 of their buffer
    if size and (view[0] == ord("\n") or bytes(view[:2]) == b"\r\n"):
        return True
    return data.find(b"\n\n", 0, size) >= 0 or data.find(b"\n\r\n", 0, size) >= 0  # type: ignore[union-attr]


def _fill(handle: IO[bytes], view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the number of bytes read."""
    total = 0
    while total < len(view):
        got = handle.readinto(view[total:])  # type: ignore[attr-defined]
        if not got:
            break
        total += got
    return total


def first_line(handle: IO[bytes], path: str | Path) -> bytes:
    """The first line of ``handle`` (at most :data:`MAX_LINE_BYTES`: a file whose first line
    is longer is not rows of text, e.g. /dev/zero or a binary file)."""
    line = handle.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES:
        raise DataError(_too_long(), path=str(path), line=1)
    return line


def _too_long() -> str:
    return f"a line longer than {MAX_LINE_BYTES >> 20} MiB: not a text file of rows"


def iter_blocks(
    handle: IO[bytes], block_bytes: int, path: str | Path | None = None
) -> Iterator[bytes | memoryview]:
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
            if len(carry) > MAX_LINE_BYTES:
                raise DataError(_too_long(), path=None if path is None else str(path))
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

    def blocks(self) -> Iterator[Block]:
        """The file's blocks in order: byte ranges of a plain file (nothing is read here but the
        header), the bytes themselves for a compressed file or when hashing."""
        path = Path(self.path)
        with open_text(path) as handle:  # past a byte-order mark, and the header if any
            if self.layout.header and not first_line(handle, path):
                raise DataError("file is empty", path=self.path)
            header = handle.tell() if not is_compressed(path) else 0
        first = 2 if self.layout.header else 1
        if not is_compressed(path) and self.hasher is None:
            if not path.exists():
                raise DataError("file does not exist", path=self.path)
            if path.is_dir():
                raise DataError("is a directory, expected a file", path=self.path)
            size = path.stat().st_size
            if size <= header:  # no data: one empty block, so that the reader sees the file
                yield Block(self.path, 0, header, header, first_line=first)
            for number, start in enumerate(range(header, size, self.block_bytes)):
                stop = min(start + self.block_bytes, size)
                yield Block(
                    self.path, number, start, stop, first_line=first if number == 0 else None
                )
            return
        with open_text(path, self.hasher) as handle:
            if self.layout.header:
                first_line(handle, path)
            for number, data in enumerate(iter_blocks(handle, self.block_bytes, path)):
                yield Block(
                    self.path, number, data=bytes(data), first_line=first if number == 0 else None
                )

    def read_block(self, block: Block) -> tuple[RawChunk | None, int]:
        """Parse one block: its rows with lines numbered from 1 within the block, and the line
        breaks it holds. Bad rows go to this reader's tally, numbered the same way (a
        collecting tally in a worker: :meth:`BadRows.replay` shifts them)."""
        data = (
            block.data
            if block.data is not None
            else read_range(
                self.path, block.start, block.stop, line_start=block.first_line is not None
            )
        )
        if not data:
            return None, 0
        parsed = self._fast_parse(data)
        return self._finish_block(data, parsed, 1), parsed[1]

    def __iter__(self) -> Iterator[RawChunk]:
        """Every block in order, rows numbered by file line; bad rows recorded in order. With
        ``workers`` > 1 the next blocks parse in threads (PyArrow releases the GIL)."""
        parsed = prefetch(
            lambda b: parse_collecting(self._parse_into, b), self.blocks(), self.workers
        )
        yield from in_file_order(parsed, self.bad_rows, self.path)

    def _parse_into(self, block: Block, bad_rows: BadRows) -> tuple[RawChunk | None, int]:
        reader = DelimitedReader(
            self.path, self.layout, bad_rows, block_bytes=self.block_bytes, workers=self.workers
        )
        return reader.read_block(block)

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
        # an ASCII block is valid UTF-8: PyArrow's check of every string (~4% of prepare's CPU
        # time) is only needed where a byte is >= 0x80
        ascii_only = np.frombuffer(block, np.uint8).max(initial=0) < 0x80
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
                    check_utf8=not ascii_only,
                ),
            )
        except pa.ArrowInvalid:
            return None, False
        return (None, False) if rejected else (table, True)

    def _fast_parse(self, block: bytes | memoryview) -> tuple[pa.Table | None, int]:
        """(dictionary-encoded table, or None if a row was rejected; line breaks in block)."""
        view = memoryview(block)
        breaks = view.obj.count(b"\n", 0, view.nbytes)  # type: ignore[union-attr]
        if _has_blank_line(view):
            return None, breaks  # PyArrow reads a blank line as a row of nulls: a bad row
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
        if not ok or table is None or table.num_rows != len(good):
            # lines that passed the checks above and still fail PyArrow (a number Python
            # reads but PyArrow does not, like "1_000"; a bare \r that splits a line): find
            # each by bisection, report it with its line, keep the rest
            rejected = self._rejected(good)
            for index in rejected:
                column, reason, kind = self._arrow_reason(good[index])
                self.bad_rows.add(self.path, good_numbers[index], column, reason, kind)
            good = [raw for i, raw in enumerate(good) if i not in rejected]
            good_numbers = [n for i, n in enumerate(good_numbers) if i not in rejected]
            if not good:
                return None, np.zeros(0, dtype=np.int64)
            table, ok = self._arrow_parse(b"\n".join(good) + b"\n")
            assert ok and table is not None and table.num_rows == len(good), self.path
        return table, np.asarray(good_numbers, dtype=np.int64)

    def _parses(self, lines: list[bytes]) -> bool:
        table, ok = self._arrow_parse(b"\n".join(lines) + b"\n")
        return ok and table is not None and table.num_rows == len(lines)

    def _rejected(self, lines: list[bytes], offset: int = 0) -> set[int]:
        """Indices (plus ``offset``) of the lines PyArrow rejects, by bisection."""
        if self._parses(lines):
            return set()
        if len(lines) == 1:
            return {offset}
        middle = len(lines) // 2
        return self._rejected(lines[:middle], offset) | self._rejected(
            lines[middle:], offset + middle
        )

    def _arrow_reason(self, raw: bytes) -> tuple[str | None, str, str]:
        """(column, reason, count key) of one line PyArrow rejects."""
        if b"\r" in raw.rstrip(b"\r"):
            return None, "a carriage return (\\r) inside the line splits it in two", "bare_cr"
        try:
            pa_csv.read_csv(
                pa.BufferReader(raw + b"\n"),
                read_options=pa_csv.ReadOptions(column_names=list(self.layout.columns)),
                parse_options=pa_csv.ParseOptions(
                    delimiter=self.layout.delimiter,
                    quote_char='"' if self.layout.quoting else False,
                ),
                convert_options=pa_csv.ConvertOptions(
                    column_types=self._arrow_types, include_columns=self._read_names
                ),
            )
        except pa.ArrowInvalid as exc:
            message = str(exc).splitlines()[0]
            found = re.search(r"column #(\d+)", message)
            index = int(found.group(1)) if found else -1
            column = self.layout.columns[index] if 0 <= index < len(self.layout.columns) else None
            value = re.search(r"invalid value '(.*)'", message)
            if value is not None:
                return column, f"{value.group(1)[:40]!r} is not a number", "bad_number"
            return column, f"rejected by the CSV parser: {message[:200]}", "unparseable"
        return None, "rejected by the CSV parser", "unparseable"

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


@dataclass
class ParsedBlock:
    """A block's rows (lines numbered from 1 within the block, or by file line when the block
    knows its first line), its line breaks, its collected bad rows, and the error that stopped
    it (lines numbered the same way)."""

    block: Block
    chunk: RawChunk | None
    breaks: int
    bad: list[tuple]
    error: DataError | None = None


def parse_collecting(parse, block: Block) -> ParsedBlock:
    """``parse(block, bad_rows) -> (chunk, breaks)`` with a collecting tally; an error that
    stops the block is kept for the reader in file order to raise (with the right line)."""
    tally = BadRows.collecting()
    try:
        chunk, breaks = parse(block, tally)
    except DataError as exc:
        return ParsedBlock(block, None, 0, tally.entries or [], exc)
    return ParsedBlock(block, chunk, breaks, tally.entries or [])


def prefetch(function, items: Iterable, threads: int) -> Iterator:
    """``map(function, items)`` in order, the next ``threads`` items computed ahead in threads."""
    if threads <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def in_file_order(
    parsed: Iterable[ParsedBlock], bad_rows: BadRows, path: str
) -> Iterator[RawChunk]:
    """The rows of one file's parsed blocks (given in order), numbered by file line; each
    block's bad rows recorded (or raised) in order. A file with no row, good or bad, is an
    error."""
    next_line = 1
    saw_data = False
    for block in parsed:
        if block.block.first_line is not None:
            next_line = block.block.first_line
        shift = next_line - 1
        bad_rows.replay(block.bad, shift)
        if block.error is not None:
            raise shifted(block.error, shift)
        if block.chunk is not None and len(block.chunk):
            saw_data = True
            yield RawChunk(block.chunk.table, block.chunk.lines + shift, block.chunk.path)
        next_line += block.breaks
    if not saw_data and bad_rows.total == 0:
        raise DataError("file holds no data rows", path=path)


def shifted(error: DataError, lines: int) -> DataError:
    """``error`` with its line moved by ``lines`` (a block's line → the file's)."""
    if error.line is None or lines == 0:
        return error
    return DataError(
        error.reason, path=error.path, line=error.line + lines, field=error.field, hint=error.hint
    )


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
