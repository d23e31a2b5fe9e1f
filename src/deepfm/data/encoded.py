"""Encoded samples: the paper's ``x`` as integer feature ids and float values, one row per record.

Layout: every field owns one *slot* (categorical, numeric) or ``max_len`` slots (multi-valued);
``ids[r, s]`` is a global feature id (field offset + local id) and ``values[r, s]`` the value
``x`` multiplying that feature's embedding. ``values`` is ``None`` when every value is 1 (all
fields categorical or bucketised), which halves memory and lets models skip a multiply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EncodedArrays:
    """``ids`` int32 ``[rows, slots]``; ``values`` float32 ``[rows, slots]`` or None; ``labels``
    float32 ``[rows]`` or None (unlabeled input); ``lines`` int64 ``[rows]``: source line numbers.
    """

    ids: np.ndarray
    values: np.ndarray | None
    labels: np.ndarray | None
    lines: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray | slice) -> EncodedArrays:
        return EncodedArrays(
            self.ids[index],
            None if self.values is None else self.values[index],
            None if self.labels is None else self.labels[index],
            self.lines[index],
        )

    @staticmethod
    def concat(parts: list[EncodedArrays], slots: int, with_values: bool) -> EncodedArrays:
        """Concatenate parts (all with or all without labels); an empty list gives zero rows."""
        if not parts:
            return EncodedArrays(
                np.zeros((0, slots), np.int32),
                np.zeros((0, slots), np.float32) if with_values else None,
                np.zeros(0, np.float32),
                np.zeros(0, np.int64),
            )
        labeled = parts[0].labels is not None
        return EncodedArrays(
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.values for p in parts]) if with_values else None,
            np.concatenate([p.labels for p in parts]) if labeled else None,
            np.concatenate([p.lines for p in parts]),
        )
