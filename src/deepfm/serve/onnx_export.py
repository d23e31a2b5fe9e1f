"""ONNX export of a bundle's model, and an ONNX Runtime scorer for it.

The exported graph takes the *encoded* sample and returns the click probability:

* ``ids`` int32 ``[batch, slots]``: global feature ids, as :meth:`FeatureMap.encode` writes them;
* ``values`` float32 ``[batch, slots]``: only when the feature map needs values (a numeric field
  kept as a value, or a multi-valued bag); otherwise every value is 1 and the input is left out;
* ``ctr`` float32 ``[batch]``: ``sigmoid(logit)``.

The batch axis is dynamic. Raw records are encoded by the bundle's field codecs (the graph holds
no vocabularies): ``feature_map.json`` and the sorted keys and ids of ``vocab/``; a non-Python
client keys values as :func:`deepfm.data.codecs.string_keys` does and looks them up there (hashed
fields need only the key and the bucket count). The graph's metadata (``deepfm.model``,
``deepfm.feature_map_sha256``, ...) says which bundle it came from.

Every model of the registry exports with PyTorch's ``torch.export``-based exporter (embedding
lookups become ``Gather``, multi-valued pooling's ``index_add`` a ``ScatterND`` with addition);
``NOT_EXPORTABLE`` lists a model that cannot, with the reason, and is empty today.

A bundle holds its model as ONNX (``model.onnx``, hashed with its other files) when the exporter
was installed where it was saved: the ONNX runtime then loads it in a fraction of a second
instead of exporting the model again (seconds). An older bundle, or one whose ``model.onnx`` does
not match its weights, is exported at load as before.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepfm import __version__
from deepfm.common import sigmoid
from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import FeatureMap
from deepfm.errors import ConfigError
from deepfm.models import build_model
from deepfm.nn import InputLayout
from deepfm.nn.calibration import calibrated, calibration_of, uncalibrated
from deepfm.outputs import make_dirs
from deepfm.serve.bundle import ONNX, Bundle

log = logging.getLogger("deepfm.serve")

#: registry name → why the model cannot be expressed in ONNX (none so far)
NOT_EXPORTABLE: dict[str, str] = {}
#: example batch for tracing; any size > 1 (torch.export specialises sizes 0 and 1)
_TRACE_BATCH = 4
#: most |difference| of a click probability between ONNX Runtime and PyTorch (the same float32
#: arithmetic, in another order: ~1e-7 in practice)
TOLERANCE = 1e-5
#: random rows on which a bundle's stored model.onnx is compared with its weights at load
_LOAD_CHECK_ROWS = 64


class ScoringModule(nn.Module):
    """``forward(ids [B, S] int32, values [B, S] float32 | absent) -> ctr [B] float32``."""

    def __init__(self, model: nn.Module, with_values: bool) -> None:
        super().__init__()
        self.model = model
        self.with_values = with_values

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.model(ids, values if self.with_values else None))


def input_names(bundle: Bundle) -> list[str]:
    return ["ids", "values"] if bundle.feature_map.needs_values else ["ids"]


def exporter_installed() -> bool:
    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript"))


def _require_onnx() -> None:
    if not exporter_installed():
        raise ConfigError("ONNX export needs the serve extra: pip install 'deepfm[serve]'")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing optional package (torchvision) and emits
    FutureWarnings about its own internals; none of it concerns the user."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cpu_model(bundle: Bundle) -> nn.Module:
    """The bundle's model on the CPU for tracing, leaving the caller's model where it is: the
    model itself when it is on the CPU, else a CPU copy of it."""
    model = bundle.model
    if device_of(model).type == "cpu":
        return model
    copy = build_model(InputLayout.of(bundle.feature_map), bundle.config)
    copy.load_state_dict(uncalibrated(model).state_dict())
    return calibrated(copy, calibration_of(model))


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode for the block, then every submodule back in the mode the caller
    had it in."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def export_onnx(bundle: Bundle, path: str | Path) -> Path:
    """Write the bundle's model as ONNX to ``path`` (atomically: a temp file, then a rename).

    Raises :class:`ConfigError` for a model in ``NOT_EXPORTABLE`` or one the exporter rejects.
    """
    _require_onnx()
    name = bundle.config.name
    if name in NOT_EXPORTABLE:
        raise ConfigError(f"model {name!r} cannot be exported to ONNX: {NOT_EXPORTABLE[name]}")
    feature_map = bundle.feature_map
    with_values = feature_map.needs_values
    model = cpu_model(bundle)
    module = ScoringModule(model, with_values)
    # example inputs: valid ids of every slot's field, so tracing sees a realistic graph
    generator = torch.Generator().manual_seed(0)
    columns = []
    for info in feature_map.fields:
        for _ in range(info.slots):
            local = torch.randint(0, info.size, (_TRACE_BATCH,), generator=generator)
            columns.append(local + info.offset)
    ids = torch.stack(columns, dim=1).to(torch.int32)
    args: tuple[torch.Tensor, ...] = (ids,)
    batch = torch.export.Dim("batch")
    dynamic: dict[str, Any] = {"ids": {0: batch}}
    if with_values:
        args += (torch.ones(ids.shape, dtype=torch.float32),)
        dynamic["values"] = {0: batch}
    path = Path(path)
    make_dirs(path.parent)
    # written into a sibling temp directory under the final name, then renamed into place: a
    # model over 2 GB comes with a weights file named after it, moved before the graph
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _quiet_exporter(), evaluating(module), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                input_names=input_names(bundle),
                output_names=["ctr"],
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
            )
            program.model.metadata_props.update(
                {
                    "deepfm.version": __version__,
                    "deepfm.model": name,
                    "deepfm.feature_map_sha256": str(bundle.info.get("feature_map_sha256", "")),
                    "deepfm.bundle_created": str(bundle.info.get("created", "")),
                    "deepfm.inputs": "ids int32 [batch, slots] global feature ids"
                    + (", values float32 [batch, slots]" if with_values else "")
                    + "; output ctr float32 [batch]",
                }
            )
            program.save(str(tmp / path.name))
        for written in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            os.replace(written, path.parent / written.name)
    except Exception as exc:  # the exporter's many error types: report them as one
        raise ConfigError(f"model {name!r} could not be exported to ONNX: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_bundle_onnx(path: Path, bundle: Bundle) -> bool:
    """Write the model of a bundle being saved as ONNX to ``path``; False, writing nothing, when
    the exporter is not installed or cannot export the model (a warning says why): serving then
    exports it at load, as for a bundle older than ``model.onnx``."""
    if not exporter_installed():
        return False
    try:
        export_onnx(bundle, path)
    except ConfigError as exc:
        warnings.warn(f"the bundle is saved without {ONNX}: {exc}", RuntimeWarning, stacklevel=3)
        return False
    return True


def random_encoded(feature_map: FeatureMap, rows: int, seed: int = 0) -> EncodedArrays:
    """Random valid encoded rows (each slot an id of its field; bag values as encoding makes)."""
    rng = np.random.default_rng(seed)
    columns, values = [], []
    for info in feature_map.fields:
        for _ in range(info.slots):
            columns.append(info.offset + rng.integers(0, info.size, rows))
            values.append(rng.uniform(0.0, 1.0, rows) if info.spec.is_value else np.ones(rows))
    ids = np.stack(columns, axis=1).astype(np.int32)
    vals = np.stack(values, axis=1).astype(np.float32) if feature_map.needs_values else None
    return EncodedArrays(ids, vals, None, np.arange(1, rows + 1))


@torch.inference_mode()
def onnx_gap(bundle: Bundle, scorer: OnnxScorer, rows: int, seed: int = 0) -> float:
    """The largest |difference| of click probabilities between ``scorer`` and the bundle's
    PyTorch model on ``rows`` random valid encoded rows."""
    encoded = random_encoded(bundle.feature_map, rows, seed)
    device = device_of(bundle.model)
    ids = torch.from_numpy(encoded.ids).to(device)
    values = None if encoded.values is None else torch.from_numpy(encoded.values).to(device)
    expected = sigmoid(bundle.model(ids, values).cpu().numpy())
    got = scorer(encoded.ids, encoded.values).astype(np.float64)
    return float(np.max(np.abs(expected - got)))


class OnnxScorer:
    """An ONNX Runtime session over an exported model: ``(ids, values) -> ctr`` as NumPy."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                "the ONNX runtime needs the serve extra: pip install 'deepfm[serve]'"
            ) from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConfigError(f"{path}: not a loadable ONNX model: {exc}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, threads: int | None = None) -> OnnxScorer:
        """A session on the bundle's own ``model.onnx`` when it holds one that matches it;
        otherwise on the model exported now, to a temporary file."""
        stored = bundle.path / ONNX if bundle.path is not None else None
        if stored is not None and ONNX in bundle.info.get("files", {}):
            scorer = cls(stored, threads=threads)
            problem = scorer.mismatch(bundle)
            if problem is None:
                return scorer
            log.warning("%s %s: exporting the model again", stored, problem)
        with tempfile.TemporaryDirectory(prefix="deepfm-onnx-") as tmp:
            return cls(export_onnx(bundle, Path(tmp) / ONNX), threads=threads)

    def mismatch(self, bundle: Bundle) -> str | None:
        """Why this model is not ``bundle``'s (None: it is). Its file was verified with the
        bundle's other files, so this catches a file written by another version of the exporter
        or copied from another bundle: its inputs, the model and feature map it says it comes
        from, and its scores on a few random rows."""
        made_for = (
            self.metadata.get("deepfm.model"),
            self.metadata.get("deepfm.feature_map_sha256"),
        )
        if made_for != (bundle.config.name, bundle.info.get("feature_map_sha256")):
            return "was exported from another model or feature map"
        if self.inputs != input_names(bundle):
            return f"takes the inputs {self.inputs}, not {input_names(bundle)}"
        gap = onnx_gap(bundle, self, _LOAD_CHECK_ROWS)
        if not gap <= TOLERANCE:
            return f"scores differently from the bundle's weights (by up to {gap:.2e})"
        return None

    def __call__(self, ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """``ids [B, S]`` int32, ``values [B, S]`` float32 or None → ``ctr [B]`` float32."""
        feed = {"ids": np.ascontiguousarray(ids, dtype=np.int32)}
        if "values" in self.inputs:
            feed["values"] = (
                np.ones(ids.shape, dtype=np.float32)
                if values is None
                else np.ascontiguousarray(values, dtype=np.float32)
            )
        return self.session.run(["ctr"], feed)[0]
