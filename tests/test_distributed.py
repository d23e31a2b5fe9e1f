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

from conftest import REPO
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
    from deepfm.train.distributed import Distributed
    from deepfm.train.trainer import data_parallel

    data, out, sparse = sys.argv[1], sys.argv[2], sys.argv[3] == "sparse"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def dense_only(collective):  # as NCCL: no sparse tensor may go through a collective
        def checked(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, list) else [tensor]
            assert not any(t.is_sparse for t in tensors), "a sparse tensor in a collective"
            return collective(tensor, *args, **kwargs)
        return checked

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        setattr(dist, name, dense_only(getattr(dist, name)))
    dataset = load_dataset(get_format("criteo"), [data], split=SplitSpec.parse("none"))
    train = dataset.train
    torch.manual_seed(0)
    model = build_model(InputLayout.of(dataset.feature_map),
                        ModelConfig("deepfm", hidden=(32, 32), dropout=0.0, l2=1e-3))
    tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for m in tables:
        m.sparse = sparse
    context = Distributed.current()
    row_tables = [m.weight for m in tables] if sparse else []
    ddp = data_parallel(model, context, torch.device("cpu"), row_tables)
    # sparse tables stay out of DDP (the reducer would all-reduce them, NCCL cannot)
    table_names = {n for n, p in model.named_parameters() if any(p is t for t in row_tables)}
    assert set(ddp.parameters_to_ignore) == table_names and (table_names or not sparse)
    rows = slice(ROWS * rank // world, ROWS * (rank + 1) // world)
    ids, labels = torch.from_numpy(train.ids[rows]), torch.from_numpy(train.labels[rows])
    loss = F.binary_cross_entropy_with_logits(ddp(ids, None), labels) + regularization(model)
    loss.backward()
    context.average_row_gradients(row_tables)
    grads = {n: p.grad.to_dense().contiguous() for n, p in model.named_parameters()}
    save_file(grads, f"{out}/grads-{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()
    """
).replace("ROWS", str(ROWS))


@pytest.fixture(scope="module")
def criteo(generated_criteo):
    path = generated_criteo.train
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
    assert metrics["setup"]["world"] == 2
    assert metrics["setup"]["lr"] == pytest.approx(3e-3 * math.sqrt(2))
    manifest = json.loads((store / "manifest.json").read_text())
    # each rank trained on its half of the training split (rows // 2 per rank), 2 epochs (the
    # LR fitted first as DeepFM's fallback counts its seconds, not its samples)
    per_rank = manifest["rows"]["train"] // 2
    assert metrics["history"][0]["train_loss"] > 0 and metrics["epochs_run"] == 2
    assert metrics["valid"]["auc"] > 0.6
    samples = metrics["train_samples_per_s"] * metrics["train_seconds"]
    assert samples == pytest.approx(per_rank * 2 * 2, rel=1e-9)


TRAINER_RUN = textwrap.dedent(
    """
    import hashlib, json, sys, types, torch
    from deepfm.data.formats import get_format
    from deepfm.data.pipeline import load_dataset
    from deepfm.data.splits import SplitSpec
    from deepfm.errors import ConfigError
    from deepfm.models import ModelConfig, build_model, get_entry
    from deepfm.nn import InputLayout
    from deepfm.train import trainer as T
    from deepfm.train.distributed import Distributed, process_group_session

    data, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    context = Distributed.from_env("cpu")
    scored = []
    predict = T.predict_logits
    def counting(model, rows, *args, **kwargs):
        scored.append(len(rows))
        return predict(model, rows, *args, **kwargs)
    T.predict_logits = counting
    if mode == "diverge" and context.rank == 1:
        # this rank's loss value turns NaN (its gradients stay finite): the other rank's
        # epoch is finite, so before the loss was summed over ranks only this one stopped
        bce = T.F.binary_cross_entropy_with_logits
        nan = lambda *a, **k: bce(*a, **k) + float("nan")
        T.F = types.SimpleNamespace(binary_cross_entropy_with_logits=nan)
    dataset = load_dataset(get_format("criteo"), [data], split=SplitSpec.parse("random:0.9"))
    torch.manual_seed(0)
    model = build_model(InputLayout.of(dataset.feature_map),
                        ModelConfig("deepfm", hidden=(16,), dropout=0.5))
    draws = []
    config = T.TrainConfig(epochs=1, batch_size=256, progress=False, threads=1, device="cpu",
                           embedding_updates="sparse")
    trainer = T.Trainer(config, context)
    with process_group_session():
        try:
            trainer.fit(model, get_entry("deepfm"), dataset.train, dataset.valid,
                        on_step=lambda step: draws.append(int(torch.randint(1 << 30, ()))))
            scored.clear()
            metrics = trainer.evaluate(model, dataset.test)
        except ConfigError as error:
            result = {"error": str(error)}
        else:
            digest = hashlib.sha256()
            for value in model.state_dict().values():
                digest.update(value.numpy().tobytes())
            result = {"draws": draws, "scored": scored, "metrics": metrics,
                      "weights": digest.hexdigest()}
    with open(f"{out}/rank-{context.rank}.json", "w") as f:
        json.dump(result, f)
    """
)


def spawn_two(script: Path, args: list[str], tmp_path: Path, timeout: float) -> list[dict]:
    """Two ranks started as plain processes (no torchrun agent that would kill the other rank
    when one fails): each must end by itself within ``timeout`` seconds."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        for rank in ranks:
            _, stderr = rank.communicate(timeout=timeout)
            assert rank.returncode == 0, stderr[-3000:]
    finally:
        for rank in ranks:
            rank.kill()
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]


def test_ranks_draw_their_own_masks_stay_in_sync_and_score_their_shards(tmp_path, criteo):
    path, _ = criteo
    script = tmp_path / "run.py"
    script.write_text(TRAINER_RUN)
    first, second = spawn_two(script, [str(path), str(tmp_path), "train"], tmp_path, 300)
    assert first["draws"] != second["draws"]  # seed + rank: different dropout masks
    assert first["weights"] == second["weights"]  # tables exchanged by rows, the rest by DDP
    assert first["metrics"] == second["metrics"]
    test_rows = len(
        load_dataset(get_format("criteo"), [str(path)], split=SplitSpec.parse("random:0.9")).test
    )
    # the final evaluation: each rank scored its half of the test split, once
    assert first["scored"] == [test_rows // 2] and second["scored"] == [test_rows - test_rows // 2]


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, criteo):
    path, _ = criteo
    script = tmp_path / "run.py"
    script.write_text(TRAINER_RUN)
    # before the loss was summed over the ranks, rank 0 waited in the next collective until
    # gloo's 30-minute timeout: here both must end within 3 minutes, with the message
    results = spawn_two(script, [str(path), str(tmp_path), "diverge"], tmp_path, 180)
    assert all("training diverged" in r.get("error", "") for r in results), results
