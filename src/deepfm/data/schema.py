"""Fields of a CTR record: what each raw column is and how it becomes feature ids.

A field is

* ``categorical``: one raw value, one id (unknown or rare values share the field's OOV id);
* ``numeric``: a number, either bucketised into ids (``numeric: bucket``, the Criteo practice) or
  kept as a value multiplying one embedding (``numeric: value``, standardised on the training rows);
* ``multi``: a bag of values in one column, split on ``separator``; the bag's embeddings are
  summed or averaged (the paper's ``e_i = V_field_i · x_field_i`` with a multi-hot ``x``);
* ``hashed``: one raw value, one of ``buckets`` ids chosen by a hash of the value, with no
  vocabulary (the hashing trick, for unbounded id spaces: distinct values may share an id).

How each kind is fitted and encoded: :mod:`deepfm.data.codecs`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deepfm.common import read_yaml
from deepfm.errors import ConfigError, is_integer

FieldKind = Literal["categorical", "numeric", "multi", "hashed"]
NumericMode = Literal["bucket", "value"]
Pooling = Literal["sum", "mean"]

FIELD_KINDS: tuple[str, ...] = ("categorical", "numeric", "multi", "hashed")
#: Bags longer than this are truncated when the length is fitted from data (the count is reported).
MAX_BAG_LENGTH = 64


@dataclass(frozen=True)
class FieldSpec:
    """One input field.

    ``min_count`` overrides the schema's default: values seen fewer times in the training rows map
    to the field's OOV id. ``max_len`` (multi only) is the number of slots of the bag; 0 means
    "the longest bag seen in the training rows", capped at ``MAX_BAG_LENGTH``. ``buckets``
    (hashed only) is the number of ids the values are hashed into.
    """

    name: str
    kind: FieldKind = "categorical"
    numeric: NumericMode = "bucket"
    separator: str = "|"
    pooling: Pooling = "sum"
    max_len: int = 0
    min_count: int | None = None
    buckets: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a field needs a non-empty name (a string), got {self.name!r}")
        if not isinstance(self.separator, str) or not self.separator:
            raise ConfigError(f"field {self.name!r}: separator must be a non-empty string")
        for key in ("max_len", "min_count", "buckets"):
            value = getattr(self, key)
            if value is not None and not is_integer(value):
                raise ConfigError(f"field {self.name!r}: {key} must be an integer, got {value!r}")
        if self.kind not in FIELD_KINDS:
            raise ConfigError(
                f"field {self.name!r}: kind {self.kind!r} is not one of {', '.join(FIELD_KINDS)}"
            )
        if self.numeric not in ("bucket", "value"):
            raise ConfigError(f"field {self.name!r}: numeric must be 'bucket' or 'value'")
        if self.pooling not in ("sum", "mean"):
            raise ConfigError(f"field {self.name!r}: pooling must be 'sum' or 'mean'")
        if self.max_len < 0 or (self.min_count is not None and self.min_count < 1):
            raise ConfigError(f"field {self.name!r}: max_len must be >= 0 and min_count >= 1")
        if (self.kind == "hashed") != (self.buckets > 0):
            raise ConfigError(
                f"field {self.name!r}: a hashed field needs buckets >= 1 (and only a hashed field "
                "has buckets)"
            )

    @property
    def is_value(self) -> bool:
        """True for a numeric field kept as a value (its sample value is not 1)."""
        return self.kind == "numeric" and self.numeric == "value"


@dataclass(frozen=True)
class Schema:
    """The fields of a dataset, the label column and the default minimum count.

    ``hash_buckets``: a categorical field with more distinct training values than this is hashed
    into that many buckets instead of getting a vocabulary (``--hash-buckets``; None: never).
    """

    fields: tuple[FieldSpec, ...]
    label: str | None = "label"
    min_count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    hash_buckets: int | None = None

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if not names:
            raise ConfigError("a schema needs at least one field")
        if self.label is not None and (not isinstance(self.label, str) or not self.label):
            raise ConfigError(f"the label must be a column name, got {self.label!r}")
        if not is_integer(self.min_count):
            raise ConfigError(f"min_count must be an integer, got {self.min_count!r}")
        ignore = self.extra.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(n, str) for n in ignore):
            raise ConfigError(f"ignore must be a list of column names, got {ignore!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"schema names these fields twice: {', '.join(duplicates)}")
        if self.label is not None and self.label in names:
            raise ConfigError(f"the label column {self.label!r} is also declared as a field")
        if self.min_count < 1:
            raise ConfigError("min_count must be at least 1")
        if self.hash_buckets is not None and not (
            is_integer(self.hash_buckets) and self.hash_buckets >= 1
        ):
            raise ConfigError(f"hash_buckets must be an integer >= 1, got {self.hash_buckets!r}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def ignored(self) -> list[str]:
        """Columns of the input that are neither fields nor the label (``ignore:``)."""
        return list(self.extra.get("ignore") or [])

    def min_count_of(self, spec: FieldSpec) -> int:
        return spec.min_count if spec.min_count is not None else self.min_count

    def with_options(self, min_count: int | None = None, hash_buckets: int | None = None) -> Schema:
        """This schema with the command line's ``--min-count`` and ``--hash-buckets`` (None:
        keep the schema's own)."""
        return replace(
            self,
            min_count=self.min_count if min_count is None else min_count,
            hash_buckets=self.hash_buckets if hash_buckets is None else hash_buckets,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "label": self.label,
            "min_count": self.min_count,
            "fields": [asdict(f) for f in self.fields],
        }
        if self.hash_buckets is not None:
            out["hash_buckets"] = self.hash_buckets
        if self.ignored:  # kept in bundles, so that scoring files read like training files
            out["ignore"] = self.ignored
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "schema") -> Schema:
        if not isinstance(data, dict) or "fields" not in data:
            raise ConfigError(f"{source}: expected a mapping with a 'fields' list")
        raw_fields = data["fields"]
        if not isinstance(raw_fields, list):
            raise ConfigError(f"{source}: 'fields' must be a list")
        known = set(FieldSpec.__dataclass_fields__)
        specs = []
        for i, raw in enumerate(raw_fields):
            if isinstance(raw, str):
                raw = {"name": raw}
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: fields[{i}] must be a name or a mapping")
            unknown = set(raw) - known
            if unknown:
                raise ConfigError(
                    f"{source}: fields[{i}] has unknown keys {sorted(unknown)}; "
                    f"known keys are {sorted(known)}"
                )
            try:
                specs.append(FieldSpec(**raw))
            except TypeError as exc:
                raise ConfigError(f"{source}: fields[{i}]: {exc}") from None
        hash_buckets = data.get("hash_buckets")
        own = ("fields", "label", "min_count", "hash_buckets")
        return cls(
            tuple(specs),
            label=data.get("label", "label"),
            min_count=data.get("min_count", 1),
            extra={k: v for k, v in data.items() if k not in own},
            hash_buckets=hash_buckets,
        )


def load_schema(path: str | Path) -> Schema:
    """Read a YAML schema::

    label: click
    min_count: 2
    fields:
      - {name: user, kind: categorical}
      - {name: price, kind: numeric, numeric: value}
      - {name: tags, kind: multi, separator: "|", pooling: mean}
      - {name: device_ip, kind: hashed, buckets: 1000000}
    ignore: [id]
    """
    return Schema.from_dict(read_yaml(path, "the schema file"), source=str(path))
