"""Named input formats: each knows its schema and turns files into :class:`RawChunk` s.

Every chunk a format yields holds one column per schema field (categorical: strings, plain or
dictionary-encoded, numeric: float64, multi: strings) and, for labeled input, a ``label`` column
of float32 0/1. A format is looked up by name with :func:`get_format`; new formats register with
:func:`register_format`.

=================  ===============================================================================
``criteo``         Kaggle ``train.txt``/``test.txt``: TSV, label, I1-I13, C1-C26 (or no label)
``criteo-csv``     the same columns as CSV with a header
``avazu``          Kaggle ``train.csv``: ``id`` dropped, ``hour`` (YYMMDDHH) → hour of day, weekday
``frappe``         libFM one-hot ``label idx:1 ...`` (label −1/1), 10 fields by position
``ipinyou``        one-hot ``click idx:1 ...`` (16 fields), decoded with ``featindex.fm.txt``
``movielens-100k`` folder with ``u.data``, ``u.user``, ``u.item``: label rating ≥ 4, genres a bag
``appmarket``      the simulated app market's CSV logs (its fields, label, ``day``)
``csv``            any CSV with a header, described by a YAML schema
``parquet``        any Parquet file, described by a YAML schema
=================  ===============================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfm.common import file_sha256
from deepfm.data.reader import (
    DEFAULT_BLOCK_BYTES,
    BadRows,
    Block,
    ColumnType,
    DelimitedReader,
    RawChunk,
    TextLayout,
    check_values,
    first_line,
    in_file_order,
    map_labels,
    open_text,
    parse_collecting,
    prefetch,
    read_header,
    reject_rows,
)
from deepfm.data.schema import FieldSpec, Schema
from deepfm.data.synthetic import APP_MARKET_SCHEMA
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
    #: raw columns read beside the schema's fields, as text (a time column for a time split)
    extra_columns: tuple[str, ...] = ()

    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def keep_columns(self, names: Sequence[str]) -> DataFormat:
        """Read the raw columns ``names`` too (kept as text beside the fields); returns self."""
        self.extra_columns = tuple(dict.fromkeys((*self.extra_columns, *names)))
        self.__dict__.pop("_layouts", None)
        return self

    def read(
        self,
        paths: Sequence[str | Path],
        bad_rows: BadRows,
        *,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        digests: dict[str, str] | None = None,
    ) -> Iterator[RawChunk]:
        """Chunks of every file in order; unlabeled files yield chunks without ``label``.

        With ``digests``, the sha256 of each file read is stored there under ``str(path)``
        (computed during the read where the format can).
        """
        if not paths:
            raise ConfigError("no input files given")
        for path in paths:
            yield from self.read_file(path, bad_rows, block_bytes=block_bytes, digests=digests)

    def read_file(
        self,
        path: str | Path,
        bad_rows: BadRows,
        *,
        block_bytes: int,
        digests: dict[str, str] | None = None,
    ) -> Iterator[RawChunk]:
        raise NotImplementedError

    def blocks(
        self, path: str | Path, *, block_bytes: int = DEFAULT_BLOCK_BYTES, hasher=None
    ) -> Iterator[Block]:
        """The parts of ``path`` that parse on their own, in order (:meth:`read_block`). By
        default the whole file is one block (formats that join side files)."""
        yield Block(str(path), 0, first_line=1)

    def read_block(
        self, block: Block, bad_rows: BadRows, *, block_bytes: int = DEFAULT_BLOCK_BYTES
    ) -> tuple[RawChunk | None, int]:
        """Parse one block: its rows (lines numbered from 1 within the block unless the block
        knows its first line) and its line breaks; bad rows go to ``bad_rows``."""
        chunks = [
            c for c in self.read_file(block.path, bad_rows, block_bytes=block_bytes) if len(c)
        ]
        if not chunks:
            return None, 0
        table = pa.concat_tables([c.table for c in chunks])
        return RawChunk(table, np.concatenate([c.lines for c in chunks]), block.path), 0

    def source_files(self, paths: Sequence[str | Path]) -> list[Path]:
        """Every file the input ``paths`` stand for (side files included), for the manifest."""
        return [Path(p) for p in paths]

    file_sha256 = staticmethod(file_sha256)


def field_column_types(schema: Schema) -> dict[str, ColumnType]:
    """How each schema field's raw column is parsed: numbers as float64, the rest as strings
    (the codecs find each block's distinct values themselves)."""
    return {s.name: "float" if s.kind == "numeric" else "string" for s in schema.fields}


def labeled_columns(schema: Schema, names: Sequence[str], path: str, line: int | None) -> bool:
    """Whether a file with columns ``names`` carries the schema's label. A file without it
    is unlabeled (rows to score) only if every column is a field or listed under the schema's
    ``ignore``: a column nobody declared is most likely the label under another name (a
    misspelt ``label:``, a byte-order mark), and reading the file as unlabeled would be silently
    wrong."""
    if schema.label is None or schema.label in names:
        return schema.label is not None
    known = set(schema.names) | set(schema.ignored)
    undeclared = [n for n in names if n not in known]
    if undeclared:
        raise DataError(
            f"no label column {schema.label!r}, and columns the schema does not declare: "
            f"{undeclared[:10]}",
            path=path,
            line=line,
            hint=f"the columns are {list(names)[:50]}; fix the schema's label, or list the "
            "other columns under 'ignore:' to read the file as unlabeled",
        )
    return False


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


def map_dictionary(column: pa.ChunkedArray | pa.Array, transform) -> pa.ChunkedArray:
    """Apply ``transform`` (strings → strings) to the dictionary of a dictionary column only
    (one call per distinct value, not per row); equal results are merged into one entry."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = []
    for part in chunks:
        if not pa.types.is_dictionary(part.type):
            part = pc.dictionary_encode(part)
        merged = pc.dictionary_encode(transform(part.dictionary))
        indices = merged.indices.take(part.indices)
        out.append(pa.DictionaryArray.from_arrays(indices, merged.dictionary))
    return pa.chunked_array(out, type=out[0].type) if out else pa.chunked_array([], pa.string())


def dictionary_rows(column: pa.ChunkedArray, entry_mask: np.ndarray) -> np.ndarray:
    """Rows whose dictionary entry is flagged in ``entry_mask`` (a single-chunk column)."""
    part = column.chunks[0] if column.num_chunks == 1 else column.combine_chunks()
    indices = pc.fill_null(part.indices, -1).to_numpy()
    flagged = np.append(entry_mask, False)
    return flagged[indices]


class DelimitedFormat(DataFormat):
    """A delimited text file whose columns are named by the schema (header or fixed order)."""

    delimiter = "\t"
    header = False
    quoting = False
    label_values: dict[float, float] = {0.0: 0.0, 1.0: 1.0}  # noqa: RUF012

    def columns_of(self, path: str | Path) -> tuple[tuple[str, ...], bool]:
        """All column names of ``path`` in file order, and whether it carries the label."""
        names = read_header(path, self.delimiter)
        missing = [n for n in (*self.schema.names, *self.extra_columns) if n not in names]
        if missing:
            raise DataError(
                f"the header lacks the schema's columns {missing}",
                path=str(path),
                line=1,
                hint=f"the header has {names[:50]}",
            )
        return tuple(names), labeled_columns(self.schema, names, str(path), line=1)

    def column_types(self, labeled: bool) -> dict[str, ColumnType]:
        types = field_column_types(self.schema)
        types.update({name: "string" for name in self.extra_columns if name not in types})
        if labeled:
            types[self.schema.label] = "label"
        return types

    def transform(self, chunk: RawChunk, bad_rows: BadRows) -> RawChunk:
        """Turn parsed raw columns into the schema's fields (formats with derived fields)."""
        return chunk

    def layout_of(self, path: str | Path) -> tuple[TextLayout, bool]:
        """How ``path`` is laid out, and whether it carries the label (read once per file)."""
        cache = self.__dict__.setdefault("_layouts", {})
        key = str(path)
        if key not in cache:
            columns, labeled = self.columns_of(path)
            layout = TextLayout(
                delimiter=self.delimiter,
                columns=columns,
                types=self.column_types(labeled),
                header=self.header,
                quoting=self.quoting,
                label_values=self.label_values,
            )
            cache[key] = (layout, labeled)
        return cache[key]

    def blocks(self, path, *, block_bytes=DEFAULT_BLOCK_BYTES, hasher=None) -> Iterator[Block]:
        layout, _ = self.layout_of(path)
        reader = DelimitedReader(path, layout, BadRows(), block_bytes=block_bytes, hasher=hasher)
        return reader.blocks()

    def read_block(self, block, bad_rows, *, block_bytes=DEFAULT_BLOCK_BYTES):
        layout, labeled = self.layout_of(block.path)
        reader = DelimitedReader(block.path, layout, bad_rows, block_bytes=block_bytes)
        chunk, breaks = reader.read_block(block)
        if chunk is not None and len(chunk):
            chunk = self.transform(chunk, bad_rows)
        if chunk is None or not len(chunk):
            return None, breaks
        return finish_chunk(
            chunk, self.schema.label if labeled else None, self.label_values
        ), breaks

    def read_file(
        self,
        path: str | Path,
        bad_rows: BadRows,
        *,
        block_bytes: int,
        digests: dict[str, str] | None = None,
    ) -> Iterator[RawChunk]:
        hasher = hashlib.sha256() if digests is not None and Path(path).is_file() else None

        def parse(block: Block):
            return parse_collecting(
                lambda b, tally: self.read_block(b, tally, block_bytes=block_bytes), block
            )

        blocks = self.blocks(path, block_bytes=block_bytes, hasher=hasher)
        yield from in_file_order(prefetch(parse, blocks, threads=2), bad_rows, str(path))
        if hasher is not None and digests is not None:
            digests[str(path)] = hasher.hexdigest()


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
            first = first_line(handle, path)
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


class AppMarketFormat(CsvFormat):
    """The simulated app market's logs as CSV (``deepfm market-csv``): its fields, the label,
    and the ``day`` of each impression (``--split time:day``)."""

    name = "appmarket"
    description = "the simulated app market's CSV logs (deepfm market-csv), with their day"

    def __init__(self, schema: Schema = APP_MARKET_SCHEMA) -> None:
        super().__init__(schema)


# -- Avazu ---------------------------------------------------------------------------------------

AVAZU_RAW = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
    "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
# min_count 2 as in the common Avazu benchmark setting (FuxiCTR's avazu_x4)
AVAZU_SCHEMA = Schema(
    fields=(FieldSpec("hour_of_day"), FieldSpec("weekday"), *(FieldSpec(n) for n in AVAZU_RAW)),
    label="click",
    min_count=2,
)


def parse_yymmddhh(texts: pa.Array) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """``(valid, hour of day, weekday)`` of YYMMDDHH strings (vectorised over distinct values)."""
    texts = texts.cast(pa.string())
    shaped = pc.fill_null(pc.match_substring_regex(texts, r"^\d{8}$"), False).to_numpy(
        zero_copy_only=False
    )
    number = pc.if_else(pa.array(shaped), texts, "00010100").cast(pa.int64()).to_numpy()
    yy, mm, dd, hh = number // 1_000_000, number // 10_000 % 100, number // 100 % 100, number % 100
    month = (yy + 30).astype("datetime64[Y]").astype("datetime64[M]") + (np.clip(mm, 1, 12) - 1)
    day = month.astype("datetime64[D]") + (dd - 1)
    valid = shaped & (mm >= 1) & (mm <= 12) & (dd >= 1) & (hh <= 23)
    valid &= day.astype("datetime64[M]") == month  # day exists in its month
    weekday = (day.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    hours = pa.array([f"{h:02d}" for h in range(24)]).take(pa.array(np.clip(hh, 0, 23)))
    return valid, hours, pa.array(WEEKDAYS).take(pa.array(weekday))


class AvazuFormat(DelimitedFormat):
    """Avazu Kaggle ``train.csv`` (header, ``click`` label) or ``test.csv`` (no ``click``).

    ``id`` is dropped (unique per row); ``hour`` (YYMMDDHH) becomes ``hour_of_day`` (00-23) and
    ``weekday`` (Mon-Sun); every other column is categorical.
    """

    name = "avazu"
    description = "Avazu Kaggle CSV: id dropped, hour → hour_of_day and weekday"
    delimiter = ","
    header = True
    quoting = True

    def __init__(self, schema: Schema = AVAZU_SCHEMA) -> None:
        super().__init__(schema)

    def columns_of(self, path: str | Path) -> tuple[tuple[str, ...], bool]:
        names = read_header(path, self.delimiter)
        raw = [n for n in self.schema.names if n not in ("hour_of_day", "weekday")]
        missing = [n for n in ("hour", *raw) if n not in names]
        missing += [n for n in self.extra_columns if n not in names and n not in missing]
        if missing:
            raise DataError(f"the header lacks the Avazu columns {missing}", path=str(path), line=1)
        return tuple(names), self.schema.label in names

    def column_types(self, labeled: bool) -> dict[str, ColumnType]:
        types: dict[str, ColumnType] = {"hour": "dictionary"}
        for name in self.schema.names:
            if name not in ("hour_of_day", "weekday"):
                types[name] = "string"
        if labeled:
            types[self.schema.label] = "label"
        return types

    def transform(self, chunk: RawChunk, bad_rows: BadRows) -> RawChunk:
        hour = chunk.table.column("hour").combine_chunks()
        valid, hours, weekdays = parse_yymmddhh(hour.dictionary)
        bad = dictionary_rows(pa.chunked_array([hour]), ~valid)
        bad |= np.asarray(hour.is_null())
        reason = "hour must be a date and hour YYMMDDHH"
        chunk = reject_rows(chunk, bad, [(bad, "hour", reason, "bad_hour")], bad_rows)
        hour = chunk.table.column("hour").combine_chunks()
        table = chunk.table
        if "hour" not in self.extra_columns:  # kept for a time split (time:hour)
            table = table.drop_columns(["hour"])
        for name, values in (("hour_of_day", hours), ("weekday", weekdays)):
            column = pa.DictionaryArray.from_arrays(hour.indices, values)
            table = table.append_column(name, map_dictionary(column, lambda d: d))
        return RawChunk(table, chunk.lines, chunk.path)


# -- libFM one-hot formats (Frappe, iPinYou) -----------------------------------------------------


def split_feature(tokens: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """``idx:1`` tokens → (index strings, valid mask); a token is valid iff it is digits:1."""
    tokens = tokens.cast(pa.string())
    valid = pc.fill_null(pc.match_substring_regex(tokens, r"^\d{1,18}:1(\.0*)?$"), False)
    index = pc.list_element(pc.split_pattern(tokens, ":", max_splits=1), 0)
    return index, valid.to_numpy(zero_copy_only=False)


class OneHotFormat(DelimitedFormat):
    """``label idx:1 idx:1 ...``, one feature per field in a fixed order, space-separated."""

    delimiter = " "
    positions: tuple[str, ...] = ()

    def columns_of(self, path: str | Path) -> tuple[tuple[str, ...], bool]:
        return ("label", *self.positions), True

    def column_types(self, labeled: bool) -> dict[str, ColumnType]:
        types: dict[str, ColumnType] = dict.fromkeys(self.positions, "dictionary")
        types["label"] = "label"
        return types

    def decode(
        self, position: int, index: pa.Array, valid: np.ndarray
    ) -> tuple[pa.Array, np.ndarray, str]:
        """(field values, known mask, reason if unknown) of the index strings at ``position``
        (``valid``: the token was well formed)."""
        return index, np.ones(len(index), bool), ""

    def transform(self, chunk: RawChunk, bad_rows: BadRows) -> RawChunk:
        bad = np.zeros(len(chunk), bool)
        reasons = []
        decoded = {}
        for position, name in enumerate(self.positions):
            column = chunk.table.column(name).combine_chunks()
            index, valid = split_feature(column.dictionary)
            values, known, reason = self.decode(position, index, valid)
            for mask, why, key in (
                (~valid, "expected a one-hot feature idx:1", "bad_feature"),
                (valid & ~known, reason, "unknown_feature"),
            ):
                rows = dictionary_rows(pa.chunked_array([column]), mask)
                if rows.any():
                    reasons.append((rows, name, why, key))
                    bad |= rows
            decoded[name] = pa.DictionaryArray.from_arrays(column.indices, values)
        table = pa.table({**decoded, "label": chunk.table.column("label")})
        chunk = reject_rows(RawChunk(table, chunk.lines, chunk.path), bad, reasons, bad_rows)
        fields = {
            spec: map_dictionary(chunk.table.column(pos), lambda d: d)
            for pos, spec in zip(self.positions, self.schema.names, strict=True)
        }
        table = pa.table({**fields, "label": chunk.table.column("label")})
        return RawChunk(table, chunk.lines, chunk.path)


FRAPPE_FIELDS = (
    "user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country",
    "city",
)  # fmt: skip
FRAPPE_SCHEMA = Schema(fields=tuple(FieldSpec(n) for n in FRAPPE_FIELDS), label="label")


class FrappeFormat(OneHotFormat):
    """Frappe in libFM form (NFM/AFM release): label −1/1, then 10 one-hot features
    (user, item, daytime, weekday, isweekend, homework, cost, weather, country, city); a field's
    value is its feature index."""

    name = "frappe"
    description = "Frappe libFM: label -1/1 and 10 one-hot idx:1 features"
    label_values = {-1.0: 0.0, 1.0: 1.0}  # noqa: RUF012
    positions = tuple(f"f{i}" for i in range(len(FRAPPE_FIELDS)))

    def __init__(self, schema: Schema = FRAPPE_SCHEMA) -> None:
        super().__init__(schema)


IPINYOU_FIELDS = (
    "weekday", "hour", "useragent", "IP", "region", "city", "adexchange", "domain", "slotid",
    "slotwidth", "slotheight", "slotvisibility", "slotformat", "creative", "advertiser",
    "slotprice",
)  # fmt: skip
IPINYOU_SCHEMA = Schema(fields=tuple(FieldSpec(n) for n in IPINYOU_FIELDS), label="label")
FEATINDEX = "featindex.fm.txt"


@dataclass
class FeatureDictionary:
    """iPinYou's ``featindex.fm.txt``: ``field:value<TAB>index`` per line."""

    path: Path
    field_of: np.ndarray  # int16 [max index + 1], -1 for an unused index
    value_of: pa.Array  # string [max index + 1]
    fields: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> FeatureDictionary:
        layout = TextLayout("\t", ("feature", "index"), {"feature": "string", "index": "float"})
        chunks = list(DelimitedReader(path, layout, BadRows("error")))
        table = pa.concat_tables([c.table for c in chunks])
        parts = pc.split_pattern(table.column("feature"), ":", max_splits=1)
        lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
        index = table.column("index").to_numpy(zero_copy_only=False)
        lines = np.concatenate([c.lines for c in chunks])
        broken = (lengths != 2) | (index < 0) | (index != np.floor(index))
        if broken.any():
            row = int(np.flatnonzero(broken)[0])
            raise DataError("expected field:value<TAB>index", path=str(path), line=int(lines[row]))
        names = pc.list_element(parts, 0).combine_chunks()
        fields = tuple(dict.fromkeys(names.to_pylist()))  # in order of appearance
        field_number = pc.index_in(names, value_set=pa.array(fields)).to_numpy()
        index = index.astype(np.int64)
        field_of = np.full(index.max() + 1, -1, np.int16)
        field_of[index] = field_number
        order = np.full(index.max() + 1, 0, np.int64)
        order[index] = np.arange(len(index))
        value_of = pc.list_element(parts, 1).combine_chunks().take(pa.array(order))
        return cls(path, field_of, value_of, fields)


class IpinyouFormat(OneHotFormat):
    """iPinYou as released with the FNN paper (``make-ipinyou-data``): ``click idx:1 ...`` with
    16 one-hot features, decoded to their raw values through the feature dictionary
    ``featindex.fm.txt`` (``--featindex``, by default beside the data file). A feature must
    belong to the field of its position."""

    name = "ipinyou"
    description = "iPinYou one-hot click idx:1 x16, decoded with featindex.fm.txt"
    positions = tuple(f"f{i}" for i in range(len(IPINYOU_FIELDS)))

    def __init__(self, schema: Schema = IPINYOU_SCHEMA, *, featindex: str | None = None) -> None:
        super().__init__(schema)
        self.featindex = featindex
        self._dictionary: FeatureDictionary | None = None

    def dictionary_for(self, path: str | Path) -> FeatureDictionary:
        where = Path(self.featindex) if self.featindex else Path(path).parent / FEATINDEX
        if not where.is_file():
            raise ConfigError(
                f"iPinYou data needs its feature dictionary: {where} does not exist "
                "(pass --featindex PATH)"
            )
        if self._dictionary is None or self._dictionary.path != where:
            dictionary = FeatureDictionary.load(where)
            if dictionary.fields != IPINYOU_FIELDS:
                raise DataError(
                    f"the feature dictionary's fields {list(dictionary.fields)} are not "
                    f"iPinYou's {list(IPINYOU_FIELDS)}",
                    path=str(where),
                )
            self._dictionary = dictionary
        return self._dictionary

    def read_file(self, path, bad_rows, *, block_bytes, digests=None):
        self.dictionary_for(path)
        yield from super().read_file(path, bad_rows, block_bytes=block_bytes, digests=digests)

    def read_block(self, block, bad_rows, *, block_bytes=DEFAULT_BLOCK_BYTES):
        self.dictionary_for(block.path)
        return super().read_block(block, bad_rows, block_bytes=block_bytes)

    def decode(
        self, position: int, index: pa.Array, valid: np.ndarray
    ) -> tuple[pa.Array, np.ndarray, str]:
        dictionary = self._dictionary
        assert dictionary is not None
        number = pc.if_else(pa.array(valid), index, "0").cast(pa.int64()).to_numpy()
        inside = number < len(dictionary.field_of)
        safe = np.where(inside, number, 0)
        known = inside & (dictionary.field_of[safe] == position)
        values = dictionary.value_of.take(pa.array(safe))
        field = IPINYOU_FIELDS[position]
        reason = f"feature index not in {FEATINDEX} for field {field!r} (position {position + 1})"
        return values, known, reason

    def source_files(self, paths: Sequence[str | Path]) -> list[Path]:
        return [Path(p) for p in paths] + [self.dictionary_for(paths[0]).path] if paths else []


# -- MovieLens-100K ------------------------------------------------------------------------------

MOVIELENS_SCHEMA = Schema(
    fields=(
        FieldSpec("user_id"),
        FieldSpec("item_id"),
        FieldSpec("age"),
        FieldSpec("gender"),
        FieldSpec("occupation"),
        FieldSpec("zip"),
        FieldSpec("release_year"),
        FieldSpec("genres", kind="multi", separator="|", pooling="sum"),
    ),
    label="label",
)
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
# label = rating >= 4 (the usual binary "click" of MovieLens CTR studies)
RATING_LABELS = {1.0: 0.0, 2.0: 0.0, 3.0: 0.0, 4.0: 1.0, 5.0: 1.0}


def _side_table(path: Path, columns: tuple[str, ...], types: dict[str, ColumnType]) -> pa.Table:
    if not path.is_file():
        raise DataError("MovieLens side file does not exist", path=str(path))
    layout = TextLayout("|", columns, types)
    chunks = list(DelimitedReader(path, layout, BadRows("error")))
    table = pa.concat_tables([c.table for c in chunks])
    return table.append_column("_line", pa.array(np.concatenate([c.lines for c in chunks])))


def _by_id(table: pa.Table, path: Path) -> np.ndarray:
    """Row of each id in ``table`` (-1 where absent); ids must be distinct positive integers."""
    ids = table.column("id").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((ids < 1) | (ids != np.floor(ids)) | (ids > 10_000_000))
    if len(bad):
        line = int(table.column("_line")[int(bad[0])].as_py())
        raise DataError("the id must be a positive integer", path=str(path), line=line, field="id")
    ids = ids.astype(np.int64)
    where = np.full(ids.max() + 1, -1, np.int64)
    where[ids] = np.arange(len(ids))
    if len(np.unique(ids)) != len(ids):
        raise DataError("an id appears twice", path=str(path), field="id")
    return where


class MovielensFormat(DataFormat):
    """MovieLens-100K: ``u.data`` ratings (``--ratings`` names another file, e.g. ``ua.base``)
    joined with ``u.user`` (age, gender, occupation, zip) and ``u.item`` (release year, and the
    19 genre flags as the multi-valued field ``genres``). Label: rating ≥ 4.

    An input path is the folder holding the files, or the ratings file itself.
    """

    name = "movielens-100k"
    description = "MovieLens-100K folder (u.data + u.user + u.item): label rating >= 4"

    def __init__(self, schema: Schema = MOVIELENS_SCHEMA, *, ratings: str | None = None) -> None:
        super().__init__(schema)
        self.ratings = ratings

    def files(self, path: str | Path) -> tuple[Path, Path, Path]:
        path = Path(path)
        if path.is_dir():
            ratings = path / (self.ratings or "u.data")
            folder = path
        else:
            ratings, folder = path, path.parent
        if self.ratings and Path(self.ratings).is_absolute():
            ratings = Path(self.ratings)
        if not ratings.is_file():
            raise DataError("MovieLens ratings file does not exist", path=str(ratings))
        return ratings, folder / "u.user", folder / "u.item"

    def source_files(self, paths: Sequence[str | Path]) -> list[Path]:
        return [f for p in paths for f in self.files(p)]

    def read_file(self, path, bad_rows, *, block_bytes, digests=None):
        ratings, user_path, item_path = self.files(path)
        users = _side_table(
            user_path,
            ("id", "age", "gender", "occupation", "zip"),
            {"id": "float", "age": "string", "gender": "string", "occupation": "string",
             "zip": "string"},
        )  # fmt: skip
        flags = tuple(f"g{i}" for i in range(len(GENRES)))
        items = _side_table(
            item_path,
            ("id", "title", "release", "video_release", "url", *flags),
            {"id": "float", "release": "string", **dict.fromkeys(flags, "float")},
        )
        user_row, item_row = _by_id(users, user_path), _by_id(items, item_path)
        genres = self._genres(items, flags)
        release_year = pc.utf8_slice_codeunits(items.column("release"), -4, 100)
        release_year = pc.if_else(pc.equal(release_year, ""), None, release_year)
        layout = TextLayout(
            "\t",
            ("user_id", "item_id", "rating", "timestamp"),
            {"user_id": "float", "item_id": "float", "rating": "label"},
            label_values=RATING_LABELS,
        )
        hasher = hashlib.sha256() if digests is not None else None
        reader = DelimitedReader(ratings, layout, bad_rows, block_bytes=block_bytes, hasher=hasher)
        for chunk in reader:
            user = self._rows(chunk, "user_id", user_row)
            item = self._rows(chunk, "item_id", item_row)
            bad = (user < 0) | (item < 0)
            reasons = [
                (user < 0, "user_id", f"user not in {user_path.name}", "unknown_user"),
                (item < 0, "item_id", f"item not in {item_path.name}", "unknown_item"),
            ]
            chunk = reject_rows(chunk, bad, reasons, bad_rows)
            if not len(chunk):
                continue
            user, item = pa.array(user[~bad]), pa.array(item[~bad])
            table = pa.table(
                {
                    "user_id": users.column("id").take(user).cast(pa.int64()).cast(pa.string()),
                    "item_id": items.column("id").take(item).cast(pa.int64()).cast(pa.string()),
                    "age": users.column("age").take(user),
                    "gender": users.column("gender").take(user),
                    "occupation": users.column("occupation").take(user),
                    "zip": users.column("zip").take(user),
                    "release_year": release_year.take(item),
                    "genres": genres.take(item),
                    "label": map_labels(chunk.table.column("rating"), RATING_LABELS),
                }
            )
            yield RawChunk(table, chunk.lines, chunk.path)
        if hasher is not None and digests is not None:
            digests[str(ratings)] = hasher.hexdigest()

    @staticmethod
    def _rows(chunk: RawChunk, column: str, where: np.ndarray) -> np.ndarray:
        ids = chunk.table.column(column).to_numpy(zero_copy_only=False)
        whole = np.isfinite(ids) & (ids == np.floor(ids)) & (ids >= 0) & (ids < len(where))
        return np.where(whole, where[np.where(whole, ids, 0).astype(np.int64)], -1)

    @staticmethod
    def _genres(items: pa.Table, flags: tuple[str, ...]) -> pa.Array:
        """Each movie's genres joined by ``|`` (null when it has none), built without a loop."""
        matrix = np.stack([items.column(f).to_numpy(zero_copy_only=False) for f in flags], 1)
        rows, cols = np.nonzero(matrix == 1)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(matrix)))])
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(GENRES).take(cols))
        joined = pc.binary_join(lists, "|")
        return pc.if_else(pc.equal(joined, ""), None, joined)


# -- Parquet ---------------------------------------------------------------------------------------


class ParquetFormat(DataFormat):
    """Any Parquet file, described by a YAML schema. A row's "line" is its 1-based row number.

    Categorical columns may hold strings or integers; numeric columns numbers; multi-valued
    columns a string joined by the field's separator, or a list of strings; the label 0/1 (or
    booleans). Nulls are missing values; a null, non-0/1 label or a NaN/inf number is a bad row.
    """

    name = "parquet"
    description = "any Parquet file with a YAML schema (--schema)"
    batch_rows = 131_072

    def read_file(self, path, bad_rows, *, block_bytes, digests=None):
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise DataError("file does not exist", path=str(path))
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"not a readable Parquet file: {exc}", path=str(path)) from None
        names = parquet.schema_arrow.names
        missing = [n for n in (*self.schema.names, *self.extra_columns) if n not in names]
        if missing:
            raise DataError(
                f"the file lacks the schema's columns {missing}",
                path=str(path),
                hint=f"its columns are {names[:50]}",
            )
        labeled = labeled_columns(self.schema, names, str(path), line=None)
        columns = self.schema.names + ([self.schema.label] if labeled else [])
        columns += [n for n in self.extra_columns if n not in columns]
        first = 1
        for batch in parquet.iter_batches(batch_size=self.batch_rows, columns=columns):
            lines = np.arange(first, first + batch.num_rows, dtype=np.int64)
            first += batch.num_rows
            chunk = self._convert(pa.Table.from_batches([batch]), lines, str(path), labeled)
            chunk = check_values(chunk, self._kinds(labeled), {0.0: 0.0, 1.0: 1.0}, bad_rows)
            if len(chunk):
                yield finish_chunk(
                    chunk, self.schema.label if labeled else None, {0.0: 0.0, 1.0: 1.0}
                )
        if first == 1 and bad_rows.total == 0:
            raise DataError("file holds no data rows", path=str(path))

    def _kinds(self, labeled: bool) -> dict[str, ColumnType]:
        kinds = field_column_types(self.schema)
        if labeled:
            kinds[self.schema.label] = "label"
        return kinds

    def _convert(self, table: pa.Table, lines: np.ndarray, path: str, labeled: bool) -> RawChunk:
        out: dict[str, Any] = {}
        for spec in self.schema.fields:
            column = table.column(spec.name)
            try:
                if spec.kind == "numeric":
                    out[spec.name] = column.cast(pa.float64())
                elif spec.kind == "multi":
                    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                        column = pc.binary_join(column.cast(pa.list_(pa.string())), spec.separator)
                    out[spec.name] = column.cast(pa.string())
                elif pa.types.is_dictionary(column.type):
                    out[spec.name] = map_dictionary(column, lambda d: d.cast(pa.string()))
                else:
                    out[spec.name] = column.cast(pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(
                    f"column of type {column.type} cannot be read as {spec.kind}: {exc}",
                    path=path,
                    field=spec.name,
                ) from None
        for name in self.extra_columns:
            if name not in out:
                out[name] = table.column(name).cast(pa.string())
        if labeled:
            label = table.column(self.schema.label)
            try:
                out[self.schema.label] = label.cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(
                    f"the label column of type {label.type} is not 0/1",
                    path=path,
                    field=self.schema.label,
                ) from None
        return RawChunk(pa.table(out), lines, path)

    def source_files(self, paths: Sequence[str | Path]) -> list[Path]:
        return [Path(p) for p in paths]


# -- registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatEntry:
    factory: Callable[..., DataFormat]
    description: str
    needs_schema: bool = False
    options: tuple[str, ...] = ()


_FORMATS: dict[str, FormatEntry] = {}


def register_format(
    name: str,
    factory: Callable[..., DataFormat],
    description: str,
    *,
    needs_schema=False,
    options: tuple[str, ...] = (),
) -> None:
    """``factory(schema or None, **options)`` builds the format; ``options`` are its keywords."""
    _FORMATS[name] = FormatEntry(factory, description, needs_schema, options)


def format_names() -> list[str]:
    return sorted(_FORMATS)


def format_descriptions() -> dict[str, str]:
    return {name: _FORMATS[name].description for name in format_names()}


def get_format(name: str, schema: Schema | None = None, **options: Any) -> DataFormat:
    """The format called ``name``; ``schema`` is required by generic formats, optional otherwise.

    ``options`` (``None`` values ignored) are format-specific: ``ratings`` (movielens-100k),
    ``featindex`` (ipinyou).
    """
    entry = _FORMATS.get(name)
    if entry is None:
        raise ConfigError(f"unknown format {name!r}; known formats: {', '.join(format_names())}")
    if entry.needs_schema and schema is None:
        raise ConfigError(f"format {name!r} needs a schema: pass --schema schema.yaml")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(entry.options))
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags} does not apply to format {name!r}")
    return entry.factory(schema, **given)


def _fixed(cls: type[DataFormat]) -> Callable[..., DataFormat]:
    return lambda schema, **options: (
        cls(schema, **options) if schema is not None else cls(**options)
    )


register_format("criteo", _fixed(CriteoFormat), CriteoFormat.description)
register_format("criteo-csv", _fixed(CriteoCsvFormat), CriteoCsvFormat.description)
register_format("avazu", _fixed(AvazuFormat), AvazuFormat.description)
register_format("frappe", _fixed(FrappeFormat), FrappeFormat.description)
register_format("ipinyou", _fixed(IpinyouFormat), IpinyouFormat.description, options=("featindex",))
register_format(
    "movielens-100k", _fixed(MovielensFormat), MovielensFormat.description, options=("ratings",)
)
register_format("appmarket", _fixed(AppMarketFormat), AppMarketFormat.description)
register_format("csv", CsvFormat, CsvFormat.description, needs_schema=True)
register_format("parquet", ParquetFormat, ParquetFormat.description, needs_schema=True)


def table_chunk(table: pa.Table, path: str = "<memory>", first_line: int = 1) -> RawChunk:
    """Wrap an in-memory table (e.g. generated data) as one chunk."""
    lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
    return RawChunk(table, lines, path)
