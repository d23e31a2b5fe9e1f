"""Scoring raw records with a bundle: encode with the saved feature map, one batched forward pass.

Unseen values map to their field's OOV id and absent or null values to its missing id, exactly as
in training, so a record never fails for carrying a value the model has not seen. A value that
cannot be a feature value (an object, NaN, a non-number in a numeric field) raises
:class:`DataError` naming the record and the field.

Two runtimes compute the same probabilities: ``torch`` (the bundle's module, in inference mode)
and ``onnx`` (the module exported to ONNX and run by ONNX Runtime; equal within 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from deepfm.common import sigmoid
from deepfm.data.encoded import EncodedArrays
from deepfm.data.reader import RawChunk
from deepfm.errors import ConfigError, DataError
from deepfm.serve.bundle import Bundle, load_bundle
from deepfm.serve.encoding import RecordColumns, number_of

Record = Mapping[str, Any]
Runtime = Literal["torch", "onnx"]
RUNTIMES: tuple[str, ...] = ("torch", "onnx")
RANK_BY: tuple[str, ...] = ("ctr", "ctr_bid")
#: the candidate key holding a bid, read when ranking by CTR × bid
BID = "bid"


def default_runtime() -> Runtime:
    """``onnx`` when ONNX Runtime (and the exporter) are installed, else ``torch``."""
    import importlib.util

    needed = ("onnxruntime", "onnx", "onnxscript")
    return "onnx" if all(importlib.util.find_spec(m) for m in needed) else "torch"


class Predictor:
    """``Predictor.load(DIR)``; ``predict_proba(records)``; ``rank(user, context, candidates)``.

    ``runtime="onnx"`` exports the model to ONNX when loading and scores with ONNX Runtime
    (``threads`` sets its intra-op threads; the torch runtime uses ``torch.get_num_threads()``).
    A predictor is safe to call from several threads at once.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        *,
        runtime: Runtime = "torch",
        threads: int | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        self.feature_map = bundle.feature_map
        self.encoder = RecordColumns(bundle.feature_map)
        self.runtime = runtime
        self._onnx = None
        if runtime == "onnx":
            from deepfm.serve.onnx_export import OnnxScorer

            self._onnx = OnnxScorer.from_bundle(bundle, threads=threads)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        *,
        runtime: Runtime = "torch",
        threads: int | None = None,
    ) -> Predictor:
        """Load and verify the bundle in ``directory`` (see :func:`load_bundle`)."""
        return cls(load_bundle(directory, device=device), device, runtime=runtime, threads=threads)

    @property
    def info(self) -> dict[str, Any]:
        """What is being served: model name, bundle creation time, feature-map hash, metrics."""
        manifest = self.bundle.info
        metrics = {k: v for k, v in self.bundle.metrics.items() if k not in ("history",)}
        return {
            "model": self.bundle.config.name,
            "created": manifest.get("created"),
            "feature_map_sha256": manifest.get("feature_map_sha256"),
            "deepfm_version": manifest.get("deepfm_version"),
            "path": str(self.bundle.path) if self.bundle.path else None,
            "runtime": self.runtime,
            "format": self.bundle.data_format,
            "fields": [f.name for f in self.feature_map.fields],
            "metrics": metrics,
            "sha256": self.bundle.sha256,
            "lineage": self.bundle.lineage,
        }

    # -- encoding ------------------------------------------------------------------------------

    def encode(
        self, records: Sequence[Record] | pa.Table, *, strict: bool = False
    ) -> EncodedArrays:
        """Encode records (dicts) or a table of raw columns with the bundle's codecs.

        ``strict``: a key that is not a field of the model raises :class:`DataError` (by default
        such keys are ignored).
        """
        if isinstance(records, pa.Table):
            lines = np.arange(1, records.num_rows + 1, dtype=np.int64)
            return self.feature_map.encode(RawChunk(records, lines, "<records>"))
        keys = self.encoder.check_keys(records, "records") if strict else None
        return self.encoder.encode(records, where="records", keys=keys)

    # -- scoring -------------------------------------------------------------------------------

    def predict_encoded(self, encoded: EncodedArrays) -> np.ndarray:
        """Click probabilities ``[rows]`` (float64) of encoded rows, in one forward pass.

        A non-finite probability (extreme input values overflowing the model) raises
        :class:`DataError` naming the first such row, rather than returning NaN."""
        return check_finite(self.forward(encoded.ids, encoded.values))

    def forward(self, ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """Click probabilities ``[rows]`` (float64) of ``ids [rows, slots]`` and ``values``, in
        one forward pass of the runtime, unchecked (see :func:`check_finite`)."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.float64)
        if self._onnx is not None:
            return self._onnx(ids, values).astype(np.float64)
        return self._torch_proba(ids, values)

    @torch.inference_mode()
    def _torch_proba(self, ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        ids_t = torch.from_numpy(ids).to(self.device)
        values_t = None if values is None else torch.from_numpy(values).to(self.device)
        return sigmoid(self.model(ids_t, values_t).cpu().numpy())

    def predict_proba(
        self, records: Sequence[Record] | pa.Table, *, strict: bool = False
    ) -> np.ndarray:
        """Click probability of each record, in order (float64 ``[len(records)]``)."""
        return self.predict_encoded(self.encode(records, strict=strict))

    def rank(
        self,
        user: Record,
        context: Record,
        candidates: Sequence[Record],
        *,
        top: int = 10,
        by: Literal["ctr", "ctr_bid"] = "ctr",
        strict: bool = False,
    ) -> list[dict[str, float | int]]:
        """The ``top`` candidates by predicted CTR, or by CTR × bid (each candidate's ``bid``).

        Each candidate is scored as the record ``{**user, **context, **candidate}``; the user
        and context fields are encoded once for all candidates. Returns
        ``[{"index", "score", "ctr"}, ...]`` best first (ties keep candidate order). ``strict``:
        keys other than the model's fields (and a candidate's ``bid``) raise :class:`DataError`.
        """
        if by not in RANK_BY:
            raise DataError(f"rank by 'ctr' or 'ctr_bid', not {by!r}")
        if isinstance(top, bool) or not isinstance(top, int):
            raise DataError(f"top must be an integer, not {top!r}")
        encoded = self.encode_rank(user, context, candidates, strict=strict)
        return self.ranked(self.predict_encoded(encoded), candidates, top=top, by=by)

    def encode_rank(
        self, user: Record, context: Record, candidates: Sequence[Record], *, strict: bool = False
    ) -> EncodedArrays:
        """The candidates of :meth:`rank` encoded, user and context fields shared."""
        encoder = self.encoder
        encoder.check_mapping(user, "user", encoder.names if strict else None)
        encoder.check_mapping(context, "context", encoder.names if strict else None)
        keys = encoder.check_keys(candidates, "candidates", frozenset((BID,))) if strict else None
        return encoder.encode(candidates, {**user, **context}, where="candidates", keys=keys)

    @staticmethod
    def ranked(
        ctr: np.ndarray,
        candidates: Sequence[Record],
        *,
        top: int = 10,
        by: Literal["ctr", "ctr_bid"] = "ctr",
    ) -> list[dict[str, float | int]]:
        """The ``top`` of :meth:`rank` from the candidates' click probabilities ``ctr``."""
        score = ctr * bids_of(candidates) if by == "ctr_bid" else ctr
        order = np.argsort(-score, kind="stable")[: max(top, 0)]
        return [
            {"index": i, "score": float(score[i]), "ctr": float(ctr[i])} for i in order.tolist()
        ]


def bids_of(candidates: Sequence[Record]) -> np.ndarray:
    """Every candidate's ``bid`` as float64; a missing, negative or non-finite bid is an error."""
    raw = [candidate.get(BID) for candidate in candidates]
    if all(type(b) is float or type(b) is int for b in raw):  # the usual case, as one array
        try:
            bids = np.array(raw, dtype=np.float64)
        except OverflowError:  # an integer beyond float64: the loop below names it
            pass
        else:
            if np.isfinite(bids).all() and (bids >= 0).all():
                return bids
    bids = np.empty(len(candidates), dtype=np.float64)
    for i, candidate in enumerate(candidates):
        value = candidate.get(BID)
        try:
            if isinstance(value, bool):
                raise ValueError("a bid is a number, not true/false")
            bid = number_of(value)
        except ValueError as exc:
            raise DataError(str(exc), path=f"candidates[{i}]", field=BID) from None
        if bid is None:
            raise DataError(
                "ranking by ctr_bid needs a bid on every candidate",
                path=f"candidates[{i}]",
                field=BID,
            )
        if bid < 0 or not math.isfinite(bid):
            raise DataError(f"a bid must be >= 0, not {bid}", path=f"candidates[{i}]", field=BID)
        bids[i] = bid
    return bids


def check_finite(ctr: np.ndarray) -> np.ndarray:
    """``ctr``, or :class:`DataError` naming the first row whose score is not finite (extreme
    input values overflowing the model) rather than answering NaN."""
    if not np.isfinite(ctr).all():
        row = int(np.flatnonzero(~np.isfinite(ctr))[0])
        raise DataError(
            "the model's score is not a finite number: a value of this record is too large "
            "for the model",
            path=f"row {row}",
        )
    return ctr
