"""The encoded store: a directory of raw little-endian arrays plus a JSON manifest.

Layout of a store ``STORE/``::

    manifest.json            feature map, cardinalities, split sizes, row and bad-row counts,
                             source files with their sha256, rows_per_s, and every array below
    vocab/NNN.{keys,ids,fences}.npy   each vocabulary field's sorted value keys and local ids
    train/ids.i32            int32   [rows, slots]   global feature ids (field offset + local id)
    train/values.f32         float32 [rows, slots]   only when the feature map ``needs_values``
    train/labels.f32         float32 [rows]          absent for unlabeled input
    train/lines.i64          int64   [rows]          1-based line (row) of the source file
    train/ordinals.i64       int64   [rows]          ordinal of the row among all input rows
    valid/...  test/...      the same per split; each split is contiguous in its own files

With ``--shards N`` each array of a split is ``N`` files (``train/ids.00003.i32``) holding
consecutive rows, shard ``k`` the rows ``[rows·k/N, rows·(k+1)/N)``: the rows a DDP rank of
``world`` ranks reads (:class:`Shard`) are whole shard files when ``world`` divides ``N``, so each
rank streams its own files.

Arrays are plain C-ordered binary files, opened as :class:`numpy.memmap` (copy-on-write, so
PyTorch can wrap them without copying). Writing is atomic: everything goes into a hidden
temporary sibling ``.STORE.partial-<pid>-<random>``, the manifest is written last, and the
directory is renamed into place; an interrupted ``prepare`` therefore leaves no directory that
looks like a store. Replacing an existing store needs ``overwrite``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import FeatureMap
from deepfm.data.pipeline import Dataset
from deepfm.data.reader import BadRows
from deepfm.errors import ConfigError, DataError, OutputError
from deepfm.outputs import (
    STORE,
    claim_directory,
    fsync_file,
    make_dirs,
    reason,
    remove_tree,
    write_json,
)

MANIFEST = "manifest.json"
STORE_FORMAT = "deepfm-store"
STORE_VERSION = 2
#: store versions this code opens (1: before codecs, vocabularies in the manifest's JSON)
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "valid", "test")
#: array name → (file suffix, dtype); ``ids``/``values`` are 2-D ``[rows, slots]``
ARRAYS: dict[str, tuple[str, str]] = {
    "ids": ("i32", "<i4"),
    "values": ("f32", "<f4"),
    "labels": ("f32", "<f4"),
    "lines": ("i64", "<i8"),
    "ordinals": ("i64", "<i8"),
}
_PARTIAL = ".partial-"
#: rows checked at a time when a store is opened for training (bounded temporary memory)
CHECK_ROWS = 1 << 20


def array_file(split: str, name: str) -> str:
    return f"{split}/{name}.{ARRAYS[name][0]}"


def array_files(split: str, name: str, shards: int) -> list[str]:
    """The files of one array of a split: one, or one per shard."""
    if shards == 1:
        return [array_file(split, name)]
    return [f"{split}/{name}.{k:05d}.{ARRAYS[name][0]}" for k in range(shards)]


def shard_bounds(rows: int, shards: int) -> list[int]:
    """First row of each shard, and ``rows``: shard ``k`` holds ``[rows·k//N, rows·(k+1)//N)``
    (the bounds of :class:`Shard`, so rank ``r`` of ``world`` ranks gets whole shards when
    ``world`` divides ``N``)."""
    return [rows * k // shards for k in range(shards + 1)]


class ShardedArray:
    """Rows of several memory-mapped files as one read-only array: row indexing (slices, index
    arrays) reads only the files the rows are in; ``np.asarray`` concatenates."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        first = parts[0]
        self.shape = (int(self.starts[-1]), *first.shape[1:])
        self.dtype = first.dtype
        self.ndim = first.ndim

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(self.shape, self.dtype)
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return np.asarray(self)[index]
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            last = int(np.searchsorted(self.starts, max(stop - 1, start), side="right")) - 1
            pieces = [
                self.parts[k][max(start - self.starts[k], 0) : stop - self.starts[k]]
                for k in range(max(first, 0), min(last, len(self.parts) - 1) + 1)
            ]
            if len(pieces) == 1:
                return pieces[0]
            if not pieces:
                return np.zeros((0, *self.shape[1:]), self.dtype)
            return ShardedArray(pieces)
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        part = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        for k in np.unique(part).tolist():
            chosen = part == k
            out[chosen] = self.parts[k][index[chosen] - self.starts[k]]
        return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class StoreWriter:
    """Writes a store into a temporary sibling directory; :meth:`commit` moves it into place.

    Use as a context manager: leaving the block with an exception removes the partial
    directory. Writers put their files under :meth:`path` (``prepare``'s workers write the
    split arrays at their rows' offsets in pre-sized files).
    """

    def __init__(
        self, out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
    ) -> None:
        # a new or empty directory, or a store with ``overwrite``; never an input
        self.out = claim_directory(out, STORE, overwrite=overwrite, inputs=inputs)
        make_dirs(self.out.parent)
        self._remove_stale_partials()
        self.tmp = (
            self.out.parent / f".{self.out.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
        )
        self.tmp.mkdir()
        self.committed = False

    def _remove_stale_partials(self) -> None:
        """Remove partial stores left by killed runs (their process no longer exists)."""
        for partial in self.out.parent.glob(f".{self.out.name}{_PARTIAL}*"):
            pid_text = partial.name.rsplit(_PARTIAL, 1)[1].split("-", 1)[0]
            try:
                os.kill(int(pid_text), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(partial, ignore_errors=True)
            except PermissionError:  # another user's live process
                continue

    def path(self, relative: str) -> Path:
        return self.tmp / relative

    def remove(self, relative: str) -> None:
        target = self.path(relative)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def commit(self, manifest: dict[str, Any]) -> Path:
        """fsync every file, write the manifest last, then rename the directory into place."""
        folders = [(Path(root), names) for root, _, names in os.walk(self.tmp)]
        with ThreadPoolExecutor(max_workers=8) as pool:  # each waits on the disk: several at once
            list(pool.map(fsync_file, [root / name for root, names in folders for name in names]))
        for root, _ in folders:
            _fsync_dir(root)
        write_json(self.tmp / MANIFEST, manifest, indent=None)
        _fsync_dir(self.tmp)
        if self.out.exists():
            # swap: move the old store aside (still complete), move the new one in, drop the old
            trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            self.out.rename(trash)
            self.tmp.rename(self.out)
            remove_tree(trash)
        else:
            self.tmp.rename(self.out)
        _fsync_dir(self.out.parent)
        self.committed = True
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
            if isinstance(exc, OSError):  # a full disk, no permission: nothing is left behind
                raise OutputError(f"cannot write the store {self.out}: {reason(exc)}") from None


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` reads the contiguous rows ``[start, stop)`` of a split."""

    rank: int = 0
    world: int = 1

    def bounds(self, rows: int) -> tuple[int, int]:
        return rows * self.rank // self.world, rows * (self.rank + 1) // self.world


class Store:
    """A prepared store, read-only. ``Store.open(path)`` validates the manifest and the files."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._feature_map: FeatureMap | None = None

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            partial = any(path.parent.glob(f".{path.name}{_PARTIAL}*"))
            hint = " (a partial, interrupted prepare exists: run it again)" if partial else ""
            raise DataError(f"not a store: {MANIFEST} is missing{hint}", path=str(path))
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(
                f"the store manifest is not valid JSON: {exc}", path=str(path)
            ) from None
        except OSError as exc:
            reason = f"cannot read the store manifest: {exc.strerror}"
            raise DataError(reason, path=str(path)) from None
        if not isinstance(manifest, dict):
            raise DataError("the store manifest is damaged: not a JSON object", path=str(path))
        version = manifest.get("version")
        if manifest.get("format") != STORE_FORMAT or version not in READABLE_VERSIONS:
            raise DataError(
                f"unsupported store (format {manifest.get('format')!r}, version {version!r}; "
                f"this version reads {STORE_FORMAT} {', '.join(map(str, READABLE_VERSIONS))}): "
                "prepare it again with this version",
                path=str(path),
            )
        store = cls(path, manifest)
        try:
            for split, arrays in manifest["arrays"].items():
                for name, meta in arrays.items():
                    row_bytes = int(np.prod(meta["shape"][1:])) * np.dtype(meta["dtype"]).itemsize
                    for file, rows in _parts(meta):
                        expected = rows * row_bytes
                        actual = (path / file).stat().st_size if (path / file).exists() else -1
                        if actual != expected:
                            raise DataError(
                                f"store array {split}/{name} has {actual} bytes, the manifest "
                                f"says {expected}: the store is damaged, prepare it again",
                                path=str(path / file),
                            )
            for split in SPLITS:  # parsed now, so that damage shows here
                store.rows(split)
            store.feature_map  # noqa: B018
        except (OSError, LookupError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise DataError(f"the store manifest is damaged: {exc!r}", path=str(path)) from None
        return store

    @property
    def feature_map(self) -> FeatureMap:
        if self._feature_map is None:
            self._feature_map = FeatureMap.from_dict(self.manifest["feature_map"], self.path)
        return self._feature_map

    @property
    def labeled(self) -> bool:
        return bool(self.manifest.get("labeled", True))

    def rows(self, split: str) -> int:
        return int(self.manifest["rows"].get(split, 0))

    def _array(self, split: str, name: str, start: int, stop: int):
        """Rows ``[start, stop)`` of an array: a memory map of the one file they are in, or a
        :class:`ShardedArray` over the shard files they span (only those are opened)."""
        meta = self.manifest["arrays"].get(split, {}).get(name)
        if meta is None:
            return None
        shape = tuple(meta["shape"])
        parts, first = [], 0
        for file, rows in _parts(meta):
            a, b = max(start, first), min(stop, first + rows)
            if a < b:
                mapped = np.memmap(self.path / file, dtype=meta["dtype"], mode="c",
                                   shape=(rows, *shape[1:]))  # fmt: skip
                parts.append(mapped[a - first : b - first])
            first += rows
        if not parts:
            return np.zeros((0, *shape[1:]), dtype=meta["dtype"])
        return parts[0] if len(parts) == 1 else ShardedArray(parts)

    def split(self, split: str, shard: Shard | None = None) -> EncodedArrays:
        """Split ``split`` (or a rank's contiguous shard of it) as memory-mapped arrays."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; a store has {', '.join(SPLITS)}")
        rows = self.rows(split)
        start, stop = (shard or Shard()).bounds(rows)
        slots = self.feature_map.num_slots
        ids = self._array(split, "ids", start, stop)
        if ids is None:
            ids = np.zeros((0, slots), np.int32)
        values = self._array(split, "values", start, stop)
        if values is None and self.feature_map.needs_values:
            values = np.zeros((0, slots), np.float32)
        labels = self._array(split, "labels", start, stop)
        if labels is None and self.labeled:
            labels = np.zeros(0, np.float32)
        lines = self._array(split, "lines", start, stop)
        return EncodedArrays(
            ids, values, labels, lines if lines is not None else np.zeros(0, np.int64)
        )

    def ordinals(self, split: str) -> np.ndarray:
        out = self._array(split, "ordinals", 0, self.rows(split))
        return out if out is not None else np.zeros(0, np.int64)

    def bad_rows(self) -> BadRows:
        """The bad-row tally recorded at preparation (counts and examples)."""
        recorded = self.manifest.get("bad_rows", {})
        tally = BadRows("skip")
        tally.by_reason.update(recorded.get("by_reason", {}))
        tally.examples = list(recorded.get("examples", []))
        return tally

    def dataset(self, shard: Shard | None = None) -> Dataset:
        """The splits as a :class:`~deepfm.data.pipeline.Dataset` of memory-mapped arrays (the
        trainer reads them like in-memory arrays; pages load on first use). Every value is
        checked first (:meth:`check`), so a damaged store is refused, never trained on."""
        splits = {s: self.split(s, shard) for s in SPLITS}
        for name, arrays in splits.items():
            self.check(name, arrays)
        return Dataset(
            self.feature_map,
            splits["train"],
            splits["valid"],
            splits["test"] if self.rows("test") else None,
            self.bad_rows(),
        )

    def check(self, split: str, arrays: EncodedArrays) -> None:
        """Refuse arrays whose bytes were changed in place (sizes match, values do not): ids
        outside the feature table, labels other than 0/1, non-finite values. One vectorised
        pass in blocks of rows per file (a few seconds for tens of GB)."""
        size = self.feature_map.num_features
        checks = (
            ("ids", arrays.ids, lambda a: a.size and (a.min() < 0 or a.max() >= size),
             f"feature ids outside [0, {size})"),
            ("labels", arrays.labels, lambda a: not np.isin(a, (0, 1)).all(),
             "labels other than 0 and 1"),
            ("values", arrays.values, lambda a: not np.isfinite(a).all(),
             "NaN or infinite values"),
        )  # fmt: skip
        for name, array, damaged, what in checks:
            if array is None:
                continue
            first_row = 0
            for piece in array.parts if isinstance(array, ShardedArray) else [array]:
                for start in range(0, len(piece), CHECK_ROWS):
                    if damaged(piece[start : start + CHECK_ROWS]):
                        rows = first_row + start, first_row + min(start + CHECK_ROWS, len(piece))
                        raise DataError(
                            f"store array {split}/{name} holds {what} (rows {rows[0]:,}-"
                            f"{rows[1]:,}): the store is damaged, prepare it again",
                            path=str(
                                getattr(piece, "filename", None) or self._array_path(split, name)
                            ),
                        )
                first_row += len(piece)


def _parts(meta: dict) -> list[tuple[str, int]]:
    """(file, rows) of each part of an array (version 1 stores: one file)."""
    if "files" in meta:
        return list(zip(meta["files"], meta["shard_rows"], strict=True))
    return [(meta["file"], meta["shape"][0])]
