"""The batch loader: same batches synchronous or asynchronous, overlap, errors, stopping."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from deepfm.data.encoded import EncodedArrays
from deepfm.data.formats import get_format
from deepfm.data.loader import BatchLoader
from deepfm.data.prepare import prepare_store
from deepfm.data.splits import SplitSpec
from deepfm.data.store import Store


def arrays(rows=1000, slots=5, values=True, labels=True) -> EncodedArrays:
    rng = np.random.default_rng(0)
    return EncodedArrays(
        rng.integers(0, 100, (rows, slots)).astype(np.int32),
        rng.random((rows, slots)).astype(np.float32) if values else None,
        rng.integers(0, 2, rows).astype(np.float32) if labels else None,
        np.arange(1, rows + 1),
    )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_file_order_batches_are_consecutive_slices(asynchronous):
    data = arrays(1000)
    loader = BatchLoader(data, 300, asynchronous=asynchronous)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and [len(b) for b in batches] == [300, 300, 300, 100]
    np.testing.assert_array_equal(torch.cat([b.ids for b in batches]).numpy(), data.ids)
    np.testing.assert_array_equal(torch.cat([b.values for b in batches]).numpy(), data.values)
    np.testing.assert_array_equal(torch.cat([b.labels for b in batches]).numpy(), data.labels)
    assert len(BatchLoader(data, 300, drop_last=True)) == 3


def test_shuffled_batches_hold_the_rows_of_the_order_and_async_equals_sync():
    data = arrays(1000, values=False)
    order = np.random.default_rng(5).permutation(1000)
    sync = list(BatchLoader(data, 128, order=order, asynchronous=False))
    async_ = list(BatchLoader(data, 128, order=order, asynchronous=True))
    for step, (a, b) in enumerate(zip(sync, async_, strict=True)):
        rows = np.sort(order[step * 128 : (step + 1) * 128])
        np.testing.assert_array_equal(a.ids.numpy(), data.ids[rows])
        assert torch.equal(a.ids, b.ids) and torch.equal(a.labels, b.labels)
        assert a.values is None and b.values is None


def test_unlabeled_data_gives_batches_without_labels():
    batch = next(iter(BatchLoader(arrays(10, labels=False), 4)))
    assert batch.labels is None and batch.ids.dtype == torch.int32


def test_batches_from_a_memory_mapped_store_split(tmp_path, criteo_train):
    result = prepare_store(
        get_format("criteo"), [str(criteo_train)], tmp_path / "s", split=SplitSpec.parse("none")
    )
    train = Store.open(result.path).split("train")
    assert isinstance(train.ids, np.memmap)
    order = np.random.default_rng(0).permutation(len(train))
    got = torch.cat([b.ids for b in BatchLoader(train, 1000, order=order)]).numpy()
    expected = np.concatenate(
        [train.ids[np.sort(order[s : s + 1000])] for s in range(0, len(train), 1000)]
    )
    np.testing.assert_array_equal(got, expected)


class SlowRows:
    """An array whose row gathers take ``delay`` seconds (a cold memory map, a slow disk)."""

    def __init__(self, array: np.ndarray, delay: float, fail_at: int | None = None) -> None:
        self.array, self.delay, self.fail_at, self.calls = array, delay, fail_at, 0

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self):
        return self.array.shape

    def __getitem__(self, index):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise OSError("read error")
        time.sleep(self.delay)  # releases the GIL, like a page fault or a file read
        return self.array[index]


def consume(loader: BatchLoader, work: float) -> float:
    started = time.perf_counter()
    for _ in loader:
        time.sleep(work)  # the training step
    return time.perf_counter() - started


def test_asynchronous_loading_overlaps_preparation_with_the_step():
    data = arrays(1000)
    slow = EncodedArrays(SlowRows(data.ids, 0.03), None, None, data.lines)
    sync = consume(BatchLoader(slow, 100, asynchronous=False), 0.03)
    overlapped = consume(BatchLoader(slow, 100, asynchronous=True), 0.03)
    # 10 steps: in sequence 10 x (0.03 + 0.03) = 0.6 s, overlapped about 10 x 0.03 + 0.03 =
    # 0.33 s; the bar 0.8 x leaves room for a loaded machine's scheduling delays
    assert overlapped < 0.8 * sync, (overlapped, sync)


def test_an_error_while_preparing_surfaces_in_the_consumer_and_stopping_ends_the_thread():
    data = arrays(1000)
    failing = EncodedArrays(SlowRows(data.ids, 0.0, fail_at=3), None, None, data.lines)
    seen = 0
    with pytest.raises(OSError, match="read error"):
        for _ in BatchLoader(failing, 100):
            seen += 1
    assert seen == 3
    before = threading.active_count()
    for _ in BatchLoader(arrays(100_000), 10):
        break  # the loader's thread must stop, not hang on a full queue
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before
