"""Model bundles: a directory holding everything needed to score raw records, and nothing pickled.

::

    bundle/
      model.safetensors   weights (safetensors: loading never executes code)
      feature_map.json    the fields' codecs (kinds, sizes, most frequent values), so serving
                          encodes exactly as training did
      vocab/              their binary vocabularies (sorted value keys and ids, memory-mapped)
      model.json          registry name, model config, input format, training config, and the
                          calibration of the logits (beta: ``a``, ``b``, ``c``) when there is one
      metrics.json        validation / test metrics of the training run
      optimizer.safetensors  the optimiser's state (optional: a warm start continues from it)
      model.onnx          the model as ONNX (optional, ``train --onnx``: the ONNX runtime loads it
                          instead of exporting the model at start)
      bundle.json         deepfm version, creation time, sha256 of every file above, lineage

A bundle's own sha256 is that of its ``bundle.json`` (which holds the hash of every other file).
Its *lineage* says where it comes from: the parent bundle a warm start continued (sha256, path)
and the data this training saw, with the earlier generations' entries (``history``, oldest
first), so the lineage of a served model can be read from the server's ``/model``.

A bundle is written into a temporary sibling directory and renamed into place, so a reader
never sees a half-written bundle; loading checks every hash before using a file. A bundle is only
written to a new or empty directory or over another bundle (``overwrite``): never over anything
else (:mod:`deepfm.outputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from deepfm import __version__
from deepfm.common import HASH_BLOCK, file_sha256
from deepfm.data.featuremap import FeatureMap
from deepfm.errors import BundleError, DeepFMError, OutputError
from deepfm.models.registry import ModelConfig, build_model
from deepfm.nn import InputLayout
from deepfm.nn.calibration import calibrated, calibration_of, uncalibrated
from deepfm.outputs import (
    BUNDLE,
    claim_directory,
    fsync_file,
    make_dirs,
    reason,
    remove_stale,
    remove_tree,
    write_json,
)

WEIGHTS = "model.safetensors"
FEATURE_MAP = "feature_map.json"
MODEL = "model.json"
METRICS = "metrics.json"
OPTIMIZER = "optimizer.safetensors"
ONNX = "model.onnx"
MANIFEST = "bundle.json"
HASHED = (WEIGHTS, FEATURE_MAP, MODEL, METRICS)  # and every vocabulary file


def bundle_files(directory: Path) -> list[str]:
    """Every file of a bundle but its manifest, as paths relative to ``directory``."""
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` atomically, replacing an existing ``target`` directory (put
    back if the second rename fails)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        remove_tree(old)
    else:
        os.replace(tmp, target)


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode (with its calibration, when it has one: every
    scoring path uses this module), its feature map and its metadata."""

    model: nn.Module
    config: ModelConfig
    feature_map: FeatureMap
    data_format: str
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: the TrainConfig settings it was trained with (as saved; empty for older bundles)
    train_config: dict[str, Any] = field(default_factory=dict)
    #: sha256 of the bundle's manifest (bundle.json): the bundle's identity in a lineage
    sha256: str = ""

    @property
    def lineage(self) -> dict[str, Any]:
        return self.info.get("lineage") or {}


def lineage_of(data: dict[str, Any], parent: Bundle | None = None, **extra: Any) -> dict[str, Any]:
    """The lineage of a bundle trained on ``data`` (what it saw: paths, rows, time range),
    continued from ``parent`` (None: trained from scratch)."""
    if parent is None:
        return {"parent": None, "data": data, "generation": 1, "history": [], **extra}
    before = parent.lineage
    earlier = [{k: v for k, v in before.items() if k != "history"}] if before else []
    return {
        "parent": {
            "sha256": parent.sha256,
            "path": str(parent.path) if parent.path else None,
            "created": parent.info.get("created"),
        },
        "data": data,
        "generation": int(before.get("generation", 1)) + 1,
        "history": [*before.get("history", []), *earlier],
        **extra,
    }


def save_bundle(
    directory: str | Path,
    model: nn.Module,
    config: ModelConfig,
    feature_map: FeatureMap,
    *,
    data_format: str,
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    lineage: dict[str, Any] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    onnx: bool = False,
) -> Path:
    """Write a bundle atomically to ``directory``: a new or empty directory, or an existing
    bundle with ``overwrite`` (see :func:`deepfm.outputs.claim_directory`; ``inputs`` are never
    overwritten). A failure leaves the previous bundle, or nothing, in place. The bundle holds
    its ``lineage`` (:func:`lineage_of`) and, if given, the optimiser's state (named tensors,
    :meth:`~deepfm.train.trainer.Optimizers.named_state`) for the next warm start, and with
    ``onnx`` the model as ONNX when the exporter is installed (:mod:`deepfm.serve.onnx_export`;
    not by default: the export adds seconds to every save and about the weights' size again).

    A calibrated ``model`` (:class:`~deepfm.nn.calibration.BetaCalibration`) is stored as the
    weights of the model under it and its calibration in ``model.json``."""
    target = claim_directory(directory, BUNDLE, overwrite=overwrite, inputs=inputs)
    make_dirs(target.parent)
    remove_stale(target)  # what a killed writer left
    try:
        prefix = f".{target.name}.tmp-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    except OSError as exc:
        raise OutputError(f"cannot write the bundle {target}: {reason(exc)}") from None
    try:
        weights = uncalibrated(model).state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(state, str(tmp / WEIGHTS))
        feature_map.save(tmp)
        meta = {"model": config.to_dict(), "format": data_format, "train": train_config or {}}
        calibration = calibration_of(model)
        if calibration is not None:
            meta["calibration"] = calibration
        write_json(tmp / MODEL, meta, sort_keys=True)
        write_json(tmp / METRICS, metrics or {}, sort_keys=True)
        if optimizer_state:
            tensors = {k: v.detach().cpu().contiguous() for k, v in optimizer_state.items()}
            save_file(tensors, str(tmp / OPTIMIZER))
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        digest = feature_map.digest()
        from deepfm.serve.onnx_export import write_bundle_onnx  # it imports this module

        if onnx:
            info = {"created": created, "feature_map_sha256": digest}
            bundle = Bundle(model, config, feature_map, data_format, info=info)
            write_bundle_onnx(tmp / ONNX, bundle)
        manifest = {
            "deepfm_version": __version__,
            "created": created,
            "model": config.name,
            "feature_map_sha256": digest,
            "files": {name: file_sha256(tmp / name) for name in bundle_files(tmp)},
            "lineage": lineage or {},
        }
        write_json(tmp / MANIFEST, manifest, sort_keys=True)  # fsynced by write_json
        for name in manifest["files"]:
            fsync_file(tmp / name)
        replace_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the bundle {target}: {reason(exc)}") from None
        raise
    return target


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a BundleError when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path.parent} lacks {path.name}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {reason(exc)}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BundleError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is corrupt: {what} must be a JSON object")
    return data


def read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        previous = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        hint = (
            f" (a write of it was interrupted; the previous bundle is {previous[-1]}: rename "
            "it back)"
            if previous and not directory.exists()
            else ""
        )
        raise BundleError(f"{directory} is not a model bundle directory{hint}")
    if not (directory / MANIFEST).exists():
        raise BundleError(
            f"{directory} has no {MANIFEST}: not a bundle, or one that was never completed"
        )
    manifest = _json_object(directory / MANIFEST, "the manifest")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{directory / MANIFEST} is corrupt: it lists no file hashes")
    return manifest


def _verify(directory: Path, files: dict[str, str]) -> None:
    """Every file present and matching its recorded sha256 (hashed in threads: hashlib releases
    the GIL, and a bundle of a 10M-value vocabulary holds ~0.5 GB)."""
    names = sorted({*HASHED, *map(str, files)})
    root = directory.resolve()
    for name in names:
        path = directory / name
        if not path.exists():
            raise BundleError(f"{directory} lacks {name}")
        if not path.resolve().is_relative_to(root) or not path.is_file():
            # a manifest naming ../../dev/zero would otherwise be hashed forever
            raise BundleError(f"{directory / MANIFEST} is corrupt: {name!r} is not a file of it")
    non_finite: list[str] = []

    def digest(name: str) -> str:
        if name == WEIGHTS:
            return weights_sha256(directory / name, non_finite)
        return file_sha256(directory / name)

    try:
        with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
            digests = dict(zip(names, pool.map(digest, names), strict=True))
    except OSError as exc:
        raise BundleError(f"cannot read a file of {directory}: {reason(exc)}") from None
    for name in names:
        if files.get(name) != digests[name]:
            raise BundleError(
                f"{directory / name} does not match the sha256 recorded in {MANIFEST}"
            )
    if non_finite:
        raise BundleError(
            f"{directory}: cannot load the model: the weights {non_finite[:3]} hold NaN or "
            "infinite values"
        )


def _bfloat16_finite(block: np.ndarray) -> bool:
    """No NaN or infinity among bfloat16 values given as ``<u2`` (NumPy has no bfloat16):
    their exponent bits are all set exactly in those."""
    return not ((block & 0x7F80) == 0x7F80).any()


#: per safetensors float type: the NumPy type its bytes are read as and the check of a block
_FINITE_CHECKS = {
    "F64": (np.dtype("<f8"), lambda block: np.isfinite(block).all()),
    "F32": (np.dtype("<f4"), lambda block: np.isfinite(block).all()),
    "F16": (np.dtype("<f2"), lambda block: np.isfinite(block).all()),
    "BF16": (np.dtype("<u2"), _bfloat16_finite),
}


def _float_tensors(header: bytes) -> list[tuple[int, int, str, np.dtype, Callable]]:
    """``(begin, end, name, NumPy type, check)`` of each float tensor a safetensors header
    describes, by offset; empty when the header cannot be read (the loader then says why, or
    the hash says the file was altered)."""
    try:
        entries = json.loads(header)
        tensors = [
            (*map(int, entry["data_offsets"]), name, *_FINITE_CHECKS[entry["dtype"]])
            for name, entry in entries.items()
            if name != "__metadata__" and entry.get("dtype") in _FINITE_CHECKS
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []
    return sorted((t for t in tensors if 0 <= t[0] <= t[1]), key=lambda t: t[:3])


def weights_sha256(path: Path, non_finite: list[str]) -> str:
    """The sha256 of a safetensors file, appending to ``non_finite`` the name of every float
    tensor holding a NaN or an infinity, found in the same plain reads (each block checked on a
    second thread while it is hashed). Checking the loaded tensors instead pulled every page of
    the memory-mapped weights into the process (1.25 s and 418 MB for a 414 MB file, against
    0.41 s and 8 MB without the check)."""
    sha = hashlib.sha256()
    checked: list[tuple[str, Future]] = []  # at most one check pending (its block in memory)
    with open(path, "rb") as handle, ThreadPoolExecutor(max_workers=1) as checker:
        size = handle.read(8)
        claimed = int.from_bytes(size, "little") if len(size) == 8 else 0
        header = handle.read(min(claimed, os.fstat(handle.fileno()).st_size))
        sha.update(size + header)
        position = 0  # in the data, which follows the header
        for begin, end, name, dtype, finite in _float_tensors(header):
            if begin < position:  # overlapping entries: the loader refuses the file
                break
            sha.update(handle.read(begin - position))
            # blocks of whole elements: HASH_BLOCK is a multiple of every width
            for offset in range(begin, end, HASH_BLOCK):
                block = handle.read(min(HASH_BLOCK, end - offset))
                values = np.frombuffer(block, dtype, len(block) // dtype.itemsize)
                checked = [*checked[-1:], (name, checker.submit(finite, values))]
                sha.update(block)
                if len(checked) == 2 and not checked[0][1].result():
                    non_finite.append(checked[0][0])
            position = end
        if checked and not checked[-1][1].result():
            non_finite.append(checked[-1][0])
        while block := handle.read(HASH_BLOCK):
            sha.update(block)
    non_finite[:] = dict.fromkeys(non_finite)  # a tensor of several blocks is named once
    return sha.hexdigest()


class _NoInitialisation(TorchFunctionMode):
    """Initialisers of parameters do nothing: the saved weights replace them anyway, and an
    untouched (lazily allocated) table costs no memory. Buffers are computed as usual (the index
    tables a model derives from its layout). Building on the meta device instead costs seconds
    of imports in a fresh process (PyTorch's meta kernels are Python)."""

    SKIPPED = frozenset(
        (torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_)
    ) | frozenset(
        getattr(torch.nn.init, name)
        for name in dir(torch.nn.init)
        if name.endswith("_") and not name.startswith("_")
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, nn.Parameter):  # left as allocated, replaced when loading
                return target
        return func(*args, **kwargs)


def _model_from(layout: InputLayout, config: ModelConfig, state: dict) -> nn.Module:
    """The model whose parameters are the saved tensors themselves (memory-mapped from the file,
    copy-on-write: loading initialises and copies nothing, rows are read as they are used)."""
    with _NoInitialisation():
        model = build_model(layout, config, fresh=False)
    model.load_state_dict(state, assign=True)
    return model


def load_bundle(directory: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle. Raises :class:`BundleError` if anything is missing or altered."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    _verify(directory, manifest["files"])
    meta = _json_object(directory / MODEL, "the model description")
    metrics = _json_object(directory / METRICS, "the metrics")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("format", ""), str):
        raise BundleError(f"{directory / MODEL} is corrupt: no 'model' settings")
    try:
        config = ModelConfig.from_dict(meta["model"])
        feature_map = FeatureMap.load(directory / FEATURE_MAP)
        state = load_file(str(directory / WEIGHTS), device=str(device))
        model = _model_from(InputLayout.of(feature_map), config, state)
        model = calibrated(model, meta.get("calibration"))
    except (DeepFMError, SafetensorError, OSError, LookupError, RuntimeError, TypeError,
            ValueError, AttributeError) as exc:  # fmt: skip
        # a bundle whose hashes were recomputed after damage fails here, never later
        raise BundleError(f"{directory}: cannot load the model: {exc}") from None
    model.to(device).eval()
    sha = file_sha256(directory / MANIFEST)
    return Bundle(
        model, config, feature_map, meta.get("format", ""), metrics, manifest, directory,
        train_config=meta.get("train") or {}, sha256=sha,
    )  # fmt: skip


def load_optimizer_state(bundle: Bundle) -> dict[str, torch.Tensor] | None:
    """The optimiser state saved in ``bundle`` (verified when the bundle was loaded), or None
    when it holds none (written with ``--no-optimizer-state`` or before warm starts)."""
    assert bundle.path is not None
    if OPTIMIZER not in bundle.info.get("files", {}):
        return None
    try:
        return load_file(str(bundle.path / OPTIMIZER))
    except (OSError, RuntimeError, ValueError) as exc:
        raise BundleError(
            f"{bundle.path / OPTIMIZER}: cannot load the optimiser state: {exc}"
        ) from None
