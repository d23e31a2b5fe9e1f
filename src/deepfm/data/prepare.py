"""Streaming preparation: raw files → encoded store, in bounded memory, on every core.

The input is parsed once, by a pool of worker processes (``--workers``, default: the cores; 1
runs everything in this process), in four phases:

1. **Parse.** Each block of the input (a byte range of a plain file, or the bytes of a
   compressed file, which this process reads as one stream) is parsed and checked in a worker
   and turned into *tokens* (:mod:`deepfm.data.codecs`): per field, the block's distinct value
   keys and each row's index into them, written to a work file. This process takes the results
   in file order: it numbers lines and rows (a row's ordinal among the good rows decides its
   split, exactly :func:`deepfm.data.splits.assign`), records bad rows (raising the first under
   ``--bad-rows error``) and checks that all files agree on the label.
2. **Count.** The training rows of each block are counted per field
   (:class:`~deepfm.data.codecs.FieldStats`): ``(key, count, check)`` rows sorted and spilled to
   disk as runs past ``--memory-mb``, bag lengths, moments of value fields.
3. **Fit.** Per field (in parallel), the runs are merged in key order and the codec is fitted
   (:func:`~deepfm.data.codecs.fit_codec`); vocabularies are written into the store as ``.npy``
   files, streamed, never held whole.
4. **Encode.** Each block's tokens become ids and values through the fitted codecs (the same
   ``encode_tokens`` every other path uses), and its rows are written to their split's files
   (``--shards`` files per split) at offsets fixed by the counts of phase 2.

Memory: per worker, one block in flight and its share of ``--memory-mb``, plus the vocabularies
mapped from disk while encoding; it does not grow with the number of rows or of distinct values.
The store is the same whatever the number of workers: blocks are cut by bytes, counts merged by
key, moments summed block by block in file order. It is identical to what the in-memory path
(``train --data``) encodes: the same feature map, ids, values, labels and splits.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import itertools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from deepfm import __version__
from deepfm.data.codecs import FieldStats, Tokens, codec_from_dict, field_tokens, fit_codec
from deepfm.data.featuremap import VOCABULARY_DIR, FeatureMap
from deepfm.data.formats import DataFormat
from deepfm.data.reader import BadRows, Block, ParsedBlock, is_compressed, parse_collecting, shifted
from deepfm.data.schema import Schema
from deepfm.data.splits import SplitSpec, assign
from deepfm.data.store import (
    ARRAYS,
    SPLITS,
    STORE_FORMAT,
    STORE_VERSION,
    StoreWriter,
    array_files,
    shard_bounds,
)
from deepfm.errors import ConfigError, DataError

_WORK = "_work"
#: bytes parsed per block: each worker holds one block and its parsed table (~4x the bytes)
PREPARE_BLOCK_BYTES = 16 << 20
#: default memory for counting (all workers together), MiB
DEFAULT_MEMORY_MB = 256


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def expand_inputs(paths: Sequence[str | Path]) -> list[str]:
    """Input paths with glob patterns (``data/day_*.gz``) expanded, in sorted order; a pattern
    that matches nothing is an error."""
    out: list[str] = []
    for path in map(str, paths):
        if glob.has_magic(path) and not Path(path).exists():
            matches = sorted(glob.glob(path))
            if not matches:
                raise DataError("no file matches this pattern", path=path)
            out.extend(matches)
        else:
            out.append(path)
    if not out:
        raise ConfigError("no input files given")
    return out


# -- work files: one per parsed block -----------------------------------------------------------


@dataclass
class BlockFile:
    """The tokens of one parsed block on disk: ``layout`` maps an array name to its offset,
    dtype and length in ``path``."""

    path: Path
    rows: int
    layout: dict[str, tuple[int, str, int]]

    @classmethod
    def write(cls, path: Path, rows: int, arrays: dict[str, np.ndarray]) -> BlockFile:
        layout, offset = {}, 0
        with open(path, "wb") as handle:
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                handle.write(array.data)
                layout[name] = (offset, array.dtype.str, len(array))
                offset += array.nbytes
        return cls(path, rows, layout)

    def load(self) -> BlockFile:
        """This block with its bytes read once (its arrays are then views of them)."""
        loaded = BlockFile(self.path, self.rows, self.layout)
        loaded._data = self.path.read_bytes()
        return loaded

    def read(self, name: str) -> np.ndarray | None:
        if name not in self.layout:
            return None
        offset, dtype, count = self.layout[name]
        data = self.__dict__.get("_data")
        if data is not None:
            return np.frombuffer(data, dtype, count, offset)
        return np.fromfile(self.path, dtype, count, offset=offset)

    def tokens(self, i: int) -> Tokens:
        """Field ``i``'s tokens."""
        keys, checks, index = self.read(f"k{i}"), self.read(f"c{i}"), self.read(f"x{i}")
        if keys is None:
            keys, checks, index = (
                np.zeros(0, np.uint64),
                np.zeros(0, np.uint32),
                np.zeros(0, np.int32),
            )
        return Tokens(keys, checks, index, self.read(f"l{i}"), self.read(f"n{i}"))


@dataclass
class ParseResult:
    parsed: ParsedBlock  # the block, its line breaks, bad rows and error (no rows: on disk)
    file: BlockFile | None
    labeled: bool
    names: dict[str, dict]  # field → frequent long values seen (key → (count, text))


@dataclass
class BlockInfo:
    """A parsed block as the later phases see it: where its tokens are, the file line of its
    first line minus one, the ordinal of its first row, and its rows per split."""

    file: BlockFile
    line_shift: int
    first_ordinal: int
    split_rows: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    split_offsets: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))


# -- worker side --------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _release() -> None:
    """Give freed memory back to the system between tasks (PyArrow's pool and glibc keep it)."""
    pa.default_memory_pool().release_unused()
    with suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _init_worker(state: dict[str, Any]) -> None:
    """Each worker parses on one core: its process is the unit of parallelism."""
    _STATE.clear()
    _STATE.update(state)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    _block_buffers_from_heap()


def _parse(task: tuple[int, Block]) -> ParseResult:
    number, block = task
    data_format: DataFormat = _STATE["format"]
    schema: Schema = _STATE["schema"]
    block_bytes = _STATE["block_bytes"]
    parsed = parse_collecting(
        lambda b, tally: data_format.read_block(b, tally, block_bytes=block_bytes), block
    )
    chunk = parsed.chunk
    parsed.chunk = None
    if chunk is None or not len(chunk) or parsed.error is not None:
        return ParseResult(parsed, None, False, {})
    table = chunk.table
    for spec in schema.fields:
        if spec.name not in table.column_names:
            parsed.error = DataError(f"input lacks the field {spec.name!r}", path=chunk.path)
            return ParseResult(parsed, None, False, {})
    arrays: dict[str, np.ndarray] = {"lines": chunk.lines.astype(np.int64)}
    labeled = "label" in table.column_names
    if labeled:
        arrays["labels"] = table.column("label").to_numpy(zero_copy_only=False).astype(np.float32)
    names = {}
    for i, spec in enumerate(schema.fields):
        tokens = field_tokens(spec, table.column(spec.name), keep_values=True)
        if tokens.numbers is not None:
            arrays[f"n{i}"] = tokens.numbers
            continue
        arrays[f"k{i}"], arrays[f"c{i}"] = tokens.keys, tokens.checks
        arrays[f"x{i}"] = tokens.index.astype(np.int32)
        if tokens.lengths is not None:
            arrays[f"l{i}"] = tokens.lengths
        stats = FieldStats.create(spec)
        stats.note_names(tokens)
        if stats.names:
            names[spec.name] = stats.names
    path = Path(_STATE["work"]) / "blocks" / f"{number:07d}.bin"
    return ParseResult(parsed, BlockFile.write(path, len(chunk), arrays), labeled, names)


def _codes(info: BlockInfo, total: int) -> np.ndarray:
    """Split code of each row of a block (by its ordinal among all ``total`` good rows)."""
    ordinals = np.arange(info.first_ordinal, info.first_ordinal + info.file.rows, dtype=np.int64)
    return assign(
        _STATE["split"],
        ordinals,
        total=total,
        valid_fraction=_STATE["valid_fraction"],
        seed=_STATE["seed"],
    )


def _count(task: tuple[list[BlockInfo], int, int]) -> tuple[dict[str, FieldStats], list, list]:
    """Count the training rows of a group of blocks; returns the field statistics (counts as
    spilled runs), each block's rows per split and each block's moments of value fields."""
    infos, total, budget = task
    schema: Schema = _STATE["schema"]
    runs = Path(_STATE["work"]) / "runs"
    stats = {
        spec.name: FieldStats.create(spec, None, runs / f"{i:03d}")
        for i, spec in enumerate(schema.fields)
    }
    counted = [s.counts for s in stats.values() if s.counts is not None]
    split_rows, moments = [], []
    for info in infos:
        codes = _codes(info, total)
        train = codes == 0
        block = info.file.load()
        split_rows.append(np.bincount(codes, minlength=3))
        block_moments = {}
        for i, spec in enumerate(schema.fields):
            field_stats = stats[spec.name]
            before = field_stats.moments.copy()
            field_stats.add(block.tokens(i), train)
            if spec.is_value:
                block_moments[spec.name] = field_stats.moments - before
                field_stats.moments = before
        moments.append(block_moments)
        # one budget for all fields (a long-tail field may take it all): a third of it
        # pending, as sorting a run takes about twice its size again
        while sum(c.pending_bytes for c in counted) > budget // 3:
            max(counted, key=lambda c: c.pending_bytes).flush()
    for counts in counted:
        counts.flush()
    _release()
    return stats, split_rows, moments


def _fit(task: tuple[int, FieldStats, int, int | None, int]) -> dict[str, Any]:
    """Fit one field; its vocabulary is written into the store. Returns the codec's JSON."""
    i, stats, min_count, hash_buckets, budget = task
    store = Path(_STATE["store"])
    codec = fit_codec(
        stats,
        min_count,
        hash_buckets=hash_buckets,
        work_dir=Path(_STATE["work"]) / "fit" / f"{i:03d}",
        out_stem=store / VOCABULARY_DIR / f"{i:03d}",
        budget_bytes=budget,
    )
    out = codec.to_dict()
    del codec
    _release()
    if "vocabulary" in out:
        out["vocabulary"]["file"] = f"{VOCABULARY_DIR}/{i:03d}"
    return out


def _writeback_starter() -> Callable[[int, int, int], None]:
    """``start(fd, offset, nbytes)``: start writing those bytes to disk without waiting
    (Linux ``sync_file_range``), so that the store's final fsync finds them written instead
    of writing every row of the store after the last block; a no-op elsewhere."""
    try:
        call = ctypes.CDLL("libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, nbytes: int) -> None:
        call(fd, offset, nbytes, write)  # an error only means the fsync does it all

    return start


class _Writer:
    """Rows of one split written at their offsets into the split's shard files (their
    writeback started at once)."""

    def __init__(self, store: Path, split: str, arrays: dict[str, dict]) -> None:
        self.files: dict[str, list[tuple[int, int, int]]] = {}  # name → (first row, rows, fd)
        for name, meta in arrays.items():
            bounds = np.cumsum([0, *meta["shard_rows"]]).tolist()
            self.files[name] = [
                (bounds[k], meta["shard_rows"][k], os.open(store / file, os.O_WRONLY))
                for k, file in enumerate(meta["files"])
            ]
        self.start_writeback = _writeback_starter()

    def write(self, name: str, first: int, rows: np.ndarray) -> None:
        """``rows`` (C-ordered) as the split's rows from ``first`` on."""
        rows = np.ascontiguousarray(rows)
        row_bytes = rows.itemsize * (rows.shape[1] if rows.ndim == 2 else 1)
        end = first + len(rows)
        for start, count, fd in self.files[name]:
            a, b = max(first, start), min(end, start + count)
            if a < b:
                offset = (a - start) * row_bytes
                written = os.pwrite(fd, rows[a - first : b - first].data, offset)
                self.start_writeback(fd, offset, written)

    def close(self) -> None:  # the store's commit fsyncs every file
        for parts in self.files.values():
            for _, _, fd in parts:
                os.close(fd)


def _encode(task: tuple[list[BlockInfo], int, dict, dict]) -> None:
    """Encode a group of blocks with the fitted codecs and write their rows."""
    infos, total, feature_map_dict, arrays = task
    store = Path(_STATE["store"])
    feature_map = _STATE.get("feature_map")
    if feature_map is None:  # once per worker: its vocabularies stay mapped between tasks
        feature_map = _STATE["feature_map"] = FeatureMap.from_dict(feature_map_dict, store)
    writers = {split: _Writer(store, split, arrays[split]) for split in SPLITS}
    slots = np.cumsum([0, *feature_map.field_slots]).tolist()
    try:
        for info in infos:
            n = info.file.rows
            block = info.file.load()
            ids = np.empty((n, feature_map.num_slots), np.int32)
            values = (
                np.ones((n, feature_map.num_slots), np.float32)
                if feature_map.needs_values
                else None
            )
            for i, codec in enumerate(feature_map.fields):
                field_ids, field_values = codec.encode_tokens(block.tokens(i))
                ids[:, slots[i] : slots[i + 1]] = field_ids
                if field_values is not None:
                    values[:, slots[i] : slots[i + 1]] = field_values
            first = info.first_ordinal
            columns = {
                "ids": ids,
                "values": values,
                "labels": block.read("labels"),
                "lines": block.read("lines") + info.line_shift,
                "ordinals": np.arange(first, first + n, dtype=np.int64),
            }
            codes = _codes(info, total)
            for code, split in enumerate(SPLITS):
                if not info.split_rows[code]:
                    continue
                chosen = codes == code
                for name, column in columns.items():
                    if column is not None and name in arrays[split]:
                        writers[split].write(name, int(info.split_offsets[code]), column[chosen])
            # no phase reads it again: its pages are freed here, by the workers in parallel,
            # not by the main process when the work directory goes
            info.file.path.unlink()
    finally:
        for writer in writers.values():
            writer.close()


# -- the pool -----------------------------------------------------------------------------------


def _start_method() -> str:
    """``fork`` where it is safe, else ``spawn``. Forked workers start with this process's
    modules already imported (a spawned one spends ~0.5 CPU-s importing NumPy and PyArrow while
    the main process waits: a fifth of what kept 2 workers below 1.7x one). Safe means: this
    process runs no other Python thread, and has not imported torch (whose OpenMP threads a
    forked child would lack): true of ``deepfm prepare``, not always of a library caller."""
    forkable = "fork" in multiprocessing.get_all_start_methods()
    alone = threading.active_count() == 1 and "torch" not in sys.modules
    return "fork" if forkable and alone else "spawn"


class _Pool:
    """``workers`` processes, or this process itself for one worker. Workers share no state
    with this process but what :func:`_init_worker` receives."""

    def __init__(self, workers: int, state: dict[str, Any]) -> None:
        self.workers = workers
        self.state = state
        self.executor = None
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            method = _start_method()
            self.executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context(method),
                initializer=_init_worker,
                initargs=(state,),
            )
            if method == "fork":  # forked now, before the hashing thread starts
                self.executor.submit(int).result()
        else:
            self._saved = (pa.cpu_count(), pa.io_thread_count())
            _init_worker(state)

    def imap(self, function: Callable, items: Iterable, ahead: int | None = None) -> Iterator:
        """Results in order; at most ``ahead`` items submitted and not yet taken (memory)."""
        if self.executor is None:
            yield from map(function, items)
            return
        ahead = ahead or 2 * self.workers
        pending: list = []
        try:
            for item in items:
                pending.append(self.executor.submit(function, item))
                if len(pending) >= ahead:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        except BrokenProcessPool:
            raise MemoryError(
                "a prepare worker process died (most often killed by the system for lack of "
                "memory): lower --workers or --memory-mb"
            ) from None
        finally:
            for future in pending:
                future.cancel()

    def close(self, wait: bool = True) -> None:
        """Stop the workers; ``wait=False`` lets them exit while this process goes on (a later
        ``close()`` waits for them)."""
        if self.executor is not None:
            self.executor.shutdown(wait=wait, cancel_futures=True)
        else:
            _STATE.clear()  # the feature map's mapped vocabularies
            _release()
            pa.set_cpu_count(self._saved[0])
            pa.set_io_thread_count(self._saved[1])


def _useful_workers(data_format: DataFormat, paths: list[str], block_bytes: int) -> int:
    """At most one worker per block of input (small inputs are prepared in this process, with
    no processes to start), and one when the format cannot be sent to a process (a class
    defined in ``python -c`` or an interactive session)."""
    module = sys.modules.get(type(data_format).__module__)
    if module is None or (module.__name__ == "__main__" and not hasattr(module, "__file__")):
        return 1
    sizes = [Path(p).stat().st_size for p in paths if Path(p).is_file()]
    return max(1, len(paths) - len(sizes) + sum(-(-s // block_bytes) for s in sizes))


def _groups(infos: list[BlockInfo], parts: int) -> list[list[BlockInfo]]:
    """Consecutive blocks in ``parts`` groups of about equal rows."""
    if not infos:
        return []
    rows = np.cumsum([info.file.rows for info in infos])
    cuts = np.searchsorted(rows, rows[-1] * np.arange(1, parts) / parts, side="right")
    bounds = [0, *sorted(set(int(c) for c in cuts)), len(infos)]
    return [infos[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# -- the preparation ----------------------------------------------------------------------------


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    path: Path


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's thresholds; False where the C library is not glibc (nothing to do)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    mallopt(M_TRIM_THRESHOLD, trim_threshold)
    return True


def _block_buffers_from_heap() -> bool:
    """Buffers below 64 MiB (every block-sized array) come from the heap and freed memory is kept
    up to 512 MiB, in this process and in each worker: each block reuses the pages of the one
    before. Served by mmap (1 MiB threshold, before 2026-12-01), every array of a block was
    mapped and zero-filled afresh: 650k page faults and a quarter of the CPU time for 1M rows,
    against 180k faults. The memory goes back to the system after each task
    (:func:`_release`, ``malloc_trim``); peak RSS is unchanged (BENCHMARKS.md)."""
    return _mallopt(64 << 20, 512 << 20)


@contextmanager
def _malloc_for_blocks() -> Iterator[None]:
    """:func:`_block_buffers_from_heap` while preparing; afterwards the thresholds are set to
    glibc's dynamic upper bounds (mmap 32 MiB, trim 64 MiB), the state a long-running process
    reaches by itself (a training run in the same process, ``compare --criteo`` or the
    benchmarks, then reuses its activations' pages: 48k samples/s, against 33k with fresh
    pages at every step, BENCHMARKS.md)."""
    if not _block_buffers_from_heap():
        yield
        return
    try:
        yield
    finally:
        _mallopt(32 << 20, 64 << 20)


class _Progress:
    def __init__(self, say: Callable[[str], None], every: float = 5.0) -> None:
        self.say, self.every, self.last = say, every, time.perf_counter()

    def tick(self, text: str) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.say(text)


@_malloc_for_blocks()
def prepare_store(
    data_format: DataFormat,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    split: SplitSpec,
    valid_fraction: float = 0.1,
    seed: int = 0,
    min_count: int | None = None,
    hash_buckets: int | None = None,
    bad_rows: BadRows | None = None,
    overwrite: bool = False,
    block_bytes: int = PREPARE_BLOCK_BYTES,
    workers: int | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    shards: int = 1,
    progress: Callable[[str], None] | None = None,
) -> PrepareResult:
    """Prepare ``paths`` (read with ``data_format``; glob patterns expanded) into the store
    ``out``; see the module docs."""
    started = time.perf_counter()
    bad_rows = bad_rows or BadRows()
    schema = data_format.schema.with_options(min_count, hash_buckets)
    workers = workers or default_workers()
    if workers < 1 or memory_mb < 16 or shards < 1:
        raise ConfigError("--workers and --shards must be at least 1, --memory-mb at least 16")
    if not 0 <= valid_fraction < 1:
        raise ConfigError(f"the validation fraction must be in [0, 1), got {valid_fraction}")
    paths = expand_inputs(paths)
    workers = min(workers, _useful_workers(data_format, paths, block_bytes))
    say = progress or (lambda _text: None)
    budget = (memory_mb << 20) // workers
    with StoreWriter(out, overwrite=overwrite, inputs=paths) as writer:
        work = writer.path(_WORK)
        (work / "blocks").mkdir(parents=True)
        state = {
            "format": data_format,
            "schema": schema,
            "block_bytes": block_bytes,
            "work": str(work),
            "store": str(writer.tmp),
            "split": split,
            "valid_fraction": valid_fraction,
            "seed": seed,
        }
        pool = _Pool(workers, state)
        read: _Read | None = None
        try:
            read = _read_blocks(data_format, paths, pool, bad_rows, block_bytes, say)
            infos, total, labeled, names = read.infos, read.total, read.labeled, read.names
            parsed = time.perf_counter()
            say(f"read {total:,} rows in {parsed - started:.1f} s; counting the training rows")
            stats = _count_all(schema, infos, total, pool, budget, work)
            for name, seen in names.items():
                stats[name].names.update(seen)
            say(f"fitting {len(schema.fields)} fields")
            feature_map = _fit_all(schema, stats, pool, budget, writer.tmp)
            arrays = _allocate(writer.tmp, infos, feature_map, labeled, shards)
            say(f"encoding {total:,} rows")
            # one task per block: no worker waits long for the last one (groups of 1/8 of the
            # rows left one idle for up to an eighth of the phase)
            groups = [[info] for info in infos]
            fm_dict = feature_map.to_dict()
            progress, encoded = _Progress(say), 0
            tasks = [(g, total, fm_dict, arrays) for g in groups]
            for group, _ in zip(groups, pool.imap(_encode, tasks), strict=True):
                encoded += sum(info.file.rows for info in group)
                progress.tick(f"encoded {encoded:,} of {total:,} rows")
            pool.close(wait=False)  # the workers exit while the store is committed
            writer.remove(_WORK)
            digests = read.digests()  # the input files' hashing may still be running
            seconds = time.perf_counter() - started
            manifest = _manifest(data_format, paths, feature_map, arrays, read, digests, bad_rows)
            manifest["split"] = _split_entry(split, valid_fraction, seed)
            manifest |= {
                "workers": workers,
                "seconds": round(seconds, 3),
                "read_seconds": round(parsed - started, 3),
                "rows_per_s": round(total / seconds) if seconds > 0 else None,
            }
            path = writer.commit(manifest)
        except BaseException:
            if read is not None:  # a later phase failed: the input's hashing is not needed
                read.stop_hashing.set()
            raise
        finally:
            pool.close()
    return PrepareResult(manifest, path)


def _in_the_background() -> None:
    """The calling thread (the one hashing the input files) yields the cores to the workers:
    its digests are needed only by the manifest, so it runs when a core would idle (phase ends,
    waits on the disk) instead of slowing the parse. On Linux a thread has its own nice value."""
    if sys.platform.startswith("linux"):
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@dataclass
class _Read:
    """What phase 1 found: the parsed blocks, their good rows, whether they are labeled, rows
    per input file, the most frequent long values per field, and ``digests()``: the sha256 of
    every input file, waiting for the plain files' hashing, which runs beside everything else."""

    infos: list[BlockInfo]
    total: int
    labeled: bool
    rows_by_source: dict[str, int]
    names: dict[str, dict]
    digests: Callable[[], dict[str, str]]
    stop_hashing: threading.Event


def _read_blocks(
    data_format, paths, pool: _Pool, bad_rows: BadRows, block_bytes: int, say
) -> _Read:
    """Phase 1: every block parsed by the pool, taken in file order."""
    hashing = ThreadPoolExecutor(max_workers=1, initializer=_in_the_background)
    stop = threading.Event()  # set when the preparation fails: no reading on for nothing
    plain = [p for p in data_format.source_files(paths) if not is_compressed(p)]
    futures = {
        str(p): hashing.submit(data_format.file_sha256, p, stop) for p in plain if Path(p).is_file()
    }
    hashers: dict[str, Any] = {}

    def tasks() -> Iterator[tuple[int, Block]]:
        number = 0
        for path in paths:
            hasher = None
            if is_compressed(path):
                hasher = hashers[str(path)] = hashlib.sha256()
            for block in data_format.blocks(path, block_bytes=block_bytes, hasher=hasher):
                yield number, block
                number += 1

    infos: list[BlockInfo] = []
    total = 0
    labeled: bool | None = None
    rows_by_source: dict[str, int] = {}
    names: dict[str, dict] = {}
    current, next_line, saw_data = None, 1, False
    progress = _Progress(say)
    try:
        for result in pool.imap(_parse, tasks()):
            block = result.parsed.block
            if block.path != current:
                _finish_file(current, saw_data, bad_rows)
                current, next_line, saw_data = block.path, 1, False
            if block.first_line is not None:
                next_line = block.first_line
            shift = next_line - 1
            bad_rows.replay(result.parsed.bad, shift)
            if result.parsed.error is not None:
                raise shifted(result.parsed.error, shift)
            if result.file is not None:
                saw_data = True
                if labeled is None:
                    labeled = result.labeled
                elif labeled != result.labeled:
                    raise ConfigError(
                        f"{block.path}: some input files have a label column and others do "
                        "not; prepare labeled and unlabeled files separately"
                    )
                infos.append(BlockInfo(result.file, shift, total))
                total += result.file.rows
                rows_by_source[block.path] = rows_by_source.get(block.path, 0) + result.file.rows
                for name, seen in result.names.items():
                    merged = names.setdefault(name, {})
                    for key, (count, text) in seen.items():
                        merged[key] = (merged.get(key, (0, text))[0] + count, text)
            next_line += result.parsed.breaks
            progress.tick(f"read {total:,} rows ({block.path})")
        _finish_file(current, saw_data, bad_rows)
        if total == 0:
            where = str(paths[0]) if paths else None
            raise DataError("the input holds no usable rows", path=where)
    except BaseException:
        stop.set()
        hashing.shutdown(wait=False, cancel_futures=True)
        raise
    hashing.shutdown(wait=False)  # the queued files are still hashed

    def digests() -> dict[str, str]:
        done = {path: future.result() for path, future in futures.items()}
        return done | {path: hasher.hexdigest() for path, hasher in hashers.items()}

    for name in names:  # keep the most frequent ones only
        best = sorted(names[name].items(), key=lambda item: -item[1][0])
        names[name] = dict(best[: FieldStats.NAMES_KEPT])
    return _Read(infos, total, bool(labeled), rows_by_source, names, digests, stop)


def _finish_file(path: str | None, saw_data: bool, bad_rows: BadRows) -> None:
    if path is not None and not saw_data and bad_rows.total == 0:
        raise DataError("file holds no data rows", path=path)


def _count_all(schema: Schema, infos, total: int, pool: _Pool, budget: int, work: Path):
    """Phase 2: the training rows counted, each group of blocks by one worker."""
    stats = {
        spec.name: FieldStats.create(spec, None, work / "runs" / f"{i:03d}")
        for i, spec in enumerate(schema.fields)
    }
    groups = _groups(infos, pool.workers)
    at = 0
    tasks = [(g, total, budget) for g in groups]
    for group_stats, split_rows, moments in pool.imap(_count, tasks):
        for name, field_stats in group_stats.items():
            field_stats.moments = np.zeros(3)  # summed block by block below, in file order
            stats[name].absorb(field_stats)
        for rows, block_moments in zip(split_rows, moments, strict=True):
            infos[at].split_rows = rows
            for name, values in block_moments.items():
                stats[name].moments += values
            at += 1
    offsets = np.zeros(3, np.int64)
    for info in infos:
        info.split_offsets = offsets.copy()
        offsets += info.split_rows
    return stats


def _fit_all(schema: Schema, stats, pool: _Pool, budget: int, store: Path) -> FeatureMap:
    """Phase 3: every field fitted, the largest first (they take longest)."""
    order = sorted(
        range(len(schema.fields)),
        key=lambda i: -sum(len(r) for r in (stats[schema.fields[i].name].counts or _NoRuns).runs),
    )
    tasks = [
        (
            i,
            stats[schema.fields[i].name],
            schema.min_count_of(schema.fields[i]),
            schema.hash_buckets,
            budget,
        )
        for i in order
    ]
    fitted = dict(zip(order, pool.imap(_fit, tasks, ahead=len(tasks)), strict=True))
    codecs = []
    for i in range(len(schema.fields)):
        entry = fitted[i]
        stem = store / entry["vocabulary"]["file"] if "vocabulary" in entry else None
        codecs.append(codec_from_dict(entry, stem))
    rows = next(iter(stats.values())).rows
    return FeatureMap.laid_out(schema, codecs, fitted_rows=rows)


class _NoRuns:
    runs: list = []  # noqa: RUF012


def _allocate(store: Path, infos, feature_map: FeatureMap, labeled: bool, shards: int):
    """Create every split's shard files at their final size; returns the manifest's arrays."""
    totals = np.sum([info.split_rows for info in infos], axis=0) if infos else np.zeros(3, int)
    arrays: dict[str, dict] = {}
    for code, split in enumerate(SPLITS):
        rows = int(totals[code])
        bounds = shard_bounds(rows, shards)
        shard_rows = np.diff(bounds).tolist()
        shapes = {"ids": [rows, feature_map.num_slots], "lines": [rows], "ordinals": [rows]}
        if feature_map.needs_values:
            shapes["values"] = [rows, feature_map.num_slots]
        if labeled:
            shapes["labels"] = [rows]
        arrays[split] = {}
        for name, shape in shapes.items():
            dtype = ARRAYS[name][1]
            row_bytes = np.dtype(dtype).itemsize * (shape[1] if len(shape) == 2 else 1)
            files = array_files(split, name, shards)
            for file, count in zip(files, shard_rows, strict=True):
                target = store / file
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as handle:
                    handle.truncate(count * row_bytes)
            arrays[split][name] = {
                "files": files,
                "shard_rows": shard_rows,
                "dtype": dtype,
                "shape": shape,
            }
    return arrays


def _split_entry(split: SplitSpec, valid_fraction: float, seed: int) -> dict[str, Any]:
    """The manifest's description of how rows were split."""
    return {
        "spec": str(split),
        "valid_fraction": valid_fraction,
        "seed": seed,
        "rule": (
            "sequential: by ordinal among good rows, first share train (its last "
            "valid_fraction validates), rest test"
            if split.kind == "sequential"
            else "by a seeded hash of the row's ordinal among good rows (splits.assign)"
        ),
    }


def _manifest(
    data_format: DataFormat,
    paths: list[str],
    feature_map: FeatureMap,
    arrays: dict[str, dict],
    read: _Read,
    digests: dict[str, str],
    bad_rows: BadRows,
) -> dict[str, Any]:
    """The store's manifest, but for its split and timings (the caller adds them)."""
    sources = []
    for path in data_format.source_files(paths):
        key = str(path)
        sources.append(
            {
                "path": str(Path(path).resolve()),
                "bytes": Path(path).stat().st_size,
                "sha256": digests.get(key) or data_format.file_sha256(path),
                "rows": read.rows_by_source.get(key, 0),
            }
        )
    rows = {split: arrays[split]["ids"]["shape"][0] for split in SPLITS}
    summaries = {codec.name: codec.to_dict() for codec in feature_map.fields}
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "deepfm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_format": data_format.name,
        "labeled": read.labeled,
        "sources": sources,
        "split": {},
        "rows": {**rows, "total": read.total, "bad": bad_rows.total},
        "bad_rows": bad_rows.to_dict(),
        "num_features": feature_map.num_features,
        "num_slots": feature_map.num_slots,
        "field_cardinalities": {codec.name: codec.size for codec in feature_map.fields},
        # distinct values met in the training rows (vocabulary candidates, before min_count)
        "distinct_values": {
            name: s["distinct"] for name, s in summaries.items() if "distinct" in s
        },
        "truncated_bags": {
            name: s["truncated_bags"] for name, s in summaries.items() if "truncated_bags" in s
        },
        "shards": len(next(iter(arrays["train"].values()))["files"]),
        "arrays": arrays,
        "feature_map": feature_map.to_dict(),
    }


def print_summary(manifest: dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    rows = manifest["rows"]
    print(
        f"rows: train {rows['train']:,}  valid {rows['valid']:,}  test {rows['test']:,}  "
        f"(total {rows['total']:,}, bad {rows['bad']:,})",
        file=out,
    )
    if manifest["bad_rows"]["by_reason"]:
        reasons = ", ".join(
            f"{k} {v:,}" for k, v in sorted(manifest["bad_rows"]["by_reason"].items())
        )
        print(f"bad rows by reason: {reasons}", file=out)
    print(
        f"features: {manifest['num_features']:,} in {len(manifest['field_cardinalities'])} fields; "
        f"rows_per_s: {manifest['rows_per_s']:,} ({manifest['seconds']:.1f} s)",
        file=out,
    )
