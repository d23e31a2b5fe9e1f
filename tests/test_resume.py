"""Checkpoints: kill -9 in the middle of training, resume, finish as if never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from deepfm.cli import main
from deepfm.data.formats import get_format
from deepfm.data.pipeline import load_dataset
from deepfm.data.splits import SplitSpec
from deepfm.errors import ConfigError
from deepfm.models import ModelConfig, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.train import checkpoint as ckpt
from deepfm.train.trainer import TrainConfig, Trainer


def run(dataset, on_step=None, **options):
    torch.manual_seed(0)
    layout = InputLayout.of(dataset.feature_map)
    model = build_model(layout, ModelConfig("deepfm", hidden=(32, 32), dropout=0.5))
    config = TrainConfig(epochs=3, batch_size=512, patience=5, progress=False, seed=0, **options)
    result = Trainer(config).fit(
        model, get_entry("deepfm"), dataset.train, dataset.valid, on_step=on_step
    )
    return model, result


KILL = textwrap.dedent(
    """
    import os, signal, sys, torch
    from deepfm.data.formats import get_format
    from deepfm.data.pipeline import load_dataset
    from deepfm.data.splits import SplitSpec
    from deepfm.models import ModelConfig, build_model, get_entry
    from deepfm.nn import InputLayout
    from deepfm.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(2)
    data, directory, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dataset = load_dataset(get_format("criteo"), [data], split=SplitSpec.parse("random:0.9"))
    torch.manual_seed(0)
    model = build_model(InputLayout.of(dataset.feature_map),
                        ModelConfig("deepfm", hidden=(32, 32), dropout=0.5))
    config = TrainConfig(epochs=3, batch_size=512, patience=5, progress=False, seed=0,
                         checkpoint_every=7, checkpoint_dir=directory)

    def on_step(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no flush

    Trainer(config).fit(model, get_entry("deepfm"), dataset.train, dataset.valid, on_step=on_step)
    """
)


@pytest.fixture(scope="module")
def criteo(generated_criteo):
    path = generated_criteo.train
    dataset = load_dataset(get_format("criteo"), [str(path)], split=SplitSpec.parse("random:0.9"))
    return path, dataset


@pytest.fixture(scope="module")
def uninterrupted(criteo):
    return run(criteo[1])


def same_run(a, b) -> None:
    (model_a, result_a), (model_b, result_b) = a, b
    # on CPU with fixed threads the resumed run replays the same batches, dropout masks and
    # kernels, so we expect equality; the stated tolerance (1e-6 on AUC and Logloss, 1e-6 on
    # weights) only leaves room for a different BLAS path, not for a different trajectory
    for ha, hb in zip(result_a.history, result_b.history, strict=True):
        for key in ("train_loss", "valid_auc", "valid_logloss"):
            assert ha[key] == pytest.approx(hb[key], abs=1e-6), key
    assert result_a.best_epoch == result_b.best_epoch
    for (name, x), (_, y) in zip(
        model_a.state_dict().items(), model_b.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(
    tmp_path, criteo, uninterrupted
):
    path, dataset = criteo
    directory = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # 18 steps per epoch: killed at step 40 of 54 (epoch 3), after the checkpoint of step 35
    done = subprocess.run(
        [sys.executable, "-c", KILL, str(path), str(directory), "40"], env=env, check=False
    )
    assert done.returncode == -9
    assert json.loads((directory / "latest.json").read_text())["step"] == 35
    resumed = run(dataset, resume=str(directory), checkpoint_every=7)
    assert len(resumed[1].history) == 3
    same_run(resumed, uninterrupted)


def test_a_damaged_or_half_written_checkpoint_is_never_loaded(tmp_path, criteo, uninterrupted):
    _, dataset = criteo
    directory = tmp_path / "checkpoints"

    def stop(step):
        if step == 30:
            raise KeyboardInterrupt  # an interrupted run, checkpoints at 14, 21, 28 (kept 2)

    with pytest.raises(KeyboardInterrupt):
        run(dataset, on_step=stop, checkpoint_every=7, checkpoint_dir=str(directory))
    folders = sorted(p.name for p in directory.glob("ckpt-*"))
    assert folders == ["ckpt-000000021", "ckpt-000000028"]
    # the newest is damaged (a flipped byte), and a crash left a half-assembled folder
    weights = directory / "ckpt-000000028" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    partial = directory / ".ckpt-000000035.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    loaded = ckpt.load_latest(directory)
    assert loaded.step == 21  # the damaged newest one is skipped
    resumed = run(dataset, resume=str(directory), checkpoint_every=7)
    same_run(resumed, uninterrupted)
    assert not partial.exists()  # stale half-assembled folders are cleared at the start
    for folder in directory.glob("ckpt-*"):
        (folder / "state.json").unlink()
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        ckpt.load_latest(directory)


def test_cli_checkpoints_and_resume(tmp_path, capsys, criteo_train):
    data = criteo_train
    args = ["train", "--data", str(data), "--epochs", "2", "--hidden", "16", "--quiet"]
    args += ["--batch-size", "512", "--threads", "2"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(first), "--checkpoint-every", "10"]) == 0
    assert (tmp_path / "a.checkpoints" / "latest.json").exists()
    # resuming from the last checkpoint (step 30 of 36) finishes with the same metrics
    assert main([*args, "--out", str(second), "--resume", str(tmp_path / "a.checkpoints")]) == 0
    a = json.loads((first / "metrics.json").read_text())
    b = json.loads((second / "metrics.json").read_text())
    assert a["valid"]["auc"] == pytest.approx(b["valid"]["auc"], abs=1e-6)
    assert a["test"]["logloss"] == pytest.approx(b["test"]["logloss"], abs=1e-6)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "c"), "--resume", str(tmp_path / "none")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    other = ["--hidden", "8"]
    assert (
        main(
            [
                *args,
                *other,
                "--out",
                str(tmp_path / "d"),
                "--resume",
                str(tmp_path / "a.checkpoints"),
            ]
        )
        == 2
    )
    # the checkpoints belong to a run with other settings: refused, naming the difference
    assert "model_config.hidden: [16] in the checkpoint, [8] now" in capsys.readouterr().err
