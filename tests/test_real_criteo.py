"""DeepFM-D on the real Criteo sample (11,212 rows, ../shared/data/criteo)."""

from deepfm.data.formats import get_format
from deepfm.data.pipeline import load_dataset
from deepfm.data.splits import SplitSpec
from deepfm.models import ModelConfig
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig


def test_deepfm_reaches_auc_070_on_held_out_criteo_rows(real_criteo_train):
    dataset = load_dataset(
        get_format("criteo"), [real_criteo_train], split=SplitSpec.parse("random:0.9"), seed=0
    )
    assert len(dataset.test) > 1000
    trained = fit_and_evaluate(
        dataset, ModelConfig(name="deepfm"), TrainConfig(seed=0, progress=False, threads=2)
    )
    # 0.70 is the bar; with ~1,100 test rows the AUC's standard error is about 0.016,
    # and the default model lands near 0.75, so the bar fails only if learning is broken.
    assert trained.metrics["test"]["auc"] > 0.70
