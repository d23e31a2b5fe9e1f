"""Data parallelism on CPU with 2 processes (gloo): gradients, learning-rate scaling, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import REPO, shared_file
from deepfm.data.formats import get_format
from deepfm.data.pipeline import load_dataset
from deepfm.data.splits import SplitSpec
from deepfm.models import ModelConfig, build_model
from deepfm.nn import InputLayout, regularization
from deepfm.train.distributed import lr_scale

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ROWS = 256  # the combined batch; each of the 2 ranks takes 128 contiguous rows

GRADIENTS = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
    from safetensors.torch import save_file
    from deepfm.data.formats import get_format
    from deepfm.data.pipeline import load_dataset
    from deepfm.data.splits import SplitSpec
    from deepfm.models import ModelConfig, build_model
    from deepfm.nn import InputLayout, regularization

    data, out, sparse = sys.argv[1], sys.argv[2], sys.argv[3] == "sparse"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = load_dataset(get_format("criteo"), [data], split=SplitSpec.parse("none"))
    train = dataset.train
    torch.manual_seed(0)
    model = build_model(InputLayout.of(dataset.feature_map),
                        ModelConfig("deepfm", hidden=(32, 32), dropout=0.0, l2=1e-3))
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.sparse = sparse
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = slice(ROWS * rank // world, ROWS * (rank + 1) // world)
    ids, labels = torch.from_numpy(train.ids[rows]), torch.from_numpy(train.labels[rows])
    loss = F.binary_cross_entropy_with_logits(ddp(ids, None), labels) + regularization(model)
    loss.backward()
    grads = {n: p.grad.to_dense().contiguous() for n, p in model.named_parameters()}
    save_file(grads, f"{out}/grads-{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()
    """
).replace("ROWS", str(ROWS))


@pytest.fixture(scope="module")
def criteo():
    path = shared_file("criteo", "criteo_train_sample.txt")
    return path, load_dataset(get_format("criteo"), [str(path)], split=SplitSpec.parse("none"))


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*TORCHRUN, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("updates", ["dense", "sparse"])
def test_two_process_gradients_equal_one_process_on_the_combined_batch(tmp_path, criteo, updates):
    path, dataset = criteo
    script = tmp_path / "grads.py"
    script.write_text(GRADIENTS)
    done = torchrun([str(script), str(path), str(tmp_path), updates], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.manual_seed(0)
    model = build_model(
        InputLayout.of(dataset.feature_map),
        ModelConfig("deepfm", hidden=(32, 32), dropout=0.0, l2=1e-3),
    )
    ids = torch.from_numpy(dataset.train.ids[:ROWS])
    labels = torch.from_numpy(dataset.train.labels[:ROWS])
    loss = F.binary_cross_entropy_with_logits(model(ids, None), labels) + regularization(model)
    loss.backward()
    ranks = [load_file(str(tmp_path / f"grads-{r}.safetensors")) for r in range(2)]
    for name, parameter in model.named_parameters():
        # DDP averages the two half-batch gradients: the mean of two means of 128 rows is the
        # mean of the 256 rows in exact arithmetic; float32 sums in another order differ by a
        # few ulps of the largest terms, hence rtol 1e-5 and atol 1e-7 (gradients are ~1e-3)
        torch.testing.assert_close(ranks[0][name], parameter.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0)


def test_lr_scaling_rules():
    assert lr_scale("none", 4) == 1.0 and lr_scale("linear", 4) == 4.0
    assert lr_scale("sqrt", 2) == pytest.approx(math.sqrt(2))


def test_torchrun_two_processes_train_from_a_store_and_rank_0_writes(tmp_path, criteo):
    from deepfm.cli import main

    path, _ = criteo
    store = tmp_path / "store"
    assert main(["prepare", "--input", str(path), "--out", str(store), "--quiet"]) == 0
    bundle = tmp_path / "bundle"
    args = ["-m", "deepfm", "train", "--store", str(store), "--out", str(bundle), "--epochs", "2"]
    args += ["--hidden", "16", "--batch-size", "256", "--quiet", "--threads", "1"]
    done = torchrun([*args, "--lr-scaling", "sqrt", "--device", "cpu"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"train_samples_per_s"') == 1  # only rank 0 reports
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["training"]["world"] == 2
    assert metrics["training"]["lr"] == pytest.approx(3e-3 * math.sqrt(2))
    manifest = json.loads((store / "manifest.json").read_text())
    # each rank trained on its half of the training split (rows // 2 per rank), 2 epochs
    per_rank = manifest["rows"]["train"] // 2
    assert metrics["history"][0]["train_loss"] > 0 and metrics["epochs_run"] == 2
    assert metrics["valid"]["auc"] > 0.6
    samples = metrics["train_samples_per_s"] * metrics["train_seconds"]
    assert samples == pytest.approx(per_rank * 2 * 2, rel=1e-9)
