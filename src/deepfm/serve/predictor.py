"""Scoring raw records with a bundle: encode with the saved feature map, one batched forward pass.

Unseen values map to their field's OOV id and absent or null values to its missing id, exactly as
in training, so a record never fails for carrying a value the model has not seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import FeatureMap
from deepfm.data.reader import RawChunk
from deepfm.errors import DataError
from deepfm.serve.bundle import Bundle, load_bundle

Record = Mapping[str, Any]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: Any, index: int, name: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"{value!r} is not a number", path="record", line=index, field=name
        ) from None
    if not math.isfinite(number):
        raise DataError("NaN or infinite number", path="record", line=index, field=name)
    return number


def records_table(feature_map: FeatureMap, records: Sequence[Record]) -> pa.Table:
    """Raw records (dicts) → the column table the feature map encodes. Extra keys are ignored."""
    columns: dict[str, pa.Array] = {}
    for spec in feature_map.schema.fields:
        name = spec.name
        raw = [record.get(name) for record in records]
        if spec.kind == "numeric":
            columns[name] = pa.array(
                [_number(v, i, name) for i, v in enumerate(raw)], type=pa.float64()
            )
        elif spec.kind == "multi":
            columns[name] = pa.array(
                [
                    spec.separator.join(_text(x) or "" for x in v)
                    if isinstance(v, list | tuple)
                    else _text(v)
                    for v in raw
                ],
                type=pa.string(),
            )
        else:
            columns[name] = pa.array([_text(v) for v in raw], type=pa.string())
    return pa.table(columns)


class Predictor:
    """``Predictor.load(DIR)``; ``predict_proba(records)``; ``rank(user, context, candidates)``."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu") -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = bundle.model.to(self.device).eval()
        self.feature_map = bundle.feature_map

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Predictor:
        return cls(load_bundle(directory, device=device), device)

    def encode(self, records: Sequence[Record] | pa.Table) -> EncodedArrays:
        table = (
            records if isinstance(records, pa.Table) else records_table(self.feature_map, records)
        )
        lines = np.arange(1, table.num_rows + 1, dtype=np.int64)
        return self.feature_map.encode(RawChunk(table, lines, "<records>"))

    @torch.inference_mode()
    def predict_encoded(self, encoded: EncodedArrays) -> np.ndarray:
        if len(encoded) == 0:
            return np.zeros(0, dtype=np.float64)
        ids = torch.from_numpy(encoded.ids).to(self.device)
        values = (
            None if encoded.values is None else torch.from_numpy(encoded.values).to(self.device)
        )
        logits = self.model(ids, values).double().cpu().numpy()
        return 1.0 / (1.0 + np.exp(-logits))

    def predict_proba(self, records: Sequence[Record] | pa.Table) -> np.ndarray:
        """Click probability of each record, in order."""
        return self.predict_encoded(self.encode(records))

    def rank(
        self,
        user: Record,
        context: Record,
        candidates: Sequence[Record],
        *,
        top: int = 10,
        by: Literal["ctr", "ctr_bid"] = "ctr",
    ) -> list[dict[str, float | int]]:
        """The ``top`` candidates by predicted CTR, or by CTR × bid (each candidate's ``bid``).

        Returns ``[{"index", "score", "ctr"}, ...]`` best first (ties keep candidate order).
        """
        if by not in ("ctr", "ctr_bid"):
            raise DataError(f"rank by 'ctr' or 'ctr_bid', not {by!r}")
        records = [{**user, **context, **candidate} for candidate in candidates]
        ctr = self.predict_proba(records)
        score = ctr
        if by == "ctr_bid":
            bids = [_number(c.get("bid"), i, "bid") for i, c in enumerate(candidates)]
            if any(b is None for b in bids):
                missing = next(i for i, b in enumerate(bids) if b is None)
                raise DataError(
                    "ranking by ctr_bid needs a bid on every candidate",
                    path="candidate",
                    line=missing,
                    field="bid",
                )
            score = ctr * np.asarray(bids, dtype=np.float64)
        order = np.argsort(-score, kind="stable")[: max(top, 0)]
        return [{"index": int(i), "score": float(score[i]), "ctr": float(ctr[i])} for i in order]
