"""Growing a fitted feature map with new data (daily warm starts).

Each vocabulary field (categorical, bucketised numeric, bag) keeps every id it has and appends
the new data's values that pass the field's min count, after the existing ids
(:meth:`~deepfm.data.codecs.Vocabulary.extend`), most frequent first, ties by key (the order
of a fit). Hashed fields need no growth (every value already has its bucket); a standardised
numeric field keeps the mean and deviation of its first fit (its one embedding keeps its meaning).

**The counting window.** A value's count is its count in the new data plus ``decay`` × its
count carried from earlier fits and updates (:class:`~deepfm.data.codecs.CarriedCounts`, saved
beside the vocabulary)::

    count_t(v) = n_t(v) + decay · count_{t-1}(v)

A value joins the vocabulary when ``count_t(v) >= min_count``; the others are carried on, those
whose count falls below 1 are forgotten, and at most ``cap`` of them (the most frequent) are
kept. The window is exponential, about ``1 / (1 - decay)`` updates long: with the default
``decay = 0.9`` (about ten daily updates) a value seen ``c`` times every day reaches
``c · (1 - 0.9^k) / 0.1`` after ``k`` days (``10c`` at most), so a value seen a tenth of the min
count a day qualifies in time, as it would in a refit on the last ten days; a value seen once and
never again is forgotten after one update (``0.9 < 1``). ``decay = 0`` counts the new data alone.

Because fields are laid out one after the other in the global table, the global ids of the fields
after a grown one shift (their local ids do not): the model's tables are remapped row by row
(:mod:`deepfm.nn.growth`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from deepfm.data.codecs import (
    CARRIED_CAP,
    COLLIDED,
    OOV,
    CarriedCounts,
    Codec,
    FieldStats,
    VocabularyCodec,
    merge_runs,
)
from deepfm.data.featuremap import FeatureMap, FeatureMapBuilder
from deepfm.data.reader import RawChunk
from deepfm.errors import ConfigError

#: the weight of yesterday's carried count in today's (a window of about ten updates)
DEFAULT_DECAY = 0.9


def check_decay(decay: float) -> float:
    """``decay`` if it is in [0, 1], else a :class:`ConfigError`."""
    if not 0.0 <= decay <= 1.0:
        raise ConfigError(f"the decay of carried counts must be in [0, 1], got {decay}")
    return decay


@dataclass
class Growth:
    """The grown map and what changed: values added per field (only fields that grew)."""

    feature_map: FeatureMap
    added: dict[str, int] = field(default_factory=dict)
    rows: int = 0

    @property
    def grew(self) -> bool:
        return any(self.added.values())


def count_rows(feature_map: FeatureMap, chunks: Iterable[RawChunk]) -> FeatureMapBuilder:
    """The statistics of new rows, counted as a fit counts them."""
    builder = FeatureMapBuilder(feature_map.schema)
    for chunk in chunks:
        builder.update(chunk)
    return builder


def grow_codec(
    codec: Codec, stats: FieldStats, min_count: int, *, decay: float, cap: int
) -> tuple[Codec, int]:
    """``codec`` with the qualifying new values appended (a copy; ``codec`` is unchanged) and
    the number of values added. Codecs without a vocabulary come back as they are."""
    if not isinstance(codec, VocabularyCodec) or stats.counts is None:
        return replace(codec), 0  # a copy: laying out the new map moves its offset
    fresh = CarriedCounts.empty()
    for keys, counts, checks in merge_runs(stats.counts.finish()):
        fresh = fresh.union(CarriedCounts(keys, counts.astype(np.float32), checks))
    carried = codec.carried or CarriedCounts.empty()
    carried = CarriedCounts(carried.keys, carried.counts * np.float32(decay), carried.checks)
    total = carried.union(fresh)
    unknown = codec.vocabulary.lookup(total.keys) == OOV
    total = total.take(unknown & (total.checks != COLLIDED))
    qualifies = total.counts >= min_count
    new = total.take(qualifies)
    order = np.lexsort((new.keys, -new.counts))  # the order of a fit: by count, ties by key
    vocabulary = codec.vocabulary.extend(new.keys[order])
    rest = total.take(~qualifies & (total.counts >= 1.0)).union(CarriedCounts.empty(), cap=cap)
    summary = {**codec.summary, "added": int(codec.summary.get("added", 0)) + len(new)}
    return replace(codec, vocabulary=vocabulary, summary=summary, carried=rest), len(new)


def grow_feature_map(
    feature_map: FeatureMap,
    counted: FeatureMapBuilder,
    *,
    decay: float = DEFAULT_DECAY,
    cap: int = CARRIED_CAP,
) -> Growth:
    """Grow every vocabulary field of ``feature_map`` with the new rows ``counted`` (a builder
    of the same schema that counted them, e.g. :func:`count_rows`). With no rows the map is
    kept as it is (carried counts too)."""
    builder, schema = counted, feature_map.schema
    if builder.rows == 0:
        return Growth(
            FeatureMap.laid_out(
                schema,
                [replace(c) for c in feature_map.fields],
                fitted_rows=feature_map.fitted_rows,
            )
        )
    codecs, added = [], {}
    for codec in feature_map.fields:
        grown, n = grow_codec(
            codec, builder.stats[codec.name], schema.min_count_of(codec.spec), decay=decay, cap=cap
        )
        codecs.append(grown)
        if n:
            added[codec.name] = n
    laid = FeatureMap.laid_out(schema, codecs, fitted_rows=feature_map.fitted_rows + builder.rows)
    return Growth(laid, added, builder.rows)
