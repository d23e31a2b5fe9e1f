"""Helpers shared by the simulate and abtest tests: short training that still learns."""

from __future__ import annotations

from deepfm.experiments.simulate import default_train_configs
from deepfm.models.registry import ModelConfig
from deepfm.train.trainer import TrainConfig

#: a small DeepFM-D: enough for the planted interactions of a small market
FAST_MODEL = ModelConfig(hidden=(64, 64))


def fast_configs(seed: int) -> dict[str, TrainConfig]:
    """Small-market training that still learns the interactions in a few seconds: Adam at 3e-3
    with batches of 512 leaves DeepFM's LR-like plateau within 2-3 epochs on 24-27k rows (at
    1e-3 a short run stays on the plateau); both LRs: FTRL at the online experiments' α."""
    return {
        "lr": default_train_configs(seed, epochs=6)["lr"],
        "deepfm": TrainConfig(
            epochs=8, patience=2, seed=seed, threads=1, progress=False, lr=3e-3, batch_size=512
        ),
    }
