"""Named input formats: each knows its schema and turns files into :class:`RawChunk` s.

Every chunk a format yields holds one column per schema field (categorical: dictionary-encoded
strings, numeric: float64, multi: strings) and, for labeled input, a ``label`` column of float32
0/1. A format is looked up by name with :func:`get_format`; new formats register with
:func:`register_format`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from deepfm.data.reader import (
    DEFAULT_BLOCK_BYTES,
    BadRows,
    ColumnType,
    DelimitedReader,
    RawChunk,
    TextLayout,
    map_labels,
    open_text,
    read_header,
)
from deepfm.data.schema import FieldSpec, Schema
from deepfm.errors import ConfigError, DataError

LABEL = "label"

CRITEO_INT = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT = tuple(f"C{i}" for i in range(1, 27))
CRITEO_SCHEMA = Schema(
    fields=tuple(FieldSpec(n, "numeric") for n in CRITEO_INT)
    + tuple(FieldSpec(n, "categorical") for n in CRITEO_CAT),
    label="label",
    min_count=10,
)


class DataFormat:
    """Base of the named formats. ``schema`` is fixed by the format or given by the user."""

    name: str = ""
    description: str = ""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def read(
        self,
        paths: Sequence[str | Path],
        bad_rows: BadRows,
        *,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> Iterator[RawChunk]:
        """Chunks of every file in order; unlabeled files yield chunks without ``label``."""
        if not paths:
            raise ConfigError("no input files given")
        for path in paths:
            yield from self.read_file(path, bad_rows, block_bytes=block_bytes)

    def read_file(
        self, path: str | Path, bad_rows: BadRows, *, block_bytes: int
    ) -> Iterator[RawChunk]:
        raise NotImplementedError


def field_column_types(schema: Schema) -> dict[str, ColumnType]:
    """How each schema field's raw column is parsed."""
    types: dict[str, ColumnType] = {}
    for spec in schema.fields:
        if spec.kind == "numeric":
            types[spec.name] = "float"
        elif spec.kind == "multi":
            types[spec.name] = "string"
        else:
            types[spec.name] = "dictionary"
    return types


def finish_chunk(
    chunk: RawChunk,
    label_source: str | None,
    label_values: dict[float, float],
    renames: dict[str, str] | None = None,
) -> RawChunk:
    """Rename columns to field names and turn the raw label into a float32 ``label`` column."""
    table = chunk.table
    if renames:
        table = table.rename_columns([renames.get(n, n) for n in table.column_names])
    if label_source is not None and label_source in table.column_names:
        labels = map_labels(table.column(label_source), label_values)
        index = table.column_names.index(label_source)
        table = table.remove_column(index).append_column(LABEL, pa.array(labels))
    return RawChunk(table, chunk.lines, chunk.path)


class DelimitedFormat(DataFormat):
    """A delimited text file whose columns are named by the schema (header or fixed order)."""

    delimiter = "\t"
    header = False
    quoting = False
    label_values: dict[float, float] = {0.0: 0.0, 1.0: 1.0}  # noqa: RUF012

    def columns_of(self, path: str | Path) -> tuple[tuple[str, ...], bool]:
        """All column names of ``path`` in file order, and whether it carries the label."""
        names = read_header(path, self.delimiter)
        missing = [n for n in self.schema.names if n not in names]
        if missing:
            raise DataError(
                f"the header lacks the schema's columns {missing}",
                path=str(path),
                line=1,
                hint=f"the header has {names[:50]}",
            )
        return tuple(names), self.schema.label is not None and self.schema.label in names

    def read_file(
        self, path: str | Path, bad_rows: BadRows, *, block_bytes: int
    ) -> Iterator[RawChunk]:
        columns, labeled = self.columns_of(path)
        types = field_column_types(self.schema)
        if labeled:
            types[self.schema.label] = "label"
        layout = TextLayout(
            delimiter=self.delimiter,
            columns=columns,
            types=types,
            header=self.header,
            quoting=self.quoting,
            label_values=self.label_values,
        )
        reader = DelimitedReader(path, layout, bad_rows, block_bytes=block_bytes)
        for chunk in reader:
            yield finish_chunk(chunk, self.schema.label if labeled else None, self.label_values)


class CriteoFormat(DelimitedFormat):
    """Criteo Kaggle ``train.txt`` / ``test.txt``: tab-separated, no header, empty = missing.

    40 columns (label, I1-I13, C1-C26) for labeled files, 39 (no label) for the test file; the
    first line decides which.
    """

    name = "criteo"
    description = "Criteo Kaggle TSV: label, I1-I13, C1-C26 (or no label), no header"

    def __init__(self, schema: Schema = CRITEO_SCHEMA) -> None:
        super().__init__(schema)

    def columns_of(self, path: str | Path) -> tuple[tuple[str, ...], bool]:
        with open_text(path) as handle:
            first = handle.readline()
        if not first:
            raise DataError("file is empty", path=str(path))
        count = first.count(b"\t") + 1
        fields = CRITEO_INT + CRITEO_CAT
        if count == len(fields) + 1:
            return ("label", *fields), True
        if count == len(fields):
            return fields, False
        raise DataError(
            f"expected 40 tab-separated columns (label, I1-I13, C1-C26) or 39 without the "
            f"label, found {count}",
            path=str(path),
            line=1,
        )


class CriteoCsvFormat(DelimitedFormat):
    """The Criteo columns as comma-separated values with a header (label optional)."""

    name = "criteo-csv"
    description = "Criteo columns as CSV with a header label,I1..I13,C1..C26"
    delimiter = ","
    header = True
    quoting = True

    def __init__(self, schema: Schema = CRITEO_SCHEMA) -> None:
        super().__init__(schema)


class CsvFormat(DelimitedFormat):
    """Any CSV with a header, described by a YAML schema (``--schema``)."""

    name = "csv"
    description = "any CSV with a header and a YAML schema (--schema)"
    delimiter = ","
    header = True
    quoting = True


@dataclass(frozen=True)
class FormatEntry:
    factory: Callable[[Schema | None], DataFormat]
    description: str
    needs_schema: bool = False


_FORMATS: dict[str, FormatEntry] = {}


def register_format(
    name: str,
    factory: Callable[[Schema | None], DataFormat],
    description: str,
    *,
    needs_schema=False,
) -> None:
    _FORMATS[name] = FormatEntry(factory, description, needs_schema)


def format_names() -> list[str]:
    return sorted(_FORMATS)


def get_format(name: str, schema: Schema | None = None) -> DataFormat:
    """The format called ``name``; ``schema`` is required by generic formats, optional otherwise."""
    entry = _FORMATS.get(name)
    if entry is None:
        raise ConfigError(f"unknown format {name!r}; known formats: {', '.join(format_names())}")
    if entry.needs_schema and schema is None:
        raise ConfigError(f"format {name!r} needs a schema: pass --schema schema.yaml")
    return entry.factory(schema)


def _fixed(cls: type[DataFormat]) -> Callable[[Schema | None], DataFormat]:
    return lambda schema: cls(schema) if schema is not None else cls()


register_format("criteo", _fixed(CriteoFormat), CriteoFormat.description)
register_format("criteo-csv", _fixed(CriteoCsvFormat), CriteoCsvFormat.description)
register_format("csv", CsvFormat, CsvFormat.description, needs_schema=True)


def table_chunk(table: pa.Table, path: str = "<memory>", first_line: int = 1) -> RawChunk:
    """Wrap an in-memory table (e.g. generated data) as one chunk."""
    lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
    return RawChunk(table, lines, path)
