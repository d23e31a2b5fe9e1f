"""Training checkpoints: written atomically, verified on load, never unpickled.

A checkpoint directory ``DIR`` holds ``ckpt-<step>/`` folders and ``latest.json``::

    ckpt-000000120/model.safetensors       the model's weights
    ckpt-000000120/best.safetensors        the best-so-far weights (early stopping), if any
    ckpt-000000120/optimizer.safetensors   optimiser tensors (moments, step counts)
    ckpt-000000120/rng-<rank>.safetensors  each rank's RNG states (dropout, shuffling)
    ckpt-000000120/state.json              everything else (epoch, step, scheduler, history,
                                           optimiser settings) and the sha256 of every file

A folder is assembled under a temporary name and renamed into place only when complete, then
``latest.json`` is replaced atomically to point at it; the two newest folders are kept. Loading
checks every file against ``state.json``; a folder that fails (a damaged disk, a copy cut short)
is skipped for the next older one, so a half-written file is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deepfm.common import file_sha256
from deepfm.errors import ConfigError

LATEST = "latest.json"
KEEP = 2
_PREFIX = "ckpt-"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


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
        "state": state,
        "optimizer": optimizer_tree,
        "sha256": {name: file_sha256(folder / name) for name in files},
    }
    _write_json(folder / "state.json", record)
    final = directory / f"{_PREFIX}{step:09d}"
    if final.exists():
        shutil.rmtree(final)
    folder.rename(final)
    _write_json(directory / LATEST, {"checkpoint": final.name, "step": step})
    for old in sorted(directory.glob(f"{_PREFIX}*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: Any

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
    except (OSError, ValueError, KeyError):
        return None
    optimizer = unflatten(record["optimizer"], tensors)
    return Checkpoint(folder, int(record["step"]), record["state"], model, best, optimizer)


def load_latest(directory: str | Path) -> Checkpoint:
    """The newest intact checkpoint of ``directory`` (``latest.json`` first, then older)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--resume {directory}: no such checkpoint directory")
    candidates = sorted(directory.glob(f"{_PREFIX}*"), reverse=True)
    try:
        latest = json.loads((directory / LATEST).read_text(encoding="utf-8"))["checkpoint"]
        candidates.sort(key=lambda p: p.name != latest)  # the pointed-at folder first
    except (OSError, ValueError, KeyError):
        pass
    for folder in candidates:
        checkpoint = _verified(folder)
        if checkpoint is not None:
            return checkpoint
    raise ConfigError(f"--resume {directory}: no intact checkpoint there")


def has_checkpoint(directory: str | Path) -> bool:
    return any(Path(directory).glob(f"{_PREFIX}*")) if Path(directory).is_dir() else False
