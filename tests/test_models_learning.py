"""Learning on the simulated app market, whose click model has planted order-2 and order-3 effects.

FM must beat LR (it can model the order-2 effects: category × hour, history × category) and
DeepFM-D must beat FM (only a deep component can model the order-3 gender × age × category
effect, whose pairwise marginals are built to cancel).

The market's ``user_id`` field has min_count 20 (few users reach it at 80k rows, so user ids are
mostly OOV): before that, with ~4 impressions per id, every model with a deep component memorised
the ids within two epochs and DeepFM-D fell below FM.

Margins, from the measured test AUCs (80k rows, 1 thread, seeds 0, 1, 2):
FM − LR = 0.058, 0.071, 0.074 and DeepFM-D − FM = 0.035, 0.014, 0.022. The asserted margins,
0.03 and 0.01, are below the smallest observed gap (and the runs are deterministic for a fixed
seed and thread count), yet well above zero: a DeepFM-D without a working deep part equals FM.
"""

import pytest
import torch

from deepfm.experiments.demo import market_dataset
from deepfm.models import ModelConfig
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig

ROWS = 80_000
FM_OVER_LR = 0.03
DEEPFM_OVER_FM = 0.01


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the figures above were measured so, and on the shared 2-core machine
    two threads ran these small batches three times slower (7.7 s vs 2.6 s for 3 epochs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fitted_auc(name: str, dataset, seed: int) -> float:
    # Adam at 3e-3 (FM, DeepFM): at 1e-3 both were still improving after 10 epochs on 72k rows
    train = TrainConfig(
        epochs=15, patience=3, seed=seed, lr=None if name == "lr" else 3e-3, progress=False
    )
    model = ModelConfig(name=name, hidden=(64, 64), dropout=0.0)
    return fit_and_evaluate(dataset, model, train).metrics["test"]["auc"]


def check_margins(seed: int) -> None:
    dataset, _ = market_dataset(ROWS, seed)
    auc = {name: fitted_auc(name, dataset, seed) for name in ("lr", "fm", "deepfm")}
    assert auc["fm"] - auc["lr"] >= FM_OVER_LR, auc
    assert auc["deepfm"] - auc["fm"] >= DEEPFM_OVER_FM, auc


def test_fm_beats_lr_and_deepfm_beats_fm_seed0():
    check_margins(0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fm_beats_lr_and_deepfm_beats_fm_more_seeds(seed):
    check_margins(seed)
