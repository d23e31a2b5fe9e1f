"""Training checkpoints: written atomically, verified on load, never unpickled.

A checkpoint directory ``DIR`` holds ``ckpt-<step>/`` folders and ``latest.json``::

    ckpt-000000120/model.safetensors       the model's weights
    ckpt-000000120/best.safetensors        the best-so-far weights (early stopping), if any
    ckpt-000000120/optimizer.safetensors   optimiser tensors (moments, step counts)
    ckpt-000000120/rng-<rank>.safetensors  each rank's RNG states (dropout, shuffling)
    ckpt-000000120/state.json              everything else (epoch, step, scheduler, history,
                                           optimiser settings) and the sha256 of every file

A folder is assembled under a temporary name and renamed into place only when complete, then
``latest.json`` is replaced atomically to point at it; the newest folder and the one before it
are kept. Loading checks every file against ``state.json``; a folder that fails (a damaged disk,
a copy cut short) is skipped for the next older one, so a half-written file is never loaded.

A directory belongs to one run: every checkpoint records the run's id and the settings that
shape its result (``run``). A new run refuses a directory that holds checkpoints already, and
resuming refuses a checkpoint whose settings differ from the run's, naming each difference.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepfm.common import file_sha256
from deepfm.errors import ConfigError, OutputError
from deepfm.outputs import reason, write_json

LATEST = "latest.json"
KEEP = 2
_PREFIX = "ckpt-"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# -- flattening state dicts into tensors + JSON ---------------------------------------------------


def flatten(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` (keyed by path); the rest,
    with ``{"__tensor__": key}`` placeholders, is returned as JSON-able data."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {"__dict__": [[k, flatten(v, f"{prefix}/{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, list | tuple):
        items = [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else items
    if isinstance(tree, float) and not (tree == tree and abs(tree) != float("inf")):
        return {"__float__": repr(tree)}  # nan, inf: JSON has no literal for them
    return tree


def unflatten(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__float__" in data:
            return float(data["__float__"])
        if "__tuple__" in data:
            return tuple(unflatten(v, tensors) for v in data["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in data["__dict__"]}
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    return data


# -- rng ----------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This process's RNG states: torch (dropout), the shuffling generator, CUDA."""
    out = {"torch": torch.get_rng_state(), "shuffle": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["shuffle"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# -- writing ------------------------------------------------------------------------------------


def staging(directory: str | Path, step: int) -> Path:
    """The temporary folder where the checkpoint of ``step`` is assembled (all ranks write
    their RNG file there before rank 0 commits)."""
    path = Path(directory) / f".{_PREFIX}{step:09d}.partial"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_partials(directory: str | Path) -> None:
    """Remove folders left half-assembled by a run that was killed while checkpointing."""
    for partial in Path(directory).glob(f".{_PREFIX}*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def write_rng(folder: Path, rank: int, states: dict[str, torch.Tensor]) -> None:
    path = folder / f"rng-{rank}.safetensors"
    save_file(states, str(path))
    _fsync(path)


def commit(
    directory: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor] | None,
    optimizer: Any,
    state: dict[str, Any],
) -> Path:
    """Write rank 0's part into the staging folder, verify-hash everything, rename, point
    ``latest.json`` at it, prune older folders. Returns the checkpoint folder."""
    directory = Path(directory)
    folder = staging(directory, step)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.items()},
        str(folder / "model.safetensors"),
    )
    if best is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in best.items()},
            str(folder / "best.safetensors"),
        )
    tensors: dict[str, torch.Tensor] = {}
    optimizer_tree = flatten(optimizer, "optimizer", tensors)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    files = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    for name in files:
        _fsync(folder / name)
    record = {
        "step": step,
        "state": flatten(state, "state", {}),  # NaN/inf as {"__float__": ...}: strict JSON
        "optimizer": optimizer_tree,
        "sha256": {name: file_sha256(folder / name) for name in files},
    }
    write_json(folder / "state.json", record, indent=None)
    final = directory / f"{_PREFIX}{step:09d}"
    if final.exists():
        shutil.rmtree(final)
    folder.rename(final)
    run_id = state.get("run", {}).get("id")
    latest = {"checkpoint": final.name, "step": step, "run_id": run_id}
    write_json(directory / LATEST, latest, indent=None)
    prune(directory, final)
    return final


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name[len(_PREFIX) :])
    except ValueError:
        return -1


def prune(directory: Path, newest: Path) -> None:
    """Keep ``newest`` (just written) and the ``KEEP - 1`` checkpoints before it; folders of
    later steps belong to a stretch of this run that was abandoned by resuming from an older
    checkpoint (the newer ones were damaged), so they go too. The newest is never removed."""
    step = _step_of(newest)
    others = [p for p in directory.glob(f"{_PREFIX}*") if p != newest]
    older = sorted((p for p in others if _step_of(p) < step), key=_step_of)
    stale = [p for p in others if _step_of(p) >= step]
    for old in stale + older[: max(0, len(older) - (KEEP - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def commit_or_fail(directory: str | Path, step: int, **parts: Any) -> Path:
    """:func:`commit`, with a failed write (full disk, no permission) as an OutputError and
    the staging folder removed."""
    try:
        return commit(directory, step, **parts)
    except (OSError, OutputError) as exc:
        shutil.rmtree(Path(directory) / f".{_PREFIX}{step:09d}.partial", ignore_errors=True)
        if isinstance(exc, OutputError):  # the atomic JSON write names its file already
            raise
        raise OutputError(f"cannot write a checkpoint to {directory}: {reason(exc)}") from None


# -- reading ------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: Any

    @property
    def run_id(self) -> str | None:
        return self.state.get("run", {}).get("id")

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        path = self.path / f"rng-{rank}.safetensors"
        return load_file(str(path)) if path.exists() else None


def _verified(folder: Path) -> Checkpoint | None:
    """The checkpoint in ``folder`` if every file matches its recorded sha256, else None."""
    try:
        record = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        for name, digest in record["sha256"].items():
            if file_sha256(folder / name) != digest:
                return None
        model = load_file(str(folder / "model.safetensors"))
        best_path = folder / "best.safetensors"
        best = load_file(str(best_path)) if best_path.exists() else None
        tensors = load_file(str(folder / "optimizer.safetensors"))
        optimizer = unflatten(record["optimizer"], tensors)
        state = unflatten(record["state"], {})
        step = int(record["step"])
    except (OSError, ValueError, LookupError, TypeError, AttributeError, SafetensorError):
        return None
    if not isinstance(state, dict):
        return None
    return Checkpoint(folder, step, state, model, best, optimizer)


def load_latest(directory: str | Path) -> Checkpoint:
    """The newest intact checkpoint of ``directory`` (``latest.json`` first, then older)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--resume {directory}: no such checkpoint directory")
    candidates = sorted(directory.glob(f"{_PREFIX}*"), key=_step_of, reverse=True)
    latest = _latest(directory)
    if latest.get("checkpoint"):
        candidates.sort(key=lambda p: p.name != latest["checkpoint"])  # the pointed-at first
    for folder in candidates:
        checkpoint = _verified(folder)
        if checkpoint is None:
            continue
        if latest.get("run_id") and checkpoint.run_id != latest["run_id"]:
            continue  # not of the run latest.json names
        return checkpoint
    raise ConfigError(f"--resume {directory}: no intact checkpoint there")


def _latest(directory: Path) -> dict[str, Any]:
    try:
        latest = json.loads((directory / LATEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return latest if isinstance(latest, dict) else {}


def has_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    if not directory.is_dir():
        return False
    return (directory / LATEST).exists() or any(directory.glob(f"{_PREFIX}*"))


def clear(directory: str | Path) -> None:
    """Remove every checkpoint of ``directory`` (a new run asked to start over)."""
    directory = Path(directory)
    for folder in [*directory.glob(f"{_PREFIX}*"), *directory.glob(f".{_PREFIX}*.partial")]:
        shutil.rmtree(folder)
    (directory / LATEST).unlink(missing_ok=True)


def start_directory(directory: str | Path) -> None:
    """A new run's checkpoint directory must hold no checkpoints: mixing two runs' folders
    would let pruning and ``latest.json`` pick the wrong run's weights."""
    if has_checkpoint(directory):
        latest = _latest(Path(directory))
        which = f" (step {latest['step']})" if "step" in latest else ""
        raise ConfigError(
            f"{directory} holds the checkpoints of an earlier run{which}: continue that run "
            f"with --resume {directory}, or start over with --overwrite (removes them)"
        )


def check_same_run(checkpoint: Checkpoint, identity: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` in a run whose settings (``identity``) differ."""
    saved = checkpoint.state.get("run", {}).get("identity")
    if saved is None:
        raise ConfigError(
            f"--resume {checkpoint.path}: the checkpoint does not record its run's settings "
            "(written by an older deepfm), so it cannot be checked against this run: start anew"
        )
    differences = _differences(saved, json.loads(json.dumps(identity)))
    named = [d for d in differences if not d.startswith("architecture:")]
    differences = named or differences  # the digest of the modules only when nothing else says
    if differences:
        shown = "; ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
        raise ConfigError(
            f"--resume {checkpoint.path.parent}: the checkpoints belong to another run: {shown} "
            "(resume with the settings and data of that run, or start a new run)"
        )


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            at = f"{where}.{key}" if where else str(key)
            out += _differences(saved.get(key), current.get(key), at)
        return out
    if saved != current:
        return [f"{where}: {saved!r} in the checkpoint, {current!r} now"]
    return []
