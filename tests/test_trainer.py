"""The trainer's speed paths give the same results as the plain path; updates, precision, flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfm.data.formats import get_format
from deepfm.data.pipeline import load_dataset
from deepfm.data.splits import SplitSpec
from deepfm.errors import ConfigError
from deepfm.models import ModelConfig, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.train import trainer as trainer_module
from deepfm.train.metrics import auc_logloss, standard_errors
from deepfm.train.trainer import (
    Batches,
    TrainConfig,
    Trainer,
    evaluate,
    monitor_score,
    predict_logits,
    use_sparse_updates,
)


@pytest.fixture(scope="module")
def criteo(generated_criteo):
    path = generated_criteo.train
    return load_dataset(get_format("criteo"), [str(path)], split=SplitSpec.parse("random:0.9"))


def fit(dataset, name="deepfm", **options):
    torch.manual_seed(0)
    model = build_model(InputLayout.of(dataset.feature_map), ModelConfig(name, hidden=(32, 32)))
    config = TrainConfig(
        **{"epochs": 2, "batch_size": 512, "progress": False, "seed": 0, **options}
    )
    result = Trainer(config).fit(model, get_entry(name), dataset.train, dataset.valid)
    return model, result


def history(result):
    return [(h["train_loss"], h["valid_auc"], h["valid_logloss"]) for h in result.history]


def test_same_seed_same_metrics_and_sync_equals_async_loading(criteo):
    _, first = fit(criteo)
    _, again = fit(criteo)
    _, sync = fit(criteo, sync_loading=True)
    # bit-identical on CPU with a fixed thread count: same batches, same order, same kernels
    assert history(first) == history(again) == history(sync)
    assert first.setup["batches"] == "asynchronous" and sync.setup["batches"] == "synchronous"


def test_fit_uses_its_thread_count_and_gives_the_callers_back(criteo):
    seen = []
    before = torch.get_num_threads()
    assert before != 1  # conftest sets 2: otherwise this test could not fail
    config = TrainConfig(epochs=1, batch_size=2048, progress=False, threads=1)
    model = build_model(InputLayout.of(criteo.feature_map), ModelConfig("lr"))
    Trainer(config).fit(
        model, get_entry("lr"), criteo.train, on_step=lambda _: seen.append(torch.get_num_threads())
    )
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


def test_monitor_scores_by_hand():
    metrics = {"auc": 0.75, "logloss": 0.5}
    assert monitor_score(metrics, "auc") == 0.75
    assert monitor_score(metrics, "logloss") == -0.5
    assert monitor_score(metrics, "auc-logloss") == 0.25
    assert monitor_score({"auc": float("nan"), "logloss": 0.5}, "auc") == -0.5  # one class
    with pytest.raises(ConfigError, match="monitor"):
        TrainConfig(monitor="accuracy")


def test_standard_errors_match_the_spread_over_repeated_splits():
    # 300 validation splits of 1,000 rows (20% clicks) scored by one fixed model: the spread
    # of their AUC and Logloss against the formulas on one split. Hanley-McNeil assumes
    # exponential score distributions and overstates a binormal model's by about 10%; 300
    # draws measure a standard deviation to within about 4% (one standard error)
    rng = np.random.default_rng(0)
    aucs, loglosses = [], []
    for _ in range(300):
        labels = (rng.random(1000) < 0.2).astype(np.float64)
        p = 1 / (1 + np.exp(1.5 - rng.normal(size=1000) - 0.8 * labels))
        metrics = auc_logloss(labels, p)
        aucs.append(metrics["auc"])
        loglosses.append(metrics["logloss"])
    errors = standard_errors(labels, p)
    assert 0.95 < errors["auc"] / np.std(aucs) < 1.3
    assert 0.85 < errors["logloss"] / np.std(loglosses) < 1.15
    single = standard_errors(np.zeros(10), np.full(10, 0.1))  # one class: no AUC
    assert np.isnan(single["auc"]) and single["logloss"] == 0.0


def test_the_restored_epoch_is_the_best_by_the_monitored_score():
    # the Frappe sample: validation AUC keeps creeping up while Logloss turns after epoch 3,
    # so the three monitors pick different epochs (measured: 6, 3 and 5). Without the id
    # prior: with it, Logloss still improves at epoch 6 and all three pick 6
    from conftest import shared_file

    path = shared_file("frappe", "frappe.validation.libfm")
    frappe = load_dataset(get_format("frappe"), [str(path)], split=SplitSpec.parse("random:0.9"))
    best = {}
    for monitor in ("auc", "logloss", "auc-logloss"):
        model, result = fit(
            frappe, epochs=6, patience=6, batch_size=2048, monitor=monitor, id_prior=0
        )
        scores = [monitor_score({"auc": a, "logloss": ll}, monitor) for _, a, ll in history(result)]
        assert result.best_epoch == 1 + scores.index(max(scores))
        restored = evaluate(model, Batches(frappe.valid), 4096)
        chosen = result.history[result.best_epoch - 1]
        assert restored["logloss"] == pytest.approx(chosen["valid_logloss"])
        best[monitor] = result.best_epoch
    assert len(set(best.values())) >= 2, best  # otherwise this test could not tell them apart


def test_device_resident_batches_equal_streamed_batches(criteo, monkeypatch):
    _, streamed = fit(criteo)
    monkeypatch.setattr(trainer_module, "plan_residency", lambda *args: (True, True))
    _, resident = fit(criteo)
    assert resident.setup["batches"] == "device-resident"
    assert history(resident) == history(streamed)


def test_sparse_row_updates_train_as_well_as_dense_adam(criteo):
    _, dense = fit(criteo, embedding_updates="dense")
    sparse_model, sparse = fit(criteo, embedding_updates="sparse")
    assert dense.setup["embedding_updates"] == "dense"
    assert sparse.setup["embedding_updates"] == "sparse"
    # lazy Adam is another optimiser (moments of unused rows do not decay), so results differ,
    # but both must learn: AUC well above chance and within 0.02 of each other. On the
    # generated rows (planted logistic effects) two epochs reach about 0.67; with ~1,000
    # validation rows the AUC's standard error is ~0.02, so 0.62 fails only if learning broke
    assert sparse.best_valid["auc"] > 0.62 and dense.best_valid["auc"] > 0.62
    assert abs(sparse.best_valid["auc"] - dense.best_valid["auc"]) < 0.02
    # the trained model is an ordinary module again (dense gradients, plain state dict)
    assert not any(getattr(m, "sparse", False) for m in sparse_model.modules())


def test_embedding_updates_are_chosen_per_device_and_table_size(criteo):
    layout = InputLayout.of(criteo.feature_map)
    model = build_model(layout, ModelConfig("deepfm", hidden=(8,)))
    entry = get_entry("deepfm")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    slots = criteo.feature_map.num_slots
    # 4,686 table rows: small next to the 4 x 64 x 39 ids of a batch → dense; large → sparse
    assert not use_sparse_updates(model, entry, TrainConfig(batch_size=64), cpu, slots)
    assert use_sparse_updates(model, entry, TrainConfig(batch_size=4), cpu, slots)
    # one GPU: dense up to 64x the ids of a batch (4,686 rows in the two tables: sparse at
    # batch 1, 64 x 39 ids; dense at batch 4)
    assert not use_sparse_updates(model, entry, TrainConfig(batch_size=4), cuda, slots)
    assert use_sparse_updates(model, entry, TrainConfig(batch_size=1), cuda, slots)
    # under DDP a dense table is all-reduced whole every step: the CPU rule, on any device
    assert use_sparse_updates(model, entry, TrainConfig(batch_size=4), cuda, slots, world=2)
    assert not use_sparse_updates(model, entry, TrainConfig(batch_size=64), cuda, slots, 2)
    forced = TrainConfig(batch_size=64, embedding_updates="sparse")
    assert use_sparse_updates(model, entry, forced, cuda, slots)
    lr_model = build_model(layout, ModelConfig("lr"))
    assert not use_sparse_updates(lr_model, get_entry("lr"), forced, cpu, slots)  # FTRL


def test_bf16_is_a_cuda_setting_and_cpu_runs_fp32(criteo):
    _, fp32 = fit(criteo)
    _, bf16 = fit(criteo, precision="bf16", device="cpu")
    assert bf16.setup["precision"] == "fp32" and history(bf16) == history(fp32)
    with pytest.raises(ConfigError):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError):
        TrainConfig(embedding_updates="lazy")
    with pytest.raises(ConfigError):
        TrainConfig(lr_scaling="cube")
    with pytest.raises(ConfigError, match="directory"):
        TrainConfig(checkpoint_every=10)


def test_evaluation_reads_batches_or_arrays_alike(criteo):
    model, _ = fit(criteo)
    from_arrays = predict_logits(model, criteo.test, 1000)
    from_tensors = predict_logits(model, Batches(criteo.test), 1000)
    np.testing.assert_array_equal(from_arrays, from_tensors)
    assert evaluate(model, criteo.test) == evaluate(model, Batches(criteo.test))
    assert len(from_arrays) == len(criteo.test)


@pytest.mark.slow
def test_compiled_model_trains_to_the_same_quality(criteo):
    _, plain = fit(criteo)
    _, compiled = fit(criteo, compile=True)
    # compiled kernels fuse and reorder float operations: close, not bit-identical
    assert abs(compiled.best_valid["auc"] - plain.best_valid["auc"]) < 0.01


def test_lazy_adam_is_sparse_adam_on_the_touched_rows_only():
    from deepfm.train.lazy_adam import LazyAdam

    torch.manual_seed(0)
    ours, reference = torch.nn.Embedding(50, 4, sparse=True), torch.nn.Embedding(50, 4, sparse=True)
    reference.weight.data.copy_(ours.weight.data)
    untouched = ours.weight.data[40:].clone()
    optimizers = [
        LazyAdam(ours.parameters(), lr=0.01),
        torch.optim.SparseAdam(reference.parameters(), lr=0.01),
    ]
    for _ in range(5):
        ids = torch.randint(0, 40, (32, 3), dtype=torch.int32)  # rows 40-49 never used
        for table, optimizer in zip((ours, reference), optimizers, strict=True):
            optimizer.zero_grad()
            (table(ids) ** 2).sum().backward()
            optimizer.step()
    # the same rule, computed with other kernels: equal up to float32 rounding (1e-6 of ~1)
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-6, rtol=0)
    assert torch.equal(ours.weight.data[40:], untouched)


class FakeCuda:
    """The torch.cuda calls the device code makes, answered without a GPU."""

    def __init__(self, free: int, reserved: int = 0, allocated: int = 0) -> None:
        self.free, self.reserved, self.allocated = free, reserved, allocated
        self.current: list[torch.device] = []

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 1 << 40))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "set_device", self.current.append)


def test_residency_weighs_both_splits_and_the_training_state_against_free_memory(
    criteo, monkeypatch
):
    from deepfm.train.trainer import plan_residency, split_bytes, training_bytes

    cuda = torch.device("cuda", 0)
    train, valid = criteo.train, criteo.valid
    t, v = split_bytes(train), split_bytes(valid)
    model = build_model(InputLayout.of(criteo.feature_map), ModelConfig("deepfm", hidden=(400,)))
    need = training_bytes(model, sparse=False, batch_size=4096, eval_batch_size=65536, slots=39)
    params = sum(p.numel() for p in model.parameters())
    assert need > 4 * 3 * params  # Adam's moments and the gradients, besides activations
    fake = FakeCuda(free=need + 2 * (t + v))  # RESIDENT_SHARE = 0.5: exactly both splits
    fake.install(monkeypatch)
    assert plan_residency(cuda, need, train, valid) == (True, True)
    fake.free -= 2  # one byte short: the training split first, validation streamed
    assert plan_residency(cuda, need, train, valid) == (True, False)
    # each split alone would fit in what is free: together they do not
    fake.free = need + 2 * max(t, v) + 2
    assert plan_residency(cuda, need, train, valid) == (True, False)
    fake.free = need + 2 * t - 2
    assert plan_residency(cuda, need, train, valid)[0] is False
    # PyTorch's cached but unused blocks count as free
    fake.reserved, fake.allocated = 4, 2
    assert plan_residency(cuda, need, train, valid)[0] is True
    # without the training state, the old check kept splits that leave no room to train
    assert plan_residency(cuda, 0, train, valid) == (True, True)
    assert plan_residency(torch.device("cpu"), need, train, valid) == (False, True)


def test_the_training_device_becomes_the_current_cuda_device(monkeypatch):
    from deepfm.train.distributed import Distributed
    from deepfm.train.trainer import use_device

    fake = FakeCuda(free=0)
    fake.install(monkeypatch)
    device = use_device(Distributed().device("cuda:1"))
    assert device == torch.device("cuda", 1) and fake.current == [device]
    # under torchrun each rank takes the GPU of its LOCAL_RANK; another index is refused
    rank = Distributed(rank=1, world=2, local_rank=1)
    assert rank.device("cuda") == torch.device("cuda", 1) == rank.device("cuda:1")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        rank.device("cuda:0")
    with pytest.raises(ConfigError, match="cuda:N"):
        rank.device("gpu")


def test_a_resumed_optimiser_keeps_this_runs_implementation_flags(criteo):
    from deepfm.train.trainer import make_optimizer

    model = build_model(InputLayout.of(criteo.feature_map), ModelConfig("deepfm", hidden=(8,)))
    optimizer = make_optimizer(model, get_entry("deepfm"), TrainConfig())
    saved = optimizer.state_dict()
    saved[0]["param_groups"][0].update(fused=None, foreach=True)  # written elsewhere
    saved[0]["param_groups"][0]["lr"] = 0.5
    optimizer.load_state_dict(saved)
    group = optimizer.primary.param_groups[0]
    assert group["fused"] is True and not group["foreach"] and group["lr"] == 0.5


@pytest.mark.parametrize("sparse", [False, True])
def test_padded_rows_add_nothing_to_the_loss_or_the_gradients(criteo, sparse):
    from deepfm.data.loader import Batch
    from deepfm.nn import regularization
    from deepfm.train.trainer import batch_loss, padded

    layout = InputLayout.of(criteo.feature_map)
    torch.manual_seed(0)
    model = build_model(layout, ModelConfig("deepfm", hidden=(32, 32), dropout=0.5, l2=1e-3))
    for table in trainer_module.embedding_tables(model):
        table.sparse = sparse
    rows = 100
    ids, labels = criteo.train.ids[:rows], criteo.train.labels[:rows]
    batch = Batch(torch.from_numpy(ids), None, torch.from_numpy(labels))

    def gradients(batch, weights):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout streams: real rows keep their masks when padded
        loss = batch_loss(model(batch.ids, batch.values), batch.labels, weights)
        (loss + regularization(model, weights)).backward()
        return loss.detach(), {n: p.grad.to_dense() for n, p in model.named_parameters()}

    big, weights = padded(batch, 128)
    assert len(big) == 128 and weights.sum() == rows and torch.equal(big.ids[rows:], batch.ids[:28])
    loss, grads = gradients(batch, None)
    padded_loss, padded_grads = gradients(big, weights)
    # the same sums with 28 exact zeros added, in another order: float32 rounding only
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-8)
    if sparse:  # the padding touched no other table row
        table = model.embedding.table.weight
        gradients(big, weights)
        touched = table.grad.coalesce().indices()
        gradients(batch, None)
        assert torch.equal(touched, table.grad.coalesce().indices())


def test_static_shapes_train_like_eager(criteo, monkeypatch):
    _, eager = fit(criteo, batch_size=1000)  # 8,100 training rows: the last batch has 100
    # the compiled path's loop (padded last batch, weighted loss) without compiling
    monkeypatch.setattr(trainer_module, "compile_model", lambda net, device, dist: (net, True))
    _, static = fit(criteo, batch_size=1000, compile=True)
    assert static.setup["compiled"] and not eager.setup["compiled"]
    for a, b in zip(history(static), history(eager), strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_compile_without_a_compiler_runs_eagerly(criteo, monkeypatch):
    _, eager = fit(criteo)
    monkeypatch.setattr(trainer_module.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found; training runs eagerly"):
        _, fallback = fit(criteo, compile=True)
    assert fallback.setup["compiled"] is False
    assert history(fallback) == history(eager)


def test_static_prediction_equals_ragged_prediction(criteo):
    model, _ = fit(criteo)
    ragged = predict_logits(model, Batches(criteo.test), 300)
    static = predict_logits(model, Batches(criteo.test), 300, static=True)
    assert len(criteo.test) % 300 and len(static) == len(criteo.test)
    np.testing.assert_allclose(static, ragged, rtol=1e-6, atol=1e-7)
