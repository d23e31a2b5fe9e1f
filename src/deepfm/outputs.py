"""Where a command may write, and how: the one place that decides.

Rules (README, "Safety"):

* A directory output of a kind (a bundle, a store, a checkpoint directory, a results directory)
  is only written to a new or empty directory, or over a directory of the same kind, recognised
  by its marker file (``bundle.json``, ``manifest.json``, ...). Replacing a bundle or a store
  needs ``overwrite``; any other non-empty directory is refused, whatever the flags.
* A file output never is an input of the command, never lies inside a bundle, store or
  checkpoint directory, and replaces an existing file only with ``overwrite``. Paths are
  compared after resolving symbolic links.
* Files are written under a temporary name in the target's directory, flushed to disk and
  renamed into place; on any error the temporary file is removed, so a full disk or a killed
  process leaves the old file (or nothing), never half of a new one.
* JSON is strict: NaN and infinities become ``null`` with a warning naming the keys.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from fnmatch import fnmatch
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from deepfm.errors import ConfigError, DeepFMWarning, OutputError

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class OutputKind:
    """A kind of directory a command writes. ``markers``: file names (glob patterns) whose
    presence identifies a directory of this kind. ``replaced``: written as a whole (a bundle,
    a store), so an existing one is only replaced with ``overwrite``; otherwise the command adds
    and updates its own files in it (results)."""

    name: str
    markers: tuple[str, ...]
    replaced: bool = True

    def recognises(self, directory: Path) -> bool:
        try:
            return any(any(directory.glob(marker)) for marker in self.markers)
        except OSError:
            return False


BUNDLE = OutputKind("bundle", ("bundle.json",))
STORE = OutputKind("store", ("manifest.json",))
CHECKPOINTS = OutputKind("checkpoint directory", ("latest.json", "ckpt-*"), replaced=False)
#: a results directory (demo, studies, simulations) carries this marker file
RESULTS_MARKER = ".deepfm-results"
RESULTS = OutputKind("results directory", (RESULTS_MARKER,), replaced=False)
#: kinds whose directories no other output may be written into
PROTECTED = (BUNDLE, STORE, CHECKPOINTS)


def kind_of(directory: Path) -> OutputKind | None:
    """The deepfm kind of ``directory`` (None: not one of ours, or not a directory)."""
    if not directory.is_dir():
        return None
    return next((k for k in (*PROTECTED, RESULTS) if k.recognises(directory)), None)


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _protected_parent(target: Path) -> tuple[Path, OutputKind] | None:
    """The nearest bundle, store or checkpoint directory holding ``target``, if any."""
    for parent in target.parents:
        for kind in PROTECTED:
            if parent.is_dir() and kind.recognises(parent):
                return parent, kind
    return None


def _check_inputs(target: Path, inputs: Iterable[PathLike], what: str) -> None:
    """``target`` must not be an input, nor a directory holding an input."""
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if source == target:
            raise ConfigError(f"{what} is the input {given}: choose another path")
        if target in source.parents:
            raise ConfigError(f"{what} holds the input {given}: choose another path")


def _inside_protected(target: Path, what: str) -> None:
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{what}: {parent} is a file, not a directory")
    found = _protected_parent(target)
    if found is not None:
        parent, kind = found
        raise ConfigError(
            f"{what} lies inside the {kind.name} {parent}: write it elsewhere "
            f"(a {kind.name} is only ever written whole by deepfm)"
        )


def claim_directory(
    out: PathLike,
    kind: OutputKind,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    own_files: Iterable[str] = (),
    flag: str = "--out",
) -> Path:
    """Check that a command may write the ``kind`` directory ``out``; returns its resolved path.

    Allowed: a path that does not exist, an empty directory, a directory of the same kind
    (replacing a bundle or store needs ``overwrite``), or, for results, a directory holding
    only names matching the glob patterns ``own_files`` (results written before the marker).
    Refused with a :class:`ConfigError`: a file, any other non-empty directory, a path inside
    a bundle, store or checkpoint directory, and a path that is or holds one of ``inputs``.
    """
    what = f"{flag} {out}"
    target = _resolved(out)
    _check_inputs(target, inputs, what)
    _inside_protected(target, what)
    if not target.exists():
        if Path(out).is_symlink():
            raise ConfigError(f"{what} is a broken symbolic link: remove it or choose another")
        return target
    if not target.is_dir():
        raise ConfigError(f"{what} is a file, not a {kind.name}: choose another path")
    try:
        entries = [p.name for p in target.iterdir()]
    except OSError as exc:
        raise OutputError(f"{what}: cannot list the directory: {exc.strerror or exc}") from None
    if not entries:
        return target
    found = kind_of(target)
    if found is kind:
        if kind.replaced and not overwrite:
            raise ConfigError(
                f"{what}: a {kind.name} is there already: pass --overwrite to replace it"
            )
        return target
    own = tuple(own_files)
    if kind is RESULTS and own and all(any(fnmatch(e, p) for p in own) for e in entries):
        return target
    there = f"is a {found.name}" if found is not None else "exists, is not empty and is"
    raise ConfigError(
        f"{what} {there} not a {kind.name}: a {kind.name} is only written to a new or empty "
        f"directory or over a {kind.name}, so nothing else is ever overwritten; choose another path"
    )


def claim_file(
    out: PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    flag: str = "--out",
) -> Path:
    """Check that a command may write the file ``out``; returns its resolved path.

    Refused: a directory, one of ``inputs``, a path inside a bundle, store or checkpoint
    directory, and an existing file without ``overwrite``.
    """
    what = f"{flag} {out}"
    target = _resolved(out)
    if target.is_dir():
        raise ConfigError(f"{what} is a directory: give a file name")
    _check_inputs(target, inputs, what)
    _inside_protected(target, what)
    if target.exists() and not target.is_file():  # a device, a pipe, a socket
        raise ConfigError(f"{what} is not a regular file: give a file name")
    if (target.exists() or Path(out).is_symlink()) and not overwrite:
        raise ConfigError(f"{what} exists: pass --overwrite to replace it")
    return target


def mark_results(directory: Path, command: str) -> None:
    """Create ``directory`` if needed and mark it as a results directory of deepfm."""
    marker = directory / RESULTS_MARKER
    if marker.exists():
        return
    make_dirs(directory)
    write_text(marker, json.dumps({"written_by": f"deepfm {command}"}) + "\n")


def make_dirs(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {directory}: {reason(exc)}") from None


# -- writing ---------------------------------------------------------------------------------


def reason(exc: OSError) -> str:
    """An OSError as a short phrase: 'No space left on device'."""
    return exc.strerror or str(exc) or type(exc).__name__


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside ``path`` for writing it before the rename."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}")


def remove_stale(path: Path, tag: str = "tmp") -> None:
    """Remove the temporary siblings ``.NAME.TAG-<pid>-...`` of ``path`` (files or
    directories) left by processes that were killed (kill -9 leaves no chance to clean up);
    those of live processes are theirs."""
    for stale in path.parent.glob(f".{glob_escape(path.name)}.{tag}-*"):
        pid = stale.name.rsplit(f".{tag}-", 1)[1].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                remove_quietly(stale)
        except PermissionError:  # another user's live process
            continue


def remove_tree(path: Path) -> None:
    """Remove a directory tree that this command replaced, errors ignored (as ``rmtree``). Its
    files are unlinked by several threads at once, largest first: freeing a file's blocks is
    mostly waiting on the disk, and on a disk mounted with ``discard`` one thread took 0.95 s
    for a 617 MB store against 0.13 s for eight."""
    files = [Path(root) / name for root, _, names in os.walk(path) for name in names]
    sizes = {}
    for file in files:
        with suppress(OSError):
            sizes[file] = file.lstat().st_size
    with ThreadPoolExecutor(max_workers=8) as pool:
        pool.map(remove_quietly, sorted(sizes, key=sizes.__getitem__, reverse=True))
    shutil.rmtree(path, ignore_errors=True)


def remove_quietly(path: Path) -> None:
    with suppress(OSError):
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error the file
    written there is flushed to disk and renamed to ``path``, otherwise it is removed. An
    OSError (full disk, no permission) becomes an :class:`OutputError` naming ``path``."""
    path = Path(path)
    make_dirs(path.parent)
    remove_stale(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        remove_quietly(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {reason(exc)}") from None
        raise


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def finite_json(data: Any, where: str = "") -> tuple[Any, list[str]]:
    """``data`` as strict-JSON-ready values (NaN/inf → None, tuples → lists, NumPy scalars →
    Python numbers) and the places (``valid.auc``) of the non-finite numbers replaced."""
    replaced: list[str] = []

    def clean(value: Any, at: str) -> Any:
        if isinstance(value, bool) or value is None or isinstance(value, str | int):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            replaced.append(at or "value")
            return None
        if isinstance(value, dict):
            return {str(k): clean(v, f"{at}.{k}" if at else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v, f"{at}[{i}]") for i, v in enumerate(value)]
        if hasattr(value, "tolist") and not isinstance(value, str):  # NumPy scalars and arrays
            return clean(value.tolist(), at)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    return clean(data, where), replaced


def to_json(data: Any) -> Any:
    """``data`` with NaN/inf as null (strict JSON), tuples as lists, NumPy values as Python's."""
    return finite_json(data)[0]


def json_text(
    data: Any, *, indent: int | None = 2, sort_keys: bool = False, name: str = "", warn: bool = True
) -> str:
    """Strict JSON text of ``data``; non-finite numbers become null, with a warning naming
    them (``name`` says which output they are in) unless ``warn`` is False (outputs where a
    missing number is expected, like the standard deviation of a single seed)."""
    clean, replaced = finite_json(data)
    if replaced and warn:
        more = f" and {len(replaced) - 8} more" if len(replaced) > 8 else ""
        shown = ", ".join(replaced[:8]) + more
        warnings.warn(
            f"{name or 'output'}: {shown} not a finite number, written as null",
            DeepFMWarning,
            stacklevel=3,
        )
    return json.dumps(clean, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(
    path: PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False, warn: bool = True
) -> Path:
    """Write ``data`` as strict JSON to ``path`` atomically (see :func:`json_text`)."""
    text = json_text(data, indent=indent, sort_keys=sort_keys, name=Path(path).name, warn=warn)
    return write_text(path, text)


def save_figure(fig: Any, path: PathLike, *, dpi: int = 110) -> Path:
    """A finished matplotlib figure laid out, saved atomically (the format from the suffix, e.g.
    ``.png``) and closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def claim_results(
    out: PathLike, command: str, *, inputs: Iterable[PathLike] = (), own_files: Iterable[str] = ()
) -> Path:
    """Claim the results directory ``out`` of ``deepfm command`` (see
    :func:`claim_directory`) and mark it; returns its resolved path."""
    target = claim_directory(out, RESULTS, inputs=inputs, own_files=own_files)
    mark_results(target, command)
    return target
