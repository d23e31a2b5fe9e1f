"""CUDA paths (``pytest -m gpu``; about a minute on one GPU): compiled static-shape training with
CUDA graphs learns like eager training, sparse and dense updates, residency, the current device.
Generated data (planted order-1 and order-2 effects), so nothing outside the repository is read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfm.data.encoded import EncodedArrays
from deepfm.models import ModelConfig, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.train.trainer import TrainConfig, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIELDS, VALUES = 8, 200


def planted(rows: int, seed: int) -> EncodedArrays:
    """Ids of 8 fields x 200 values; clicks from order-1 effects and one field pair."""
    rng = np.random.default_rng(seed)
    local = rng.integers(0, VALUES, (rows, FIELDS))
    effects = np.random.default_rng(0).normal(0, 1, (FIELDS, VALUES))
    pair = np.random.default_rng(1).normal(0, 1.5, (VALUES, VALUES))
    logit = effects[np.arange(FIELDS), local].sum(1) * 0.5 + pair[local[:, 0], local[:, 1]] - 1
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    ids = (local + np.arange(FIELDS) * VALUES).astype(np.int32)
    return EncodedArrays(ids, None, labels, np.arange(rows, dtype=np.int64))


def train(**options):
    layout = InputLayout(FIELDS * VALUES, (1,) * FIELDS)
    torch.manual_seed(0)
    model = build_model(layout, ModelConfig("deepfm", hidden=(64, 64), dropout=0.2))
    config = TrainConfig(
        **{"epochs": 3, "batch_size": 1000, "progress": False, "device": "cuda", **options}
    )
    # 30,500 rows: the last batch of each epoch has 500 (padded when compiled)
    return Trainer(config).fit(model, get_entry("deepfm"), planted(30_500, 1), planted(5_000, 2))


def test_compiled_static_shapes_train_like_eager():
    eager = train()
    compiled = train(compile=True)
    assert compiled.setup["compiled"] and eager.setup["precision"] == "tf32"
    assert eager.best_valid["auc"] > 0.7
    # other kernels and dropout streams: close, not identical
    assert abs(compiled.best_valid["auc"] - eager.best_valid["auc"]) < 0.01


@pytest.mark.parametrize("updates", ["dense", "sparse"])
def test_updates_and_resident_data_on_cuda(updates):
    result = train(embedding_updates=updates, precision="bf16")
    assert result.setup["embedding_updates"] == updates
    assert result.setup["batches"] == "device-resident" and result.setup["precision"] == "bf16"
    assert result.best_valid["auc"] > 0.7


def test_the_training_device_becomes_current():
    last = torch.cuda.device_count() - 1
    result = train(device=f"cuda:{last}", epochs=1)
    assert result.setup["device"] == f"cuda:{last}" and torch.cuda.current_device() == last
