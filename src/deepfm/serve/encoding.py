"""JSON-like records (dicts) → the raw columns the feature map's codecs encode, for serving.

This layer only checks and converts values; the encoding itself is the codecs' (the same
:meth:`FeatureMap.encode_columns` that ``prepare`` and ``train --data`` use): a request's fields
become one Arrow column each, exactly the columns a file reader produces, and every field is
encoded in one vectorised pass.

Value rules (the same as the file readers'):

* ``None`` and ``""`` are missing (the field's missing id); an absent key is missing too;
* categorical values are strings; numbers are accepted and written as text (``3.0`` → ``"3"``,
  ``True`` → ``"true"``), so a number-like id matches the vocabulary built from a file;
* numeric fields take numbers or numeric strings (``true``/``false`` count as 1/0); NaN and
  infinity are refused, as in files;
* a multi-valued field takes a list of values or one string joined with the field's separator.

Anything else (an object, a list where one value is expected, a non-finite number) raises
:class:`DataError` naming the record and the field (``records[3], field 'I5': ...``).

``shared`` values (``rank``'s user and context) are encoded once and broadcast to every record
that does not carry the field itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm.data.codecs import Codec
from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import ROW_KEYS_UP_TO, FeatureMap
from deepfm.errors import DataError

Record = Mapping[str, Any]

#: ``PLAIN_DICTS.issuperset(map(type, records))``: every record a plain dict, checked in C
PLAIN_DICTS = frozenset((dict,))

#: raw values a :class:`ValueMemo` holds, all fields together (about 100 bytes each), and
#: an eighth as many whole records for each of at most two sets of fields (about 1.4 kB each
#: at 20 string fields): about 120 MB at most
MEMO_VALUES = 1 << 18


def text_of(value: Any) -> str | None:
    """The token a scalar stands for (``None`` for missing); integral floats lose ``.0``."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN or infinite number")
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, int):
        return str(value)  # ValueError past Python's 4300-digit limit
    if isinstance(value, str):
        return value or None
    raise ValueError(f"expected a string or a number, got {_kind(value)}")


def number_of(value: Any) -> float | None:
    """A finite float, or ``None`` for missing (``None``, ``""``)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool | int | float):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError("number out of range") from None
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{_short(value)} is not a number") from None
    else:
        raise ValueError(f"expected a number, got {_kind(value)}")
    if not math.isfinite(number):
        raise ValueError("NaN or infinite number")
    return number


def bag_text(value: Any, separator: str) -> str | None:
    """One bag as the separator-joined text a file holds: a list of values, or one string."""
    if isinstance(value, list | tuple):
        if any(isinstance(v, list | tuple | dict) for v in value):
            raise ValueError("a bag holds values, not lists or objects")
        parts = [text_of(v) for v in value]
        return separator.join(p for p in parts if p) or None
    return text_of(value)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", tuple: "a list"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BadValue(Exception):
    def __init__(self, where: str, field: str, reason: str) -> None:
        super().__init__(reason)
        self.where, self.field, self.reason = where, field, reason


class RecordColumns:
    """Checks records and turns them into the feature map's raw columns; ``encode`` returns
    ``EncodedArrays`` (``ids [n, S]`` int32, ``values [n, S]`` float32 or None) through the
    codecs. Safe to use from several threads (it only reads the feature map)."""

    def __init__(self, feature_map: FeatureMap, memo_values: int = MEMO_VALUES) -> None:
        self.feature_map = feature_map
        self.fields: list[Codec] = list(feature_map.fields)
        self.names: frozenset[str] = frozenset(f.name for f in self.fields)
        self._order = [f.name for f in self.fields]
        self._groups = {
            kind: [f.name for f in self.fields if _group(f) == kind]
            for kind in ("category", "numeric")
        }
        one_slot = all(f.slots == 1 for f in self.fields)  # a bag's slots: the codecs only
        self._memo = ValueMemo(self.fields, memo_values) if memo_values and one_slot else None

    def check_keys(
        self, records: Sequence[Record], where: str, extra: frozenset[str] = frozenset()
    ) -> set[str] | None:
        """Raise :class:`DataError` naming the first record (``where[i]``) that holds a key which
        is neither a field of the model nor in ``extra``, or that is not an object. Returns the
        records' keys when they are all plain dicts (for :meth:`encode`'s ``keys``)."""
        allowed = self.names | extra
        if PLAIN_DICTS.issuperset(map(type, records)):
            keys = set().union(*records)
            if allowed.issuperset(keys):
                return keys  # the usual case, checked at once; otherwise find the first culprit
        for i, record in enumerate(records):
            self.check_mapping(record, f"{where}[{i}]", allowed)
        return None

    def check_mapping(self, record: Any, where: str, allowed: frozenset[str] | None = None) -> None:
        """``record`` must be a mapping; with ``allowed``, of those keys only."""
        if type(record) is not dict and not isinstance(record, Mapping):  # dict: the fast check
            raise DataError(f"expected an object of field values, got {_kind(record)}", path=where)
        if allowed is not None and not allowed.issuperset(record):
            unknown = sorted(str(k) for k in set(record) - allowed)[0]
            raise DataError(
                f"not a field of the model (its fields: {', '.join(f.name for f in self.fields)})",
                path=where,
                field=unknown,
            )

    def columns(
        self, records: Sequence[Record], shared: Record | None = None, *, where: str = "records"
    ) -> dict[str, pa.Array | np.ndarray]:
        """One raw column per field: ``len(records)`` rows for the fields some record carries,
        one row (``shared``'s value, broadcast when encoding) for the others."""
        raws, present = self._raws(records, shared, where)
        return self._convert(raws, present, where)

    def _raws(
        self, records: Sequence[Record], shared: Record | None, where: str
    ) -> tuple[dict[str, Sequence[Any]], set[str]]:
        """Each field's raw values, as given: one per record, or one (``shared``'s value,
        broadcast when encoding) for a field no record carries; and the fields carried."""
        shared = shared or {}
        if not PLAIN_DICTS.issuperset(map(type, records)):
            for i, record in enumerate(records):
                if not isinstance(record, Mapping):
                    raise DataError(
                        f"expected an object, got {_kind(record)}", path=f"{where}[{i}]"
                    )
        present: set[str] = set().union(*records) if records else set()
        raws: dict[str, Sequence[Any]] = {}
        carried = [name for name in self._order if name in present]
        if len(carried) > 1:
            try:  # the usual case: every record carries the same fields, read in C loops
                rows = map(itemgetter(*carried), records)
                raws = dict(zip(carried, zip(*rows, strict=True), strict=True))
            except KeyError:  # some record lacks one: shared's value or None stands in
                raws = {}
        for name in self._order:
            if name not in raws:
                default = shared.get(name)
                raws[name] = (
                    [r.get(name, default) for r in records] if name in present else [default]
                )
        return raws, present

    def _convert(
        self, raws: dict[str, Sequence[Any]], present: set[str], where: str
    ) -> dict[str, pa.Array | np.ndarray]:
        """The raw columns a file reader would give for ``raws`` (see :meth:`columns`)."""
        out = {}
        # the usual case first: all the categorical fields' values in one Arrow conversion,
        # all the numeric fields' in one NumPy conversion, sliced back into columns
        for kind, joined in (("category", _strings), ("numeric", _plain_numbers)):
            group = [name for name in self._groups[kind] if name in raws]
            flat = list(chain.from_iterable(raws[name] for name in group))
            column = joined(flat) if len(group) > 1 else None
            if column is not None:
                start = 0
                for name in group:
                    out[name] = column[start : start + len(raws[name])]
                    start += len(raws[name])
        try:  # the others, and those of a group holding a value to convert or refuse
            for codec, name in zip(self.fields, self._order, strict=True):
                if name not in out and name in raws:
                    place = (lambda i: f"{where}[{i}]") if name in present else _shared_place
                    out[name] = _column(codec, raws[name], place)
        except _BadValue as bad:
            raise DataError(bad.reason, path=bad.where, field=bad.field) from None
        return out

    def encode(
        self,
        records: Sequence[Record],
        shared: Record | None = None,
        *,
        where: str = "records",
        keys: set[str] | None = None,
    ) -> EncodedArrays:
        """Encode ``records``; a field a record lacks takes its value from ``shared``.

        ``where`` names the records in error messages (``records[3], field 'I5': ...``);
        ``keys``: every key the records hold, when the caller has them (:meth:`check_keys`).
        Records and values seen by recent calls are encoded from the memo (:class:`ValueMemo`);
        the others, and every call holding a bad value, by the codecs.
        """
        n = len(records)
        found = None
        memo = self._memo if n <= ROW_KEYS_UP_TO else None
        if memo is not None:
            found = memo.encode_records(records, shared or {}, self._encode_unseen, keys)
        if found is None:
            raws, present = self._raws(records, shared, where)
            if memo is not None:
                found = memo.encode(
                    dict(enumerate(raws[name] for name in self._order)), n, self._encode_unseen
                )
            found = found or self._encode_raws(raws, present, n, where)
        ids, values = found
        return EncodedArrays(ids, values, None, np.arange(1, n + 1, dtype=np.int64))

    def _encode_raws(
        self, raws: dict[str, Sequence[Any]], present: set[str], n: int, where: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``ids [n, S]`` and ``values`` of ``raws`` by the codecs."""
        columns = self._convert(raws, present, where)
        ids, values = self.feature_map.encode_columns(columns, n)
        if values is not None and not np.isfinite(values).all():
            # a value field standardised past float32: the record is refused, not scored inf
            row, slot = (int(v) for v in np.argwhere(~np.isfinite(values))[0])
            codec = self.fields[
                int(np.searchsorted(np.cumsum(self.feature_map.field_slots), slot, side="right"))
            ]
            place = f"{where}[{row}]" if len(columns[codec.name]) == n else "user/context"
            raise DataError("number too large for a float32 value", path=place, field=codec.name)
        return ids, values

    def _encode_unseen(
        self, raws: dict[int, Sequence[Any]], n: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The memo's misses (values by field position: only the fields named) encoded by the
        codecs, ``ids [n, S]`` and ``values`` (the other fields' columns unset)."""
        by_name = {self._order[j]: raw for j, raw in raws.items()}
        return self._encode_raws(by_name, set(), n, "records")


class ValueMemo:
    """Each single-slot field's recently encoded raw values → their global id (and value, for
    a value field), so that the values a request shares with recent ones (the same items
    ranked for user after user) are encoded by dictionary lookups in C instead of the codecs'
    passes.

    A value's encoding depends only on its field and the value, so the memo gives exactly what
    the codecs gave. Two values that Python finds equal must encode alike to share an entry:
    ``1 == 1.0`` (both ``"1"``) and ``True == 1`` (a number: 1.0 either way) do, but a
    categorical ``True`` is ``"true"``, not ``"1"``. So a categorical field never remembers a
    bool or a number equal to 0 or 1: those values always miss and go to the codecs. A value
    that cannot be a key (a list, an object) sends the whole call to the codecs, which refuse
    it with its place; so does any value the codecs refuse.

    Records that carry the same fields are remembered whole as well (:class:`_RowMemo`): one
    lookup of a record's values instead of one per value. A record holding a value a
    categorical field cannot share is never remembered.

    Bounded: a field's entries are dropped together when it would hold more than its share of
    ``limit``; a row memo starts again empty when it holds ``limit // 8`` records. Safe to
    share between threads (a race costs a miss, never a wrong id).
    """

    def __init__(self, fields: Sequence[Codec], limit: int = MEMO_VALUES) -> None:
        self.names = [codec.name for codec in fields]
        self.row_limit = max(1, limit // 8)
        self._rows: dict[tuple[int, ...], _RowMemo] = {}
        self.ids: list[dict] = [{} for _ in fields]
        self.values: list[dict] = [{} for _ in fields]
        self.textual = [_group(codec) == "category" for codec in fields]
        self.with_values = [j for j, codec in enumerate(fields) if codec.needs_values]
        self.per_field = max(1, limit // max(1, len(fields)))
        self._layouts: dict[tuple[int, ...], np.ndarray] = {}

    def encode(
        self, raws: dict[int, Sequence[Any]], rows: int, encode_unseen
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``ids [rows, F]`` and ``values`` of the raw values ``raws`` of some fields (by
        position: ``rows`` values each, or one broadcast; the other fields' columns are 0 and
        1), the misses encoded by ``encode_unseen(raws, rows)`` and remembered; None where the
        codecs must take the whole call (a bad value, say)."""
        fields = list(raws)
        counts = tuple(map(len, raws.values()))
        flat = list(chain.from_iterable(raws.values()))
        owners = list(chain.from_iterable(map(repeat, map(self.ids.__getitem__, fields), counts)))
        try:  # None (a value not remembered) stops the conversion with a TypeError
            found = np.fromiter(map(dict.get, owners, flat), np.int32, len(flat))
        except TypeError:
            try:
                missed = list(map(dict.get, owners, flat))
            except TypeError:  # an unhashable value: the codecs name it
                return None
            if not self._learn(raws, missed, counts, encode_unseen):
                return None
            try:
                found = np.fromiter(map(dict.get, owners, flat), np.int32, len(flat))
            except TypeError:  # dropped meanwhile by another thread, or a value never kept
                return None
        layout = self._layout(counts, rows)
        if len(fields) == len(self.names):
            ids = found[layout]
        else:
            ids = np.zeros((rows, len(self.names)), np.int32)
            if fields:
                ids[:, fields] = found[layout]
        if not self.with_values:
            return ids, None
        values = np.ones(ids.shape, np.float32)
        for j in self.with_values:
            if j in raws:
                got = list(map(self.values[j].get, raws[j]))
                if None in got:
                    return None
                values[:, j] = got
        return ids, values

    def encode_records(
        self, records: Sequence[Record], shared: Record, encode_unseen, keys: set[str] | None
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``ids [n, F]`` and ``values`` of ``records`` that all carry the same fields (at least
        two), ``shared`` giving the others: each record's values looked up whole; None where
        this does not apply or the codecs must take the call. ``keys``: every key of the
        records, when known."""
        if keys is None:
            if not PLAIN_DICTS.issuperset(map(type, records)):
                return None
            keys = set().union(*records)
        carried = tuple(j for j, name in enumerate(self.names) if name in keys)  # positions
        if len(carried) < 2:
            return None
        memo = self._rows.get(carried)
        if memo is None:
            if len(self._rows) >= 2:  # candidates mostly carry one set of fields
                self._rows.clear()
            memo = _RowMemo([self.names[j] for j in carried], self, self.row_limit)
            self._rows[carried] = memo
        try:  # a record lacking one of the fields: KeyError, left to the per-value path
            rows = list(map(memo.values_of, records))
        except KeyError:
            return None
        found = memo.find(rows, carried, encode_unseen)
        if found is None:
            return None
        inside = set(carried)
        others = {j: [shared.get(n)] for j, n in enumerate(self.names) if j not in inside}
        common = self.encode(others, 1, encode_unseen)
        if common is None:
            return None
        ids = np.repeat(common[0], len(records), axis=0)
        ids[:, carried] = found[0]
        values = None
        if common[1] is not None:
            values = np.repeat(common[1], len(records), axis=0)
            if found[1] is not None:  # else no carried field has values: the ones stand
                values[:, carried] = found[1]
        return ids, values

    def _layout(self, counts: tuple[int, ...], rows: int) -> np.ndarray:
        """Positions ``[rows, F]`` in the flat values of each row's value of each field."""
        layout = self._layouts.get(counts)
        if layout is None or len(layout) != rows:
            sizes = np.array(counts)
            starts = np.cumsum(sizes) - sizes
            layout = starts + np.arange(rows)[:, None] * (sizes > 1)
            if len(self._layouts) > 64:  # a few shapes recur (records × shared fields)
                self._layouts.clear()
            self._layouts[counts] = layout
        return layout

    def _learn(self, raws, found, counts, encode_unseen) -> bool:
        """Encode the values ``found`` missed and remember them; False if the codecs refuse
        one of them (the caller then encodes the whole call, naming the bad value's place)."""
        unseen: dict[int, list] = {}
        start = 0
        for (j, raw), count in zip(raws.items(), counts, strict=True):
            got = found[start : start + count]
            start += count
            if None in got:
                unseen[j] = [v for v, g in zip(raw, got, strict=True) if g is None]
        rows = max(map(len, unseen.values()))
        padded = {j: values + [None] * (rows - len(values)) for j, values in unseen.items()}
        try:
            ids, values = encode_unseen(padded, rows)
        except DataError:
            return False
        for j, keys in unseen.items():
            column = ids[: len(keys), j].tolist()
            numbers = values[: len(keys), j].tolist() if j in self.with_values else None
            # see the class docs: bools and 0/1 numbers are not kept (strings: checked in C)
            if self.textual[j] and not _TEXTS.issuperset(map(type, keys)):
                kept = [i for i, v in enumerate(keys) if _shareable(v)]
                keys = [keys[i] for i in kept]
                column = [column[i] for i in kept]
            memo = self.ids[j]
            if len(memo) + len(keys) > self.per_field:
                memo.clear()
                self.values[j].clear()
            if numbers is not None:
                self.values[j].update(zip(keys, numbers, strict=True))
            memo.update(zip(keys, column, strict=True))
        return True


class _RowMemo:
    """Records' values of the fields ``names`` (a tuple per record, in field order) → their ids
    and values rows; part of :class:`ValueMemo`, whose rules it follows."""

    def __init__(self, names: list[str], values: ValueMemo, limit: int) -> None:
        self.values_of = itemgetter(*names)
        self._values = values
        self.width, self.limit = len(names), limit
        self._lock = threading.Lock()
        textual = [k for k, name in enumerate(names) if values.textual[values.names.index(name)]]
        # a row's categorical values as a tuple (the first twice: itemgetter of one is no tuple)
        self._pick_textual = itemgetter(*textual, *textual[:1]) if textual else lambda _row: ()
        self._with_values = any(values.names[j] in names for j in values.with_values)
        self._state = self._empty()

    def _empty(self) -> tuple[dict, np.ndarray, np.ndarray | None, list[int]]:
        """(index: values → row, ids, values, [rows filled]): replaced whole when full, so a
        reader holding the old one never sees a row rewritten."""
        ids = np.zeros((self.limit, self.width), np.int32)
        values = np.ones((self.limit, self.width), np.float32) if self._with_values else None
        return {}, ids, values, [0]

    def find(
        self, rows: list[tuple], carried: tuple[int, ...], encode_unseen
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``ids [n, width]`` and ``values`` of ``rows``; the missed ones encoded by
        ``encode_unseen`` (``carried``: the fields' positions) and remembered."""
        index, ids, values, _ = state = self._state
        try:  # None (a record not remembered) stops the conversion with a TypeError
            at = np.fromiter(map(index.get, rows), np.int64, len(rows))
        except TypeError:
            try:
                at_or_none = list(map(index.get, rows))
            except TypeError:  # an unhashable value: the codecs name it
                return None
            state = self._learn(state, rows, at_or_none, carried, encode_unseen)
            if state is None:
                return None
            index, ids, values, _ = state
            try:
                at = np.fromiter(map(index.get, rows), np.int64, len(rows))
            except TypeError:  # a record with a value never kept
                return None
        return ids[at], None if values is None else values[at]

    def _learn(self, state, rows, at_or_none, carried, encode_unseen):
        """Encode the records ``at_or_none`` missed and remember those that may be; the state
        they are in, or None if the codecs refuse one of them."""
        unseen = list({row: None for row, at in zip(rows, at_or_none, strict=True) if at is None})
        # their values through the value memo: a new record mostly holds values seen before
        raws = dict(zip(carried, zip(*unseen, strict=True), strict=True))
        found = self._values.encode(raws, len(unseen), encode_unseen)
        if found is None:
            return None
        ids, values = found
        textual = list(map(self._pick_textual, unseen))
        kept: slice | list[int] = slice(None)
        keys = unseen
        if not _TEXTS.issuperset(map(type, chain.from_iterable(textual))):  # checked in C
            kept = [i for i, values in enumerate(textual) if all(map(_shareable, values))]
            keys = [unseen[i] for i in kept]
        columns = list(carried)
        with self._lock:
            state = self._state
            if state[3][0] + len(keys) > self.limit:
                state = self._state = self._empty()
            index, memo_ids, memo_values, filled = state
            start = filled[0]
            end = start + len(keys)
            if end > self.limit:  # more new records than the memo holds: not remembered
                return state
            memo_ids[start:end] = ids[kept][:, columns]
            if memo_values is not None and values is not None:
                memo_values[start:end] = values[kept][:, columns]
            filled[0] = end
            index.update(zip(keys, range(start, end), strict=True))
        return state


#: the types of values a categorical memo entry may always hold
_TEXTS = frozenset((str, type(None)))


def _shareable(value: Any) -> bool:
    """Whether a categorical value may share a memo entry with the values equal to it (see
    :class:`ValueMemo`): not a bool, nor a number equal to 0 or 1."""
    return type(value) is str or value is None or (value != 0 and value != 1)


def _shared_place(_row: int) -> str:
    return "user/context"


def _group(codec: Codec) -> str:
    kind = codec.spec.kind
    return kind if kind in ("numeric", "multi") else "category"


def _strings(raw: list) -> pa.Array | None:
    """``raw`` as one Arrow string array, or None when a value is not a string or None."""
    try:
        return pa.array(raw, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return None


def _plain_numbers(raw: list) -> np.ndarray | None:
    """``raw`` as float64 (NaN for None), or None when a value needs a closer look (a NaN or
    infinite number, a value that is not a number)."""
    try:
        x = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    if x.shape != (len(raw),):
        return None
    bad = ~np.isfinite(x)
    # NaN from None is missing; NaN or inf from a value is refused by the closer look
    if bad.any() and not all(raw[i] is None for i in np.flatnonzero(bad).tolist()):
        return None
    return x


def _column(codec: Codec, raw: list, place) -> pa.Array | np.ndarray:
    """The raw column a file reader would give for ``raw`` values of ``codec``'s field (numbers
    as a float64 array, NaN for missing)."""
    kind = codec.spec.kind
    if kind == "numeric":
        return _numbers(raw, codec.name, place)
    if kind == "multi":
        separator = codec.spec.separator
        texts = []
        for i, value in enumerate(raw):
            try:
                texts.append(bag_text(value, separator))
            except ValueError as exc:
                raise _BadValue(place(i), codec.name, str(exc)) from None
        return pa.array(texts, pa.string())
    try:  # the usual case, strings and None: one conversion
        return pa.array(raw, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass  # numbers (written as text) or bad values (named below)
    texts = []
    for i, value in enumerate(raw):
        try:
            texts.append(text_of(value))
        except ValueError as exc:
            raise _BadValue(place(i), codec.name, str(exc)) from None
    return pa.array(texts, pa.string())


def _numbers(raw: list, name: str, place) -> np.ndarray:
    """Numbers as float64 with NaN for missing; a bad value raises naming its place."""
    x = _plain_numbers(raw)
    if x is not None:
        return x
    x = np.empty(len(raw), dtype=np.float64)
    for i, value in enumerate(raw):
        try:
            number = number_of(value)
        except ValueError as exc:
            raise _BadValue(place(i), name, str(exc)) from None
        x[i] = np.nan if number is None else number
    return x
