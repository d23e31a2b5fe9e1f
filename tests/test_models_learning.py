"""Learning on the simulated app market, whose click model has planted order-2 and order-3 effects.

FM must beat LR (it can model the order-2 effects: category × hour, history × category) and
DeepFM-D must beat FM (only a deep component can model the order-3 gender × age × category
effect, whose pairwise marginals are built to cancel).

The ``user_id`` field is replaced by its OOV id in every split. With ~20k users and 80k rows a
user id is seen ~4 times in training, and every model with a deep component memorises the ids:
measured on market_dataset(200_000, 0), DeepFM-D's validation AUC peaks after epoch 1 (0.707)
and falls while its training loss keeps dropping; without user_id it climbs to 0.80. The planted
order-2/order-3 effects do not involve the user id (only the order-1 activity and the low-rank
user × app term do, and those are lost for all three models alike).

Margins, from the measured test AUCs (80k rows, 1 thread, seeds 0, 1, 2):
FM − LR = 0.062, 0.070, 0.070 and DeepFM-D − FM = 0.033, 0.020, 0.025. The asserted margins
(0.03 and 0.01) are about half the smallest observed gap, leaving room for the run-to-run
variation that thread count and early stopping bring, yet far above zero.
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


def without_user_id(dataset):
    info = next(f for f in dataset.feature_map.fields if f.name == "user_id")
    slot = sum(
        f.slots for f in dataset.feature_map.fields[: dataset.feature_map.fields.index(info)]
    )
    for part in (dataset.train, dataset.valid, dataset.test):
        part.ids[:, slot] = info.offset  # local id 0: OOV
    return dataset


def test_auc(name: str, dataset, seed: int) -> float:
    # Adam at 3e-3 (FM, DeepFM): at 1e-3 both are still improving after 10 epochs on 72k rows
    train = TrainConfig(
        epochs=15, patience=3, seed=seed, lr=None if name == "lr" else 3e-3, progress=False
    )
    model = ModelConfig(name=name, hidden=(64, 64), dropout=0.0)
    return fit_and_evaluate(dataset, model, train).metrics["test"]["auc"]


test_auc.__test__ = False  # a helper, not a test


def check_margins(seed: int) -> None:
    dataset, _ = market_dataset(ROWS, seed)
    dataset = without_user_id(dataset)
    auc = {name: test_auc(name, dataset, seed) for name in ("lr", "fm", "deepfm")}
    assert auc["fm"] - auc["lr"] >= FM_OVER_LR, auc
    assert auc["deepfm"] - auc["fm"] >= DEEPFM_OVER_FM, auc


def test_fm_beats_lr_and_deepfm_beats_fm_seed0():
    check_margins(0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_fm_beats_lr_and_deepfm_beats_fm_more_seeds(seed):
    check_margins(seed)
