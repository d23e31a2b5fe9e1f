"""Batches of an encoded split as tensors, prepared one step ahead (paper, Sec. III-B2).

Preparing a batch means gathering its rows from the (memory-mapped) arrays, turning them into
tensors, pinning them when the target is a CUDA device, and starting the copy to the device
(``non_blocking``). With ``asynchronous=True`` a background thread prepares batch n+1 while the
caller trains on batch n (the gathers and copies release the GIL); with ``False``
(``--sync-loading``) each batch is prepared in the caller's thread when it is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from deepfm.data.encoded import EncodedArrays
from deepfm.data.threads import Background


@dataclass
class Batch:
    """``ids`` int ``[B, S]``; ``values`` float ``[B, S]`` or None; ``labels`` ``[B]`` or None."""

    ids: torch.Tensor
    values: torch.Tensor | None
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _rows(array: np.ndarray | None, index: slice | np.ndarray) -> np.ndarray | None:
    """Rows of ``array`` as an array in memory (a memory map's pages are read here, in the
    preparing thread, not later in the consumer)."""
    if array is None:
        return None
    return np.array(array[index], copy=True) if isinstance(index, slice) else array[index]


class BatchLoader:
    """Iterates ``data`` in batches of ``batch_size`` rows.

    ``order``: the rows to read, in order (e.g. a permutation per epoch, or part of one), or
    None for every row in file order (slices).
    With ``sort_rows`` the rows of a shuffled batch are gathered in increasing row order
    (sequential reads of the memory map; the batch holds the same rows, in another order).
    ``device``: where batches go. ``depth``: batches prepared ahead in asynchronous mode.
    """

    def __init__(
        self,
        data: EncodedArrays,
        batch_size: int,
        *,
        order: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        asynchronous: bool = True,
        depth: int = 2,
        drop_last: bool = False,
        sort_rows: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.data = data
        self.batch_size = batch_size
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        self.device = torch.device(device)
        self.asynchronous = asynchronous
        self.depth = depth
        self.drop_last = drop_last
        self.sort_rows = sort_rows
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()

    @property
    def rows(self) -> int:
        """Rows per pass: those of ``order``, or all."""
        return len(self.data) if self.order is None else len(self.order)

    def __len__(self) -> int:
        rows = self.rows
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _indices(self) -> Iterator[slice | np.ndarray]:
        rows = self.rows
        for step in range(len(self)):
            start, stop = step * self.batch_size, min(rows, (step + 1) * self.batch_size)
            if self.order is None:
                yield slice(start, stop)
            else:
                chosen = self.order[start:stop]
                yield np.sort(chosen) if self.sort_rows else chosen

    def prepare(self, index: slice | np.ndarray) -> Batch:
        """Gather, convert, pin and start moving one batch."""
        tensors = []
        for array in (self.data.ids, self.data.values, self.data.labels):
            rows = _rows(array, index)
            if rows is None:
                tensors.append(None)
                continue
            tensor = torch.from_numpy(rows)
            if self.pin:
                tensor = tensor.pin_memory()
            tensors.append(tensor.to(self.device, non_blocking=True))
        return Batch(*tensors)

    def _batches(self) -> Iterator[Batch]:
        for index in self._indices():
            yield self.prepare(index)

    def __iter__(self) -> Iterator[Batch]:
        if self.asynchronous:
            return iter(Background(self._batches(), depth=self.depth))
        return self._batches()
