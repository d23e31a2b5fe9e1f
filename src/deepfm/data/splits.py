"""The paper's splits (Sec. IV-A1): random (e.g. 9:1, seeded) and sequential (e.g. 6:1, file order).

A split assigns every row, by its ordinal among all input rows, to train (0), valid (1) or test
(2). Random assignment hashes ``(seed, ordinal)``, so it needs no pass over the data, is the same
whatever the chunking, and splits are disjoint and complete by construction. A sequential split
puts the first ``a/b`` of the rows in train and the rest in test; the validation carve-out is the
end of the training part (still before every test row). For random splits the validation rows are
a seeded random ``valid_fraction`` of the training part.

A *time* split (``time:COLUMN``) orders the rows by a time column of the raw data (the app
market's ``day``, Avazu's ``hour``; rows of one time in file order): the rows of the last time
are the test rows, the last ``valid_fraction`` of the others (in time order) validate, the rest
train — as a model trained on the days so far is evaluated on the next day
(:func:`time_codes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from deepfm.errors import ConfigError

TRAIN, VALID, TEST = 0, 1, 2


@dataclass(frozen=True)
class SplitSpec:
    """``kind`` is random, sequential, time or none; ``train`` the training share of the rows
    (random, sequential); ``column`` the time column (time)."""

    kind: str
    train: Fraction
    column: str = ""

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        """``random:0.9``, ``random:9/10``, ``sequential:6/7``, ``time:COLUMN`` or ``none``."""
        if text == "none":
            return cls("none", Fraction(1))
        if text.strip().startswith("time:"):
            column = text.strip()[len("time:") :].strip()
            if not column:
                raise ConfigError(f"bad split {text!r}: name the time column, e.g. time:day")
            return cls("time", Fraction(1), column)
        match = re.fullmatch(r"(random|sequential):([0-9./]+)", text.strip())
        if not match:
            raise ConfigError(
                f"bad split {text!r}: use random:0.9, sequential:6/7, time:COLUMN or none"
            )
        try:
            share = Fraction(match.group(2)).limit_denominator(10_000)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"bad split share {match.group(2)!r}") from None
        if not 0 < share < 1:
            raise ConfigError(f"the training share must be between 0 and 1, got {share}")
        return cls(match.group(1), share)

    def __str__(self) -> str:
        if self.kind == "time":
            return f"time:{self.column}"
        return self.kind if self.kind == "none" else f"{self.kind}:{self.train}"


def uniform_hash(seed: int, ordinals: np.ndarray, stream: int = 0) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from ``(seed, stream, ordinal)`` (SplitMix64)."""
    with np.errstate(over="ignore"):
        x = ordinals.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= np.uint64((seed * 0x2545F4914F6CDD1D + stream * 0x632BE59BD9B4E019) % 2**64)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sequential_bounds(spec: SplitSpec, total: int, valid_fraction: float) -> tuple[int, int]:
    """``(valid_start, cut)`` of a sequential split of ``total`` rows: ordinals below
    ``valid_start`` train, ``[valid_start, cut)`` validate, ``cut`` and above test."""
    cut = int(total * spec.train)
    return cut - round(cut * valid_fraction), cut


def assign(
    spec: SplitSpec,
    ordinals: np.ndarray,
    *,
    total: int | None = None,
    valid_fraction: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Split code (TRAIN, VALID, TEST) of each row; ``total`` rows are needed for sequential.
    A time split reads a column of the rows: :func:`time_codes`."""
    if spec.kind == "time":
        raise ConfigError(
            f"split {spec} orders rows by their time: it is read from the rows (train --data)"
        )
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"the validation fraction must be in [0, 1), got {valid_fraction}")
    ordinals = np.asarray(ordinals, dtype=np.int64)
    codes = np.full(len(ordinals), TRAIN, dtype=np.int8)
    if spec.kind == "sequential":
        if total is None:
            raise ConfigError("a sequential split needs the total number of rows")
        valid_start, cut = sequential_bounds(spec, total, valid_fraction)
        codes[ordinals >= valid_start] = VALID
        codes[ordinals >= cut] = TEST
        return codes
    if spec.kind == "random":
        codes[uniform_hash(seed, ordinals) >= float(spec.train)] = TEST
    if valid_fraction > 0:
        train = codes == TRAIN
        codes[train & (uniform_hash(seed, ordinals, stream=1) < valid_fraction)] = VALID
    return codes


def time_order(times: np.ndarray) -> np.ndarray:
    """Row order by time, ties in input order. Times that all read as numbers are compared as
    numbers (day 10 after day 9), others as text (fixed-width stamps such as YYMMDDHH)."""
    times = np.asarray(times)
    if times.dtype.kind in "OUS":
        try:
            times = times.astype(np.float64)
        except ValueError:
            times = times.astype(str)
    return np.argsort(times, kind="stable")


def time_codes(times: np.ndarray, valid_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, order)`` of a time split of rows with these ``times`` (see the module docs):
    the split code of each row, and the rows in time order."""
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"the validation fraction must be in [0, 1), got {valid_fraction}")
    order = time_order(times)
    codes = np.full(len(order), TRAIN, dtype=np.int8)
    if not len(order):
        return codes, order
    ordered = np.asarray(times)[order]
    last = ordered == ordered[-1]
    codes[order[last]] = TEST
    before = order[~last]
    valid = round(len(before) * valid_fraction)
    if valid:
        codes[before[len(before) - valid :]] = VALID
    return codes, order
