"""Shared fixtures. Real datasets are read from ../shared/data (never committed to this repo);
tests that need them skip with the reason when the folder is absent. Set DEEPFM_SHARED_DATA to
point elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPFM_SHARED_DATA", REPO.parent / "shared" / "data"))

# fixed thread count: float summation order, and so results, depend on it
torch.set_num_threads(2)


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set DEEPFM_SHARED_DATA to the shared data dir)")
    return path


@pytest.fixture
def criteo_train() -> Path:
    return shared_file("criteo", "criteo_train_sample.txt")


@pytest.fixture
def criteo_test_unlabeled() -> Path:
    return shared_file("criteo", "criteo_test_unlabeled.txt")


@pytest.fixture
def criteo_csv() -> Path:
    return shared_file("criteo", "criteo_sample_deepctr.txt")


def criteo_line(label: int | None = 0, ints=None, cats=None) -> str:
    """One Criteo TSV line; ``ints``/``cats`` override the default values."""
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    cells = ([] if label is None else [str(label)]) + list(ints) + list(cats)
    return "\t".join(cells) + "\n"
