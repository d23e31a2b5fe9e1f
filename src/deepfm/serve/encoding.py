"""Encoding JSON-like records (dicts) with a fitted feature map, for serving.

:meth:`FeatureMap.encode` works on Arrow tables read from files. A request holds a few hundred
values at most, and building an Arrow table for it costs more than the model's forward pass
(``pc.index_in`` also rebuilds its hash set from the whole vocabulary on every call). This
encoder keeps one Python dict per field (token → local id), built once per loaded bundle, and
encodes a request with one dict lookup per value; numeric fields are converted as a column with
NumPy. The ids and values equal :meth:`FeatureMap.encode` on the same values
(``tests/test_predictor_encoding.py`` checks it on the real Criteo rows and by fuzzing).

Value rules (the same as the file readers'):

* ``None`` and ``""`` are missing (the field's missing id); an absent key is missing too;
* categorical values are strings; numbers are accepted and written as text (``3.0`` → ``"3"``,
  ``True`` → ``"true"``), so a number-like id matches the vocabulary built from a file;
* numeric fields take numbers or numeric strings (``true``/``false`` count as 1/0); NaN and
  infinity are refused, as in files;
* a multi-valued field takes a list of values or one string joined with the field's separator.

Anything else (an object, a list where one value is expected, a non-finite number) raises
:class:`DataError` naming the record and the field.

``shared`` values (``rank``'s user and context) are encoded once and broadcast to every record
that does not carry the field itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import FIRST_VALUE, MISSING, OOV, FeatureMap, FieldInfo, bucketize
from deepfm.errors import DataError

Record = Mapping[str, Any]
_NOT_FOUND = -1
_SCALARS = (str, int, float, bool)


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


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", tuple: "a list"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Field:
    info: FieldInfo
    slot: int  # first slot of the field in the encoded row
    lookup: dict[Any, int]  # token → local id (empty for value fields)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.info.name


class RecordEncoder:
    """``encode(records, shared=None) -> EncodedArrays`` with ``ids [n, S]`` int32 and
    ``values [n, S]`` float32 (``None`` when the map needs none), as :meth:`FeatureMap.encode`.

    Safe to use from several threads (it only reads its lookup tables).
    """

    def __init__(self, feature_map: FeatureMap) -> None:
        self.feature_map = feature_map
        self.num_slots = feature_map.num_slots
        self.needs_values = feature_map.needs_values
        self.fields: list[_Field] = []
        slot = 0
        for info in feature_map.fields:
            lookup: dict[Any, int] = {}
            if not info.spec.is_value:
                lookup = {token: FIRST_VALUE + i for i, token in enumerate(info.vocab)}
                if info.spec.kind == "categorical":
                    # files never hold "" (an empty cell is missing), so these keys are free
                    lookup[""] = MISSING
            self.fields.append(_Field(info, slot, lookup))
            slot += info.slots
        self.names: frozenset[str] = frozenset(f.name for f in self.fields)

    def check_keys(
        self, records: Sequence[Record], where: str, extra: frozenset[str] = frozenset()
    ) -> None:
        """Raise :class:`DataError` naming the first record (``where[i]``) that holds a key which
        is neither a field of the model nor in ``extra``, or that is not an object."""
        allowed = self.names | extra
        for i, record in enumerate(records):
            self.check_mapping(record, f"{where}[{i}]", allowed)

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

    def encode(
        self,
        records: Sequence[Record],
        shared: Record | None = None,
        *,
        where: str = "records",
    ) -> EncodedArrays:
        """Encode ``records``; a field a record lacks takes its value from ``shared``.

        ``where`` names the records in error messages (``records[3], field 'I5': ...``).
        """
        n = len(records)
        shared = shared or {}
        for i, record in enumerate(records):
            if type(record) is not dict and not isinstance(record, Mapping):
                raise DataError(f"expected an object, got {_kind(record)}", path=f"{where}[{i}]")
        ids = np.empty((n, self.num_slots), dtype=np.int32)
        values = np.ones((n, self.num_slots), dtype=np.float32) if self.needs_values else None
        present: set[str] = set().union(*records) if n else set()
        own = [f for f in self.fields if f.name in present]
        rest = [f for f in self.fields if f.name not in present]
        try:
            if own:
                self._fill(own, records, shared, ids, values, where)
            if rest and n:  # fields no record carries: encoded once, broadcast to every row
                self._fill(rest, [shared], {}, ids, values, "")
        except _BadValue as bad:
            raise DataError(bad.reason, path=bad.where, field=bad.field) from None
        return EncodedArrays(ids, values, None, np.arange(1, n + 1, dtype=np.int64))

    # -- fields of one kind at a time ----------------------------------------------------------

    def _fill(
        self,
        fields: list[_Field],
        rows: Sequence[Record],
        shared: Record,
        ids: np.ndarray,
        values: np.ndarray | None,
        where: str,
    ) -> None:
        """Encode ``fields`` of ``rows`` into ``ids``/``values`` (one row broadcasts to all)."""

        def place(i: int) -> str:
            return f"{where}[{i}]" if where else "user/context"

        numeric = []
        for f in fields:
            kind = f.info.spec.kind
            if kind == "numeric":
                numeric.append(f)
                continue
            name = f.name
            default = shared.get(name)
            if kind == "multi":
                column = [r.get(name, default) for r in rows]
                bag_ids, bag_values = _bags(f, column, place)
                width = f.info.slots
                ids[:, f.slot : f.slot + width] = bag_ids + f.info.offset
                values[:, f.slot : f.slot + width] = bag_values  # type: ignore[index]
            else:
                ids[:, f.slot] = _categorical(f, rows, default, place) + f.info.offset
        if numeric:
            self._numbers(numeric, rows, shared, ids, values, place)

    @staticmethod
    def _numbers(fields, rows, shared, ids, values, place) -> None:
        """All numeric fields of ``rows`` as one ``[rows, fields]`` float matrix."""
        pairs = [(f.name, shared.get(f.name)) for f in fields]
        matrix = [[r.get(name, default) for name, default in pairs] for r in rows]
        x = _float_matrix(matrix, [f.name for f in fields], place)  # NaN = missing
        missing = np.isnan(x)
        with np.errstate(invalid="ignore", over="ignore"):
            # beyond int64 a bucket token is garbage, as in FeatureMap.encode: never in the
            # vocabulary, so OOV
            tokens = bucketize(np.where(missing, 0.0, x))
        for j, f in enumerate(fields):
            info, slot = f.info, f.slot
            if info.spec.is_value:
                ids[:, slot] = info.offset + np.where(missing[:, j], MISSING, FIRST_VALUE)
                with np.errstate(over="ignore"):
                    scaled = np.where(missing[:, j], 0.0, (x[:, j] - info.mean) / info.std)
                    scaled = scaled.astype(np.float32)
                if not np.isfinite(scaled).all():  # past float32 after standardising
                    i = int(np.flatnonzero(~np.isfinite(scaled))[0])
                    raise _BadValue(place(i), f.name, "number too large for a float32 value")
                values[:, slot] = scaled
                continue
            get = f.lookup.get
            local = np.array([get(t, OOV) for t in tokens[:, j].tolist()], dtype=np.int64)
            ids[:, slot] = info.offset + np.where(missing[:, j], MISSING, local)


class _BadValue(Exception):
    def __init__(self, where: str, field: str, reason: str) -> None:
        super().__init__(reason)
        self.where, self.field, self.reason = where, field, reason


def _categorical(f: _Field, rows: Sequence[Record], default: Any, place) -> np.ndarray:
    """Local ids of one categorical field of ``rows``: one dict lookup per string value, in one
    pass over the rows; numbers and bad values take the slow path."""
    name, get = f.name, f.lookup.get
    local = [
        get(v, OOV)
        if type(v := r.get(name, default)) is str
        else (MISSING if v is None else _NOT_FOUND)
        for r in rows
    ]
    if _NOT_FOUND in local:
        for i, code in enumerate(local):
            if code == _NOT_FOUND:  # a number or a bool (its text is looked up), or a bad value
                try:
                    token = text_of(rows[i].get(name, default))
                except ValueError as exc:
                    raise _BadValue(place(i), name, str(exc)) from None
                local[i] = MISSING if token is None else get(token, OOV)
    return np.array(local, dtype=np.int64)


def _float_matrix(matrix: list[list], names: list[str], place) -> np.ndarray:
    """Numbers as float64 ``[rows, fields]`` with NaN for missing; a bad value raises."""
    try:  # fast path: NumPy converts ints, floats, numeric strings and None (→ NaN)
        x = np.array(matrix, dtype=np.float64)
        ok = x.shape == (len(matrix), len(names))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if ok:
        bad = ~np.isfinite(x)
        # NaN from None is missing; NaN or inf from a value goes to the slow path's error
        if not bad.any() or all(matrix[i][j] is None for i, j in np.argwhere(bad).tolist()):
            return x
    x = np.empty((len(matrix), len(names)), dtype=np.float64)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            try:
                number = number_of(value)
            except ValueError as exc:
                raise _BadValue(place(i), names[j], str(exc)) from None
            x[i, j] = np.nan if number is None else number
    return x


def _bags(f: _Field, column: list, place) -> tuple[np.ndarray, np.ndarray]:
    """Local ids and values ``[rows, slots]`` of one multi-valued column."""
    info = f.info
    width, separator, get = info.slots, info.spec.separator, f.lookup.get
    ids = np.full((len(column), width), MISSING, dtype=np.int64)
    values = np.zeros((len(column), width), dtype=np.float32)
    for i, value in enumerate(column):
        try:
            tokens = _bag_tokens(value, separator)[:width]
        except ValueError as exc:
            raise _BadValue(place(i), f.name, str(exc)) from None
        if not tokens:
            values[i, 0] = 1.0  # an empty bag is one "missing" feature
            continue
        ids[i, : len(tokens)] = [get(t, OOV) for t in tokens]
        values[i, : len(tokens)] = 1.0 / len(tokens) if info.spec.pooling == "mean" else 1.0
    return ids, values


def _bag_tokens(value: Any, separator: str) -> list[str]:
    """The tokens of one bag: a list of values, or one separator-joined string."""
    if isinstance(value, list | tuple):
        if any(isinstance(v, list | tuple | dict) for v in value):
            raise ValueError("a bag holds values, not lists or objects")
        parts = [text_of(v) for v in value]
    else:
        parts = [text_of(value)]
    return [t for part in parts if part for t in part.split(separator) if t]
